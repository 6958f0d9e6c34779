"""LeNet-5 as in the authors' MNIST code (61,706 parameters for 10 classes).

Two formulations of the same network, with the same parameter tree:

* ``conv_impl='xla'``: ``nn.Conv`` + ``nn.max_pool`` (native convolutions).
* ``conv_impl='im2col'``: each 5x5 convolution is one matrix product over
  explicit patches, in a channels-first ``[C, B, H, W]`` activation layout,
  and ReLU + 2x2 max-pooling is one op with a hand-written gradient.

``'auto'`` (the default) picks ``'im2col'`` on CPU and ``'xla'`` elsewhere.
Why: XLA:CPU runs these convolutions with Eigen's spatial convolution, which
is slow for 1-16 channels (the input-gradient convolution of the 6->16 layer
alone was ~30% of a training step), and differentiates ``max_pool`` into an
argmax reduce-window + scatter (~25%). As matrix products the same work runs
in XLA:CPU's fast GEMM library (YNNPACK), and channels-first keeps every patch
slice contiguous, so no transposes are inserted around the GEMMs. On GPU/TPU
the native convolutions (cuDNN, XLA:TPU) are the right choice.
See ``benchmarks/RESULTS.md`` for the measured effect.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from gce_jax.models.common import Normalize

ConvImpl = Literal["auto", "xla", "im2col"]
CONV_IMPLS = ("auto", "xla", "im2col")


def resolve_conv_impl(conv_impl: str) -> str:
    """``'auto'`` -> ``'im2col'`` on the CPU backend, ``'xla'`` otherwise."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return conv_impl


# --------------------------------------------------------------------------
# Channels-first building blocks (activations are [C, B, H, W])
# --------------------------------------------------------------------------

def patches_cnhw(x: jax.Array, k: int) -> jax.Array:
    """``[C, B, H, W]`` -> ``[k*k*C, B*Ho*Wo]`` rows in HWIO kernel order (i, j, c).

    Each of the k*k slices is a block of whole ``[B, Ho, Wo]`` images, so the
    stack is a contiguous copy and its transpose (col2im) a sum of pads.
    """
    c, b, h, w = x.shape
    ho, wo = h - k + 1, w - k + 1
    cols = jnp.stack([x[:, :, i:i + ho, j:j + wo] for i in range(k) for j in range(k)])
    return cols.reshape(k * k * c, b * ho * wo)


def conv_cnhw(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: int) -> jax.Array:
    """Stride-1 'SAME'/'VALID'-style convolution, ``[C,B,H,W]`` -> ``[F,B,Ho,Wo]``.

    ``kernel`` is HWIO ``[k, k, C, F]`` (flax's layout). Written as
    ``kernel^T @ patches`` so that the forward, weight-gradient
    (``g @ patches^T``) and input-gradient (``kernel @ g``) products all have
    the operand layouts XLA:CPU's GEMMs take without copies.
    """
    k, _, c, f = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, b, h, w = x.shape
    out = kernel.reshape(k * k * c, f).T @ patches_cnhw(x, k)
    return (out + bias[:, None]).reshape(f, b, h - k + 1, w - k + 1)


