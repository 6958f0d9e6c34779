"""Flax (linen) models. Inputs are NHWC in [0,1]; normalisation is inside.

Every model is called as ``model.apply(variables, x, train=False,
return_features=False)`` and returns logits, or ``(logits, features)`` with the
penultimate activations.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gce_jax.models.common import DATASET_STATS, Normalize, normalize_for
from gce_jax.models.lenet import LeNet5
from gce_jax.models.resnet import CifarResNet, ResNet50

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
MODEL_NAMES = ("lenet5", *(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS), "resnet50")


def get_model(name: str, *, num_classes: int, dataset: str | None = None,
              dtype: jnp.dtype = jnp.float32,
              bn_axis_name: str | None = None) -> nn.Module:
    """Builds a model by name.

    Args:
      name: ``lenet5``, ``resnet{20,32,44,56,110}`` (CIFAR) or ``resnet50``.
      num_classes: size of the logits.
      dataset: selects the in-model mean/std normalisation (none for MNIST).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and logits
        stay float32.
      bn_axis_name: mesh axis over which BatchNorm statistics are averaged in
        training mode (data-parallel training sets ``'batch'``).
    """
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


def logits_fn(model: nn.Module, variables) -> Callable[[jax.Array], jax.Array]:
    """Inference-mode ``x -> logits`` closure (BatchNorm uses running averages).

    This is what attacks and evaluation call: it can never update batch
    statistics, and each example's logits are independent of its batch.
    """
    return lambda x: model.apply(variables, x, train=False)


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


__all__ = ["get_model", "logits_fn", "count_params", "LeNet5", "CifarResNet",
           "ResNet50", "Normalize", "DATASET_STATS", "MODEL_NAMES"]
