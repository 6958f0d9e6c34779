"""Orbax checkpoints of the training state, one per epoch.

Layout under ``workdir``::

    checkpoints/<epoch>/{state,meta}       last ``keep`` epochs (resume)
    checkpoints_best/<epoch>/{state,meta}  best validation accuracy
    checkpoints_unreadable/                checkpoints set aside as unreadable

The orbax step number is the number of *completed* epochs. Saves are atomic
(orbax writes a temporary directory and renames it on success), and only
finalized steps are ever listed or restored, so a run killed mid-save leaves
the previous checkpoint intact; leftover temporary directories are cleaned by
the next save. Nothing is created on disk before the first save: reading a
finished run works in a read-only workdir.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

LAST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message is one line)."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """A short line for an error: the OS reason if there is one (TensorStore's
    messages run to 100+ lines around it), else ``Type: first line``."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def checkpoint_dir(workdir: str, which: str = "last") -> str:
    if which not in ("last", "best_val"):
        raise ValueError(f"unknown checkpoint selection {which!r}; expected 'last' or 'best_val'")
    return os.path.join(os.path.abspath(workdir), LAST_DIR if which == "last" else BEST_DIR)


def finalized_epochs(directory: str) -> list[int]:
    """Sorted epochs whose orbax save was committed in ``directory``; writes nothing."""
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


def latest_epoch_on_disk(workdir: str, which: str = "last") -> int | None:
    """Latest completed epoch saved in ``workdir`` (None if none); writes nothing."""
    steps = finalized_epochs(checkpoint_dir(workdir, which))
    return steps[-1] if steps else None


def _manager(directory: str, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True, cleanup_tmp_directories=True,
        # Synchronous: a save has finished when save() returns, so the state
        # buffers can be donated to the next step and a crash right after an
        # epoch never loses that epoch. The per-epoch cost is small.
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _reserve_space(directory: str, nbytes: int) -> None:
    """Fails with OSError (ENOSPC, EFBIG, EROFS, ...) unless ``nbytes`` can be
    written in ``directory``; writes no data and leaves nothing behind.

    Refusing before orbax starts gives one clean error: orbax's own failure on
    a full disk is raised while its other writes are still in flight, and
    those print 100+ lines of "Event loop is closed" tracebacks from
    TensorStore's threads after the caller has reported the failure.
    """
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".space-check-{os.getpid()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if nbytes > 0:
            os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)
        os.unlink(probe)


