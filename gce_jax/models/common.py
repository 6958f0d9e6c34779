"""Pieces shared by all models: input normalisation inside the model."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gce_jax.data.registry import DatasetSpec, get_dataset


class Normalize(nn.Module):
    """``(x - mean) / std`` with constants (no parameters); identity if None."""

    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.mean is None:
            return x
        if x.shape[-1] != len(self.mean):
            # Broadcasting would silently turn a 1-channel image into 3 channels.
            raise ValueError(f"input has {x.shape[-1]} channels but the normalisation "
                             f"expects {len(self.mean)}; check the model's dataset")
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x - mean) / std


def normalize_for(dataset: str | DatasetSpec | None) -> Normalize:
    """The Normalize layer for a data set: its registered ``mean``/``std``
    (``gce_jax.data.registry``); identity for ``None`` or a set registered without
    statistics (MNIST: the authors' LeNet-5 sees raw [0,1] pixels)."""
    if dataset is None:
        return Normalize()
    spec = get_dataset(dataset)
    return Normalize(mean=spec.mean, std=spec.std)


def resolve_for_backend(option: str, value: str, choices: Sequence[str], *, on_cpu: str,
                        elsewhere: str) -> str:
    """``value`` of a model ``option``, with ``'auto'`` resolved for the default backend.

    Raises ValueError naming ``option`` and its ``choices`` for any other value.
    """
    if value not in choices:
        raise ValueError(f"{option} must be one of {tuple(choices)}, got {value!r}")
    if value == "auto":
        return on_cpu if jax.default_backend() == "cpu" else elsewhere
    return value
