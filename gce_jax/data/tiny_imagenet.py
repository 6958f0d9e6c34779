"""The ``tiny-imagenet-200`` folder: train/<wnid>/images, val/ labelled by val_annotations.txt.

The official test labels are not public, so ``test`` reads the official val set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.images import Entry, decode_image, first_per_class
from gce_jax.data.layout import fail, is_image_name
from gce_jax.data.registry import DatasetSpec
from gce_jax.provenance import portable_path


def _read_text(spec: DatasetSpec, path: Path, what: str) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError as err:
        raise fail(spec, path, f"missing or unreadable {what} ({err})") from err
    except UnicodeDecodeError as err:
        raise fail(spec, path, f"corrupt {what} (not text)") from err


def _train_entries(spec: DatasetSpec, root: Path, wnids: tuple[str, ...]) -> list[Entry]:
    train = root / "train"
    if not train.is_dir():
        raise fail(spec, train, "missing train/ folder")
    found = {p.name for p in train.iterdir() if p.is_dir()}
    if found != set(wnids):
        missing, extra = sorted(set(wnids) - found), sorted(found - set(wnids))
        raise fail(spec, train, f"class-count mismatch: train/ has {len(found)} wnid folders "
                                f"vs {len(wnids)} in wnids.txt (missing {missing[:3]}, "
                                f"extra {extra[:3]})")
    entries: list[Entry] = []
    for w in wnids:
        img_dir = train / w / "images"
        files = sorted(f.name for f in os.scandir(img_dir) if is_image_name(f.name)) \
            if img_dir.is_dir() else []
        if not files:
            raise fail(spec, img_dir, "missing or empty images/ folder")
        entries.extend((w, f, img_dir / f) for f in files)
    return entries


def _val_entries(spec: DatasetSpec, root: Path, index: dict[str, int]) -> list[Entry]:
    ann = root / "val" / "val_annotations.txt"
    img_dir = root / "val" / "images"
    entries: list[Entry] = []
    for lineno, line in enumerate(_read_text(spec, ann, "val_annotations.txt"), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise fail(spec, ann, f"line {lineno}: expected '<file>\\t<wnid from wnids.txt>\\t...', "
                                  f"got {line[:80]!r}")
        if not (img_dir / fields[0]).is_file():
            raise fail(spec, img_dir / fields[0], "image listed in val_annotations.txt is missing")
        entries.append((fields[1], fields[0], img_dir / fields[0]))
    return entries


def load_tiny_imagenet(spec: DatasetSpec, root: Path, split: str,
                       limit_per_class: int | None) -> ArrayDataset:
    """``split`` (``train``, or ``val``/``test``: the official val set) from ``root``."""
    wnids_path = root / "wnids.txt"
    wnids = tuple(w.strip() for w in _read_text(spec, wnids_path, "wnids.txt") if w.strip())
    if len(wnids) != spec.num_classes or len(set(wnids)) != len(wnids):
        raise fail(spec, wnids_path, f"class-count mismatch: wnids.txt lists {len(set(wnids))} "
                                     f"distinct wnids, expected {spec.num_classes}")
    index = {w: i for i, w in enumerate(wnids)}  # label = position in wnids.txt
    if split == "train":
        entries, where = _train_entries(spec, root, wnids), root / "train"
    else:
        entries, where = _val_entries(spec, root, index), root / "val" / "images"
    entries = first_per_class(entries, limit_per_class)
    images = np.empty((len(entries),) + spec.image_shape, np.uint8)
    for i, (_, _, path) in enumerate(entries):
        images[i] = decode_image(spec, path, path)  # some JPEGs are grayscale
    labels = np.fromiter((index[e[0]] for e in entries), np.int32, len(entries))
    return ArrayDataset(images, labels, spec.num_classes, spec.name,
                        class_names=spec.class_names or wnids,
                        split="val" if split == "test" else split,
                        origin=f"tiny-imagenet:{portable_path(where)}")
