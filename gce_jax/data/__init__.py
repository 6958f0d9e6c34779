"""Datasets as in-memory uint8 arrays, and a fast deterministic numpy batch pipeline.

Every supported dataset fits in memory as uint8, so loading materialises the whole
split once (``load_split``) and batching is a numpy gather over a pre-permuted index
(``batches``): cheap enough that a small model never waits for data.

Sources:

* ``source='local'`` reads the official on-disk formats under ``data_dir``
  (MNIST IDX files, CIFAR python pickles, ``split/class/*.png|jpg`` image folders,
  optionally inside a ``.tar.gz``, and the ``tiny-imagenet-200`` folder).
* ``source='tfds'`` reads ``tfds.data_source(name, split=..., data_dir=...)``
  (array_record). TensorFlow is only needed to *prepare* a tfds download
  (``pip install .[prepare]``).
* ``source='auto'`` uses the local reader when ``data_dir`` holds a recognised
  layout, tfds otherwise.
* ``digits`` is scikit-learn's bundled 8x8 digits set and needs neither.

Model selection must use ``train_val_split`` on the training split, never the test set.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ArrayDataset",
    "DataError",
    "DATASETS",
    "CIFAR10_CLASSES",
    "augment_batch",
    "batches",
    "dataset_info",
    "grain_batches",
    "load_split",
    "num_batches",
    "train_val_split",
]

# name -> (image_shape HWC, num_classes)
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "tiny_imagenet": ((64, 64, 3), 200),
    "digits": ((8, 8, 1), 10),
}

# Official CIFAR-10 label order (batches.meta); alphabetical order would differ.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

_SPLITS = {
    "mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    # Official Tiny ImageNet test labels are not public: 'test' means the official val set.
    "tiny_imagenet": ("train", "val", "test"),
    "digits": ("train", "test"),
}

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
_TAR_EXTS = (".tar.gz", ".tgz", ".tar")
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim
_CIFAR10_PICKLES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR100_PICKLES = {"train": ("train",), "test": ("test",)}
_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_CACHE_VERSION = 1

_IMAGE_FOLDER_LAYOUT = "image folders <split>/<class>/*.png|jpg (a folder, or a .tar.gz of it)"
_LAYOUTS = {
    "mnist": (
        "the official IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz) in data_dir "
        f"or data_dir/mnist; or {_IMAGE_FOLDER_LAYOUT} with 10 classes of 28x28 images"
    ),
    "cifar10": (
        "the official python batches cifar-10-batches-py/{data_batch_1..data_batch_5, "
        "test_batch, batches.meta} (data_dir = that folder, its parent, or "
        f"cifar-10-python.tar.gz); or {_IMAGE_FOLDER_LAYOUT} with the 10 CIFAR-10 "
        "classes of 32x32 images"
    ),
    "cifar100": (
        "the official python files cifar-100-python/{train, test, meta} (data_dir = that "
        f"folder, its parent, or cifar-100-python.tar.gz); or {_IMAGE_FOLDER_LAYOUT} "
        "with 100 classes of 32x32 images"
    ),
    "tiny_imagenet": (
        "tiny-imagenet-200/{wnids.txt (200 wnids), train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG, val/val_annotations.txt} (data_dir = that folder or its parent)"
    ),
}


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message names the path and
    the expected layout."""


def _fail(name: str, path: Any, problem: str) -> DataError:
    layout = _LAYOUTS.get(name)
    msg = f"{problem} [{path}]"
    if layout:
        msg += f". Expected layout for {name}: {layout}"
    return DataError(msg)


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class ArrayDataset:
    """One split held in memory.

    images: uint8 ``[N, H, W, C]``; labels: int32 ``[N]`` in ``[0, num_classes)``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None
    split: str = ""
    origin: str = ""  # where it was read from, for logs and reports

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        labels = np.asarray(self.labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N={len(images)}], got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got "
                f"[{labels.min()}, {labels.max()}]"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.num_classes} classes"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray | Sequence[int], split: str | None = None) -> ArrayDataset:
        """A new dataset with the examples at ``indices`` (copied), same metadata."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            split=self.split if split is None else split,
        )


