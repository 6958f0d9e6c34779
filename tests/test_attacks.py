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
from gce_jax.models import logits_fn

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
    return logits_fn(model, variables)


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

    direct = A.pgd(logits_fn(model, variables), x, y,
                   key=jax.random.key(0), eps=0.1, steps=2)
    np.testing.assert_allclose(step(variables, x, y), direct, atol=1e-6)


def test_no_recompile_for_new_eps_or_new_weights():
    shape = SHAPES[0]
    x, y = data(shape, 4, 1)
    model = TinyMLP()
    v1 = model.init(jax.random.key(1), jnp.zeros((1,) + shape))
    v2 = model.init(jax.random.key(2), jnp.zeros((1,) + shape))
    from gce_jax.attacks import gradient
    A.bim(logits_fn(model, v1), x, y, eps=0.1, steps=2)
    size = gradient._iterative_jit._cache_size()
    A.bim(logits_fn(model, v2), x, y, eps=0.2, steps=2)
    A.bim(logits_fn(TinyMLP(), v1), x, y, eps=0.3, steps=2, step_size=0.5)
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


# Short runs of every attack, for the input-validation and dtype tests.
SHORT = {**{name: kw for name, _, kw in BOUNDED},
         "jsma": {"gamma": 0.5},
         "carlini_wagner_l2": {"binary_steps": 2, "steps": 20, "initial_const": 10.0}}


def _params(name):
    return inspect.signature(A.ATTACKS[name]).parameters


@pytest.mark.parametrize("name", sorted(A.ATTACKS))
def test_every_attack_rejects_bad_concrete_inputs_with_one_clear_error(name):
    """Labels, pixels, eps (any scalar type), step sizes: a ValueError naming
    the problem, before any compute; the inputs are left untouched."""
    shape = SHAPES[0]
    fn = mlp_fn(shape)
    x, y = data(shape, 2, 0)
    x_copy, y_copy = x.copy(), y.copy()
    kw = dict(SHORT.get(name, {}))
    if "eps" in _params(name):
        kw["eps"] = 0.1
    nan_x = x.copy()
    nan_x[0, 0, 0, 0] = np.nan
    inf_x = x.copy()
    inf_x[1, 0, 0, 0] = np.inf
    cases = [({"y": np.full(2, K, np.int32)}, r"y must lie in \[0, 4\]"),
             ({"y": np.array([0, -1], np.int32)}, r"y must lie in \[0, 4\]"),
             ({"x": nan_x}, "NaN"),
             ({"x": x * 255}, r"x must lie in \[0, 1\].*255"),
             ({"x": inf_x}, r"x must lie in \[0, 1\]")]
    if "eps" in _params(name):
        cases += [({"eps": bad}, "eps must be finite and >= 0")
                  for bad in (-0.1, np.float32(-0.1), jnp.float32(-0.1), np.nan, np.inf)]
    if "step_size" in _params(name):
        cases += [({"step_size": bad}, "step_size must be finite and > 0")
                  for bad in (-0.01, 0.0, np.float32(-0.01), np.nan)]
    if "targets" in _params(name):
        # Attacks that can also run untargeted take given targets only when targeted.
        on = {"targeted": True} if "targeted" in _params(name) else {}
        cases += [({"targets": np.array([1, K], np.int32), **on}, r"targets must lie in \[0, 4\]")]
    if name == "carlini_wagner_l2":
        cases += [({"learning_rate": -1e-2}, "learning_rate must be finite and > 0"),
                  ({"initial_const": 0.0}, "initial_const must be finite and > 0"),
                  ({"confidence": -1.0}, "confidence must be finite and >= 0")]
    if name == "jsma":
        cases += [({"margin": -0.01}, "margin must be finite and >= 0"),
                  ({"margin": 1.0}, "margin must be < 1")]
    for bad, message in cases:
        args = {"x": x, "y": y, **kw, **bad}
        with pytest.raises(ValueError, match=message):
            A.ATTACKS[name](fn, args.pop("x"), args.pop("y"), key=jax.random.key(0), **args)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(y, y_copy)


def test_traced_bad_eps_gives_nan_not_a_wrong_way_move():
    """Under jit the checks cannot see values: a negative eps must not act as |eps|."""
    shape = SHAPES[0]
    fn = mlp_fn(shape)
    x, y = data(shape, 2, 0)
    for name in ("fgsm", "pgd", "apgd", "square"):
        kw = SHORT[name]
        run = jax.jit(lambda e, v: A.ATTACKS[name](fn, v, y, key=jax.random.key(0), eps=e, **kw))
        assert np.all(np.isnan(np.asarray(run(-0.1, x)))), name
        good = np.asarray(run(0.1, x))
        assert np.all(np.isfinite(good)) and linf(good, x).max() <= 0.1 + 1e-6, name


