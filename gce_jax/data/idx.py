"""IDX files (MNIST's format), optionally gzipped: one file of images, one of labels."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.layout import fail, idx_files
from gce_jax.data.registry import DatasetSpec
from gce_jax.provenance import portable_path

_UBYTE = 0x0800  # IDX magic: 0x0000 08 <ndim>, 08 = unsigned byte


def _read_maybe_gzip(spec: DatasetSpec, path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # Sniff too: IDX data starts 00 00 08, so a gzip header is unambiguous.
        if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise fail(spec, path, f"truncated or corrupt file ({type(err).__name__}: {err})") from err


def _parse_idx(spec: DatasetSpec, path: Path, raw: bytes, tail: tuple[int, ...]) -> np.ndarray:
    ndim = 1 + len(tail)
    magic = _UBYTE | ndim
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise fail(spec, path, f"truncated IDX file: {len(raw)} bytes, header alone needs {header}")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise fail(spec, path, f"wrong IDX magic number {got}, expected {magic}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if dims[1:] != tail:
        raise fail(spec, path, f"IDX dimensions {dims}, expected (N, {', '.join(map(str, tail))})")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise fail(spec, path, f"{kind} IDX file: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_file(spec: DatasetSpec, d: Path, stem: str) -> Path:
    for cand in (d / stem, d / (stem + ".gz")):
        if cand.is_file():
            return cand
    raise fail(spec, d / (stem + "[.gz]"), "missing IDX file")


def load_idx(spec: DatasetSpec, d: Path, split: str) -> ArrayDataset:
    """``split`` of ``spec`` from the IDX files in folder ``d``.

    Images are ``(N, H, W)`` for one channel, ``(N, H, W, C)`` otherwise.
    """
    files = idx_files(spec)
    if split not in files:
        raise fail(spec, d, f"no IDX files are named for split {split!r}")
    img_stem, lbl_stem = files[split]
    img_path, lbl_path = _idx_file(spec, d, img_stem), _idx_file(spec, d, lbl_stem)
    h, w, c = spec.image_shape
    images = _parse_idx(spec, img_path, _read_maybe_gzip(spec, img_path),
                        (h, w) if c == 1 else (h, w, c))
    labels = _parse_idx(spec, lbl_path, _read_maybe_gzip(spec, lbl_path), ())
    if len(images) != len(labels):
        raise fail(spec, d, f"{img_path.name} has {len(images)} images but "
                            f"{lbl_path.name} has {len(labels)} labels")
    if labels.size and labels.max() >= spec.num_classes:
        raise fail(spec, lbl_path, f"label {labels.max()} outside 0..{spec.num_classes - 1}")
    class_names = spec.class_names or tuple(str(i) for i in range(spec.num_classes))
    return ArrayDataset(images.reshape(len(images), h, w, c), labels.astype(np.int32),
                        spec.num_classes, spec.name, class_names=class_names, split=split,
                        origin=f"idx:{portable_path(d)}")
