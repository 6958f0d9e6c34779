"""Image files: ``<split>/<class>/*.png|jpg`` folders, and ``.tar.gz`` archives holding
either such folders or the official CIFAR batches."""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.cifar import assemble, cifar_batch, cifar_class_names
from gce_jax.data.layout import fail, is_image_name, pickle_format
from gce_jax.data.registry import DataError, DatasetSpec
from gce_jax.provenance import portable_path

# (class folder, file name, bytes or path) of one image file
Entry = tuple[str, str, Any]


def first_per_class(entries: list[Entry], k: int | None) -> list[Entry]:
    """The first ``k`` entries of each class (all with ``k=None``)."""
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


def _class_order(spec: DatasetSpec, found: set[str]) -> tuple[str, ...]:
    if spec.class_names and found == set(spec.class_names):
        return spec.class_names
    if all(c.isdigit() for c in found):  # '0'..'9', or '10' after '9'
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def decode_image(spec: DatasetSpec, src: bytes | Path, where: Any) -> np.ndarray:
    """One image file as uint8 ``image_shape`` (grayscale or RGB as the spec says)."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = spec.image_shape
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.size != (w, h):
                raise fail(spec, where, f"image is {im.size[0]}x{im.size[1]}, expected {w}x{h}")
            arr = np.asarray(im.convert("L" if c == 1 else "RGB"))
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise fail(spec, where, f"truncated or corrupt image ({type(err).__name__}: {err})") from err
    return arr.reshape(spec.image_shape)


def _assemble_image_folder(spec: DatasetSpec, split: str, entries: list[Entry], where: Any,
                           limit_per_class: int | None) -> ArrayDataset:
    classes = _class_order(spec, {e[0] for e in entries})
    if len(classes) != spec.num_classes:
        raise fail(spec, where, f"class-count mismatch: found {len(classes)} class folders, "
                                f"expected {spec.num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    # Deterministic order: by class label, then file name.
    entries = sorted(entries, key=lambda e: (index[e[0]], e[1]))
    entries = first_per_class(entries, limit_per_class)
    images = np.empty((len(entries),) + spec.image_shape, np.uint8)
    for i, (cls, fname, src) in enumerate(entries):
        images[i] = decode_image(spec, src, f"{where}/{cls}/{fname}")
    labels = np.fromiter((index[e[0]] for e in entries), np.int32, len(entries))
    return ArrayDataset(images, labels, spec.num_classes, spec.name, class_names=classes,
                        split=split, origin=f"images:{portable_path(str(where))}")


def load_image_folder(spec: DatasetSpec, split: str, root: Path,
                      limit_per_class: int | None) -> ArrayDataset:
    """``split`` from ``root/<split>/<class>/*.png|jpg``."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise fail(spec, split_dir, f"missing split folder {split}/")
    entries: list[Entry] = []
    for cls_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = [f for f in os.scandir(cls_dir) if f.is_file() and is_image_name(f.name)]
        if not files:
            raise fail(spec, cls_dir, "class folder holds no .png/.jpg images")
        entries.extend((cls_dir.name, f.name, Path(f.path)) for f in files)
    return _assemble_image_folder(spec, split, entries, split_dir, limit_per_class)


def tar_holds_pickles(spec: DatasetSpec, path: Path) -> bool:
    """Whether ``path`` is the official CIFAR archive (a guess by its file name; the
    reader itself handles either content)."""
    fmt = pickle_format(spec)
    return fmt is not None and path.name == fmt.archive


def load_tar(spec: DatasetSpec, split: str, path: Path, limit_per_class: int | None) -> ArrayDataset:
    """``split`` from an archive of the official CIFAR batches or of image folders."""
    fmt = pickle_format(spec)
    pickle_names = fmt.files.get(split, ()) if fmt else ()
    meta = fmt.meta if fmt else ""
    with_images = "image_folder" in spec.formats
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
                elif (with_images and len(parts) >= 3 and parts[-3] == split
                      and is_image_name(base)):
                    images.append((parts[:-3], parts[-2], base, tf.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise fail(spec, path, f"truncated or corrupt archive ({type(err).__name__}: {err})") from err

    if fmt is not None and any(p in pickles for p in pickle_names):
        batches = []
        for f in pickle_names:
            if f not in pickles:
                raise fail(spec, f"{path}:{f}", "missing CIFAR batch file in archive")
            member, raw = pickles[f]
            batches.append(cifar_batch(spec, fmt, f"{path}:{member}", raw))
        meta_member = pickles.get(meta)
        names = cifar_class_names(spec, fmt, f"{path}:{meta_member[0] if meta_member else meta}",
                                  meta_member[1] if meta_member else None)
        return assemble(spec, split, batches, names, f"pickle:{portable_path(path)}")
    if not images:
        raise fail(spec, path, f"archive holds no {split}/<class>/<image> members or official batches")
    prefixes = {img[0] for img in images}
    if len(prefixes) > 1:
        shown = sorted("/".join(p) or "." for p in prefixes)[:3]
        raise fail(spec, path, f"ambiguous archive: {split}/ appears under several folders {shown}")
    prefix = "/".join(next(iter(prefixes)))
    entries = [(cls, fname, raw) for _, cls, fname, raw in images]
    return _assemble_image_folder(spec, split, entries,
                                  f"{path}:{prefix + '/' if prefix else ''}{split}", limit_per_class)
