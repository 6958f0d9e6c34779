"""Data sets by name: what each one is (shape, classes, normalisation) and how it is stored.

A :class:`DatasetSpec` is everything the rest of the project knows about a data
set without reading it: the loaders read its ``formats``, the models take their
input normalisation (``mean``/``std``) and class count from it, the training
config is validated against the registered names, and reports carry its name
and class names. The built-in sets are registered below; a user's set in one of
the known formats joins them with :func:`register_dataset`, or is described in
a training config (``config.data.format``, see :func:`dataset_from_config`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BUILTIN_DATASETS",
    "CIFAR10_CLASSES",
    "DataError",
    "DatasetSpec",
    "FORMATS",
    "dataset_from_config",
    "dataset_names",
    "get_dataset",
    "register_dataset",
]


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message names the path and
    the expected layout."""


# On-disk formats a data set can be stored in (the readers in this package).
# 'tfds' is not among them: a data set is in the tfds catalog when it has a
# tfds_name.
FORMATS = (
    "idx",              # MNIST-style IDX files (optionally gzipped)
    "cifar10_pickle",   # CIFAR-10's python batches (data_batch_1..5, test_batch)
    "cifar100_pickle",  # CIFAR-100's python files (train, test; fine labels)
    "image_folder",     # <split>/<class>/*.png|jpg, a folder or a .tar.gz of it
    "tiny_imagenet",    # the tiny-imagenet-200 folder
    "sklearn_digits",   # scikit-learn's bundled 8x8 digits (no files)
)

