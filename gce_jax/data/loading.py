"""``load_split``: one split of a registered data set, from local files or tfds, into memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gce_jax.data.arrays import ArrayDataset, limit_per_class as _limit_per_class, resize_dataset
from gce_jax.data.cache import cached
from gce_jax.data.cifar import load_cifar_pickles
from gce_jax.data.idx import load_idx
from gce_jax.data.images import load_image_folder, load_tar, tar_holds_pickles
from gce_jax.data.layout import describe_layout, fail, find_layout, holds_tfds, pickle_format
from gce_jax.data.registry import DataError, DatasetSpec, dataset_from_config, get_dataset
from gce_jax.data.tfds_source import load_tfds
from gce_jax.data.tiny_imagenet import load_tiny_imagenet

Source = Literal["auto", "local", "tfds"]


def load_split(
    name: str | DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    limit_per_class: int | None = None,
) -> ArrayDataset:
    """Load one split of a registered data set fully into memory.

    Args:
      name: a registered name (``mnist | cifar10 | cifar100 | tiny_imagenet |
        digits`` or one added by ``register_dataset``), or a ``DatasetSpec``.
      split: one of the data set's splits, usually ``train | test``; tiny_imagenet
        also ``val`` (its official val set, which ``test`` also returns because the
        official test labels are not public).
      data_dir: for ``local``, the folder (or ``.tar.gz``) with a known layout;
        for ``tfds``, the tfds data_dir (``None`` = tfds default).
      source: ``auto`` (local if ``data_dir`` holds a known layout, tfds if it is
        a tfds data_dir with the set prepared or ``None``), ``local`` or ``tfds``.
        Ignored for ``digits`` (scikit-learn's bundled copy).
      cache_dir: where decoded image folders / Tiny ImageNet are cached as ``.npz``
        (default ``$GCE_JAX_CACHE_DIR`` or ``~/.cache/gce_jax``); never the data folder.
      cache: set False to neither read nor write that cache.
      limit_per_class: keep only the first ``k`` examples of each class (for quick
        tests); image folders then decode only those files.

    Raises:
      DataError: naming the path and the expected layout, for every bad input
        (a ``data_dir`` that does not exist or holds no known layout included).
    """
    spec = get_dataset(name)
    if split not in spec.splits:
        hint = " (for model selection use train_val_split on 'train')" if split == "val" else ""
        raise DataError(f"{spec.name} has no split {split!r}; use one of {spec.splits}{hint}")
    if source not in ("auto", "local", "tfds"):
        raise DataError(f"source must be 'auto', 'local' or 'tfds', got {source!r}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be >= 1, got {limit_per_class}")

    if "sklearn_digits" in spec.formats:
        ds = _load_digits(spec, split)
    elif _reads_tfds(spec, data_dir, source):
        ds = load_tfds(spec, split, data_dir, auto=source == "auto")
    else:
        ds = _load_local(spec, split, data_dir, cache_dir, cache, limit_per_class)
    if limit_per_class is not None:
        ds = _limit_per_class(ds, limit_per_class)
    if ds.image_shape != spec.image_shape:  # guards every reader at once
        raise fail(spec, ds.origin, f"images have shape {ds.image_shape}, expected {spec.image_shape}")
    return ds


def resolved_source(name: str, data_dir: Any, source: Source) -> str:
    """``'local'`` or ``'tfds'``: where :func:`load_split` reads ``name`` from with this
    ``data_dir`` and ``source`` (``'auto'`` resolved as it would be)."""
    return "tfds" if _reads_tfds(get_dataset(name), data_dir, source) else "local"


def _reads_tfds(spec: DatasetSpec, data_dir: Any, source: Source) -> bool:
    """Whether ``source`` and ``data_dir`` mean tfds (local otherwise)."""
    if source != "auto":
        return source == "tfds"
    if not spec.formats:
        return True
    if data_dir is None:
        return spec.tfds_name is not None
    path = Path(data_dir)
    try:
        if find_layout(spec, path) is not None:
            return False
        return path.is_dir() and holds_tfds(spec, path)
    except OSError:
        return False  # unreadable: let the local reader report it with the layout


def _load_local(spec: DatasetSpec, split: str, data_dir: Any, cache_dir: Any, cache: bool,
                limit_per_class: int | None) -> ArrayDataset:
    if data_dir is None:
        raise DataError(f"reading {spec.name} from local files needs data_dir; expected "
                        f"layout for {spec.name}: {describe_layout(spec)}")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise fail(spec, data_dir, "data_dir does not exist")
    try:
        return _load_layout(spec, split, data_dir, cache_dir, cache, limit_per_class)
    except OSError as err:  # e.g. permissions; the readers wrap expected failures themselves
        raise fail(spec, getattr(err, "filename", None) or data_dir,
                   f"unreadable data ({type(err).__name__}: {err})") from err


def _load_layout(spec: DatasetSpec, split: str, data_dir: Path, cache_dir: Any, cache: bool,
                 limit_per_class: int | None) -> ArrayDataset:
    layout = find_layout(spec, data_dir)
    if layout is None:
        tfds_hint = (f", nor a tfds data_dir with {spec.tfds_name!r} prepared (source='tfds' "
                     "prepares one)") if spec.tfds_name else ""
        raise fail(spec, data_dir, f"data_dir holds no known {spec.name} layout{tfds_hint}")
    if layout.kind == "idx":
        return load_idx(spec, layout.path, split)
    if layout.kind == "cifar_pickle":
        return load_cifar_pickles(spec, pickle_format(spec), split, layout.path)

    def decode() -> ArrayDataset:
        if layout.kind == "tiny_imagenet":
            return load_tiny_imagenet(spec, layout.path, split, limit_per_class)
        if layout.kind == "image_folder":
            return load_image_folder(spec, split, layout.path, limit_per_class)
        return load_tar(spec, split, layout.path, limit_per_class)

    if layout.kind == "tar" and tar_holds_pickles(spec, layout.path):
        return decode()  # pickled arrays are fast to read, no point caching
    if not cache:
        return decode()
    return cached(spec, split, layout, cache_dir, limit_per_class, decode)


def _load_digits(spec: DatasetSpec, split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    # Fixed 80/20 split; sorted so each part keeps the original order.
    perm = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(0.2 * len(labels)))
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return ArrayDataset(
        images[idx], labels[idx], spec.num_classes, spec.name, class_names=spec.class_names,
        split=split, origin="sklearn.datasets.load_digits (seeded 80/20 split)",
    )


def load_config_split(config: Any, split: str | None = None, **kwargs: Any) -> ArrayDataset:
    """``split`` (default ``config.data.test_split``) of the data set a training
    config names (:func:`dataset_from_config`), from ``config.data.data_dir`` /
    ``source``, resized to ``config.data.resize`` if set. ``kwargs`` go to
    :func:`load_split`."""
    data = config.get("data") or {}
    split = split or data.get("test_split", "test")
    ds = load_split(dataset_from_config(config), split, data_dir=data.get("data_dir"),
                    source=data.get("source", "auto"), **kwargs)
    if data.get("resize"):
        ds = resize_dataset(ds, tuple(data["resize"]))
    return ds
