"""Published model weights: one folder per trained model, usable without its run.

A training run's ``workdir`` holds orbax checkpoints, optimizer state and logs;
it is large, machine-local and not kept. What results depend on is published
as a small folder in one documented format::

    <folder>/
      variables.msgpack  the selected checkpoint's inference variables
                         ({'params'[, 'batch_stats']}), flax.serialization msgpack
      config.json        the run's resolved training config (as in the workdir)
      metrics.jsonl      the run's per-epoch training metrics
      manifest.json      format version, sha256 of variables.msgpack, the
                         variables' tree fingerprint (checkpoint.variables_fingerprint,
                         what evaluation reports record), selection and selected
                         epoch, the command that trained the model, git commit,
                         hardware, date

:func:`load_published` checks the sha256 before it deserialises anything.
``experiments.evaluate --workdir <folder>`` and ``experiments.reproduce
--weights_dir <dir>`` accept published folders wherever a run workdir goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import flax.serialization
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from gce_jax.provenance import write_json

FORMAT = "gce_jax.published_weights/1"
VARIABLES_FILE = "variables.msgpack"
MANIFEST_FILE = "manifest.json"


class WeightsError(ValueError):
    """A published-weights folder is missing, incomplete or fails its checksum."""


def is_published(path: str) -> bool:
    """Whether ``path`` is a published-weights folder (has a manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _selected_epoch(metrics: list[dict], selection: str) -> int | None:
    if not metrics:
        return None
    if selection == "best_val":
        scored = [m for m in metrics if m.get("val_acc") is not None]
        # The first epoch reaching the best accuracy, as the training loop keeps it.
        return max(scored, key=lambda m: (m["val_acc"], -m["epoch"]))["epoch"] if scored else None
    return metrics[-1]["epoch"]


def publish(workdir: str, out_dir: str, *, command: str, provenance: dict[str, Any],
            selection: str | None = None) -> dict[str, Any]:
    """Writes ``workdir``'s selected weights to ``out_dir`` (which must not exist).

    The folder is assembled beside ``out_dir`` and renamed into place, so an
    interrupted publish leaves nothing at ``out_dir``. Returns the manifest.
    """
    from gce_jax.checkpoint import variables_fingerprint
    from gce_jax.train import load_for_eval

    if os.path.exists(out_dir):
        raise WeightsError(f"{out_dir!r} exists; refusing to overwrite published weights")
    _, variables, config = load_for_eval(workdir, selection)
    which = selection or config.selection
    variables = jax.device_get(variables)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".publish-", dir=parent)
    try:
        vpath = os.path.join(tmp, VARIABLES_FILE)
        with open(vpath, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(
                jax.tree.map(np.asarray, dict(variables))))
        shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(tmp, "config.json"))
        shutil.copyfile(os.path.join(workdir, "metrics.jsonl"),
                        os.path.join(tmp, "metrics.jsonl"))
        manifest = {
            "format": FORMAT,
            "name": os.path.basename(os.path.normpath(out_dir)),
            "model": config.model,
            "dataset": config.dataset,
            "sha256": _sha256(vpath),
            "variables_sha256": variables_fingerprint(variables),
            "selection": which,
            "selected_epoch": _selected_epoch(metrics, which),
            "epochs_trained": metrics[-1]["epoch"] if metrics else 0,
            "command": command,
            **provenance,
        }
        write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """The folder's manifest; :class:`WeightsError` if it is missing or unreadable."""
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path!r}: no readable {MANIFEST_FILE} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{path!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_published(path: str) -> tuple[nn.Module, dict, ml_collections.ConfigDict]:
    """``(model, variables, config)`` from a published folder, like ``train.load_for_eval``.

    The model is built in inference form; the variables are checked against
    the manifest's sha256 before they are deserialised.
    """
    from gce_jax.train import create_model

    manifest = read_manifest(path)
    vpath = os.path.join(path, VARIABLES_FILE)
    if not os.path.isfile(vpath):
        raise WeightsError(f"{path!r}: {VARIABLES_FILE} is missing")
    digest = _sha256(vpath)
    if digest != manifest["sha256"]:
        raise WeightsError(f"{vpath!r}: sha256 {digest} does not match the manifest's "
                           f"{manifest['sha256']}")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path!r}: unreadable config.json ({e})") from None
    with open(vpath, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    model = create_model(config, config.resolved.num_classes, bn_axis_name=None)
    return model, jax.tree.map(jax.numpy.asarray, variables), config
