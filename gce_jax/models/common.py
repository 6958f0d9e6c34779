"""Pieces shared by all models: input normalisation inside the model."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

# Per-channel mean/std on [0,1] pixels. Normalising inside the model keeps the
# model's input in pixel space, so attacks' eps and [0,1] clipping mean what
# they say. MNIST is deliberately absent: the authors' LeNet-5 sees raw [0,1].
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


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


def normalize_for(dataset: str | None) -> Normalize:
    """The Normalize layer for a dataset name (identity for unknown/None)."""
    if dataset in DATASET_STATS:
        mean, std = DATASET_STATS[dataset]
        return Normalize(mean=mean, std=std)
    return Normalize()
