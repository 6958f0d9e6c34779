"""Where each on-disk format keeps its files, how to find them under a data_dir, and
the one error every reader raises (naming the path and the expected layout)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from gce_jax.data.registry import DataError, DatasetSpec

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
TAR_EXTS = (".tar.gz", ".tgz", ".tar")
MNIST_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class PickleFormat:
    """The official python-pickle layout of CIFAR-10 or CIFAR-100."""

    folder: str
    archive: str
    files: dict[str, tuple[str, ...]]  # split -> batch files
    meta: str
    label_key: str
    names_key: str


PICKLE_FORMATS = {
    "cifar10_pickle": PickleFormat(
        "cifar-10-batches-py", "cifar-10-python.tar.gz",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "batches.meta", "labels", "label_names"),
    # 'label' is the fine label: the 100 classes.
    "cifar100_pickle": PickleFormat(
        "cifar-100-python", "cifar-100-python.tar.gz", {"train": ("train",), "test": ("test",)},
        "meta", "fine_labels", "fine_label_names"),
}


def idx_files(spec: DatasetSpec) -> dict[str, tuple[str, str]]:
    """split -> (images file, labels file) of an ``idx`` data set (without ``.gz``)."""
    return {s: (i, l) for s, i, l in spec.idx_files} if spec.idx_files else dict(MNIST_IDX_FILES)


def pickle_format(spec: DatasetSpec) -> PickleFormat | None:
    return next((PICKLE_FORMATS[f] for f in spec.formats if f in PICKLE_FORMATS), None)


def _describe(spec: DatasetSpec, fmt: str) -> str:
    h, w, _ = spec.image_shape
    if fmt == "idx":
        files = ", ".join(f for pair in idx_files(spec).values() for f in pair)
        return f"the IDX files {files} (each optionally .gz) in data_dir or data_dir/{spec.name}"
    if fmt in PICKLE_FORMATS:
        p = PICKLE_FORMATS[fmt]
        files = ", ".join((*[f for fs in p.files.values() for f in fs], p.meta))
        return (f"the official python batches {p.folder}/{{{files}}} (data_dir = that "
                f"folder, its parent, or {p.archive})")
    if fmt == "image_folder":
        return ("image folders <split>/<class>/*.png|jpg (a folder, or a .tar.gz of it) with "
                f"{spec.num_classes} classes of {h}x{w} images")
    if fmt == "tiny_imagenet":
        return ("tiny-imagenet-200/{wnids.txt (" + str(spec.num_classes) + " wnids), "
                "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt} "
                "(data_dir = that folder or its parent)")
    return ""


def describe_layout(spec: DatasetSpec) -> str:
    """The layouts ``spec`` may be read from, in words (empty for file-less sets)."""
    return "; or ".join(d for d in (_describe(spec, f) for f in spec.formats) if d)


def fail(spec: DatasetSpec, path: Any, problem: str) -> DataError:
    """The error for bad data at ``path``: the problem, the path, the expected layout."""
    layout = describe_layout(spec)
    msg = f"{problem} [{path}]"
    if layout:
        msg += f". Expected layout for {spec.name}: {layout}"
    return DataError(msg)


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: Literal["idx", "cifar_pickle", "image_folder", "tar", "tiny_imagenet"]
    path: Path


def is_tar(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(TAR_EXTS)


def is_image_name(fname: str) -> bool:
    return fname.lower().endswith(IMAGE_EXTS) and not fname.startswith(".")


def _has_split_dirs(d: Path) -> bool:
    return any((d / s).is_dir() and any(c.is_dir() for c in (d / s).iterdir())
               for s in ("train", "test"))


def _find_format(spec: DatasetSpec, fmt: str, data_dir: Path) -> Layout | None:
    name = spec.name
    if fmt == "tiny_imagenet":
        for d in (data_dir, data_dir / "tiny-imagenet-200"):
            if (d / "wnids.txt").is_file() or (d / "val" / "val_annotations.txt").is_file():
                return Layout("tiny_imagenet", d)
    elif fmt == "idx":
        files = [f for pair in idx_files(spec).values() for f in pair]
        # torchvision keeps them in <NAME>/raw (MNIST/raw).
        for d in (data_dir, data_dir / name, data_dir / name / "raw", data_dir / name.upper() / "raw"):
            if any((d / (f + ext)).is_file() for f in files for ext in ("", ".gz")):
                return Layout("idx", d)
    elif fmt in PICKLE_FORMATS:
        p = PICKLE_FORMATS[fmt]
        for d in (data_dir, data_dir / p.folder, data_dir / name):
            if any((d / f).is_file() for fs in p.files.values() for f in fs + (p.meta,)):
                return Layout("cifar_pickle", d)
        if (data_dir / p.archive).is_file():
            return Layout("tar", data_dir / p.archive)
    elif fmt == "image_folder":
        # e.g. an extracted cifar10-jpeg/ next to other datasets
        for d in (data_dir, data_dir / name, *sorted(data_dir.glob(f"{name}-*"))):
            if d.is_dir() and _has_split_dirs(d):
                return Layout("image_folder", d)
        # e.g. data_dir=../shared/data holding cifar10-jpeg.tar.gz
        archives = sorted(p for ext in TAR_EXTS for pat in (f"{name}{ext}", f"{name}-*{ext}")
                          for p in data_dir.glob(pat))
        if archives:
            return Layout("tar", archives[0])
    return None


def find_layout(spec: DatasetSpec, data_dir: Path) -> Layout | None:
    """The first recognised layout of ``spec`` under ``data_dir`` (``None`` if none)."""
    if is_tar(data_dir):
        tar_formats = {"image_folder", *PICKLE_FORMATS}
        return Layout("tar", data_dir) if tar_formats & set(spec.formats) else None
    if not data_dir.is_dir():
        return None
    for fmt in spec.formats:
        layout = _find_format(spec, fmt, data_dir)
        if layout is not None:
            return layout
    return None


def holds_tfds(spec: DatasetSpec, data_dir: Path) -> bool:
    """Whether ``data_dir`` looks like a tfds data_dir with ``spec`` prepared in it
    (``<data_dir>/<name>[/<config>]/<version>/dataset_info.json``)."""
    if not spec.tfds_name:
        return False
    root = data_dir / spec.tfds_name.split(":")[0]
    return root.is_dir() and (any(root.glob("*/dataset_info.json"))
                              or any(root.glob("*/*/dataset_info.json")))
