"""ResNets: CIFAR ResNet-(6n+2) with option-A shortcuts, and ResNet-50.

CIFAR ResNets follow He et al. 2016 (Sec. 4.2): a 3x3 stem with 16 channels,
three stages of n basic blocks with 16/32/64 channels, global average pooling
and a linear classifier. Option A: the shortcut of a downsampling block is the
identity subsampled by 2 with zero-padded extra channels (no parameters).

ResNet-50 uses bottleneck blocks [3, 4, 6, 3]. For 64x64 Tiny ImageNet the
stem is a 3x3 stride-1 convolution without max-pooling (a 7x7/2 stem plus pool
would shrink 64x64 inputs to 16x16 before the first stage).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from gce_jax.models.common import Normalize

# He et al. initialise convolutions with N(0, 2/fan_in).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _batch_norm(train: bool, axis_name: str | None, dtype, name=None, scale_init=None):
    kw = {} if scale_init is None else {"scale_init": scale_init}
    # momentum 0.9 == PyTorch's 0.1; axis_name makes the statistics a pmean
    # over the data-parallel axis when training under shard_map.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if train else None, dtype=dtype,
                        name=name, **kw)


class BasicBlock(nn.Module):
    filters: int
    strides: int = 1
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                                 dtype=self.dtype)
        y = conv(self.filters, (3, 3), strides=self.strides, padding=1)(x)
        y = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype)(y))
        y = conv(self.filters, (3, 3), padding=1)(y)
        y = _batch_norm(train, self.bn_axis_name, self.dtype)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.filters:
            shortcut = x[:, ::self.strides, ::self.strides, :]
            extra = self.filters - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0),
                                          (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; depth in {20, 32, 44, 56, 110}."""

    depth: int = 56
    num_classes: int = 10
    normalize: Normalize = Normalize()
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 return_features: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        x = self.normalize(x).astype(self.dtype)
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype)(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype)(x))
        for stage, filters in enumerate((16, 32, 64)):
            for block in range(n):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(filters, strides, self.bn_axis_name, self.dtype)(x, train)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32)(features)
        return (logits, features) if return_features else logits


class Bottleneck(nn.Module):
    filters: int
    strides: int = 1
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                                 dtype=self.dtype)
        bn = functools.partial(_batch_norm, train, self.bn_axis_name, self.dtype)
        y = nn.relu(bn()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(bn()(conv(self.filters, (3, 3), strides=self.strides, padding=1)(y)))
        # Zero-init the last BN scale so each block starts as the identity.
        y = bn(scale_init=nn.initializers.zeros)(conv(4 * self.filters, (1, 1))(y))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != 4 * self.filters:
            shortcut = conv(4 * self.filters, (1, 1), strides=self.strides, name="proj")(x)
            shortcut = bn(name="proj_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet50(nn.Module):
    """Bottleneck ResNet-50 ([3, 4, 6, 3]) for 64x64 inputs."""

    num_classes: int = 200
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    normalize: Normalize = Normalize()
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 return_features: bool = False):
        x = self.normalize(x).astype(self.dtype)
        x = nn.Conv(64, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype)(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype)(x))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(64 * 2**stage, strides, self.bn_axis_name, self.dtype)(x, train)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32)(features)
        return (logits, features) if return_features else logits
