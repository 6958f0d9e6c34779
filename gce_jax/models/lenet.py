"""LeNet-5 as in the authors' MNIST code (61,706 parameters for 10 classes)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gce_jax.models.common import Normalize


class LeNet5(nn.Module):
    """conv6@5x5(pad 2)-pool-conv16@5x5-pool-fc120-fc84-fc(K), ReLU.

    Input ``[B, 28, 28, C]`` in [0,1]. No BatchNorm, so ``train`` changes
    nothing; it is accepted so every model shares one call signature.
    """

    num_classes: int = 10
    normalize: Normalize = Normalize()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 return_features: bool = False):
        del train
        x = self.normalize(x).astype(self.dtype)
        x = nn.Conv(6, (5, 5), padding=2, dtype=self.dtype)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", dtype=self.dtype)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, dtype=self.dtype)(x))
        features = nn.relu(nn.Dense(84, dtype=self.dtype)(x))
        # Logits in float32 whatever the compute dtype: the losses' stability
        # (and attack gradients) depend on it.
        logits = nn.Dense(self.num_classes, dtype=jnp.float32)(features)
        return (logits, features) if return_features else logits
