"""A convolution whose input gradient is an explicit, canonical convolution.

``conv_general_dilated`` here computes exactly ``lax.conv_general_dilated``;
only its VJP differs in form. JAX's transpose rule expresses the input
gradient as a convolution of the output cotangent with the kernel read as
``OI`` and spatially reversed. XLA:CPU gives such a convolution to its fast
(Eigen) kernel only where layout assignment can first copy the kernel into
``HWIO`` order; inside a ``while`` body (every iterative attack, and
``lax.map`` chunks) it did not, and the input gradient of a CIFAR ResNet-20
ran 7.8x slower in the loop than the same gradient outside it (jaxlib
0.10.2, 2026-12-04: FGSM on 256 images 4.5 s against 0.58 s; see
``benchmarks/attacks.py``). Here the backward pass flips and transposes the
kernel itself, so the input gradient is an ordinary ``HWIO`` convolution of
the dilated cotangent wherever it runs. The kernel gradient is JAX's own.

The parameters are ``nn.Conv``'s (pass this function as its
``conv_general_dilated``). Forward values are identical; gradients equal the
native ones (``tests/test_fast_paths.py``). Only the 2-D ``NHWC``/``HWIO``
case without input dilation or groups is rewritten; anything else falls back
to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


class _Static(NamedTuple):
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    rhs_dilation: tuple[int, ...]
    precision: Any
    preferred_element_type: Any


def _native(lhs: jax.Array, rhs: jax.Array, s: _Static) -> jax.Array:
    return lax.conv_general_dilated(lhs, rhs, s.strides, s.padding,
                                    rhs_dilation=s.rhs_dilation, dimension_numbers=_NHWC,
                                    precision=s.precision,
                                    preferred_element_type=s.preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs: jax.Array, rhs: jax.Array, s: _Static) -> jax.Array:
    return _native(lhs, rhs, s)


def _conv_fwd(lhs, rhs, s):
    return _native(lhs, rhs, s), (lhs, rhs)


def input_grad_padding(in_size: int, window: int, stride: int, pad: tuple[int, int],
                       out_size: int, rhs_dilation: int = 1) -> tuple[int, int]:
    """Padding of the input-gradient convolution along one spatial axis.

    The cotangent is dilated by ``stride`` (to ``(out_size - 1) * stride + 1``)
    and convolved, stride 1, with the reversed kernel; the padding makes the
    result ``in_size`` long and aligns it with the forward pass's ``pad``.
    """
    w = (window - 1) * rhs_dilation + 1
    before = w - 1 - pad[0]
    after = in_size + w - 1 - ((out_size - 1) * stride + 1) - before
    return before, after


def _conv_bwd(s, res, g):
    lhs, rhs = res
    # [H, W, I, O] -> reversed in space, I and O swapped: an HWIO kernel from
    # the cotangent's channels (O) to the input's (I).
    kt = jnp.transpose(jnp.flip(rhs, (0, 1)), (0, 1, 3, 2))
    pads = [input_grad_padding(n, k, st, p, m, d) for n, k, st, p, m, d in zip(
        lhs.shape[1:3], rhs.shape[:2], s.strides, s.padding, g.shape[1:3], s.rhs_dilation)]
    dlhs = lax.conv_general_dilated(g.astype(lhs.dtype), kt.astype(lhs.dtype), (1, 1), pads,
                                    lhs_dilation=s.strides, rhs_dilation=s.rhs_dilation,
                                    dimension_numbers=_NHWC, precision=s.precision)
    _, kernel_vjp = jax.vjp(lambda k: _native(lhs, k, s), rhs)
    return dlhs.astype(lhs.dtype), kernel_vjp(g)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` with an explicit input-gradient convolution.

    Same signature and values as ``lax.conv_general_dilated``; see the module
    docstring for what differs (the form of the VJP) and what falls back.
    """
    plain = (lhs_dilation is None or all(d == 1 for d in lhs_dilation))
    if not (plain and feature_group_count == 1 and batch_group_count == 1
            and _is_nhwc(lhs, rhs, dimension_numbers)):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    rhs_dil = tuple(rhs_dilation or (1, 1))
    strides = tuple(window_strides)
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dil)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, _Static(strides, pads, rhs_dil, precision, preferred_element_type))


__all__ = ["conv_general_dilated", "input_grad_padding"]
