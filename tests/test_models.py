"""Model shapes, parameter counts and inference-mode behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gce_jax.models import count_params, get_model, logits_fn


def _init(model, shape):
    return model.init(jax.random.key(0), jnp.zeros(shape))


def _shapes(model, shape):
    return jax.eval_shape(lambda: _init(model, shape))


def test_lenet5_exact_parameter_count():
    v = _init(get_model("lenet5", num_classes=10), (1, 28, 28, 1))
    assert count_params(v["params"]) == 61_706
    assert "batch_stats" not in v


@pytest.mark.parametrize("depth,expected", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6),
                                            (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_parameter_counts(depth, expected):
    # He et al. 2016, Table 6 (option A shortcuts have no parameters).
    v = _shapes(get_model(f"resnet{depth}", num_classes=10, dataset="cifar10"), (1, 32, 32, 3))
    n = count_params(v["params"])
    assert abs(n - expected) / expected < 0.03, n


def test_resnet50_parameter_count_and_shapes():
    model = get_model("resnet50", num_classes=200, dataset="tiny_imagenet")
    v = _shapes(model, (1, 64, 64, 3))
    # torchvision's ResNet-50 has 23.5M params without its 1000-way head.
    n = count_params(v["params"])
    assert 23.5e6 + 2048 * 200 < n < 23.5e6 + 2048 * 200 + 0.1e6, n
    out = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), v,
                         jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert out[0].shape == (2, 200) and out[1].shape == (2, 2048)


@pytest.mark.parametrize("name,shape,k,feat", [("lenet5", (3, 28, 28, 1), 10, 84),
                                               ("resnet20", (3, 32, 32, 3), 100, 64)])
def test_output_and_feature_shapes(name, shape, k, feat):
    model = get_model(name, num_classes=k, dataset=None if name == "lenet5" else "cifar100")
    v = _init(model, shape)
    x = jax.random.uniform(jax.random.key(1), shape)
    logits, features = model.apply(v, x, return_features=True)
    assert logits.shape == (3, k) and features.shape == (3, feat)
    np.testing.assert_allclose(model.apply(v, x), logits)


def test_eval_mode_is_deterministic_and_batch_independent():
    model = get_model("resnet20", num_classes=10, dataset="cifar10")
    v = _init(model, (1, 32, 32, 3))
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    f = jax.jit(logits_fn(model, v))
    a, b = f(x), f(x)
    np.testing.assert_array_equal(a, b)
    # Running averages, not batch statistics: one example alone gives the same logits.
    np.testing.assert_allclose(f(x[:1]), a[:1], rtol=1e-5, atol=1e-5)


def test_train_flag_switches_batchnorm():
    model = get_model("resnet20", num_classes=10, dataset="cifar10")
    v = _init(model, (1, 32, 32, 3))
    x = jax.random.uniform(jax.random.key(3), (8, 32, 32, 3))
    _, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    before = jax.tree_util.tree_leaves(v["batch_stats"])
    after = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # Inference mode cannot mutate anything.
    with pytest.raises(Exception):
        model.apply(v, x, train=True)  # batch_stats not declared mutable


def test_normalisation_is_inside_the_model():
    model = get_model("resnet20", num_classes=10, dataset="cifar10")
    plain = get_model("resnet20", num_classes=10, dataset=None)
    v = _init(model, (1, 32, 32, 3))
    x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
    assert not np.allclose(model.apply(v, x), plain.apply(v, x))


def test_channel_mismatch_is_an_error():
    with pytest.raises(ValueError, match="channels"):
        _init(get_model("lenet5", num_classes=10, dataset="cifar10"), (1, 28, 28, 1))


def test_bfloat16_compute_keeps_float32_logits():
    model = get_model("resnet20", num_classes=10, dataset="cifar10", dtype=jnp.bfloat16)
    v = _init(model, (1, 32, 32, 3))
    out = model.apply(v, jnp.ones((2, 32, 32, 3)))
    assert out.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(v["params"])[0].dtype == jnp.float32


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        get_model("vgg16", num_classes=10)
