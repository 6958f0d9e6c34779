"""The batch pipeline: a deterministic numpy gather over a pre-permuted index.

Every supported data set fits in memory as uint8, so a batch is one fancy-index
gather plus a conversion to float: cheap enough that a small model never waits
for data (benchmarks/RESULTS.md, "Input pipeline"). Training batches come from
:func:`batches`; evaluation batches from :func:`eval_batches`, which keeps one
batch shape (one compilation) by padding the last batch with :func:`pad_to`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from gce_jax.data.arrays import ArrayDataset

__all__ = [
    "augment_batch",
    "batch_slices",
    "batches",
    "eval_batches",
    "num_batches",
    "pad_to",
    "to_float",
]


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


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in ``[0, 1]``."""
    # Division (not multiplication by 1/255) keeps 255 -> exactly 1.0.
    return np.divide(images, np.float32(255.0), dtype=np.float32)


def num_batches(ds: ArrayDataset | int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches ``batches`` yields for ``ds`` (or a dataset length)."""
    n = ds if isinstance(ds, int) else len(ds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """``slice(start, stop)`` of each consecutive batch of ``n`` rows (the last may be short)."""
    for b in range(num_batches(n, batch_size)):
        yield slice(b * batch_size, min((b + 1) * batch_size, n))


def pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with its leading axis padded to ``size`` rows by repeating its rows.

    A constant batch shape means one compilation. Padding rows are real
    examples, so a model or an attack sees nothing degenerate; the caller drops
    their outputs (or masks them, as :func:`eval_batches` does).
    """
    a = np.asarray(a)
    if len(a) == size:
        return a
    if not 0 < len(a) < size:
        raise ValueError(f"cannot pad {len(a)} rows to {size}")
    reps = np.resize(np.arange(len(a)), size - len(a))
    return np.concatenate([a, a[reps]], axis=0)


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
        yield {"image": to_float(x), "label": y}


def eval_batches(data: ArrayDataset | Mapping[str, np.ndarray],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches in order, for evaluation: one shape, one compilation.

    ``data`` is an :class:`ArrayDataset` (batches hold ``'image'`` as float32 in
    ``[0, 1]`` and ``'label'``) or a mapping of equally long arrays (each batched
    as it is). Every batch also holds ``'mask'``: float32, 1 for a real row, 0
    for a padding row of the last batch (:func:`pad_to`). Batch ``i`` covers rows
    ``i * batch_size`` up to ``(i + 1) * batch_size`` (:func:`batch_slices`).
    """
    if isinstance(data, ArrayDataset):
        arrays: Mapping[str, np.ndarray] = {"image": data.images, "label": data.labels}
        convert = {"image": to_float}
    else:
        arrays, convert = data, {}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise ValueError("eval_batches needs arrays of one length, got "
                         f"{ {k: len(v) for k, v in arrays.items()} }")
    (n,) = lengths
    for s in batch_slices(n, batch_size):
        real = s.stop - s.start
        batch = {k: pad_to(convert.get(k, np.asarray)(v[s]), batch_size)
                 for k, v in arrays.items()}
        mask = np.zeros((batch_size,), np.float32)
        mask[:real] = 1.0
        batch["mask"] = mask
        yield batch
