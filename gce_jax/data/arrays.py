"""One split held in memory as uint8 arrays, and the operations on whole splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["ArrayDataset", "limit_per_class", "resize_dataset", "train_val_split"]


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


def limit_per_class(ds: ArrayDataset, k: int) -> ArrayDataset:
    """The first ``k`` examples of each class, in the dataset's own order."""
    order = np.argsort(ds.labels, kind="stable")
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(ds), np.int64)
    rank[order] = np.arange(len(ds)) - np.repeat(starts, counts)
    keep = np.flatnonzero(rank < k)
    if len(keep) == len(ds):
        return ds
    return ds.subset(keep)


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
