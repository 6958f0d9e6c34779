"""Flax (linen) models. Inputs are NHWC in [0,1]; normalisation is inside.

Every model is called as ``model.apply(variables, x, train=False,
return_features=False)`` and returns logits, or ``(logits, features)`` with the
penultimate activations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from gce_jax.data.registry import DatasetSpec, get_dataset
from gce_jax.models.common import Normalize, normalize_for
from gce_jax.models.lenet import LeNet5
from gce_jax.models.resnet import CifarResNet, ResNet50

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
MODEL_NAMES = ("lenet5", *(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS), "resnet50")


def get_model(name: str, *, num_classes: int | None = None,
              dataset: str | DatasetSpec | None = None,
              dtype: jnp.dtype = jnp.float32,
              bn_axis_name: str | None = None) -> nn.Module:
    """Builds a model by name.

    Args:
      name: ``lenet5``, ``resnet{20,32,44,56,110}`` (CIFAR) or ``resnet50``.
      num_classes: size of the logits (default: the data set's class count).
      dataset: a registered data set name (``gce_jax.data.register_dataset``)
        or spec: selects the in-model mean/std normalisation (none for MNIST)
        and the default ``num_classes``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and logits
        stay float32.
      bn_axis_name: mesh axis over which BatchNorm statistics are averaged in
        training mode (data-parallel training sets ``'batch'``).
    """
    if num_classes is None:
        if dataset is None:
            raise ValueError("get_model needs num_classes or a dataset to take it from")
        num_classes = get_dataset(dataset).num_classes
    norm = normalize_for(dataset)
    if name == "lenet5":
        return LeNet5(num_classes=num_classes, normalize=norm, dtype=dtype)
    if name.startswith("resnet") and name[6:].isdigit():
        depth = int(name[6:])
        if depth in CIFAR_RESNET_DEPTHS:
            return CifarResNet(depth=depth, num_classes=num_classes, normalize=norm,
                               bn_axis_name=bn_axis_name, dtype=dtype)
        if depth == 50:
            return ResNet50(num_classes=num_classes, normalize=norm,
                            bn_axis_name=bn_axis_name, dtype=dtype)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


class _InferenceApply:
    """``(variables, x) -> model.apply(variables, x, train=False)``, hashable by model.

    Flax modules are frozen dataclasses (equal config => equal hash), but
    ``model.apply`` bound methods compare by identity; this wrapper lets two
    equal models share one compiled attack.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, variables, x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x, train=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _InferenceApply) and self.model == other.model

    def __hash__(self) -> int:
        return hash((_InferenceApply, self.model))

    def __repr__(self) -> str:
        return f"_InferenceApply({type(self.model).__name__})"


def logits_fn(model: nn.Module, variables) -> Partial:
    """Inference-mode ``x -> logits`` (BatchNorm uses running averages).

    This is what attacks and evaluation call: it can never update batch
    statistics, and each example's logits are independent of its batch. It is
    a ``jax.tree_util.Partial`` whose variables are pytree leaves, so a jitted
    attack taking it as an argument compiles once per model configuration and
    shape, not once per set of weights.
    """
    return Partial(_InferenceApply(model), variables)


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__ = ["get_model", "logits_fn", "count_params", "LeNet5", "CifarResNet",
           "ResNet50", "Normalize", "MODEL_NAMES"]