def test_every_attack_accepts_bfloat16_and_stays_in_its_ball_exactly():
    """bfloat16 in, bfloat16 out: computed in float32 and rounded towards x,
    so the result is the float32 attack's, and the ball and box hold exactly."""
    from gce_jax.attacks._common import finish
    shape, batch = SHAPES[1], 4
    fn = mlp_fn(shape)
    x32, y = data(shape, batch, 11)
    xb = jnp.asarray(x32, jnp.bfloat16)
    x_exact = np.asarray(xb, np.float32)  # the bfloat16 pixels, exactly
    eps = 0.1
    for name in sorted(SHORT):
        kw = dict(SHORT[name])
        norm = A.ATTACK_NORMS[name]
        if "eps" in _params(name):
            kw["eps"] = eps
        key = jax.random.key(3)
        out = A.ATTACKS[name](fn, xb, y, key=key, **kw)
        assert out.dtype == jnp.bfloat16, name
        o = np.asarray(out, np.float32)
        assert np.all(np.isfinite(o)) and o.min() >= 0.0 and o.max() <= 1.0, name
        if norm == "linf":
            assert linf(o, x_exact).max() <= np.float32(eps), (name, linf(o, x_exact))
        elif norm == "l2":
            assert l2(o, x_exact).max() <= eps * (1 + 1e-6) + 1e-6, name
        # The float32 attack on the same pixels, rounded towards x.
        ref = A.ATTACKS[name](fn, x_exact, y, key=key, **kw)
        np.testing.assert_array_equal(o, np.asarray(finish(ref, xb), np.float32), err_msg=name)
        assert not np.array_equal(o, x_exact), name  # the attack did something


def test_finish_rounds_towards_the_clean_input():
    from gce_jax.attacks._common import finish
    x = jnp.asarray([0.5, 0.5, 0.25, 1.0], jnp.bfloat16)
    # Nearest bfloat16 beyond x_adv (seen from x) -> its neighbour on x's side:
    # 0.5037 -> 0.50390625 -> 0.5; 0.9940 -> 0.9921875 -> 0.99609375.
    # Nearest already on x's side: kept (0.4991 -> 0.5, 0.2520 -> 0.251953125).
    x_adv = jnp.asarray([0.5037, 0.4991, 0.2520, 0.9940], jnp.float32)
    out = np.asarray(finish(x_adv, x), np.float32)
    assert out.tolist() == [0.5, 0.5, 0.251953125, 0.99609375]
    assert np.all(np.abs(out - np.asarray(x, np.float32))
                  <= np.abs(np.asarray(x_adv) - np.asarray(x, np.float32)))


# ----------------------------------------------------------------------------- JSMA
def test_jsma_pair_choice_matches_brute_force():
    from gce_jax.attacks.jsma import _best_pair
    rng = np.random.RandomState(0)
    n = 23
    a = rng.randn(6, n).astype(np.float32)
    b = rng.randn(6, n).astype(np.float32)
    dom = rng.rand(6, n) < 0.7
    dom[5] = False
    dom[5, :2] = True
    for increase in (True, False):
        sa, sb = (a, b) if increase else (-a, -b)
        for rows in (n, 5):  # one block, and blocks of rows with a padded tail
            ok, p, q = (np.asarray(v) for v in _best_pair(jnp.asarray(a), jnp.asarray(b),
                                                          jnp.asarray(dom), increase, rows))
            for i in range(6):
                best, pair = 0.0, None
                for u in range(n):
                    for v in range(n):
                        if u == v or not (dom[i, u] and dom[i, v]):
                            continue
                        sab, sbb = sa[i, u] + sa[i, v], sb[i, u] + sb[i, v]
                        if sab > 0 and sbb < 0 and -sab * sbb > best:
                            best, pair = -sab * sbb, {u, v}
                assert ok[i] == (pair is not None), (increase, rows, i)
                if pair is not None:
                    assert {int(p[i]), int(q[i])} == pair, (increase, rows, i)


def _saturated_jsma_problem(theta):
    """A linear 2-class model with a known JSMA answer.

    Logits ``(-s, s)`` with ``s = w.x + c``: class 1 (the target) iff s > 0.
    Features 0-1 (weight 2, the most salient) sit at 0.995, saturated; 2-5
    (weight 1) at 0; the rest (weight 0) at 0.5. The target needs s to rise by
    1.5: one pair of the weight-1 features (+2) does it, the saturated pair
    (+0.02) cannot. For theta = -1 the picture is mirrored (x -> 1 - x, w -> -w).
    """
    n = 16
    w = np.zeros(n, np.float32)
    w[:2], w[2:6] = 2.0, 1.0
    x = np.full(n, 0.5, np.float32)
    x[:2], x[2:6] = 0.995, 0.0
    if theta < 0:
        w, x = -w, (1.0 - x).astype(np.float32)
    c = -float(w @ x) - 1.5
    fn = lambda v: jnp.stack([-(v.reshape(v.shape[0], -1) @ w + c),
                              v.reshape(v.shape[0], -1) @ w + c], axis=-1)
    return fn, x[None], np.zeros(1, np.int32), np.ones(1, np.int32)


