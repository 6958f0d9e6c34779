"""tfds data sets, read with ``tfds.data_source`` (array_record, random access).

TensorFlow is only needed to *prepare* (download and convert) a tfds data set
(``pip install .[prepare]``); reading a prepared one needs tensorflow-datasets alone.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from gce_jax.data.arrays import ArrayDataset
from gce_jax.data.layout import describe_layout
from gce_jax.data.registry import DataError, DatasetSpec
from gce_jax.provenance import portable_path

DEFAULT_DIR = "the default tfds data_dir (~/tensorflow_datasets)"


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_is_prepared(tfds: Any, name: str, data_dir: Any) -> bool:
    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # noqa: BLE001 - only refines an error message
        return False


def _open(tfds: Any, spec: DatasetSpec, split: str, data_dir: Any, where: str, also: str) -> Any:
    name = spec.tfds_name
    # download=False first: without TensorFlow tfds cannot prepare, and its own errors
    # for that case are unrelated-looking ImportErrors.
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
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
            return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
        except Exception as err2:  # noqa: BLE001
            raise DataError(
                f"tfds could not prepare {name!r} split {split!r} in {where}{also}: {err2}"
            ) from err2


def load_tfds(spec: DatasetSpec, split: str, data_dir: Any, *, auto: bool) -> ArrayDataset:
    """``split`` of ``spec.tfds_name`` from the tfds ``data_dir`` (``None`` = tfds' default)."""
    if not spec.tfds_name:
        raise DataError(f"{spec.name} is not in the tfds catalog; read it with source='local' "
                        f"and a data_dir holding {describe_layout(spec)}")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(f"source='tfds' for {spec.name} needs tensorflow-datasets ({err}); or "
                        f"pass source='local' with data_dir holding {describe_layout(spec)}") from err

    if data_dir is None:
        where = DEFAULT_DIR
    else:
        where = str(data_dir) + ("" if os.path.exists(data_dir) else " (which does not exist)")
    also = ""
    if auto:
        also = f" (data_dir also has no local layout; expected {describe_layout(spec)})"
    src = _open(tfds, spec, split, data_dir, where, also)

    name, shape, num_classes = spec.tfds_name, spec.image_shape, spec.num_classes
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

    class_names = spec.class_names
    if class_names is None:
        try:
            names = src.dataset_info.features["label"].names
            if len(names) == num_classes:
                class_names = tuple(names)
        except Exception:  # noqa: BLE001 - metadata is optional (absent under mocks)
            pass
    origin = DEFAULT_DIR if data_dir is None else portable_path(data_dir)
    return ArrayDataset(images, labels, num_classes, spec.name, class_names=class_names,
                        split=split, origin=f"tfds:{name}/{split} in {origin}")
