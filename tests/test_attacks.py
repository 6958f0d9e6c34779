"""Attack invariants and bug traps on tiny synthetic models (no training).

Known answers on a trained model live in test_attacks_known_answers.py.
Compilation dominates the runtime: every logits_fn is built once (module
level / cached) so repeated calls hit the attacks' jit caches.
"""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gce_jax import attacks as A
from gce_jax.attacks import objectives
from gce_jax.losses import cross_entropy, guided_complement_entropy

K = 5
HYP = settings(max_examples=10, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- models
class TinyMLP(nn.Module):
    classes: int = K

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes)(h)


class TinyBN(nn.Module):
    """Conv + BatchNorm: in train mode an example's logits depend on its batch."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
        h = nn.relu(h).reshape(x.shape[0], -1)
        return nn.Dense(K)(h)


@functools.lru_cache(maxsize=None)
def mlp_fn(shape: tuple[int, ...]):
    """One cached ``logits_fn`` per input shape (so the jit caches are hit)."""
    model = TinyMLP()
    variables = model.init(jax.random.key(sum(shape)), jnp.zeros((1,) + shape))
    return A.inference_logits_fn(model, variables)


def linear_params(d: int, k: int = K, seed: int = 0):
    rng = np.random.RandomState(seed)
    return rng.randn(d, k).astype(np.float32), rng.randn(k).astype(np.float32)


@functools.lru_cache(maxsize=None)
def linear_fn(d: int):
    w, b = linear_params(d)
    return lambda x: x.reshape(x.shape[0], -1) @ w + b


def data(shape, batch, seed):
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 1, (batch,) + shape).astype(np.float32)
    # Pixels exactly at the box edges exercise the [0,1] clipping.
    x[:, ..., 0] = np.where(rng.rand(batch, *shape[:-1]) < 0.3, 0.0, x[:, ..., 0])
    x[:, ..., -1] = np.where(rng.rand(batch, *shape[:-1]) < 0.3, 1.0, x[:, ..., -1])
    y = rng.randint(0, K, batch).astype(np.int32)
    return x, y


def linf(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(axis=1)


def l2(a, b):
    return np.sqrt(((np.asarray(a, np.float64) - np.asarray(b)) ** 2).reshape(len(a), -1).sum(1))


# Short runs of every bounded attack: (name, norm, extra kwargs).
BOUNDED = [
    ("fgsm", "linf", {}),
    ("bim", "linf", {"steps": 3}),
    ("pgd", "linf", {"steps": 3, "step_size": 0.05}),
    ("mim", "linf", {"steps": 3}),
    ("apgd", "linf", {"steps": 4, "n_restarts": 2}),
    ("square", "linf", {"n_queries": 6}),
    ("pgd_l2", "l2", {"steps": 3}),
]
SHAPES = [(4, 4, 1), (5, 3, 2)]
# (shape, batch) pairs: each is one compilation per attack, so keep two. Any
# [B, ...] works except for Square, which needs images.
CASES = [((16,), 1), (SHAPES[1], 4)]
IMAGE_CASES = [(SHAPES[0], 1), (SHAPES[1], 4)]


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name,norm,kw", BOUNDED, ids=[b[0] for b in BOUNDED])
@HYP
@given(case=st.sampled_from([0, 1]), eps=st.sampled_from([0.0, 0.03, 0.3, 1.5]),
       seed=st.integers(0, 2**16))
def test_bounded_attack_invariants(name, norm, kw, case, eps, seed):
    shape, batch = (IMAGE_CASES if name == "square" else CASES)[case]
    x, y = data(shape, batch, seed)
    x_copy = x.copy()
    fn = mlp_fn(shape)
    key = jax.random.key(seed)
    out = np.asarray(A.ATTACKS[name](fn, x, y, key=key, eps=eps, **kw))

    np.testing.assert_array_equal(x, x_copy)  # input untouched
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
    dist = linf(out, x) if norm == "linf" else l2(out, x)
    assert np.all(dist <= eps * (1 + 1e-6) + 1e-6), (dist, eps)
    if eps == 0.0:
        np.testing.assert_array_equal(out, x)
    again = np.asarray(A.ATTACKS[name](fn, x, y, key=key, eps=eps, **kw))
    np.testing.assert_array_equal(out, again)  # same key, same output


def test_attacks_are_gradient_stopped_and_jittable():
    shape = SHAPES[0]
    x, y = data(shape, 3, 0)
    fn = mlp_fn(shape)
    g = jax.grad(lambda v: jnp.sum(A.pgd(fn, v, y, key=jax.random.key(0), eps=0.1,
                                         steps=2)))(jnp.asarray(x))
    np.testing.assert_array_equal(g, 0.0)

    # Inside a jitted function, with the weights traced (adversarial training).
    model = TinyMLP()
    variables = model.init(jax.random.key(1), jnp.zeros((1,) + shape))

    @jax.jit
    def step(v, xb, yb):
        return A.pgd(lambda z: model.apply(v, z), xb, yb, key=jax.random.key(0),
                     eps=0.1, steps=2)

    direct = A.pgd(A.inference_logits_fn(model, variables), x, y,
                   key=jax.random.key(0), eps=0.1, steps=2)
    np.testing.assert_allclose(step(variables, x, y), direct, atol=1e-6)


def test_no_recompile_for_new_eps_or_new_weights():
    shape = SHAPES[0]
    x, y = data(shape, 4, 1)
    model = TinyMLP()
    v1 = model.init(jax.random.key(1), jnp.zeros((1,) + shape))
    v2 = model.init(jax.random.key(2), jnp.zeros((1,) + shape))
    from gce_jax.attacks import gradient
    A.bim(A.inference_logits_fn(model, v1), x, y, eps=0.1, steps=2)
    size = gradient._iterative_jit._cache_size()
    A.bim(A.inference_logits_fn(model, v2), x, y, eps=0.2, steps=2)
    A.bim(A.inference_logits_fn(TinyMLP(), v1), x, y, eps=0.3, steps=2, step_size=0.5)
    assert gradient._iterative_jit._cache_size() == size


def test_random_start_is_uniform_inside_the_ball():
    shape = (6, 6, 3)
    x = np.full((64,) + shape, 0.5, np.float32)  # far from the box edges
    y = np.zeros(64, np.int32)
    fn = linear_fn(int(np.prod(shape)))
    start = np.asarray(A.pgd(fn, x, y, key=jax.random.key(3), eps=0.1, steps=0))
    delta = (start - x).ravel()
    assert np.abs(delta).max() <= 0.1 + 1e-6
    # U(-eps, eps): mean |delta| = eps/2, and each half of the range is used.
    assert abs(np.abs(delta).mean() - 0.05) < 0.003
    assert 0.45 < (delta > 0).mean() < 0.55 and np.abs(delta).max() > 0.099
    assert not np.array_equal(start[0], start[1])  # per-example noise

    start2 = np.asarray(A.pgd_l2(fn, x, y, key=jax.random.key(3), eps=0.5, steps=0))
    norms = l2(start2, x)
    assert np.all(norms <= 0.5 + 1e-5) and norms.min() > 0.4  # near-surface in 108-d
    assert not np.array_equal(start2[0], start2[1])


def test_projection_is_around_the_clean_input():
    """Huge steps for many iterations must stay within eps of x, not of x_t."""
    shape = (4, 4, 1)
    x, y = data(shape, 6, 2)
    x = np.clip(x, 0.3, 0.7)  # so the box cannot hide a drifting projection
    fn = linear_fn(16)
    for name, kw in [("bim", {"step_size": 0.09}), ("pgd", {"step_size": 0.09}),
                     ("mim", {"step_size": 0.09}), ("pgd_l2", {"step_size": 0.09}),
                     ("apgd", {})]:
        out = A.ATTACKS[name](fn, x, y, key=jax.random.key(0), eps=0.1, steps=30, **kw)
        dist = l2(out, x) if name == "pgd_l2" else linf(out, x)
        assert np.all(dist <= 0.1 + 1e-6), (name, dist)
    # With two classes a linear model's margin gradient w_other - w_y is
    # constant, so BIM with steps of eps/2 reaches the corner x + eps sign(grad)
    # after two steps and must stay there (a projection around x_t would drift).
    w, b = linear_params(16, k=2)
    fn2 = lambda v: v.reshape(v.shape[0], -1) @ w + b
    y2 = y % 2
    out = np.asarray(A.bim(fn2, x, y2, eps=0.1, steps=7, step_size=0.05, loss="margin"))
    grad = (w[:, 1 - y2] - w[:, y2]).T
    expected = np.clip(x.reshape(6, -1) + 0.1 * np.sign(grad), 0, 1)
    np.testing.assert_allclose(out.reshape(6, -1), expected, atol=1e-6)


@pytest.mark.parametrize("loss", ["xe", "margin"])
def test_fgsm_linear_model_closed_form(loss):
    shape = (3, 3, 2)
    d = int(np.prod(shape))
    x, y = data(shape, 8, 4)
    w, b = linear_params(d)
    eps = 0.07
    out = np.asarray(A.fgsm(linear_fn(d), x, y, eps=eps, loss=loss)).reshape(8, -1)
    xf = x.reshape(8, -1).astype(np.float64)
    z = xf @ w + b
    onehot = np.eye(K)[y]
    if loss == "xe":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) @ w.T  # d xe / d x
    else:
        runner = np.argmax(np.where(onehot > 0, -np.inf, z), axis=1)
        grad = w[:, runner].T - w[:, y].T
    expected = np.clip(xf + eps * np.sign(grad), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)

    targeted = np.asarray(A.fgsm(linear_fn(d), x, y, eps=eps, loss=loss, targeted=True))
    np.testing.assert_allclose(targeted.reshape(8, -1), np.clip(xf - eps * np.sign(grad), 0, 1),
                               atol=1e-6)


def test_mim_normalises_each_example_by_its_own_l1_norm():
    """Scaling one example's logits by 1000 must not change another's result.

    Example 0 starts correctly classified, so with logits x1000 its
    cross-entropy gradient is ~0 until the attack flips it, then ~1000: a
    batch-level L1 norm would reweight the other examples' momentum terms.
    """
    shape = (4, 4, 1)
    x, y = data(shape, 4, 5)
    base = mlp_fn(shape)
    y[0] = int(np.argmax(base(jnp.asarray(x))[0]))
    scale = jnp.array([1000.0, 1.0, 1.0, 1.0])
    plain = np.asarray(A.mim(base, x, y, eps=0.5, steps=12))
    scaled_fn = lambda v: base(v) * scale[:, None]
    scaled = np.asarray(A.mim(scaled_fn, x, y, eps=0.5, steps=12))
    np.testing.assert_array_equal(plain[1:], scaled[1:])
    # Example 0 does flip during the attack (what makes the check sensitive).
    assert int(np.argmax(base(jnp.asarray(scaled))[0])) != y[0]


def test_batchnorm_model_attacked_in_inference_mode():
    from gce_jax.models import logits_fn as models_logits_fn
    shape = (6, 6, 1)
    model = TinyBN()
    x, y = data(shape, 4, 6)
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    # Non-trivial running statistics.
    _, upd = model.apply(variables, jnp.asarray(x) * 0.5 + 0.2, train=True,
                         mutable=["batch_stats"])
    variables = {**variables, **upd}
    stats_before = jax.tree_util.tree_map(np.array, variables["batch_stats"])
    fn = models_logits_fn(model, variables)
    other_x, other_y = data(shape, 4, 7)
    mixed_x = np.concatenate([x[:1], other_x[1:]])
    mixed_y = np.concatenate([y[:1], other_y[1:]])
    for name in ["pgd", "apgd"]:
        kw = {"steps": 5}
        a = np.asarray(A.ATTACKS[name](fn, x, y, key=jax.random.key(1), eps=0.2, **kw))
        b = np.asarray(A.ATTACKS[name](fn, mixed_x, mixed_y, key=jax.random.key(1),
                                       eps=0.2, **kw))
        np.testing.assert_allclose(a[0], b[0], atol=1e-6, err_msg=name)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats_before,
                           jax.tree_util.tree_map(np.array, variables["batch_stats"]))

    # The check above can fail: a train-mode closure couples the examples.
    def train_mode(v):
        return model.apply(variables, v, train=True, mutable=["batch_stats"])[0]
    a = np.asarray(A.pgd(train_mode, x, y, key=jax.random.key(1), eps=0.2, steps=5))
    b = np.asarray(A.pgd(train_mode, mixed_x, mixed_y, key=jax.random.key(1), eps=0.2,
                         steps=5))
    assert not np.allclose(a[0], b[0], atol=1e-6)


def test_chunking_and_batch_size_do_not_change_results():
    shape = (4, 4, 1)
    x, y = data(shape, 7, 8)
    fn = mlp_fn(shape)
    key = jax.random.key(9)
    full = np.asarray(A.pgd(fn, x, y, key=key, eps=0.2, steps=3))
    chunked = np.asarray(A.pgd(fn, x, y, key=key, eps=0.2, steps=3, batch_chunk=3))
    np.testing.assert_allclose(full, chunked, atol=1e-6)
    first = np.asarray(A.pgd(fn, x[:2], y[:2], key=key, eps=0.2, steps=3))
    np.testing.assert_allclose(full[:2], first, atol=1e-6)
    other = np.asarray(A.pgd(fn, x, y, key=jax.random.key(10), eps=0.2, steps=3))
    assert not np.allclose(full, other)


def test_bad_inputs_raise():
    fn = mlp_fn((4, 4, 1))
    x, y = data((4, 4, 1), 2, 0)
    with pytest.raises(ValueError, match="loss"):
        A.pgd(fn, x, y, key=jax.random.key(0), eps=0.1, loss="nope")
    with pytest.raises(ValueError, match="shape"):
        A.fgsm(fn, x, y[:1], eps=0.1)
    with pytest.raises(TypeError, match="integer"):
        A.fgsm(fn, x, y.astype(np.float32), eps=0.1)
    with pytest.raises(ValueError, match="random start"):
        A.pgd(fn, x, y, key=None, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        A.bim(fn, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="targets or a key"):
        A.jsma(fn, x, y)


# ----------------------------------------------------------------------------- objectives
def test_objectives_known_values():
    z = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = jnp.array([0, 1])
    np.testing.assert_allclose(objectives.margin(z, y), [1.0 - 3.0, 5.0 - 2.0])
    # dlr = margin / (z_pi1 - z_pi3)
    np.testing.assert_allclose(objectives.dlr(z, y), [-2.0 / 3.0, 3.0 / 4.0], rtol=1e-6)
    np.testing.assert_allclose(objectives.xe(z, y), cross_entropy(z, y), rtol=1e-6)
    np.testing.assert_allclose(objectives.gce(z, y),
                               guided_complement_entropy(z, y, alpha=1 / 3, normalize=True),
                               rtol=1e-6)
    # DLR is invariant to shifting and positive scaling of the logits.
    np.testing.assert_allclose(objectives.dlr(7.0 * z - 2.0, y), objectives.dlr(z, y),
                               rtol=1e-5)
    with pytest.raises(ValueError):
        objectives.get_objective("ce")


# ----------------------------------------------------------------------------- defaults
def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def test_paper_defaults_are_the_function_defaults():
    d = _defaults(A.bim)
    assert d["steps"] == 10 and d["step_size"] is None and d["loss"] == "xe"
    assert A.attack_spec("bim", eps=0.2)["step_size"] == pytest.approx(0.02)
    d = _defaults(A.pgd)
    assert (d["steps"], d["step_size"], d["random_start"], d["loss"]) == (40, 0.01, True, "xe")
    d = _defaults(A.mim)
    assert (d["steps"], d["decay"], d["step_size"]) == (40, 1.0, None)
    assert A.attack_spec("mim", eps=0.2)["step_size"] == pytest.approx(0.005)
    d = _defaults(A.carlini_wagner_l2)
    assert (d["binary_steps"], d["steps"], d["initial_const"], d["confidence"],
            d["learning_rate"], d["targeted"], d["abort_early"]) == (9, 1000, 1e-3, 0.0,
                                                                      1e-2, True, True)
    d = _defaults(A.jsma)
    assert (d["theta"], d["gamma"]) == (1.0, 0.25)
    d = _defaults(A.apgd)
    assert (d["steps"], d["n_restarts"], d["rho"], d["momentum"], d["n_target_classes"]) == (
        100, 1, 0.75, 0.75, 9)
    # loss=None: APGD-CE untargeted, the targeted DLR for APGD-T (AutoAttack's).
    assert A.attack_spec("apgd", eps=0.1)["loss"] == "xe"
    assert A.attack_spec("apgd", eps=0.1, targeted=True)["loss"] == "dlr"
    d = _defaults(A.fab)
    assert (d["steps"], d["n_restarts"], d["alpha_max"], d["eta"], d["beta"],
            d["n_target_classes"]) == (100, 1, 0.1, 1.05, 0.9, 9)
    d = _defaults(A.autoattack)
    assert (d["version"], d["steps"], d["n_queries"], d["n_target_classes"]) == (
        "standard", 100, 5000, 9)
    d = _defaults(A.square)
    assert (d["n_queries"], d["p_init"], d["loss"]) == (5000, 0.8, "margin")
    assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_attack_spec_and_registry():
    assert set(A.ATTACKS) == {"fgsm", "bim", "pgd", "mim", "pgd_l2", "jsma",
                              "carlini_wagner_l2", "apgd", "fab", "square", "autoattack"}
    assert A.attack_spec("autoattack", eps=0.1)["norm"] == "linf"
    assert A.attack_spec("fab", eps=0.1)["loss"] == "linearised_boundary"
    spec = A.attack_spec("pgd", eps=0.3, loss="dlr")
    assert spec["loss"] == "dlr" and spec["eps"] == 0.3 and spec["steps"] == 40
    assert spec["norm"] == "linf"
    assert A.attack_spec("carlini_wagner_l2")["loss"] == "cw_margin"
    assert A.attack_spec("jsma")["norm"] == "l0"
    with pytest.raises(TypeError):
        A.attack_spec("pgd", nonsense=1)
    for name, fn in A.ATTACKS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["logits_fn", "x", "y"], name
        assert "key" in params and params["key"].kind is inspect.Parameter.KEYWORD_ONLY
        assert fn.__doc__, name


def test_square_p_schedule():
    from gce_jax.attacks.square import p_schedule
    got = [float(p_schedule(0.8, jnp.float32(i), 10000)) for i in (0, 10, 11, 50, 51, 600, 9999)]
    assert got == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 16, 0.8 / 512])
    # Rescaled to the query budget.
    assert float(p_schedule(0.8, jnp.float32(3), 100)) == pytest.approx(0.1)  # 300 -> p/8