@pytest.mark.parametrize("theta", [1.0, -1.0])
def test_jsma_margin_skips_saturated_pixels_and_succeeds_with_fewer_changes(theta):
    fn, x, y, t = _saturated_jsma_problem(theta)
    saturated, fresh = np.arange(16) < 2, (np.arange(16) >= 2) & (np.arange(16) < 6)
    runs = {}
    for margin in (0.0, 0.01):
        for gamma in (2 / 16, 0.5):  # 1 iteration; 4 iterations
            out = np.asarray(A.jsma(fn, x, y, targets=t, theta=theta, gamma=gamma,
                                    margin=margin))
            runs[margin, gamma] = (out[0] != x[0], int(np.argmax(fn(out)[0])) == 1)
    # margin 0 (cleverhans' rule): the first iteration spends itself on the
    # saturated pair, so one iteration fails and the success changes 4 pixels.
    changed, hit = runs[0.0, 2 / 16]
    assert not hit and np.array_equal(changed, saturated)
    changed, hit = runs[0.0, 0.5]
    assert hit and changed.sum() == 4 and np.all(changed[saturated])
    # margin 0.01: the saturated pixels are outside the domain; one pair suffices.
    for gamma in (2 / 16, 0.5):
        changed, hit = runs[0.01, gamma]
        assert hit and changed.sum() == 2 and np.all(changed <= fresh)


def test_jsma_iteration_budget_is_the_floor_of_gamma_n_over_2():
    from gce_jax.attacks.jsma import max_iterations
    assert max_iterations(0.1, 784) == 39  # 78.4 / 2: at most 78 <= gamma N pixels
    assert max_iterations(0.25, 784) == 98 and max_iterations(2 / 16, 16) == 1
    assert A.attack_spec("jsma")["margin"] == 0.01


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


def test_defaults_table_is_what_the_attacks_and_attack_spec_use():
    from gce_jax.attacks import defaults
    assert set(defaults.ATTACK_DEFAULTS) == set(A.ATTACKS)
    for name, table in defaults.ATTACK_DEFAULTS.items():
        sig = _defaults(A.ATTACKS[name])
        assert {k: sig[k] for k in table} == dict(table), name
    for name, scale in defaults.STEP_SCALE.items():
        spec = A.attack_spec(name, eps=0.3, steps=6)
        assert spec["step_size"] == pytest.approx(scale * 0.3 / 6), name
    # A step derived from eps / steps at steps=0 is a clear error, not a ZeroDivisionError.
    with pytest.raises(ValueError, match="steps >= 1"):
        A.attack_spec("bim", eps=0.1, steps=0)
    with pytest.raises(ValueError, match="steps >= 1"):
        defaults.derived_step_size(2.5, 0.1, 0)
    s = defaults.default_settings("bim", 0.3, steps=5)
    assert s["step_size"] == pytest.approx(0.06) and s["steps"] == 5
    assert defaults.default_settings("bim", 0.3, step_size=0.1)["step_size"] == 0.1


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


@pytest.mark.parametrize("eps", [0.05, 1.0])
def test_early_stop_keeps_each_example_at_its_first_fooling_iterate_and_exits(eps):
    # BIM with a fixed step size: bim(steps=k) is the k-th iterate of one trajectory,
    # so the early-stopped result must be each example's first misclassified iterate.
    shape, steps, step = (4, 4, 1), 12, 0.02
    x, y = data(shape, 9, 3)
    fn = linear_fn(16)
    iterates = [np.asarray(A.bim(fn, x, y, eps=eps, steps=k, step_size=step))
                for k in range(steps + 1)]
    fooled = np.stack([np.argmax(np.asarray(fn(it)), -1) != y for it in iterates])
    first = np.where(fooled.any(0), fooled.argmax(0), steps)
    expected = np.stack([iterates[k][i] for i, k in enumerate(first)])
    calls = []

    def counted(xa):
        jax.debug.callback(lambda: calls.append(1))
        return fn(xa)

    got = np.asarray(A.bim(counted, x, y, eps=eps, steps=steps, step_size=step, early_stop=True))
    np.testing.assert_array_equal(got, expected)
    if fooled[-1].all() and first.max() < steps:
        # Every example was fooled by iterate first.max(): the loop ran one more
        # gradient evaluation (which saw them all fooled) and stopped.
        assert len(calls) == first.max() + 1
    else:
        assert len(calls) == steps
    assert (first < steps).any(), "the case must fool some examples early"
