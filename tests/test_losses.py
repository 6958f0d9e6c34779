"""Losses against a plain numpy transcription of the paper's Eqs. 1-3."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import test_util as jtu

from gce_jax import losses


# ---------------------------------------------------------------- references
def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_complement_sum(z, y):
    """sum_{j != g} (y_j / (1 - y_g)) log(y_j / (1 - y_g)), per example (<= 0)."""
    p = np_softmax(z)
    out = []
    for pi, g in zip(p, y):
        q = np.delete(pi, g) / (1.0 - pi[g])
        out.append(np.sum(q * np.log(q)))
    return np.array(out)


def np_eq1(z, y):  # paper Eq. 1 per example, sign flipped (minimised).
    return np_complement_sum(z, y)


def np_eq2(z, y, alpha):
    p_g = np_softmax(z)[np.arange(len(y)), y]
    return p_g**alpha * np_complement_sum(z, y)


def np_eq3(z, y, alpha):
    return np_eq2(z, y, alpha) / math.log(z.shape[-1] - 1)


def np_xe(z, y):
    return -np.log(np_softmax(z)[np.arange(len(y)), y])


def random_case(seed, batch=16, k=10, scale=3.0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(batch, k)) * scale).astype(np.float32)
    y = rng.integers(0, k, size=batch).astype(np.int32)
    return z, y


# --------------------------------------------------------------- agreement
@pytest.mark.parametrize("k", [3, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_transcription(k, seed):
    z, y = random_case(seed, k=k)
    np.testing.assert_allclose(losses.cross_entropy(z, y), np_xe(z, y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.complement_entropy(z, y), np_eq1(z, y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.complement_entropy(z, y, normalize=True),
                               np_eq1(z, y) / math.log(k - 1), rtol=1e-5, atol=1e-5)
    for alpha in (1.0, 0.5, 1 / 3, 0.1):
        np.testing.assert_allclose(
            losses.guided_complement_entropy(z, y, alpha=alpha, normalize=False),
            np_eq2(z, y, alpha), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            losses.guided_complement_entropy(z, y, alpha=alpha),
            np_eq3(z, y, alpha), rtol=1e-5, atol=1e-5)


def test_range_and_sign_convention():
    z, y = random_case(3, batch=256, k=10, scale=5.0)
    gce = np.asarray(losses.guided_complement_entropy(z, y, alpha=1 / 3))
    assert np.all(gce <= 0) and np.all(gce >= -1 - 1e-6)
    # The optimum: confident correct prediction with a flat complement -> -1.
    z_opt = np.zeros((1, 10), np.float32)
    z_opt[0, 4] = 50.0
    np.testing.assert_allclose(
        losses.guided_complement_entropy(z_opt, np.array([4]), alpha=1 / 3), [-1.0], atol=1e-6)
    # Minimising moves toward the label: gradient on z_g is negative.
    g = jax.grad(lambda z: losses.guided_complement_entropy(z, y, alpha=1 / 3).sum())(z)
    assert np.all(np.asarray(g)[np.arange(len(y)), y] <= 0)


def test_alpha_zero_equals_normalised_complement_entropy():
    z, y = random_case(5, k=7)
    np.testing.assert_allclose(
        losses.guided_complement_entropy(z, y, alpha=0.0),
        losses.complement_entropy(z, y, normalize=True), rtol=1e-6, atol=1e-7)


def test_batch_shapes_are_per_example():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=(2, 3))
    for fn in (losses.cross_entropy, losses.complement_entropy,
               functools.partial(losses.guided_complement_entropy, alpha=0.5)):
        out = fn(z, y)
        assert out.shape == (2, 3)
        np.testing.assert_allclose(out.reshape(-1), fn(z.reshape(6, 5), y.reshape(6)), rtol=1e-6)


# ------------------------------------------------------------------- grads
@pytest.mark.parametrize("name", ["xe", "complement", "gce"])
def test_check_grads(name):
    with jax.enable_x64(True):
        z, y = random_case(7, batch=4, k=6)
        z = jnp.asarray(z, jnp.float64)
        fn = losses.get_loss(name, alpha=1 / 3)
        jtu.check_grads(lambda z: fn(z, y), (z,), order=2, modes=["fwd", "rev"])


def test_same_under_jit_vmap_grad():
    z, y = random_case(11, batch=8, k=10)
    fn = functools.partial(losses.guided_complement_entropy, alpha=1 / 3)
    eager = fn(z, y)
    np.testing.assert_allclose(jax.jit(fn)(z, y), eager, rtol=1e-6, atol=1e-7)
    per_row = jax.vmap(lambda zi, yi: fn(zi[None], yi[None])[0])(z, y)
    np.testing.assert_allclose(per_row, eager, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda z: fn(z, y).sum())(z)
    g_jit = jax.jit(jax.grad(lambda z: fn(z, y).sum()))(z)
    g_vmap = jax.vmap(jax.grad(lambda zi, yi: fn(zi[None], yi[None])[0]))(z, y)
    np.testing.assert_allclose(g_jit, g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_vmap, g, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------- robustness
@functools.lru_cache(maxsize=None)
def _value_and_grad(name, alpha):
    fn = losses.get_loss(name, alpha=alpha)
    return jax.jit(jax.value_and_grad(lambda z, y: fn(z, y).astype(jnp.float32).sum()))


EXTREMES = [-1e4, -1e3, -88.0, -30.0, -1.0, 0.0, 1.0, 30.0, 88.0, 1e3, 1e4]


@st.composite
def extreme_case(draw):
    k = draw(st.sampled_from([3, 4, 10, 100, 1000]))
    mode = draw(st.sampled_from(["extreme", "pg_to_1", "pg_to_0", "ties"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    y = rng.integers(0, k, size=4).astype(np.int32)
    if mode == "extreme":
        z = rng.choice(EXTREMES, size=(4, k)) * rng.uniform(0.5, 1.0, size=(4, k))
    elif mode == "pg_to_1":
        z = rng.normal(size=(4, k))
        z[np.arange(4), y] = draw(st.sampled_from([50.0, 1e3, 1e4]))
    elif mode == "pg_to_0":
        z = rng.normal(size=(4, k))
        z[np.arange(4), y] = draw(st.sampled_from([-50.0, -1e3, -1e4]))
    else:
        z = np.full((4, k), draw(st.sampled_from(EXTREMES)))
    z = np.clip(z, -1e4, 1e4)
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    alpha = draw(st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 1.0, 2.0]))
    return jnp.asarray(z, dtype), jnp.asarray(y), alpha


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(extreme_case())
def test_finite_value_and_grad_on_extreme_logits(case):
    z, y, alpha = case
    for name in ("xe", "complement", "gce"):
        value, grad = _value_and_grad(name, alpha)(z, y)
        assert np.isfinite(float(value)), (name, z, y)
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), (name, z, y)


def np_gce_stable(z, y, alpha):
    """Eq. 3 in float64 from the complement logits directly (no 1 - p_g)."""
    z = np.asarray(z, np.float64)
    out = []
    for zi, g in zip(z, y):
        zc = np.delete(zi, g)
        lq = zc - zc.max() - np.log(np.sum(np.exp(zc - zc.max())))
        lse_c = zc.max() + np.log(np.sum(np.exp(zc - zc.max())))
        log_pg = -np.logaddexp(0.0, lse_c - zi[g])
        out.append(np.exp(alpha * log_pg) * np.sum(np.exp(lq) * lq) / math.log(len(zi) - 1))
    return np.array(out)


def np_gce_stable_grad(z, y, alpha, h=1e-6):
    """d sum(Eq. 3) / dz by central differences of the float64 reference."""
    z = np.asarray(z, np.float64)
    grad = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        step = h * max(1.0, abs(z[idx]))
        zp, zm = z.copy(), z.copy()
        zp[idx] += step
        zm[idx] -= step
        grad[idx] = (np_gce_stable(zp, y, alpha).sum() - np_gce_stable(zm, y, alpha).sum()) / (2 * step)
    return grad


ACCURACY_CASES = ["shifted_1e3", "pg_to_1", "pg_to_0", "flat_complement", "wide_spread"]


def _accuracy_case(case, k):
    z, y = random_case(5, batch=6, k=k)
    rows = np.arange(len(y))
    if case == "shifted_1e3":
        z = z + np.float32(1e3)
    elif case == "pg_to_1":
        z[rows, y] = 1e4
    elif case == "pg_to_0":
        z[rows, y] = -1e4
    elif case == "flat_complement":
        z[:] = 2.0
        z[rows, y] = 30.0
    else:  # complement logits spread over 80, as for a confident network
        z = np.random.default_rng(5).uniform(-40, 40, size=z.shape).astype(np.float32)
    return z, y


# K=10 runs class-major, K=100 example-major (losses._CLASS_MAJOR_MAX_K).
@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("case", ACCURACY_CASES)
def test_accurate_far_from_zero(case, k):
    # The label's entry is replaced, not masked, inside exp, and the entropy
    # sum subtracts m_c * s (see losses.py): neither may cost accuracy where
    # p_g -> 1, p_g -> 0, for logits far from 0 or widely spread.
    # Reference: float64 on the same float32 inputs.
    z, y = _accuracy_case(case, k)
    for alpha in (0.0, 1 / 3, 1.0):
        got = np.asarray(losses.guided_complement_entropy(jnp.asarray(z), jnp.asarray(y),
                                                           alpha=alpha), np.float64)
        np.testing.assert_allclose(got, np_gce_stable(z, y, alpha), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("case", ACCURACY_CASES)
def test_gradient_accurate_far_from_zero(case, k):
    z, y = _accuracy_case(case, k)
    z, y = z[:2], y[:2]
    grad = jax.grad(lambda z: jnp.sum(losses.guided_complement_entropy(z, y, alpha=1 / 3)))
    got = np.asarray(grad(jnp.asarray(z)), np.float64)
    np.testing.assert_allclose(got, np_gce_stable_grad(z, y, 1 / 3), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("k", [5, 10, 16, 17, 40])
def test_class_major_and_example_major_agree(k, monkeypatch):
    # Which layout runs is a speed choice only (losses._CLASS_MAJOR_MAX_K).
    z, y = random_case(11, batch=8, k=k)
    z = z.reshape(2, 4, k)
    y = y.reshape(2, 4)

    def value_and_grad():
        f = lambda z: jnp.sum(losses.guided_complement_entropy(z, y, alpha=1 / 3))  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(jnp.asarray(z))

    monkeypatch.setattr(losses, "_CLASS_MAJOR_MAX_K", 10**6)
    v_cls, g_cls = value_and_grad()
    monkeypatch.setattr(losses, "_CLASS_MAJOR_MAX_K", 0)
    v_ex, g_ex = value_and_grad()
    np.testing.assert_allclose(v_cls, v_ex, rtol=1e-6)
    np.testing.assert_allclose(g_cls, g_ex, rtol=1e-5, atol=1e-7)
    assert np.any(np.abs(np.asarray(g_cls)) > 1e-3)


def test_bfloat16_close_to_float32():
    z, y = random_case(13, k=10)
    f32 = losses.guided_complement_entropy(z, y, alpha=1 / 3)
    bf16 = losses.guided_complement_entropy(jnp.asarray(z, jnp.bfloat16), y, alpha=1 / 3)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=0.02)


def test_confident_label_has_zero_not_nan_gradient():
    # p_g rounds to exactly 1 in float32: the -inf/where trap would give NaN.
    z = jnp.array([[1e4, 0.0, -3.0, 2.0]])
    g = jax.grad(lambda z: losses.guided_complement_entropy(z, jnp.array([0]), alpha=1 / 3).sum())(z)
    assert np.all(np.isfinite(g))
    # The complement is still shaped: its gradient must not vanish.
    assert np.abs(np.asarray(g)[0, 1:]).max() > 1e-3


# ------------------------------------------------------------------ errors
def test_two_classes_normalised_raises_at_trace_time():
    z = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="log\\(K-1\\)"):
        jax.jit(lambda z: losses.guided_complement_entropy(z, jnp.zeros(3, jnp.int32), alpha=0.5))(z)
    with pytest.raises(ValueError, match="log\\(K-1\\)"):
        losses.complement_entropy(z, jnp.zeros(3, jnp.int32), normalize=True)
    # Unnormalised K=2 is well defined (a single complement class: 0).
    np.testing.assert_array_equal(
        losses.guided_complement_entropy(z, jnp.zeros(3, jnp.int32), alpha=0.5, normalize=False), 0.0)


@pytest.mark.parametrize("fn", [losses.cross_entropy, losses.complement_entropy,
                                functools.partial(losses.guided_complement_entropy, alpha=0.3)])
def test_bad_labels_raise_clear_errors(fn):
    z = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        fn(z, jnp.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in"):
        fn(z, np.array([0, -1, 3, 2]))
    with pytest.raises(TypeError, match="integer class ids"):
        fn(z, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"labels shape"):
        fn(z, jnp.zeros((4, 5), jnp.int32))  # one-hot labels
    with pytest.raises(ValueError, match=r"labels shape"):
        jax.jit(fn)(z, jnp.zeros((3,), jnp.int32))


def test_out_of_range_labels_under_jit_give_nan():
    # Values are unknown at trace time; NaN is what the training loop catches.
    out = jax.jit(losses.guided_complement_entropy, static_argnames="alpha")(
        jnp.zeros((2, 5)), jnp.array([1, 7]), alpha=0.5)
    assert np.isfinite(out[0]) and np.isnan(out[1])


def test_get_loss_unknown_name():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get_loss("hinge")
