"""Orbax checkpoints of the training state, one per epoch.

Layout under ``workdir``::

    checkpoints/<epoch>/{state,meta}       last ``keep`` epochs (resume)
    checkpoints_best/<epoch>/{state,meta}  best validation accuracy (keep 1)

The orbax step number is the number of *completed* epochs. Saves are atomic
(orbax writes a temporary directory and renames it on success), so a run
killed mid-save leaves the previous checkpoint intact; leftover temporary
directories are cleaned on the next start.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

LAST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"


def checkpoint_dir(workdir: str, which: str = "last") -> str:
    if which not in ("last", "best_val"):
        raise ValueError(f"unknown checkpoint selection {which!r}; expected 'last' or 'best_val'")
    return os.path.join(os.path.abspath(workdir), LAST_DIR if which == "last" else BEST_DIR)


def _steps_on_disk(directory: str) -> list[int]:
    # Read-only probe: constructing a CheckpointManager would create dirs.
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def latest_epoch_on_disk(workdir: str, which: str = "last") -> int | None:
    """Latest completed epoch saved in ``workdir`` (None if none); writes nothing."""
    steps = _steps_on_disk(checkpoint_dir(workdir, which))
    return steps[-1] if steps else None


def _manager(directory: str, keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        # Read-only managers must not prune (orbax warns about anything else).
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        # Synchronous: a save has finished when save() returns, so the state
        # buffers can be donated to the next step and a crash right after an
        # epoch never loses that epoch. The per-epoch cost is small.
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) describing ``state`` for restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class CheckpointStore:
    """The last-N and best-validation checkpoint managers of one workdir."""

    def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
        self.workdir = workdir
        self.read_only = read_only
        self._last = _manager(checkpoint_dir(workdir, "last"), keep, read_only)
        self._best = None
        best_dir = checkpoint_dir(workdir, "best_val")
        if not read_only or os.path.isdir(best_dir):
            self._best = _manager(best_dir, 1, read_only)

    def latest_epoch(self, which: str = "last") -> int | None:
        mngr = self._last if which == "last" else self._best
        return None if mngr is None else mngr.latest_step()

    def save(self, epoch: int, state: Any, meta: dict, *, best: bool = False) -> None:
        """Saves ``state`` as completed epoch ``epoch`` (and as best if ``best``)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        self._last.save(epoch, args=args, force=True)
        if best:
            self._best.save(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: Any, *, which: str = "last",
                epoch: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)``; ``abstract_state`` fixes structure and sharding."""
        mngr = self._last if which == "last" else self._best
        if mngr is None or (epoch is None and mngr.latest_step() is None):
            raise FileNotFoundError(
                f"no {which!r} checkpoint in {checkpoint_dir(self.workdir, which)}")
        epoch = mngr.latest_step() if epoch is None else epoch
        out = mngr.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._last.close()
        if self._best is not None:
            self._best.close()


def variables_fingerprint(variables: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes.

    Identifies *which weights* a report was computed on, so that a result is
    never reused for a retrained model that merely has the same run name.
    """
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
