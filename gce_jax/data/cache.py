"""Decoded image folders and Tiny ImageNet kept as ``.npz``, keyed by the source's files.

Decoding tens of thousands of JPEGs takes minutes; reading the arrays back takes
a second. The key covers the data set's description and every source file's
size and modification time, so edited or replaced data is decoded again. The
cache lives in ``cache_dir`` (default ``$GCE_JAX_CACHE_DIR`` or
``~/.cache/gce_jax``), never in the data folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.layout import Layout
from gce_jax.data.registry import DatasetSpec
from gce_jax.provenance import atomic_open

_CACHE_VERSION = 2  # 2: the key includes the DatasetSpec


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("GCE_JAX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gce_jax"


def _fingerprint(h: Any, path: Path) -> None:
    # Size + mtime of every file: catches replaced or edited data without hashing it.
    st = path.stat()
    if path.is_file():
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            fst = os.stat(os.path.join(dirpath, f))
            h.update(f"{dirpath}/{f}|{fst.st_size}|{fst.st_mtime_ns}\n".encode())


def cached(spec: DatasetSpec, split: str, layout: Layout, cache_dir: Any,
           limit_per_class: int | None, decode: Callable[[], ArrayDataset]) -> ArrayDataset:
    """``decode()``'s result, read from the cache when its key matches, else written to it."""
    src = layout.path.resolve()
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, spec.to_dict(), split, str(src),
                                   limit_per_class]).encode())
    try:
        if layout.kind == "tar":
            _fingerprint(h, src)
        elif layout.kind == "image_folder":
            _fingerprint(h, src / split)
        else:
            for p in ("wnids.txt", "train" if split == "train" else "val"):
                if (src / p).exists():
                    _fingerprint(h, src / p)
    except OSError:
        return decode()  # unreadable layout: let the reader report it
    path = cache_root(cache_dir) / f"{spec.name}-{split}-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                names = tuple(str(s) for s in z["class_names"])
                return ArrayDataset(z["images"], z["labels"], spec.num_classes, spec.name,
                                    class_names=names or None, split=str(z["split"]),
                                    origin=str(z["origin"]))
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            pass
    ds = decode()
    try:
        # Atomic: concurrent readers never see half a file.
        with atomic_open(path, "wb") as f:
            np.savez(f, images=ds.images, labels=ds.labels, split=ds.split, origin=ds.origin,
                     class_names=np.array(ds.class_names or (), dtype=str))
    except OSError as err:
        warnings.warn(f"could not write data cache {path}: {err}", stacklevel=3)
    return ds