# Official CIFAR-10 label order (batches.meta); alphabetical order would differ.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _floats(name: str, values: Sequence[float] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"{name} must be finite, got {values!r}")
    return out


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One data set, as registered.

    Attributes:
      name: the name runs, reports and class lists carry (``[A-Za-z0-9_.-]``).
      formats: the local layouts it may be stored in, tried in this order
        (see ``FORMATS``); empty for a tfds-only set.
      image_shape: ``(H, W, C)`` of every image.
      num_classes: labels are ``0 .. num_classes - 1``.
      class_names: one per label, in label order; ``None`` = read from the files
        where they hold them (CIFAR meta files, ``wnids.txt``, tfds features).
      mean, std: per-channel statistics of ``[0, 1]`` pixels, used by the models'
        in-model normalisation; ``None`` = the model sees raw ``[0, 1]`` pixels.
      splits: the split names ``load_split`` accepts.
      tfds_name: its name in the tfds catalog (``source='tfds'``), if any.
      idx_files: ``((split, images file, labels file), ...)`` for the ``idx``
        format; empty = MNIST's file names.
    """

    name: str
    formats: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    splits: tuple[str, ...] = ("train", "test")
    tfds_name: str | None = None
    idx_files: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise DataError(f"data set name {self.name!r}: use letters, digits, '_', '.' or '-'")
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise DataError(f"{self.name}: unknown format {bad[0]!r}; known: {', '.join(FORMATS)}"
                            " (or give a tfds_name for a tfds data set)")
        if not formats and not self.tfds_name:
            raise DataError(f"{self.name}: give a format (one of {', '.join(FORMATS)}) or a tfds_name")
        try:
            shape = tuple(int(v) for v in self.image_shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{self.name}: image_shape must be (H, W, C) positive ints, "
                            f"got {self.image_shape!r}")
        names = None if self.class_names is None else tuple(str(c) for c in self.class_names)
        k = self.num_classes if self.num_classes is not None else (len(names) if names else None)
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise DataError(f"{self.name}: num_classes must be an int >= 2, got {k!r}")
        if names is not None and (len(names) != k or len(set(names)) != k):
            raise DataError(f"{self.name}: class_names must be {k} distinct names, got "
                            f"{len(names)} ({len(set(names))} distinct)")
        mean, std = _floats(f"{self.name}: mean", self.mean), _floats(f"{self.name}: std", self.std)
        if (mean is None) != (std is None):
            raise DataError(f"{self.name}: give both mean and std, or neither")
        if mean is not None and (len(mean) != shape[2] or len(std) != shape[2]):
            raise DataError(f"{self.name}: mean and std need one value per channel ({shape[2]}), "
                            f"got {len(mean)} and {len(std)}")
        if std is not None and min(std) <= 0:
            raise DataError(f"{self.name}: std must be > 0, got {std}")
        splits = tuple(str(s) for s in self.splits)
        if "train" not in splits or len(set(splits)) != len(splits):
            raise DataError(f"{self.name}: splits must be distinct and include 'train', got {splits}")
        # Sorted: a config (ml_collections sorts keys) and a dict describe the same set.
        idx_files = tuple(sorted(tuple(str(v) for v in t) for t in self.idx_files))
        if any(len(t) != 3 for t in idx_files):
            raise DataError(f"{self.name}: idx_files entries are (split, images file, labels file)")
        for attr, value in (("formats", formats), ("image_shape", shape), ("num_classes", k),
                            ("class_names", names), ("mean", mean), ("std", std),
                            ("splits", splits), ("idx_files", idx_files)):
            object.__setattr__(self, attr, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a run's ``config.json`` records them)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise DataError(f"unknown data set fields {unknown}; known: {sorted(fields)}")
        return cls(**dict(d))


_REGISTRY: dict[str, DatasetSpec] = {}


def _add(spec: DatasetSpec) -> DatasetSpec:
    _REGISTRY[spec.name] = spec
    return spec


# Per-channel mean/std on [0,1] pixels. MNIST is deliberately left raw: the
# authors' LeNet-5 sees [0, 1] pixels. Normalising inside the model keeps its
# input in pixel space, so attacks' eps and [0,1] clipping mean what they say.
_add(DatasetSpec("mnist", ("idx", "image_folder"), (28, 28, 1), 10,
                 class_names=tuple(str(i) for i in range(10)), tfds_name="mnist"))
_add(DatasetSpec("cifar10", ("cifar10_pickle", "image_folder"), (32, 32, 3), 10,
                 class_names=CIFAR10_CLASSES, mean=(0.4914, 0.4822, 0.4465),
                 std=(0.2470, 0.2435, 0.2616), tfds_name="cifar10"))
_add(DatasetSpec("cifar100", ("cifar100_pickle", "image_folder"), (32, 32, 3), 100,
                 mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                 tfds_name="cifar100"))
# Official Tiny ImageNet test labels are not public: 'test' means the official val set.
_add(DatasetSpec("tiny_imagenet", ("tiny_imagenet",), (64, 64, 3), 200,
                 mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
                 splits=("train", "val", "test")))
_add(DatasetSpec("digits", ("sklearn_digits",), (8, 8, 1), 10,
                 class_names=tuple(str(i) for i in range(10))))

BUILTIN_DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def register_dataset(
    name: str,
    *,
    format: str | Sequence[str],  # noqa: A002 - the word users know from the config
    image_shape: Sequence[int],
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    splits: Sequence[str] = ("train", "test"),
    tfds_name: str | None = None,
    idx_files: Mapping[str, tuple[str, str]] | None = None,
    overwrite: bool = False,
) -> DatasetSpec:
    """Registers a data set in a known format under its own name.

    Afterwards ``load_split(name, ...)``, ``get_model(..., dataset=name)``,
    ``config.dataset = name`` for training, ``experiments.evaluate`` and the
    reports all use this name, its class names and its normalisation.

    Args:
      name: the data set's name (not a built-in one).
      format: one of ``FORMATS`` (or several, tried in order), or ``'tfds'``
        with ``tfds_name``.
      image_shape: ``(H, W, C)``.
      class_names: one per label; ``num_classes`` defaults to their count.
      num_classes: needed when ``class_names`` is not given.
      mean, std: per-channel statistics of ``[0, 1]`` pixels for the models'
        in-model normalisation (``None``: raw pixels).
      splits: split names (default ``('train', 'test')``).
      tfds_name: its tfds catalog name (``source='tfds'``).
      idx_files: ``{split: (images file, labels file)}`` for ``format='idx'``
        (default: MNIST's names, e.g. ``train-images-idx3-ubyte``).
      overwrite: replace an earlier registration of ``name`` with other values.

    Returns:
      The registered :class:`DatasetSpec`. Registering the same values twice is
      a no-op.

    Raises:
      DataError: a bad value, a built-in name, or ``name`` already registered
        with other values (without ``overwrite``).
    """
    formats = (format,) if isinstance(format, str) else tuple(format)
    if "tfds" in formats:
        formats = tuple(f for f in formats if f != "tfds")
        tfds_name = tfds_name or name
    spec = DatasetSpec(
        name, formats, tuple(image_shape), num_classes, class_names=class_names, mean=mean,
        std=std, splits=tuple(splits), tfds_name=tfds_name,
        idx_files=tuple((s, *files) for s, files in (idx_files or {}).items()))
    return _register(spec, overwrite=overwrite)


def _register(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
    old = _REGISTRY.get(spec.name)
    if old == spec:
        return old
    if spec.name in BUILTIN_DATASETS:
        raise DataError(f"{spec.name!r} is a built-in data set; register yours under its own name")
    if old is not None and not overwrite:
        raise DataError(f"data set {spec.name!r} is already registered with other values "
                        f"({old}); pass overwrite=True to replace it")
    return _add(spec)


def get_dataset(name: str | DatasetSpec) -> DatasetSpec:
    """The registered spec of ``name`` (a spec is returned as it is)."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(_REGISTRY)} "
                        "(gce_jax.data.register_dataset adds one)") from None


