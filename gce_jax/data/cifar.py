"""CIFAR-10 / CIFAR-100's official python pickles, read without running pickled code."""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.layout import PickleFormat, fail
from gce_jax.data.registry import DatasetSpec
from gce_jax.provenance import portable_path


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/numpy arrays only: a pickle can otherwise run any code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles from numpy 1.x
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return getattr(importlib.import_module(module), name)


def _unpickle(spec: DatasetSpec, where: Any, raw: bytes) -> dict[str, Any]:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ...
        raise fail(spec, where, f"truncated or corrupt pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise fail(spec, where, f"corrupt pickle: expected a dict, got {type(obj).__name__}")
    # Official files come from Python 2 (bytes keys); re-pickled copies may use str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_batch(spec: DatasetSpec, fmt: PickleFormat, where: Any,
                raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(images NHWC, labels)`` of one pickled batch."""
    d = _unpickle(spec, where, raw)
    if "data" not in d or fmt.label_key not in d:
        raise fail(spec, where, f"corrupt batch: keys {sorted(d)} lack 'data' or {fmt.label_key!r}")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[fmt.label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise fail(spec, where, f"corrupt batch: {err}") from err
    h, w, c = spec.image_shape
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != h * w * c:
        raise fail(spec, where, f"corrupt batch: data is {data.dtype} {data.shape}, "
                                f"expected uint8 [N, {h * w * c}]")
    if labels.shape != (len(data),):
        raise fail(spec, where, f"corrupt batch: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise fail(spec, where, f"labels outside [0, {spec.num_classes})")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B), each plane row-major.
    return data.reshape(-1, c, h, w).transpose(0, 2, 3, 1), labels.astype(np.int32)


def cifar_class_names(spec: DatasetSpec, fmt: PickleFormat, where: Any,
                      raw: bytes | None) -> tuple[str, ...] | None:
    """The registered class names, else the meta file's (``None`` without either).

    A meta file present is checked either way: a wrong one means wrong files.
    """
    if raw is None:  # meta is informational; the labels are in the batches
        return spec.class_names
    d = _unpickle(spec, where, raw)
    names = d.get(fmt.names_key)
    if names is None:
        raise fail(spec, where, "corrupt meta file: no label names")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(names) != spec.num_classes:
        raise fail(spec, where, f"class-count mismatch: meta lists {len(names)} classes, "
                                f"expected {spec.num_classes}")
    return spec.class_names or names


def assemble(spec: DatasetSpec, split: str, parts: list[tuple[np.ndarray, np.ndarray]],
             class_names: tuple[str, ...] | None, origin: str) -> ArrayDataset:
    return ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        spec.num_classes, spec.name, class_names=class_names, split=split,
                        origin=origin)


def load_cifar_pickles(spec: DatasetSpec, fmt: PickleFormat, split: str, d: Path) -> ArrayDataset:
    """``split`` from the extracted official folder ``d``."""
    if split not in fmt.files:
        raise fail(spec, d, f"the official batches hold no split {split!r}")
    parts = []
    for f in fmt.files[split]:
        p = d / f
        if not p.is_file():
            raise fail(spec, p, "missing CIFAR batch file")
        try:
            raw = p.read_bytes()
        except OSError as err:
            raise fail(spec, p, f"unreadable file ({err})") from err
        parts.append(cifar_batch(spec, fmt, p, raw))
    meta_path = d / fmt.meta
    names = cifar_class_names(spec, fmt, meta_path,
                              meta_path.read_bytes() if meta_path.is_file() else None)
    return assemble(spec, split, parts, names, f"pickle:{portable_path(d)}")