def _state_nbytes(state: Any, meta: dict) -> int:
    leaves = jax.tree.leaves(state)
    # 1 MiB for orbax's metadata, the OCDBT manifest and ``meta``.
    return sum(int(getattr(x, "nbytes", 0)) for x in leaves) + len(repr(meta)) + (1 << 20)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) describing ``state`` for restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class CheckpointStore:
    """The last-N and best-validation checkpoints of one workdir.

    ``save(..., which='last')`` keeps the newest ``keep`` epochs;
    ``which='best_val'`` keeps only the epoch just saved (the others are
    deleted after it is committed, so a kill in between leaves both). Reads go
    through a plain orbax ``Checkpointer`` and never create or modify files.
    """

    def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
        self.workdir = workdir
        self.keep = keep
        self.read_only = read_only
        self._writers: dict[str, ocp.CheckpointManager] = {}
        self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

    def _writer(self, which: str) -> ocp.CheckpointManager:
        if self.read_only:
            raise CheckpointError(f"{self.workdir}: the checkpoint store is read-only")
        if which not in self._writers:
            self._writers[which] = _manager(checkpoint_dir(self.workdir, which),
                                            self.keep if which == "last" else None)
        return self._writers[which]

    def epochs(self, which: str = "last") -> list[int]:
        """Finalized epochs on disk, oldest first."""
        return finalized_epochs(checkpoint_dir(self.workdir, which))

    def latest_epoch(self, which: str = "last") -> int | None:
        steps = self.epochs(which)
        return steps[-1] if steps else None

    def save(self, epoch: int, state: Any, meta: dict, *, which: str = "last") -> None:
        """Saves ``state`` and ``meta`` as completed epoch ``epoch``.

        Raises CheckpointError (cause chained) if the write fails, e.g. on a
        full disk or a read-only workdir.
        """
        directory = checkpoint_dir(self.workdir, which)
        try:
            mngr = self._writer(which)  # a read-only store refuses before any write
            if jax.process_index() == 0:
                _reserve_space(directory, _state_nbytes(state, meta))
            mngr.save(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            if which == "best_val":
                for old in mngr.all_steps():
                    if old != epoch:
                        mngr.delete(old)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- orbax/TensorStore raise many types
            self._remove_partial(directory, epoch)
            raise CheckpointError(f"could not write the checkpoint of epoch {epoch} to "
                                  f"{directory}: {one_line(e)}") from e

    @staticmethod
    def _remove_partial(directory: str, epoch: int) -> None:
        """Frees what a failed save wrote (it may have failed for lack of space)."""
        if jax.process_index() != 0 or not os.path.isdir(directory):
            return
        for name in os.listdir(directory):
            if ocp.utils.is_tmp_checkpoint(os.path.join(directory, name)):
                try:
                    step = ocp.utils.step_from_checkpoint_name(name)
                except ValueError:
                    continue
                if step == epoch:
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def _path(self, epoch: int, which: str) -> str:
        return os.path.join(checkpoint_dir(self.workdir, which), str(epoch))

    def restore(self, abstract_state: Any, *, which: str = "last",
                epoch: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)``; ``abstract_state`` fixes structure and sharding.

        Raises FileNotFoundError when there is no such checkpoint and
        CheckpointError (cause chained) when it cannot be read.
        """
        epoch = self.latest_epoch(which) if epoch is None else epoch
        if epoch is None or epoch not in self.epochs(which):
            what = f"{which!r} checkpoint" + ("" if epoch is None else f" of epoch {epoch}")
            raise FileNotFoundError(f"no {what} in {checkpoint_dir(self.workdir, which)}")
        try:
            out = self._reader.restore(self._path(epoch, which), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self._path(epoch, which)} is unreadable: "
                                  f"{one_line(e)}") from e
        return out["state"], dict(out["meta"])

    def read_meta(self, epoch: int, which: str = "last") -> dict:
        """The JSON ``meta`` of one checkpoint (cheap: no arrays are read)."""
        try:
            out = self._reader.restore(self._path(epoch, which),
                                       args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self._path(epoch, which)} is unreadable: "
                                  f"{one_line(e)}") from e
        return dict(out["meta"])

    def restore_newest_intact(self, abstract_state: Any, which: str = "last"
                              ) -> tuple[int, Any, dict, list[tuple[int, str]]]:
        """``(epoch, state, meta, skipped)`` from the newest readable checkpoint.

        ``skipped`` lists ``(epoch, reason)`` of newer checkpoints that could
        not be read. When none can be read, the newest one's error is raised:
        then the cause is more likely a changed model than a damaged disk.
        """
        epochs = self.epochs(which)
        if not epochs:
            raise FileNotFoundError(f"no {which!r} checkpoint in "
                                    f"{checkpoint_dir(self.workdir, which)}")
        skipped: list[tuple[int, str]] = []
        first_error: CheckpointError | None = None
        for epoch in reversed(epochs):
            try:
                state, meta = self.restore(abstract_state, which=which, epoch=epoch)
            except CheckpointError as e:
                first_error = first_error or e
                skipped.append((epoch, str(e)))
                continue
            return epoch, state, meta, skipped
        raise first_error

    def set_aside(self, epoch: int, which: str = "last") -> str:
        """Moves an unreadable checkpoint to ``checkpoints_unreadable/``; returns where."""
        dest_root = os.path.join(os.path.abspath(self.workdir), UNREADABLE_DIR)
        base = os.path.join(dest_root, f"{os.path.basename(checkpoint_dir(self.workdir, which))}"
                                       f"_{epoch}")
        dest, n = base, 1
        while os.path.exists(dest):
            n += 1
            dest = f"{base}.{n}"
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            shutil.move(self._path(epoch, which), dest)
        self._sync(f"set_aside_{which}_{epoch}")
        if which in self._writers:
            self._writers[which].reload()
        return dest

    def delete(self, epoch: int, which: str = "last") -> None:
        try:
            self._writer(which).delete(epoch)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"could not delete {self._path(epoch, which)}: "
                                  f"{one_line(e)}") from e

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            from orbax.checkpoint import multihost
            multihost.sync_global_processes(name)

    def close(self) -> None:
        for mngr in self._writers.values():
            mngr.close()


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
