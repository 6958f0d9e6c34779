"""gce_jax.models.conv_grad: lax.conv_general_dilated's values, an explicit input gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from gce_jax.models import conv_grad

DN = ("NHWC", "HWIO", "NHWC")
CASES = [  # (input HW, kernel HW, strides, padding, rhs_dilation)
    ((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((8, 8), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((9, 7), (3, 3), (2, 2), "SAME", (1, 1)),
    ((9, 7), (3, 2), (2, 3), "VALID", (1, 1)),
    ((10, 10), (3, 3), (1, 2), ((2, 0), (0, 1)), (2, 1)),
    ((7, 7), (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
]


def _both(hw, k, strides, padding, dil, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, *hw, 4), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((*k, 4, 5), dtype=np.float32))

    def f(conv):
        return lambda x, w: conv(x, w, strides, padding, rhs_dilation=dil, dimension_numbers=DN)
    return x, w, f(lax.conv_general_dilated), f(conv_grad.conv_general_dilated)


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_values_and_both_gradients_equal_lax(case):
    x, w, native, explicit = _both(*case)
    y = native(x, w)
    np.testing.assert_array_equal(explicit(x, w), y)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32))
    (dx_n, dw_n), (dx_e, dw_e) = (jax.vjp(f, x, w)[1](g) for f in (native, explicit))
    assert dx_e.shape == x.shape
    np.testing.assert_allclose(dx_e, dx_n, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dw_e, dw_n)  # the kernel gradient is JAX's own


def test_gradient_checks_against_finite_differences():
    x, w, _, explicit = _both(*CASES[2])
    check_grads(explicit, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_the_input_gradient_inside_a_loop_equals_the_one_outside():
    # The case the module exists for: a while body (every iterative attack).
    x, w, _, explicit = _both(*CASES[1])

    def grad(x):
        return jax.grad(lambda z: jnp.sum(jnp.tanh(explicit(z, w))))(x)
    looped = jax.jit(lambda x: lax.fori_loop(0, 1, lambda i, z: grad(z), x))(x)
    np.testing.assert_allclose(looped, jax.jit(grad)(x), rtol=1e-6, atol=1e-6)


def test_other_layouts_and_groups_fall_back_to_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 4), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4), dtype=np.float32))
    kw = dict(dimension_numbers=DN, feature_group_count=2)
    np.testing.assert_array_equal(conv_grad.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                                  lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw))
    xc = jnp.transpose(x, (0, 3, 1, 2))
    wc = jnp.asarray(rng.standard_normal((5, 4, 3, 3), dtype=np.float32))
    np.testing.assert_array_equal(conv_grad.conv_general_dilated(xc, wc, (1, 1), "SAME"),
                                  lax.conv_general_dilated(xc, wc, (1, 1), "SAME"))


def test_resnet_input_grad_option_is_checked():
    from gce_jax.models.resnet import resolve_input_grad
    assert resolve_input_grad("auto") == ("explicit" if jax.default_backend() == "cpu"
                                          else "native")
    with pytest.raises(ValueError, match="input_grad must be one of"):
        resolve_input_grad("fast")
