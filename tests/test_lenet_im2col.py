"""LeNet-5's im2col/channels-first formulation equals the nn.Conv one.

``conv_impl='im2col'`` (the CPU default) must be a drop-in replacement for
``conv_impl='xla'``: same parameter tree and initial values, same logits,
features and gradients (parameters and input), also on odd input sizes,
3-channel inputs and with flat image regions (pooling ties).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gce_jax.losses import cross_entropy, guided_complement_entropy
from gce_jax.models import count_params, get_model
from gce_jax.models.im2col import resolve_conv_impl
from gce_jax.models.lenet import LeNet5
from gce_jax.models.common import normalize_for


def _pair(**kw):
    return LeNet5(conv_impl="xla", **kw), LeNet5(conv_impl="im2col", **kw)


def _grads(model, v, x, y):
    def f(v, x):
        return jnp.sum(guided_complement_entropy(model.apply(v, x), y, alpha=1 / 3)
                       + cross_entropy(model.apply(v, x), y))
    return jax.grad(f, argnums=(0, 1))(v, x)


def _assert_trees_close(a, b, rtol, atol):
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(q), np.asarray(p), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_same_parameters_and_initial_values():
    xla, im2col = _pair()
    x = jnp.zeros((1, 28, 28, 1))
    va, vb = xla.init(jax.random.key(0), x), im2col.init(jax.random.key(0), x)
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    assert count_params(vb["params"]) == 61_706
    jax.tree.map(np.testing.assert_array_equal, va, vb)


@pytest.mark.parametrize("shape", [(1, 28, 28, 1), (7, 28, 28, 1), (4, 29, 29, 1),
                                   (3, 30, 26, 1)])
def test_logits_features_and_gradients_agree(shape):
    xla, im2col = _pair(num_classes=10)
    x = jax.random.uniform(jax.random.key(1), shape)
    y = jnp.arange(shape[0]) % 10
    v = xla.init(jax.random.key(2), x)
    la, fa = xla.apply(v, x, return_features=True)
    lb, fb = im2col.apply(v, x, return_features=True)
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-5)
    (gva, gxa), (gvb, gxb) = _grads(xla, v, x, y), _grads(im2col, v, x, y)
    _assert_trees_close(gva, gvb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gxb, gxa, rtol=1e-4, atol=1e-6)


def test_rgb_input_with_normalisation():
    xla, im2col = _pair(num_classes=100, normalize=normalize_for("cifar10"))
    x = jax.random.uniform(jax.random.key(3), (5, 28, 28, 3))
    y = jnp.arange(5) * 17 % 100
    v = xla.init(jax.random.key(4), x)
    np.testing.assert_allclose(im2col.apply(v, x), xla.apply(v, x), rtol=1e-5, atol=1e-5)
    (gva, gxa), (gvb, gxb) = _grads(xla, v, x, y), _grads(im2col, v, x, y)
    _assert_trees_close(gva, gvb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gxb, gxa, rtol=1e-4, atol=1e-6)


def test_gradients_agree_with_pooling_ties():
    # Flat regions (zeros and a constant patch) with positive biases make
    # tied window maxima at positive values. Both paths must route a window's
    # gradient to its first maximum, as nn.max_pool does: the input gradient
    # tells the rules apart (the weights' often cannot, the tied positions
    # seeing equal patches).
    xla, im2col = _pair()
    x = jnp.zeros((4, 28, 28, 1)).at[:, 8:20, 8:20, :].set(0.5)
    x = x.at[:, 12, 12:16, :].set(1.0)
    y = jnp.arange(4)
    v = xla.init(jax.random.key(5), x)
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.full_like(a, 0.05) if "bias" in jax.tree_util.keystr(p) else a, v)
    (gva, gxa), (gvb, gxb) = _grads(xla, v, x, y), _grads(im2col, v, x, y)
    _assert_trees_close(gva, gvb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gxb, gxa, rtol=1e-4, atol=1e-6)


def test_jit_and_vmap_of_gradients():
    _, im2col = _pair()
    x = jax.random.uniform(jax.random.key(6), (3, 28, 28, 1))
    v = im2col.init(jax.random.key(7), x)
    per_example = jax.jit(jax.vmap(
        jax.grad(lambda xi: jnp.sum(im2col.apply(v, xi[None]))), in_axes=0))(x)
    full = jax.grad(lambda x: jnp.sum(im2col.apply(v, x)))(x)
    np.testing.assert_allclose(per_example, full, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_logits():
    xla, im2col = _pair(dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(8), (2, 28, 28, 1))
    v = xla.init(jax.random.key(9), x)
    out = im2col.apply(v, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, xla.apply(v, x), rtol=0.05, atol=0.05)


def test_conv_impl_selection():
    assert resolve_conv_impl("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
    assert resolve_conv_impl("xla") == "xla"
    assert get_model("lenet5", num_classes=10).conv_impl == "auto"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("winograd")
