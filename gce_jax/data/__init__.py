"""Data sets as in-memory uint8 arrays, by name, and a fast deterministic numpy batch pipeline.

Every supported data set fits in memory as uint8, so loading materialises the
whole split once (:func:`load_split`) and batching is a numpy gather over a
pre-permuted index (:func:`batches`); :func:`eval_batches` gives fixed-size
evaluation batches, the last one padded (:func:`pad_to`) and masked.

Data sets are known by name in a registry (:mod:`gce_jax.data.registry`):
``mnist``, ``cifar10``, ``cifar100``, ``tiny_imagenet`` and ``digits`` are
built in, and :func:`register_dataset` adds a user's set in a known format
under its own name, class names, shape and normalisation statistics (a
training config can describe one too: ``config.data.format``).

Sources (one module each):

* local files under ``data_dir``: IDX files (:mod:`~gce_jax.data.idx`), the CIFAR
  python pickles (:mod:`~gce_jax.data.cifar`), ``split/class/*.png|jpg`` image
  folders, optionally inside a ``.tar.gz`` (:mod:`~gce_jax.data.images`), and the
  ``tiny-imagenet-200`` folder (:mod:`~gce_jax.data.tiny_imagenet`); decoded
  image files are cached as ``.npz`` (:mod:`~gce_jax.data.cache`);
* tfds: ``tfds.data_source(name, split=..., data_dir=...)`` (array_record,
  :mod:`~gce_jax.data.tfds_source`). TensorFlow is only needed to *prepare* a
  tfds download (``pip install .[prepare]``);
* ``digits`` is scikit-learn's bundled 8x8 digits set and needs neither.

``source='auto'`` reads local files when ``data_dir`` holds a known layout and
tfds when ``data_dir`` is ``None`` or a tfds data_dir with the set prepared; any
other ``data_dir`` (missing, empty, unrelated) is one ``DataError`` saying so.

Model selection must use :func:`train_val_split` on the training split, never
the test set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from gce_jax.data.arrays import ArrayDataset, resize_dataset, train_val_split
from gce_jax.data.loading import load_config_split, load_split
from gce_jax.data.pipeline import (augment_batch, batch_slices, batches, eval_batches,
                                   num_batches, pad_to, to_float)
from gce_jax.data.registry import (BUILTIN_DATASETS, CIFAR10_CLASSES, FORMATS, DataError,
                                   DatasetSpec, dataset_from_config, dataset_names, get_dataset,
                                   register_dataset)

__all__ = [
    "ArrayDataset",
    "BUILTIN_DATASETS",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DataError",
    "DatasetSpec",
    "FORMATS",
    "augment_batch",
    "batch_slices",
    "batches",
    "dataset_from_config",
    "dataset_info",
    "dataset_names",
    "eval_batches",
    "get_dataset",
    "load_config_split",
    "load_split",
    "num_batches",
    "pad_to",
    "register_dataset",
    "resize_dataset",
    "to_float",
    "train_val_split",
]


def dataset_info(name: str) -> tuple[tuple[int, int, int], int]:
    """``(image_shape HWC, num_classes)`` for ``name``, without loading any data."""
    spec = get_dataset(name)
    return spec.image_shape, spec.num_classes


class _DatasetTable(Mapping):
    """``name -> (image_shape HWC, num_classes)`` of every registered data set (a live,
    read-only view of the registry)."""

    def __getitem__(self, name: str) -> tuple[tuple[int, int, int], int]:
        if name not in dataset_names():
            raise KeyError(name)
        return dataset_info(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dataset_names())

    def __len__(self) -> int:
        return len(dataset_names())


DATASETS: Mapping[str, tuple[tuple[int, int, int], int]] = _DatasetTable()
