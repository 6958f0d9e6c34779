"""ResNets: CIFAR ResNet-(6n+2) with option-A shortcuts, and ResNet-50.

CIFAR ResNets follow He et al. 2016 (Sec. 4.2): a 3x3 stem with 16 channels,
three stages of n basic blocks with 16/32/64 channels, global average pooling
and a linear classifier. Option A: the shortcut of a downsampling block is the
identity subsampled by 2 with zero-padded extra channels (no parameters).

``conv_impl`` selects the formulation of the CIFAR ResNets' convolutions, as for
LeNet-5 (``gce_jax.models.im2col``): ``'xla'`` is ``nn.Conv`` on NHWC;
``'im2col'`` runs the whole network channels-first (``[C, B, H, W]``) with
convolutions as GEMMs over patches and BatchNorm over axis 0. Both have the
same parameter tree and the same values and gradients. The default is
``'xla'`` everywhere: on a 2-core CPU (2026-12-02) the im2col ResNet-20 step
measured 0.95-1.12x the native one's time (``benchmarks.training --only
resnet``), so unlike LeNet-5 it is not the CPU default (``'auto'`` would pick
it on CPU).

ResNet-50 uses bottleneck blocks [3, 4, 6, 3]. For 64x64 Tiny ImageNet the
stem is a 3x3 stride-1 convolution without max-pooling (a 7x7/2 stem plus pool
would shrink 64x64 inputs to 16x16 before the first stage).
"""

from __future__ import annotations

import functools
from typing import Literal, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from gce_jax.models import conv_grad
from gce_jax.models.common import Normalize, resolve_for_backend
from gce_jax.models.im2col import ConvImpl, PatchConv, resolve_conv_impl

# He et al. initialise convolutions with N(0, 2/fan_in).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _batch_norm(train: bool, axis_name: str | None, dtype, name=None, scale_init=None,
                feature_axis: int = -1):
    kw = {} if scale_init is None else {"scale_init": scale_init}
    # momentum 0.9 == PyTorch's 0.1; axis_name makes the statistics a pmean
    # over the data-parallel axis when training under shard_map.
    return nn.BatchNorm(use_running_average=not train, axis=feature_axis, momentum=0.9,
                        epsilon=1e-5, axis_name=axis_name if train else None, dtype=dtype,
                        name=name, **kw)


InputGrad = Literal["auto", "native", "explicit"]
INPUT_GRADS = ("auto", "native", "explicit")


def resolve_input_grad(input_grad: str) -> str:
    """``'auto'`` -> ``'explicit'`` on the CPU backend, ``'native'`` otherwise."""
    return resolve_for_backend("input_grad", input_grad, INPUT_GRADS, on_cpu="explicit",
                               elsewhere="native")


def _conv3x3(filters: int, strides: int, channels_first: bool, dtype, name: str | None = None,
             input_grad: str = "native"):
    if channels_first:
        return PatchConv(filters, 3, strides=strides, padding=1, use_bias=False,
                         kernel_init=_conv_init, dtype=dtype, name=name)
    conv = (conv_grad.conv_general_dilated if resolve_input_grad(input_grad) == "explicit"
            else lax.conv_general_dilated)
    return nn.Conv(filters, (3, 3), strides=strides, padding=1, use_bias=False,
                   kernel_init=_conv_init, dtype=dtype, name=name, conv_general_dilated=conv)


class BasicBlock(nn.Module):
    filters: int
    strides: int = 1
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32
    channels_first: bool = False  # [C, B, H, W] activations and im2col convolutions
    input_grad: InputGrad = "native"

    @nn.compact
    def __call__(self, x, train: bool):
        cf = self.channels_first
        conv = functools.partial(_conv3x3, channels_first=cf, dtype=self.dtype,
                                 input_grad=self.input_grad)
        bn = functools.partial(_batch_norm, train, self.bn_axis_name, self.dtype,
                               feature_axis=0 if cf else -1)
        # Explicit names: the same parameter tree for both layouts.
        y = conv(self.filters, self.strides, name="Conv_0")(x)
        y = nn.relu(bn(name="BatchNorm_0")(y))
        y = conv(self.filters, 1, name="Conv_1")(y)
        y = bn(name="BatchNorm_1")(y)
        shortcut = x
        channels = x.shape[0 if cf else -1]
        if self.strides != 1 or channels != self.filters:
            s, extra = self.strides, self.filters - channels
            pad_c = (extra // 2, extra - extra // 2)
            if cf:
                shortcut = jnp.pad(x[:, :, ::s, ::s], (pad_c, (0, 0), (0, 0), (0, 0)))
            else:
                shortcut = jnp.pad(x[:, ::s, ::s, :], ((0, 0), (0, 0), (0, 0), pad_c))
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; depth in {20, 32, 44, 56, 110}."""

    depth: int = 56
    num_classes: int = 10
    normalize: Normalize = Normalize()
    bn_axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32
    conv_impl: ConvImpl = "xla"
    # nn.Conv's input gradient: 'explicit' (gce_jax.models.conv_grad) or
    # XLA's 'native' form; 'auto' is explicit on CPU, native elsewhere.
    input_grad: InputGrad = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 return_features: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        cf = resolve_conv_impl(self.conv_impl) == "im2col"
        x = self.normalize(x).astype(self.dtype)
        if cf:
            x = jnp.transpose(x, (3, 0, 1, 2))  # NHWC -> CNHW
        x = _conv3x3(16, 1, cf, self.dtype, name="Conv_0", input_grad=self.input_grad)(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype, name="BatchNorm_0",
                                feature_axis=0 if cf else -1)(x))
        for stage, filters in enumerate((16, 32, 64)):
            for block in range(n):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(filters, strides, self.bn_axis_name, self.dtype, cf,
                               self.input_grad,
                               name=f"BasicBlock_{stage * n + block}")(x, train)
        features = jnp.mean(x, axis=(2, 3)).T if cf else jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="Dense_0")(features)
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