def resize_dataset(ds: ArrayDataset, size: tuple[int, int]) -> ArrayDataset:
    """Bilinear resize of every image to ``size = (h, w)``, still uint8.

    Used to run 28x28 models (LeNet-5) on the 8x8 digits in the offline
    quickstart; done once at load time so the pipeline stays a gather.
    """
    from PIL import Image

    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize needs a positive (h, w), got {size}")
    if ds.image_shape[:2] == (h, w):
        return ds
    channels = ds.image_shape[2]
    out = np.empty((len(ds), h, w, channels), np.uint8)
    for i, img in enumerate(ds.images):
        for c in range(channels):
            out[i, :, :, c] = np.asarray(
                Image.fromarray(img[:, :, c]).resize((w, h), Image.BILINEAR))
    return dataclasses.replace(ds, images=out)


def dataset_info(name: str) -> tuple[tuple[int, int, int], int]:
    """``(image_shape HWC, num_classes)`` for ``name``, without loading any data."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------- loading


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    source: Literal["auto", "local", "tfds"] = "auto",
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    limit_per_class: int | None = None,
) -> ArrayDataset:
    """Load one split of ``name`` fully into memory.

    Args:
      name: ``mnist | cifar10 | cifar100 | tiny_imagenet | digits``.
      split: ``train | test``; tiny_imagenet also ``val`` (its official val set, which
        ``test`` also returns because the official test labels are not public).
      data_dir: for ``local``, the folder (or ``.tar.gz``) with an official layout;
        for ``tfds``, the tfds data_dir (``None`` = tfds default).
      source: ``auto`` (local if ``data_dir`` holds a recognised layout, else tfds),
        ``local`` or ``tfds``. Ignored for ``digits`` (scikit-learn's bundled copy).
      cache_dir: where decoded image folders / Tiny ImageNet are cached as ``.npz``
        (default ``$GCE_JAX_CACHE_DIR`` or ``~/.cache/gce_jax``); never the data folder.
      cache: set False to neither read nor write that cache.
      limit_per_class: keep only the first ``k`` examples of each class (for quick
        tests); image folders then decode only those files.

    Raises:
      DataError: naming the path and the expected layout, for every bad input.
    """
    shape, _ = dataset_info(name)
    if split not in _SPLITS[name]:
        hint = " (for model selection use train_val_split on 'train')" if split == "val" else ""
        raise DataError(f"{name} has no split {split!r}; use one of {_SPLITS[name]}{hint}")
    if source not in ("auto", "local", "tfds"):
        raise DataError(f"source must be 'auto', 'local' or 'tfds', got {source!r}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be >= 1, got {limit_per_class}")

    if name == "digits":
        ds = _load_digits(split)
    elif source == "tfds" or (source == "auto" and name != "tiny_imagenet"
                              and not _has_local_layout(name, data_dir)):
        if name == "tiny_imagenet":
            raise _fail(name, data_dir, "tiny_imagenet is not in the tfds catalog; "
                                        "read it with source='local'")
        ds = _load_tfds(name, split, data_dir, auto=source == "auto")
    else:
        if data_dir is None:
            raise DataError(f"source='local' needs data_dir; expected layout for {name}: "
                            f"{_LAYOUTS[name]}")
        ds = _load_local(name, split, Path(data_dir), cache_dir, cache, limit_per_class)
    if limit_per_class is not None:
        ds = _limit_per_class(ds, limit_per_class)
    if ds.image_shape != shape:  # guards every reader at once
        raise _fail(name, ds.origin, f"images have shape {ds.image_shape}, expected {shape}")
    return ds


def _limit_per_class(ds: ArrayDataset, k: int) -> ArrayDataset:
    # Stable: keeps the first k of each class in the dataset's own order.
    order = np.argsort(ds.labels, kind="stable")
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(ds), np.int64)
    rank[order] = np.arange(len(ds)) - np.repeat(starts, counts)
    keep = np.flatnonzero(rank < k)
    if len(keep) == len(ds):
        return ds
    return ds.subset(keep)


# --------------------------------------------------------------------------- digits


def _load_digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    # Fixed 80/20 split; sorted so each part keeps the original order.
    perm = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(0.2 * len(labels)))
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return ArrayDataset(
        images[idx], labels[idx], 10, "digits",
        class_names=tuple(str(i) for i in range(10)), split=split,
        origin="sklearn.datasets.load_digits (seeded 80/20 split)",
    )


# --------------------------------------------------------------------------- tfds


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_is_prepared(tfds: Any, name: str, data_dir: Any) -> bool:
    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # noqa: BLE001 - only refines an error message
        return False


def _load_tfds(name: str, split: str, data_dir: Any, *, auto: bool) -> ArrayDataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(f"source='tfds' for {name} needs tensorflow-datasets ({err}); or pass "
                        f"source='local' with data_dir holding {_LAYOUTS[name]}") from err

    where = data_dir if data_dir is not None else "the default tfds data_dir (~/tensorflow_datasets)"
    also = ""
    if auto:
        also = f" (data_dir also has no local layout; expected {_LAYOUTS[name]})"
    # download=False first: without TensorFlow tfds cannot prepare, and its own errors
    # for that case are unrelated-looking ImportErrors.
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many unrelated types here
        if _tfds_is_prepared(tfds, name, data_dir):
            state = (f"is in {where} but cannot be opened for random access ({err}); "
                     "it must be prepared with file_format='array_record'")
        else:
            state = f"is not prepared in {where}"
        if not _tensorflow_available():
            raise DataError(
                f"tfds dataset {name!r} split {split!r} {state}. Preparing (download + "
                "convert) needs TensorFlow, which is not installed: pip install "
                "'.[prepare]' (tensorflow-cpu), or pass source='local' with a data_dir "
                f"holding the official files{also}"
            ) from err
        try:
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=True)
        except Exception as err2:  # noqa: BLE001
            raise DataError(
                f"tfds could not prepare {name!r} split {split!r} in {where}{also}: {err2}"
            ) from err2

    shape, num_classes = DATASETS[name]
    n = len(src)
    images = np.empty((n,) + shape, np.uint8)
    labels = np.empty((n,), np.int32)
    # Per-item reads: __getitems__ is not supported by tfds' mocked sources, and
    # array_record is built for random access anyway.
    try:
        for i in range(n):
            ex = src[i]
            img = np.asarray(ex["image"])
            if img.shape != shape:
                raise DataError(
                    f"tfds {name} example {i} has image shape {img.shape}, expected {shape} [{where}]"
                )
            images[i] = img
            labels[i] = int(ex["label"])  # cifar100: 'label' is the fine label
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt records surface as many types
        raise DataError(f"could not read tfds {name} split {split!r} from {where}: {err}") from err
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"tfds {name} labels outside [0, {num_classes}) in {where}")

    class_names = None
    try:
        names = src.dataset_info.features["label"].names
        if len(names) == num_classes:
            class_names = tuple(names)
    except Exception:  # noqa: BLE001 - metadata is optional (absent under mocks)
        pass
    return ArrayDataset(images, labels, num_classes, name, class_names=class_names,
                        split=split, origin=f"tfds:{name}/{split} in {where}")


# --------------------------------------------------------------------------- local layouts


@dataclasses.dataclass(frozen=True)
class _Layout:
    kind: Literal["idx", "cifar_pickle", "image_folder", "tar", "tiny_imagenet"]
    path: Path


def _is_tar(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(_TAR_EXTS)


def _has_split_dirs(d: Path) -> bool:
    return any((d / s).is_dir() and any(c.is_dir() for c in (d / s).iterdir())
               for s in ("train", "test"))


def _find_layout(name: str, data_dir: Path) -> _Layout | None:
    """The first recognised layout under ``data_dir`` (``None`` if there is none)."""
    if _is_tar(data_dir):
        return _Layout("tar", data_dir) if name != "tiny_imagenet" else None
    if not data_dir.is_dir():
        return None
    if name == "tiny_imagenet":
        for d in (data_dir, data_dir / "tiny-imagenet-200"):
            if (d / "wnids.txt").is_file() or (d / "val" / "val_annotations.txt").is_file():
                return _Layout("tiny_imagenet", d)
        return None
    if name == "mnist":
        for d in (data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"):
            if any((d / (f + ext)).is_file() for fs in _MNIST_FILES.values() for f in fs
                   for ext in ("", ".gz")):
                return _Layout("idx", d)
    else:
        pickles = (_CIFAR10_PICKLES if name == "cifar10" else _CIFAR100_PICKLES)
        meta = "batches.meta" if name == "cifar10" else "meta"
        for d in (data_dir, data_dir / _CIFAR_DIRS[name]):
            if any((d / f).is_file() for fs in pickles.values() for f in fs + (meta,)):
                return _Layout("cifar_pickle", d)
        if (data_dir / _CIFAR_ARCHIVES[name]).is_file():
            return _Layout("tar", data_dir / _CIFAR_ARCHIVES[name])
    # e.g. an extracted cifar10-jpeg/ next to other datasets
    folders = [data_dir, data_dir / name, *sorted(data_dir.glob(f"{name}-*"))]
    for d in folders:
        if d.is_dir() and _has_split_dirs(d):
            return _Layout("image_folder", d)
    # e.g. data_dir=../shared/data holding cifar10-jpeg.tar.gz
    archives = sorted(p for ext in _TAR_EXTS for pat in (f"{name}{ext}", f"{name}-*{ext}")
                      for p in data_dir.glob(pat))
    if archives:
        return _Layout("tar", archives[0])
    return None


def _has_local_layout(name: str, data_dir: Any) -> bool:
    if data_dir is None:
        return False
    try:
        return _find_layout(name, Path(data_dir)) is not None
    except OSError:
        return True  # unreadable: let the local reader report it with the layout


def _load_local(name: str, split: str, data_dir: Path, cache_dir: Any, cache: bool,
                limit_per_class: int | None) -> ArrayDataset:
    if not data_dir.exists():
        raise _fail(name, data_dir, "data_dir does not exist")
    try:
        return _load_local_layout(name, split, data_dir, cache_dir, cache, limit_per_class)
    except OSError as err:  # e.g. permissions; the readers wrap expected failures themselves
        raise _fail(name, getattr(err, "filename", None) or data_dir,
                    f"unreadable data ({type(err).__name__}: {err})") from err


def _load_local_layout(name: str, split: str, data_dir: Path, cache_dir: Any, cache: bool,
                       limit_per_class: int | None) -> ArrayDataset:
    layout = _find_layout(name, data_dir)
    if layout is None:
        raise _fail(name, data_dir, f"no recognised {name} layout in data_dir")
    if layout.kind == "idx":
        return _load_mnist_idx(layout.path, split)
    if layout.kind == "cifar_pickle":
        return _load_cifar_pickles(name, split, layout.path)

    def decode() -> ArrayDataset:
        if layout.kind == "tiny_imagenet":
            return _load_tiny_imagenet(layout.path, split, limit_per_class)
        if layout.kind == "image_folder":
            return _load_image_folder(name, split, layout.path, limit_per_class)
        return _load_tar(name, split, layout.path, limit_per_class)

    if layout.kind == "tar" and _tar_holds_pickles(layout.path, name):
        return decode()  # pickled arrays are fast to read, no point caching
    if not cache:
        return decode()
    return _cached(name, split, layout, cache_dir, limit_per_class, decode)


# --- MNIST IDX


def _read_maybe_gzip(name: str, path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # Sniff too: IDX data starts 00 00 08, so a gzip header is unambiguous.
        if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise _fail(name, path, f"truncated or corrupt file ({type(err).__name__}: {err})") from err


def _parse_idx(path: Path, raw: bytes, magic: int, tail: tuple[int, ...]) -> np.ndarray:
    ndim = 1 + len(tail)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail("mnist", path, f"truncated IDX file: {len(raw)} bytes, header alone needs {header}")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise _fail("mnist", path, f"wrong IDX magic number {got}, expected {magic}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if dims[1:] != tail:
        raise _fail("mnist", path, f"IDX dimensions {dims}, expected (N, {', '.join(map(str, tail))})")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise _fail("mnist", path, f"{kind} IDX file: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_file(d: Path, stem: str) -> Path:
    for cand in (d / stem, d / (stem + ".gz")):
        if cand.is_file():
            return cand
    raise _fail("mnist", d / (stem + "[.gz]"), "missing IDX file")


def _load_mnist_idx(d: Path, split: str) -> ArrayDataset:
    img_stem, lbl_stem = _MNIST_FILES[split]
    img_path, lbl_path = _idx_file(d, img_stem), _idx_file(d, lbl_stem)
    images = _parse_idx(img_path, _read_maybe_gzip("mnist", img_path), _IDX_IMAGES_MAGIC, (28, 28))
    labels = _parse_idx(lbl_path, _read_maybe_gzip("mnist", lbl_path), _IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise _fail("mnist", d, f"{img_path.name} has {len(images)} images but "
                                f"{lbl_path.name} has {len(labels)} labels")
    if labels.size and labels.max() >= 10:
        raise _fail("mnist", lbl_path, f"label {labels.max()} outside 0..9")
    return ArrayDataset(images[..., None], labels.astype(np.int32), 10, "mnist",
                        class_names=tuple(str(i) for i in range(10)), split=split,
                        origin=f"idx:{d}")


# --- CIFAR python pickles


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


def _unpickle(name: str, where: Any, raw: bytes) -> dict[str, Any]:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ...
        raise _fail(name, where, f"truncated or corrupt pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise _fail(name, where, f"corrupt pickle: expected a dict, got {type(obj).__name__}")
    # Official files come from Python 2 (bytes keys); re-pickled copies may use str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(name: str, where: Any, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(name, where, raw)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    if "data" not in d or label_key not in d:
        raise _fail(name, where, f"corrupt batch: keys {sorted(d)} lack 'data' or {label_key!r}")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise _fail(name, where, f"corrupt batch: {err}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 32 * 32 * 3:
        raise _fail(name, where, f"corrupt batch: data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (len(data),):
        raise _fail(name, where, f"corrupt batch: {len(data)} images but {labels.size} labels")
    num_classes = DATASETS[name][1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _fail(name, where, f"labels outside [0, {num_classes})")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B), each plane row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _cifar_class_names(name: str, where: Any, raw: bytes | None) -> tuple[str, ...] | None:
    if raw is None:  # meta is informational; the labels are already in the batches
        return CIFAR10_CLASSES if name == "cifar10" else None
    d = _unpickle(name, where, raw)
    names = d.get("label_names" if name == "cifar10" else "fine_label_names")
    if names is None:
        raise _fail(name, where, "corrupt meta file: no label names")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(names) != DATASETS[name][1]:
        raise _fail(name, where, f"class-count mismatch: meta lists {len(names)} classes, "
                                 f"expected {DATASETS[name][1]}")
    return names


def _cifar_files(name: str, split: str) -> tuple[tuple[str, ...], str]:
    if name == "cifar10":
        return _CIFAR10_PICKLES[split], "batches.meta"
    return _CIFAR100_PICKLES[split], "meta"


def _load_cifar_pickles(name: str, split: str, d: Path) -> ArrayDataset:
    files, meta = _cifar_files(name, split)
    parts = []
    for f in files:
        p = d / f
        if not p.is_file():
            raise _fail(name, p, "missing CIFAR batch file")
        try:
            raw = p.read_bytes()
        except OSError as err:
            raise _fail(name, p, f"unreadable file ({err})") from err
        parts.append(_cifar_batch(name, p, raw))
    meta_path = d / meta
    class_names = _cifar_class_names(name, meta_path, meta_path.read_bytes() if meta_path.is_file() else None)
    return ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        DATASETS[name][1], name, class_names=class_names, split=split,
                        origin=f"pickle:{d}")


# --- tar archives (official CIFAR archives, or image folders packed as .tar.gz)


def _tar_holds_pickles(path: Path, name: str) -> bool:
    # Cheap guess by file name; the reader itself handles either content.
    return path.name == _CIFAR_ARCHIVES.get(name)


def _is_image_name(fname: str) -> bool:
    return fname.lower().endswith(_IMAGE_EXTS) and not fname.startswith(".")


def _load_tar(name: str, split: str, path: Path, limit_per_class: int | None) -> ArrayDataset:
    pickle_names, meta = _cifar_files(name, split) if name in _CIFAR_DIRS else ((), "")
    pickles: dict[str, tuple[str, bytes]] = {}
    images: list[tuple[tuple[str, ...], str, str, bytes]] = []  # prefix, class, file, bytes
    try:
        # Streaming mode: a single pass over the gzip stream (random access would
        # re-decompress from the start for every member).
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
                if not parts:
                    continue
                base = parts[-1]
                if base in pickle_names or (meta and base == meta):
                    pickles[base] = (m.name, tf.extractfile(m).read())
                elif (len(parts) >= 3 and parts[-3] == split and _is_image_name(base)):
                    images.append((parts[:-3], parts[-2], base, tf.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise _fail(name, path, f"truncated or corrupt archive ({type(err).__name__}: {err})") from err

    if pickles and any(p in pickles for p in pickle_names):
        parts_ = []
        for f in pickle_names:
            if f not in pickles:
                raise _fail(name, f"{path}:{f}", "missing CIFAR batch file in archive")
            member, raw = pickles[f]
            parts_.append(_cifar_batch(name, f"{path}:{member}", raw))
        meta_member = pickles.get(meta)
        class_names = _cifar_class_names(
            name, f"{path}:{meta_member[0] if meta_member else meta}",
            meta_member[1] if meta_member else None)
        return ArrayDataset(np.concatenate([p[0] for p in parts_]),
                            np.concatenate([p[1] for p in parts_]), DATASETS[name][1], name,
                            class_names=class_names, split=split, origin=f"pickle:{path}")
    if not images:
        raise _fail(name, path, f"archive holds no {split}/<class>/<image> members or official batches")
    prefixes = {img[0] for img in images}
    if len(prefixes) > 1:
        shown = sorted("/".join(p) or "." for p in prefixes)[:3]
        raise _fail(name, path, f"ambiguous archive: {split}/ appears under several folders {shown}")
    prefix = "/".join(next(iter(prefixes)))
    entries = [(cls, fname, raw) for _, cls, fname, raw in images]
    return _assemble_image_folder(name, split, entries, f"{path}:{prefix + '/' if prefix else ''}{split}",
                                  limit_per_class)


# --- image folders


def _load_image_folder(name: str, split: str, root: Path, limit_per_class: int | None) -> ArrayDataset:
    split_dir = root / split
    if not split_dir.is_dir():
        raise _fail(name, split_dir, f"missing split folder {split}/")
    entries: list[tuple[str, str, Any]] = []
    for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = [f for f in os.scandir(cls_dir) if f.is_file() and _is_image_name(f.name)]
        if not files:
            raise _fail(name, cls_dir, "class folder holds no .png/.jpg images")
        entries.extend((cls_dir.name, f.name, Path(f.path)) for f in files)
    return _assemble_image_folder(name, split, entries, split_dir, limit_per_class)


def _first_per_class(entries: list[tuple[str, str, Any]], k: int | None) -> list[tuple[str, str, Any]]:
    # Filtering before decoding is what makes limit_per_class cheap for image files.
    if k is None:
        return entries
    seen: dict[str, int] = {}
    kept = []
    for e in entries:
        seen[e[0]] = seen.get(e[0], 0) + 1
        if seen[e[0]] <= k:
            kept.append(e)
    return kept


def _class_order(name: str, found: set[str]) -> tuple[str, ...]:
    if name == "cifar10" and found == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    if all(c.isdigit() for c in found):  # '0'..'9', or '10' after '9'
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def _assemble_image_folder(name: str, split: str, entries: list[tuple[str, str, Any]],
                           where: Any, limit_per_class: int | None) -> ArrayDataset:
    shape, num_classes = DATASETS[name]
    classes = _class_order(name, {e[0] for e in entries})
    if len(classes) != num_classes:
        raise _fail(name, where, f"class-count mismatch: found {len(classes)} class folders, "
                                 f"expected {num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    # Deterministic order: by class label, then file name.
    entries = sorted(entries, key=lambda e: (index[e[0]], e[1]))
    entries = _first_per_class(entries, limit_per_class)
    images = np.empty((len(entries),) + shape, np.uint8)
    for i, (cls, fname, src) in enumerate(entries):
        images[i] = _decode_image(name, src, f"{where}/{cls}/{fname}", shape)
    labels = np.fromiter((index[e[0]] for e in entries), np.int32, len(entries))
    return ArrayDataset(images, labels, num_classes, name, class_names=classes, split=split,
                        origin=f"images:{where}")


def _decode_image(name: str, src: bytes | Path, where: Any, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w, c = shape
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.size != (w, h):
                raise _fail(name, where, f"image is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
            arr = np.asarray(im.convert("L" if c == 1 else "RGB"))
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise _fail(name, where, f"truncated or corrupt image ({type(err).__name__}: {err})") from err
    return arr.reshape(shape)


# --- Tiny ImageNet


def _load_tiny_imagenet(root: Path, split: str, limit_per_class: int | None) -> ArrayDataset:
    name = "tiny_imagenet"
    shape, num_classes = DATASETS[name]
    wnids_path = root / "wnids.txt"
    try:
        wnids = tuple(w.strip() for w in wnids_path.read_text().splitlines() if w.strip())
    except OSError as err:
        raise _fail(name, wnids_path, f"missing or unreadable wnids.txt ({err})") from err
    except UnicodeDecodeError as err:
        raise _fail(name, wnids_path, "corrupt wnids.txt (not text)") from err
    if len(wnids) != num_classes or len(set(wnids)) != len(wnids):
        raise _fail(name, wnids_path, f"class-count mismatch: wnids.txt lists {len(set(wnids))} "
                                      f"distinct wnids, expected {num_classes}")
    index = {w: i for i, w in enumerate(wnids)}  # label = position in wnids.txt
    entries: list[tuple[str, str, Any]] = []
    if split == "train":
        train = root / "train"
        if not train.is_dir():
            raise _fail(name, train, "missing train/ folder")
        found = {p.name for p in train.iterdir() if p.is_dir()}
        if found != set(wnids):
            missing, extra = sorted(set(wnids) - found), sorted(found - set(wnids))
            raise _fail(name, train, f"class-count mismatch: train/ has {len(found)} wnid folders "
                                     f"vs {len(wnids)} in wnids.txt (missing {missing[:3]}, "
                                     f"extra {extra[:3]})")
        for w in wnids:
            img_dir = train / w / "images"
            files = sorted(f.name for f in os.scandir(img_dir) if _is_image_name(f.name)) \
                if img_dir.is_dir() else []
            if not files:
                raise _fail(name, img_dir, "missing or empty images/ folder")
            entries.extend((w, f, img_dir / f) for f in files)
        where = train
    else:  # 'val' and 'test' both read the official val set
        ann = root / "val" / "val_annotations.txt"
        try:
            lines = ann.read_text().splitlines()
        except OSError as err:
            raise _fail(name, ann, f"missing or unreadable val_annotations.txt ({err})") from err
        except UnicodeDecodeError as err:
            raise _fail(name, ann, "corrupt val_annotations.txt (not text)") from err
        img_dir = root / "val" / "images"
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise _fail(name, ann, f"line {lineno}: expected '<file>\\t<wnid from wnids.txt>\\t...', "
                                       f"got {line[:80]!r}")
            if not (img_dir / fields[0]).is_file():
                raise _fail(name, img_dir / fields[0], "image listed in val_annotations.txt is missing")
            entries.append((fields[1], fields[0], img_dir / fields[0]))
        where = img_dir
    entries = _first_per_class(entries, limit_per_class)
    images = np.empty((len(entries),) + shape, np.uint8)
    for i, (_, fname, path) in enumerate(entries):
        images[i] = _decode_image(name, path, path, shape)  # some JPEGs are grayscale
    labels = np.fromiter((index[e[0]] for e in entries), np.int32, len(entries))
    return ArrayDataset(images, labels, num_classes, name, class_names=wnids,
                        split="val" if split == "test" else split, origin=f"tiny-imagenet:{where}")


# --- decoded-array cache (image folders, Tiny ImageNet)


def _cache_root(cache_dir: Any) -> Path:
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


def _cached(name: str, split: str, layout: _Layout, cache_dir: Any, limit_per_class: int | None,
            decode) -> ArrayDataset:
    src = layout.path.resolve()
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, name, split, str(src), limit_per_class]).encode())
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
    path = _cache_root(cache_dir) / f"{name}-{split}-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                names = tuple(str(s) for s in z["class_names"])
                return ArrayDataset(z["images"], z["labels"], DATASETS[name][1], name,
                                    class_names=names or None, split=str(z["split"]),
                                    origin=str(z["origin"]))
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            pass
    ds = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=ds.images, labels=ds.labels, split=ds.split, origin=ds.origin,
                     class_names=np.array(ds.class_names or (), dtype=str))
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file
    except OSError as err:
        warnings.warn(f"could not write data cache {path}: {err}", stacklevel=3)
    return ds


# --------------------------------------------------------------------------- pipeline


def _epoch_rngs(seed: int, epoch: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Independent streams, so toggling augmentation never changes the example order.
    perm_ss, aug_ss = np.random.SeedSequence([seed, epoch]).spawn(2)
    return np.random.default_rng(perm_ss), np.random.default_rng(aug_ss)


def augment_batch(images: np.ndarray, rng: np.random.Generator, *, pad: int = 4,
                  flip: bool = True) -> np.ndarray:
    """CIFAR-style augmentation of an NHWC batch: random crop from a ``pad``-pixel
    zero-padded image, then a random horizontal flip (p=0.5). One vectorised gather."""
    return _apply_augment(images, _augment_draws(len(images), rng, pad=pad, flip=flip), pad=pad)


def _augment_draws(b: int, rng: np.random.Generator, *, pad: int = 4,
                   flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The random part of :func:`augment_batch` for ``b`` images: crop offsets, flips."""
    oy = rng.integers(0, 2 * pad + 1, size=b)
    ox = rng.integers(0, 2 * pad + 1, size=b)
    return oy, ox, (rng.random(b) < 0.5) if flip else None


def _apply_augment(images: np.ndarray, draws, *, pad: int = 4) -> np.ndarray:
    oy, ox, flips = draws
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.arange(w)
    if flips is not None:
        cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _to_float(x: np.ndarray) -> np.ndarray:
    # Division (not multiplication by 1/255) keeps 255 -> exactly 1.0.
    return np.divide(x, np.float32(255.0), dtype=np.float32)


def num_batches(ds: ArrayDataset | int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches ``batches`` yields for ``ds`` (or a dataset length)."""
    n = ds if isinstance(ds, int) else len(ds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    ds: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: bool = False,
    drop_remainder: bool = False,
    rows: slice | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{'image': float32 NHWC in [0, 1], 'label': int32}`` batches.

    Deterministic in ``(seed, epoch)``: a new ``epoch`` gives a new order and new
    augmentations. Without ``drop_remainder`` every example appears exactly once per
    epoch (the last batch may be smaller); with it, a trailing partial batch is dropped.

    ``rows`` keeps only those rows of every batch (a host's share of a global
    batch, ``parallel.process_slice``): only they are gathered, augmented and
    converted, and they are bit-identical to the same rows of the full batch
    (the augmentation draws are made for the whole batch, in the same order).
    """
    n_batches = num_batches(ds, batch_size, drop_remainder)
    perm_rng, aug_rng = _epoch_rngs(seed, epoch)
    order = perm_rng.permutation(len(ds)) if shuffle else None
    for b in range(n_batches):
        lo, hi = b * batch_size, min((b + 1) * batch_size, len(ds))
        idx = order[lo:hi] if order is not None else np.arange(lo, hi)
        draws = _augment_draws(len(idx), aug_rng) if augment else None
        if rows is not None:
            idx = idx[rows]
            if draws is not None:
                draws = tuple(None if d is None else d[rows] for d in draws)
        if order is None and rows is None:
            x, y = ds.images[lo:hi], ds.labels[lo:hi].copy()  # a view, no gather
        else:
            x, y = ds.images[idx], ds.labels[idx]
        if augment:
            x = _apply_augment(x, draws)
        yield {"image": _to_float(x), "label": y}


def grain_batches(
    ds: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: bool = False,
    drop_remainder: bool = False,
):
    """The same batches as a ``grain.MapDataset`` (random access, e.g. for a
    ``grain.DataLoader`` with worker processes). ``batches`` is the default path."""
    import grain

    perm_rng, _ = _epoch_rngs(seed, epoch)
    order = perm_rng.permutation(len(ds)) if shuffle else np.arange(len(ds))
    aug_seed = int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])

    def make(idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        x = ds.images[idx]
        if augment:
            x = augment_batch(x, rng)
        return {"image": _to_float(x), "label": ds.labels[idx]}

    return (grain.MapDataset.source(order)
            .batch(batch_size, drop_remainder=drop_remainder, batch_fn=np.asarray)
            .random_map(make, seed=aug_seed))


def train_val_split(
    ds: ArrayDataset,
    *,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split a *training* set into disjoint (train, val) parts, seeded.

    Give exactly one of ``val_size`` / ``val_fraction``. Use the val part for model
    selection (early stopping, hyper-parameters); never select on the test set.
    Not stratified. Both parts keep the original example order.
    """
    n = len(ds)
    if (val_size is None) == (val_fraction is None):
        raise ValueError("give exactly one of val_size or val_fraction")
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_size = int(round(n * val_fraction))
    assert val_size is not None
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} examples, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return (ds.subset(np.sort(perm[val_size:]), split=f"{ds.split or 'train'}-minus-val"),
            ds.subset(np.sort(perm[:val_size]), split="val"))
