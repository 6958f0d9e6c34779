"""Convolutions as matrix products over explicit patches, channels-first.

The CPU fast path of LeNet-5 and the CIFAR ResNets. Activations are
``[C, B, H, W]``; a ``k x k`` convolution is ``kernel^T @ patches`` with
``patches`` the ``[k*k*C, B*Ho*Wo]`` stack of shifted (strided) views. Why:
XLA:CPU runs ``lax.conv`` with Eigen's spatial convolution, slow for the few
channels of these networks, and computes weight gradients with the batch as the
contraction dimension behind large transposes; as GEMMs in this layout the
forward, weight-gradient (``g @ patches^T``) and input-gradient
(``kernel @ g``, then col2im = a sum of pads) products run in XLA:CPU's fast
GEMM library without layout copies. GEMM outputs are materialised, which also
stops XLA from recomputing cheap elementwise producers (BatchNorm, ReLU) inside
every consumer. On GPU/TPU the native convolutions are the right choice.

:class:`PatchConv` has exactly ``nn.Conv``'s parameters (same names, shapes,
initialisers), so checkpoints move freely between the formulations.
"""

from __future__ import annotations

from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from gce_jax.models.common import resolve_for_backend

ConvImpl = Literal["auto", "xla", "im2col"]
CONV_IMPLS = ("auto", "xla", "im2col")


def resolve_conv_impl(conv_impl: str) -> str:
    """``'auto'`` -> ``'im2col'`` on the CPU backend, ``'xla'`` otherwise."""
    return resolve_for_backend("conv_impl", conv_impl, CONV_IMPLS, on_cpu="im2col",
                               elsewhere="xla")


def patches_cnhw(x: jax.Array, k: int, stride: int = 1) -> jax.Array:
    """``[C, B, H, W]`` -> ``[k*k*C, B*Ho*Wo]`` rows in HWIO kernel order (i, j, c).

    Each of the k*k slices is a block of whole ``[B, Ho, Wo]`` images, so the
    stack is a contiguous copy and its transpose (col2im) a sum of pads.
    """
    c, b, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    cols = jnp.stack([x[:, :, i:i + stride * (ho - 1) + 1:stride,
                        j:j + stride * (wo - 1) + 1:stride]
                      for i in range(k) for j in range(k)])
    return cols.reshape(k * k * c, b * ho * wo)


def conv_cnhw(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, padding: int,
              stride: int = 1) -> jax.Array:
    """Convolution ``[C,B,H,W]`` -> ``[F,B,Ho,Wo]`` with symmetric zero padding.

    ``kernel`` is HWIO ``[k, k, C, F]`` (flax's layout); same output as
    ``nn.Conv(F, (k, k), strides=stride, padding=padding)`` on NHWC.
    """
    k, _, c, f = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, b, h, w = x.shape
    out = kernel.reshape(k * k * c, f).T @ patches_cnhw(x, k, stride)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(f, b, (h - k) // stride + 1, (w - k) // stride + 1)


class PatchConv(nn.Module):
    """``nn.Conv`` (square kernel, symmetric padding) on ``[C, B, H, W]``.

    Same parameter names, shapes and initialisers as ``nn.Conv`` (kernel HWIO,
    then bias), so the parameter tree and its initial values are identical.
    """

    features: int
    kernel_size: int = 5
    strides: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (k, k, x.shape[0], self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
                if self.use_bias else None)
        return conv_cnhw(x.astype(self.dtype), kernel.astype(self.dtype),
                         None if bias is None else bias.astype(self.dtype),
                         self.padding, self.strides)