def _window_view(z: jax.Array) -> jax.Array:
    c, b, h, w = z.shape
    # Floor odd sizes like nn.max_pool's 'VALID' windows.
    z = z[:, :, :h // 2 * 2, :w // 2 * 2]
    return z.reshape(c, b, h // 2, 2, w // 2, 2)


def _window_max(zr: jax.Array) -> jax.Array:
    # A reduce, not an elementwise max of four slices: XLA keeps a reduce's
    # result in memory, whereas an elementwise max would be fused into (and
    # recomputed by) every consumer, including the 4x larger backward ones.
    return jnp.max(zr, axis=(3, 5))


def _relu_max_pool(z: jax.Array) -> jax.Array:
    return jax.nn.relu(_window_max(_window_view(z)))


@jax.custom_vjp
def relu_max_pool_cnhw(z: jax.Array) -> jax.Array:
    """``max_pool(relu(z), 2x2, stride 2)`` on ``[C, B, H, W]``.

    ReLU is monotone, so it commutes with the max and runs on the 4x smaller
    pooled tensor. Gradient: exactly ``nn.max_pool``'s (XLA's select-and-
    scatter with ``>=``, as PyTorch): a window's whole gradient goes to its
    *first* maximum in row-major window order. Sharing it among tied maxima
    is also a valid subgradient, but MNIST's flat regions tie in most images,
    and that rule changed FGSM's result on the same weights.
    """
    return _relu_max_pool(z)


def _relu_max_pool_fwd(z):
    y = _relu_max_pool(z)
    # The output (materialised anyway: the next layer reads it) rather than
    # the pre-ReLU max, which XLA would recompute inside each backward fusion.
    return y, (z, y)


def _relu_max_pool_bwd(res, g):
    z, y = res
    zr = _window_view(z)
    c, b, h2, _, w2, _ = zr.shape
    # y = relu(max): where y > 0 it is the max; windows with y == 0 get no
    # gradient (relu'(0) = 0, as jax.nn.relu). Among tied maxima the first in
    # window order (0,0), (0,1), (1,0), (1,1) takes it all.
    free = y > 0
    parts = []
    for i, j in ((0, 0), (0, 1), (1, 0)):
        hit = free & (zr[:, :, :, i, :, j] == y)
        parts.append(jnp.where(hit, g, 0))
        free = free & ~hit
    parts.append(jnp.where(free, g, 0))
    dz = jnp.stack([jnp.stack(parts[:2], -1), jnp.stack(parts[2:], -1)], 3)
    dz = dz.reshape(c, b, 2 * h2, 2 * w2)
    if dz.shape != z.shape:  # odd sizes: the floored row/column gets no gradient
        dz = jnp.pad(dz, ((0, 0), (0, 0), (0, z.shape[2] - dz.shape[2]),
                          (0, z.shape[3] - dz.shape[3])))
    return (dz,)


relu_max_pool_cnhw.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


class PatchConv(nn.Module):
    """5x5 stride-1 convolution on ``[C, B, H, W]`` with ``nn.Conv``'s parameters.

    Same names, shapes, initialisers and creation order as ``nn.Conv`` (kernel
    HWIO, then bias), so the parameter tree and its initial values are
    identical and checkpoints move freely between the two formulations.
    """

    features: int
    kernel_size: int = 5
    padding: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[0], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return conv_cnhw(x.astype(self.dtype), kernel.astype(self.dtype),
                         bias.astype(self.dtype), self.padding)


class LeNet5(nn.Module):
    """conv6@5x5(pad 2)-pool-conv16@5x5-pool-fc120-fc84-fc(K), ReLU.

    Input ``[B, 28, 28, C]`` in [0,1]. No BatchNorm, so ``train`` changes
    nothing; it is accepted so every model shares one call signature.
    ``conv_impl`` selects the convolution formulation (see the module
    docstring); every choice has the same parameters and outputs.
    """

    num_classes: int = 10
    normalize: Normalize = Normalize()
    dtype: jnp.dtype = jnp.float32
    conv_impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False,
                 return_features: bool = False):
        del train
        x = self.normalize(x).astype(self.dtype)
        if resolve_conv_impl(self.conv_impl) == "xla":
            x = nn.Conv(6, (5, 5), padding=2, dtype=self.dtype, name="Conv_0")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            x = nn.Conv(16, (5, 5), padding="VALID", dtype=self.dtype, name="Conv_1")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        else:
            x = jnp.transpose(x, (3, 0, 1, 2))  # NHWC -> CNHW (a bitcast for C=1)
            x = relu_max_pool_cnhw(PatchConv(6, padding=2, dtype=self.dtype, name="Conv_0")(x))
            x = relu_max_pool_cnhw(PatchConv(16, dtype=self.dtype, name="Conv_1")(x))
            x = jnp.transpose(x, (1, 2, 3, 0))  # back to NHWC: Dense_0 sees (h, w, c) order
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, dtype=self.dtype, name="Dense_0")(x))
        features = nn.relu(nn.Dense(84, dtype=self.dtype, name="Dense_1")(x))
        # Logits in float32 whatever the compute dtype: the losses' stability
        # (and attack gradients) depend on it.
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="Dense_2")(features)
        return (logits, features) if return_features else logits
