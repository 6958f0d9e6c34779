"""Known answers of the attacks on a small model trained on sklearn digits (8x8).

The model (a one-hidden-layer MLP, ~98% test accuracy) is trained inside a
module-scoped fixture in a few seconds. The orderings asserted here are the
ones any correct implementation shows on an undefended model; the thresholds
leave room for platform-level float differences.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gce_jax import attacks as A
from gce_jax.models import logits_fn

N_TRAIN = 1500
EPS = 0.1


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(h)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.RandomState(0).permutation(len(x))
    x, y = x[perm], y[perm]
    xtr, ytr = jnp.asarray(x[:N_TRAIN]), jnp.asarray(y[:N_TRAIN])
    model = MLP()
    params = model.init(jax.random.key(0), xtr[:1])
    opt = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, i):
            p, s = carry
            idx = jax.random.randint(jax.random.key(i), (128,), 0, N_TRAIN)
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(p, xtr[idx]), ytr[idx]).mean())(p)
            u, s = opt.update(g, s)
            return (optax.apply_updates(p, u), s), None
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(400))
        return params

    params = train(params)
    fn = logits_fn(model, params)
    xt, yt = jnp.asarray(x[N_TRAIN:]), jnp.asarray(y[N_TRAIN:])
    assert accuracy(fn, xt, yt) > 0.95
    return fn, xt, yt


def accuracy(fn, x, y) -> float:
    return float(jnp.mean(jnp.argmax(fn(x), axis=-1) == y))


def l2(a, b):
    return jnp.sqrt(jnp.sum((a - b) ** 2, axis=tuple(range(1, a.ndim))))


def target_margin(fn, x, t):
    """max_{i != t} z_i - z_t (< 0 iff classified as t)."""
    z = fn(x)
    is_t = jax.nn.one_hot(t, z.shape[-1], dtype=bool)
    return jnp.max(jnp.where(is_t, -jnp.inf, z), -1) - jnp.sum(jnp.where(is_t, z, 0.0), -1)


def test_iterative_attacks_beat_single_step(digits):
    fn, x, y = digits
    key = jax.random.key(1)
    acc = {name: accuracy(fn, A.ATTACKS[name](fn, x, y, key=key, eps=EPS), y)
           for name in ("fgsm", "bim", "pgd", "mim", "apgd")}
    clean = accuracy(fn, x, y)
    assert acc["fgsm"] < clean - 0.3, acc
    assert acc["pgd"] <= acc["fgsm"], acc
    assert acc["bim"] < acc["fgsm"] and acc["mim"] < acc["fgsm"], acc
    assert acc["apgd"] <= acc["pgd"], acc
    # Larger budget, stronger attack (no gradient masking on this model).
    assert accuracy(fn, A.pgd(fn, x, y, key=key, eps=0.3), y) < 0.05


def test_square_lowers_accuracy_without_gradients(digits):
    fn, x, y = digits
    out = A.square(fn, x, y, key=jax.random.key(2), eps=EPS, n_queries=300)
    assert float(jnp.max(jnp.abs(out - x))) <= EPS + 1e-6
    assert accuracy(fn, out, y) < accuracy(fn, x, y) - 0.4


def test_targeted_pgd_and_objectives_reach_their_targets(digits):
    fn, x, y = digits
    t = A.draw_targets(jax.random.key(3), y, 10)
    assert bool(jnp.all(t != y))
    out = A.pgd(fn, x, t, key=jax.random.key(3), eps=0.3, targeted=True, loss="margin")
    assert float(jnp.mean(jnp.argmax(fn(out), -1) == t)) > 0.9
    for loss in ("dlr", "gce"):
        adv = A.pgd(fn, x, y, key=jax.random.key(4), eps=EPS, loss=loss)
        assert accuracy(fn, adv, y) < accuracy(fn, x, y) - 0.3, loss
        # The attack ascends its objective (GCE: the training loss, minimised
        # by training, maximised here).
        obj = A.get_objective(loss)
        assert float(jnp.mean(obj(fn(adv), y) - obj(fn(x), y))) > 0, loss


def test_carlini_wagner_paper_settings(digits):
    fn, x_all, y_all = digits
    x, y = x_all[:64], y_all[:64]
    key = jax.random.key(5)
    t = A.draw_targets(key, y, 10)
    # Targets are drawn per example (fold_in of the index), so a prefix of the
    # batch gets the same targets; the full-batch PGD below reuses a compilation.
    t_all = A.draw_targets(key, y_all, 10)
    np.testing.assert_array_equal(t_all[:64], t)
    out = A.carlini_wagner_l2(fn, x, y, key=key)  # 9 x 1000, c0 = 1e-3, kappa = 0
    ok = np.asarray(jnp.argmax(fn(out), -1) == t)
    assert ok.mean() > 0.9
    # The smallest-L2 success sits on the decision boundary: margin ~ -kappa = 0.
    margin = np.asarray(target_margin(fn, out, t))[ok]
    assert np.all(margin <= 0.0) and np.all(margin > -0.1), margin
    # Failures are returned unchanged.
    np.testing.assert_array_equal(np.asarray(out)[~ok], np.asarray(x)[~ok])
    # Minimal perturbation: smaller L2 than a targeted L_inf PGD that succeeds.
    pgd = A.pgd(fn, x_all, t_all, key=key, eps=0.3, targeted=True, loss="margin")[:64]
    both = ok & np.asarray(jnp.argmax(fn(pgd), -1) == t)
    assert both.sum() > 40
    assert float(l2(out, x)[both].mean()) < 0.75 * float(l2(pgd, x)[both].mean())

    # Untargeted variant, and per-example independence of the binary search and
    # the early abort (example 0 must not care about the rest of its batch).
    untargeted = A.carlini_wagner_l2(fn, x, y, targeted=False, binary_steps=4, steps=300,
                                     initial_const=1.0)
    assert accuracy(fn, untargeted, y) < 0.2
    mixed_x = jnp.concatenate([x[:1], x[32:], x[1:32]])
    mixed_y = jnp.concatenate([y[:1], y[32:], y[1:32]])
    again = A.carlini_wagner_l2(fn, mixed_x, mixed_y, targeted=False, binary_steps=4,
                                steps=300, initial_const=1.0)
    np.testing.assert_allclose(again[0], untargeted[0], atol=1e-6)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_jsma_targeted_and_sparse(digits, gamma):
    fn, x, y = digits
    key = jax.random.key(6)
    t = A.draw_targets(key, y, 10)
    out = A.jsma(fn, x, y, key=key, gamma=gamma)
    n = x[0].size
    changed = np.asarray(jnp.sum((out != x).reshape(len(x), -1), axis=1))
    assert changed.max() <= gamma * n
    assert float(jnp.max(out)) <= 1.0 and float(jnp.min(out)) >= 0.0
    # theta = +1 only ever raises features to 1.
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(out != x)], 1.0)
    success = float(jnp.mean(jnp.argmax(fn(out), -1) == t))
    if gamma == 0.5:
        assert success > 0.9
        # Chunking (and batch composition) does not change any example.
        chunked = A.jsma(fn, x, y, key=key, gamma=gamma, batch_chunk=50)
        np.testing.assert_array_equal(chunked, out)
        with_targets = A.jsma(fn, x, y, targets=t, gamma=gamma)
        np.testing.assert_array_equal(with_targets, out)
    else:
        assert 0.0 < success < 0.9  # 6 features are not enough for most targets