def dataset_names() -> tuple[str, ...]:
    """Every registered name, built-in ones first."""
    return tuple(_REGISTRY)


# config.data fields that describe a data set (the rest say where it is and
# how to batch it).
_CONFIG_FIELDS = ("format", "image_shape", "class_names", "num_classes", "mean", "std",
                  "splits", "tfds_name", "idx_files")


def dataset_from_config(config: Any) -> DatasetSpec:
    """The data set a training config names, without changing the registry.

    In order:

    1. ``config.resolved.dataset``: what a finished run recorded in its
       ``config.json`` (so evaluating it uses the normalisation it trained with,
       in any process);
    2. ``config.data.format`` set: the set described by ``config.data``
       (``format``, ``image_shape``, ``class_names`` or ``num_classes``,
       ``mean``/``std``, ...) under the name ``config.dataset``;
    3. the registry's entry for ``config.dataset``.

    Raises:
      DataError: an unknown name, a bad description, or a description that
        reuses a registered name with other values.
    """
    name = config.get("dataset")
    recorded = (config.get("resolved") or {}).get("dataset")
    if recorded:
        return DatasetSpec.from_dict(dict(recorded))
    data = config.get("data") or {}
    if data.get("format") is None:
        return get_dataset(name)
    fields = {k: data.get(k) for k in _CONFIG_FIELDS if data.get(k) is not None}
    fmt = fields.pop("format")
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    if "tfds" in formats:
        formats = tuple(f for f in formats if f != "tfds")
        fields["tfds_name"] = fields.get("tfds_name") or name
    if "idx_files" in fields:
        fields["idx_files"] = tuple((s, *f) for s, f in dict(fields["idx_files"]).items())
    if "image_shape" not in fields:
        raise DataError(f"config.data.format={fmt!r} needs config.data.image_shape (H, W, C)")
    spec = DatasetSpec(name=name, formats=formats, image_shape=fields.pop("image_shape"),
                       num_classes=fields.pop("num_classes", None), **fields)
    old = _REGISTRY.get(name)
    if old is not None and old != spec:
        raise DataError(f"config.dataset={name!r} is already registered with other values "
                        f"({old}); give the data set that config.data describes its own name")
    return spec
