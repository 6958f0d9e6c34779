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

import flax.linen as nn
import jax
import jax.numpy as jnp

from gce_jax.models.common import Normalize
from gce_jax.models.im2col import ConvImpl, PatchConv, resolve_conv_impl

# ---------------------------------------------------------------------------
# ReLU + 2x2 max-pool on channels-first activations ([C, B, H, W])
# ---------------------------------------------------------------------------

def _window_view(z: jax.Array) -> jax.Array:
    c, b, h, w = z.shape
    return z.reshape(c, b, h // 2, 2, w // 2, 2)


def _window_max(zr: jax.Array) -> jax.Array:
    # A reduce, not an elementwise max of four slices: XLA keeps a reduce's
    # result in memory, whereas an elementwise max would be fused into (and
    # recomputed by) every consumer, including the 4x larger backward ones.
    return jnp.max(zr, axis=(3, 5))


def _relu_max_pool(z: jax.Array) -> jax.Array:
    return jax.nn.relu(_window_max(_window_view(z)))


def relu_max_pool_cnhw(z: jax.Array) -> jax.Array:
    """``max_pool(relu(z), 2x2, stride 2)`` on ``[C, B, H, W]``.

    ReLU is monotone, so it commutes with the max and runs on the 4x smaller
    pooled tensor. Gradient: exactly ``nn.max_pool``'s (XLA's select-and-
    scatter with ``>=``, as PyTorch): a window's whole gradient goes to its
    *first* maximum in row-major window order. Sharing it among tied maxima
    is also a valid subgradient, but MNIST's flat regions tie in most images,
    and that rule changed FGSM's result on the same weights.
    """
    c, b, h, w = z.shape
    # Odd sizes: the floored row/column is dropped, as by nn.max_pool's 'VALID'
    # windows; the slice's own transpose gives it zero gradient.
    return _relu_max_pool_even(z[:, :, :h // 2 * 2, :w // 2 * 2])


@jax.custom_vjp
def _relu_max_pool_even(z: jax.Array) -> jax.Array:
    return _relu_max_pool(z)


def _first_max_position(zr: jax.Array, y: jax.Array) -> jax.Array:
    """Window position ``2i + j`` of the first maximum; 4 where ``y == 0``.

    y = relu(max), so windows with y == 0 get no gradient (relu'(0) = 0, as
    jax.nn.relu).
    """
    hit = lambda i, j: zr[:, :, :, i, :, j] == y
    return jnp.where(y > 0, jnp.where(hit(0, 0), 0.0, jnp.where(hit(0, 1), 1.0,
                                      jnp.where(hit(1, 0), 2.0, 3.0))), 4.0).astype(y.dtype)


def _relu_max_pool_fwd(z):
    zr = _window_view(z)
    y = jax.nn.relu(_window_max(zr))
    # The position is found here, on the pooled grid, while the windows are
    # read anyway; computed in the backward pass it measured 1.1-2.2x slower
    # per training step (XLA recomputes it inside the 4x-larger expansion).
    return y, _first_max_position(zr, y)


def _relu_max_pool_bwd(first, g):
    c, b, h2, w2 = first.shape
    # A numerically exact division (by 1 or, where nothing is hit, of 0)
    # keeps XLA from fusing the (col2im) producer of g, and the position, into
    # the 4x-larger expansion, which would recompute them per output.
    share = g / jnp.maximum((first < 4).astype(g.dtype), 1)
    pos = (2 * jnp.arange(2)[:, None, None] + jnp.arange(2)).astype(first.dtype)  # [2, 1, 2]
    dz = jnp.where(pos == first[:, :, :, None, :, None], share[:, :, :, None, :, None], 0)
    return (dz.reshape(c, b, 2 * h2, 2 * w2),)


_relu_max_pool_even.defvjp(_relu_max_pool_fwd, _relu_max_pool_bwd)


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
