"""AutoAttack standard and its new parts: targeted DLR, APGD-T, FAB / FAB-T.

Known answers come from models where the answer is known independently:
linear models (closed-form L_inf distance to the decision boundary, or a
linear program solved by scipy) and a numpy transcription of the targeted
DLR. The ensemble is checked against its own components on the small MLP that
test_attacks_known_answers.py trains on sklearn digits (8x8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from scipy.optimize import linprog
from test_attacks_known_answers import digits  # noqa: F401 -- a trained digits MLP fixture

from gce_jax import attacks as A
from gce_jax import robustness as R
from gce_jax.attacks import CLEAN_MISCLASSIFIED, ROBUST, objectives

D, K_LIN = 20, 5


# ----------------------------------------------------------------- models
def _linear(w, b, x):
    return x.reshape(x.shape[0], -1) @ w + b


def linear_model(seed: int, k: int = K_LIN, scale: float = 1.0):
    rng = np.random.RandomState(seed)
    w = (scale * rng.randn(D, k)).astype(np.float32)
    b = rng.randn(k).astype(np.float32)
    return Partial(_linear, jnp.asarray(w), jnp.asarray(b)), w, b


def predict(fn, x):
    return np.asarray(jnp.argmax(fn(jnp.asarray(x)), axis=-1))


def linf(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(axis=1)


# --------------------------------------------------------------- objectives
def test_targeted_dlr_matches_a_numpy_transcription():
    rng = np.random.RandomState(0)
    for k in (4, 10):
        z = rng.randn(32, k).astype(np.float32) * 3
        y = rng.randint(0, k, 32)
        t = (y + rng.randint(1, k, 32)) % k
        srt = np.sort(z, axis=1)
        want = -(z[np.arange(32), y] - z[np.arange(32), t]) / (
            srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)
        got = objectives.dlr_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # Shift- and scale-invariant, and positive once z_t > z_y.
        np.testing.assert_allclose(
            objectives.dlr_targeted(jnp.asarray(5 * z + 2), jnp.asarray(y), jnp.asarray(t)),
            got, rtol=1e-4, atol=1e-5)
        assert np.all((np.asarray(got) > 0) == (z[np.arange(32), t] > z[np.arange(32), y]))
    with pytest.raises(ValueError, match="at least 4 classes"):
        objectives.dlr_targeted(jnp.zeros((2, 3)), jnp.zeros(2, int), jnp.ones(2, int))
    # Targeted objectives: the targeted DLR for 'dlr', minus the objective at t otherwise.
    z, y, t = jnp.asarray(z), jnp.asarray(y), jnp.asarray(t)
    assert objectives.targeted_objective("dlr") is objectives.dlr_targeted
    np.testing.assert_allclose(objectives.targeted_objective("xe")(z, y, t), -objectives.xe(z, t))
    with pytest.raises(ValueError, match="true label"):
        objectives.signed_objective("dlr", targeted=True)


def test_top_other_classes_skip_the_label_largest_first():
    z = jnp.array([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 1.0, 8.0, 2.0]])
    got = objectives.top_other_classes(z, jnp.array([0, 3]), 3)
    np.testing.assert_array_equal(got, [[2, 3, 4], [1, 4, 2]])
    with pytest.raises(ValueError, match="target classes"):
        objectives.top_other_classes(z, jnp.array([0, 3]), 5)


# ------------------------------------------------------------------- APGD-T
def test_apgd_t_reaches_the_requested_target_where_it_is_reachable():
    """Target t is reachable within eps iff max over ball and box of
    min_{j != t} (z_t - z_j) > 0, a linear program. With the targeted margin
    APGD-T reaches every target reachable with a clear margin, also when
    another wrong class is easier."""
    fn, w, b = linear_model(4, scale=2.0)
    rng = np.random.RandomState(5)
    x = rng.uniform(0.2, 0.8, (12, D)).astype(np.float32)
    y = (x @ w + b).argmax(1).astype(np.int32)
    eps = 0.1
    best = np.full((len(x), K_LIN), -np.inf)
    for i in range(len(x)):
        for t in set(range(K_LIN)) - {y[i]}:
            others = [j for j in range(K_LIN) if j != t]
            # maximise s  s.t.  (w_t - w_j).(x + delta) + b_t - b_j >= s for all j != t
            res = linprog(np.r_[np.zeros(D), -1.0],
                          A_ub=np.array([np.r_[-(w[:, t] - w[:, j]), 1.0] for j in others]),
                          b_ub=np.array([(w[:, t] - w[:, j]) @ x[i] + b[t] - b[j]
                                         for j in others]),
                          bounds=[(max(-eps, -x[i, m]), min(eps, 1 - x[i, m]))
                                  for m in range(D)] + [(None, None)])
            best[i, t] = -res.fun
    # For each example the reachable target with the smallest clear margin.
    margin = np.where(best > 0.3, best, np.inf)
    rows = np.flatnonzero(np.isfinite(margin).any(1))
    targets = margin[rows].argmin(1).astype(np.int32)
    assert len(rows) >= 5 and np.any(targets != best[rows].argmax(1))
    out = A.apgd(fn, x[rows], y[rows], key=jax.random.key(0), eps=eps, steps=50,
                 targeted=True, targets=targets, loss="margin")
    assert linf(out, x[rows]).max() <= eps + 1e-6
    np.testing.assert_array_equal(predict(fn, out), targets)


def test_apgd_t_with_the_targeted_dlr_reaches_its_target_iff_reachable():
    """Two live classes (the other three sit 100 logits below): the top target
    of each example is the other live class, and the best the ball allows is
    the corner x + eps sign(w_t - w_y) (clipped), so reachability is exact."""
    rng = np.random.RandomState(6)
    w = np.zeros((D, K_LIN), np.float32)
    w[:, :2] = 2.0 * rng.randn(D, 2)
    b = np.array([0.0, 0.5, -100.0, -100.0, -100.0], np.float32)
    fn = Partial(_linear, jnp.asarray(w), jnp.asarray(b))
    x = rng.uniform(0.2, 0.8, (16, D)).astype(np.float32)
    y = (x @ w + b).argmax(1).astype(np.int32)
    t = 1 - y
    eps = 0.05
    gap = w[:, t].T - w[:, y].T
    corner = np.clip(x + eps * np.sign(gap), 0, 1)
    best = np.sum(gap * corner, 1) + b[t] - b[y]  # max of z_t - z_y in the ball
    assert (best > 0.05).sum() >= 3 and (best < -0.05).sum() >= 3
    out = A.apgd(fn, x, y, key=jax.random.key(1), eps=eps, steps=50, targeted=True,
                 n_target_classes=1)
    hit = predict(fn, out) == t
    np.testing.assert_array_equal(hit[best > 0.05], True)
    np.testing.assert_array_equal(hit[best < 0], False)


# ----------------------------------------------------------------- ensemble
# One budget and one batch size (16) wherever possible: every new static
# setting or shape is a compilation, which dominates this file's time.
BUDGET = dict(steps=5, n_queries=30, n_target_classes=2)
N = 16


def test_autoattack_is_at_least_as_strong_as_every_component(digits):
    fn, x, y = digits
    x, y = x[:N], y[:N]
    key, eps = jax.random.key(7), 0.08
    res = A.autoattack(fn, x, y, key=key, eps=eps, **BUDGET)
    clean = predict(fn, x) == y
    np.testing.assert_array_equal(res.broken_by == CLEAN_MISCLASSIFIED, ~clean)
    assert res.components == ("apgd-ce", "apgd-t", "fab-t", "square")
    x_adv = np.asarray(res.x_adv)
    assert linf(x_adv, x).max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    broken = res.broken_by >= 0
    np.testing.assert_array_equal(predict(fn, x_adv) != y, broken | ~clean)
    np.testing.assert_array_equal(x_adv[~broken], x[~broken])
    robust = res.broken_by == ROBUST
    assert 0 < robust.sum() < clean.sum()
    for c, (name, attack, kw) in enumerate(A.autoattack_components(eps=eps, **BUDGET)):
        alone = predict(fn, attack(fn, x, y, key=jax.random.fold_in(key, c), **kw)) == y
        assert robust.mean() <= alone.mean(), name
        # Per example: draws are keyed by index, so a component run alone
        # fails on everything the ensemble left robust or broke later.
        assert not np.any(robust & ~alone), name
        assert not np.any((res.broken_by > c) & ~alone), name
        assert not np.any((res.broken_by == c) & alone), name


def test_autoattack_does_not_depend_on_the_batch(digits):
    fn, x, y = digits
    key, eps = jax.random.key(8), 0.08
    full = A.autoattack(fn, x[:N], y[:N], key=key, eps=eps, **BUDGET)
    part = A.autoattack(fn, x[8:N], y[8:N], key=key, eps=eps, example_offset=8, **BUDGET)
    np.testing.assert_array_equal(part.broken_by, full.broken_by[8:])
    np.testing.assert_allclose(part.x_adv, np.asarray(full.x_adv)[8:], atol=1e-6)
    idx = np.array([15, 3, 9, 0, 12, 1, 7, 4])  # not contiguous: one index per example
    sub = A.autoattack(fn, x[idx], y[idx], key=key, eps=eps, example_offset=idx, **BUDGET)
    np.testing.assert_array_equal(sub.broken_by, full.broken_by[idx])
    np.testing.assert_allclose(sub.x_adv, np.asarray(full.x_adv)[idx], atol=1e-6)


@pytest.mark.parametrize("name", ["apgd-t", "fab-t", "fab"])
def test_new_attacks_stay_in_the_ball_and_do_not_depend_on_the_batch(digits, name):
    fn, x, y = digits
    if name == "fab":  # untargeted, with a random restart
        attack, kw = A.fab, dict(steps=5, n_restarts=2)
    else:  # the ensemble's settings: shares its compilations
        (attack, kw), = [(a, k) for n, a, k in A.autoattack_components(eps=0.0, **BUDGET)
                         if n == name]
        kw = {k: v for k, v in kw.items() if k != "eps"}
    key = jax.random.key(1)
    full = np.asarray(attack(fn, x[:N], y[:N], key=key, eps=0.3, **kw))
    x5, y5 = x[:5], y[:5]  # an odd batch
    for eps in (0.0, 0.3):
        out = np.asarray(attack(fn, x5, y5, key=key, eps=eps, **kw))
        assert out.shape == x5.shape and out.dtype == x5.dtype
        assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
        assert linf(out, x5).max() <= eps + 1e-6
        if eps == 0.0:
            np.testing.assert_array_equal(out, x5)
    np.testing.assert_allclose(out, full[:5], atol=1e-6)
    assert np.mean(predict(fn, full) != y[:N]) > 0.5
    if name == "fab":
        chunked = attack(fn, x[:N], y[:N], key=key, eps=0.3, batch_chunk=5, **kw)
        np.testing.assert_allclose(chunked, full, atol=1e-6)


def test_bad_inputs_raise(digits):
    fn, x, y = digits
    x3, y3 = x[:3], y[:3]
    key = jax.random.key(0)
    three = Partial(_linear, jnp.ones((64, 3)), jnp.zeros(3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        A.apgd(three, x3, y3 % 3, key=key, eps=0.1, targeted=True)
    with pytest.raises(ValueError, match="at least 4 classes"):
        A.autoattack(three, x3, y3 % 3, key=key, eps=0.1)
    with pytest.raises(ValueError, match="standard"):
        A.autoattack(fn, x3, y3, key=key, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="images"):
        A.autoattack(fn, x3.reshape(3, -1), y3, key=key, eps=0.1)
    with pytest.raises(ValueError, match="targeted=True"):
        A.apgd(fn, x3, y3, key=key, eps=0.1, targets=y3)
    with pytest.raises(ValueError, match="shape"):
        A.fab(fn, x3, y3, key=key, eps=0.1, targeted=True, targets=np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match="n_target_classes"):
        A.fab(fn, x3, y3, key=key, eps=0.1, targeted=True, n_target_classes=0)
    with pytest.raises(ValueError, match="steps"):
        A.fab(fn, x3, y3, key=key, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="true label"):
        A.pgd(fn, x3, y3, key=key, eps=0.1, targeted=True, loss="dlr")


# ------------------------------------------------------------------ evaluator
def test_evaluator_reports_autoattack_and_one_cumulative_row_per_component(digits):
    from gce_jax import parallel
    fn, x, y = digits
    x, y = x[:N], y[:N]
    spec = R.paper_spec("autoattack", 0.08, **BUDGET)
    assert spec.label == "autoattack" and spec.loss is None
    one = R.Evaluator(fn, x, y, batch_size=N, registry=A.ATTACKS, progress=False)
    res = one.run(spec)
    direct = A.autoattack(fn, x, y, key=one.prng_key_for(spec), eps=0.08, **BUDGET)
    np.testing.assert_array_equal(res.robust, direct.broken_by == ROBUST)
    rows = res.with_components()
    assert [r.record["label"] for r in rows] == [
        "autoattack", "autoattack > apgd-ce", "autoattack > apgd-t", "autoattack > fab-t",
        "autoattack > square"]
    for c, r in enumerate(rows[1:]):  # cumulative: robust to components 0..c
        np.testing.assert_array_equal(r.robust, one.clean_correct & ~np.isin(
            direct.broken_by, np.arange(c + 1)))
        assert r.record["settings"]["broke"] == int(np.sum(direct.broken_by == c))
        # Success is cumulative as well, not the ensemble's final figure repeated.
        fooled = int(one.clean_correct.sum() - r.robust.sum())
        assert r.record["num_success"] == fooled and r.record["mean_l0"] is None
        assert r.record["success_rate"] == pytest.approx(fooled / one.clean_correct.sum())
    np.testing.assert_array_equal(rows[-1].robust, res.robust)
    assert res.record["loss"].startswith("apgd-ce:xe") and res.record["settings"]["steps"] == 5
    # The worst case counts the ensemble once, not its cumulative rows.
    pgd = one.run(R.paper_spec("pgd", 0.08, steps=3))
    (group,) = R.best_robust([*rows, pgd])
    assert group["attacks"] == ["autoattack", "pgd-xe"]
    md = R.report_to_markdown(R.build_report(
        run="toy", workdir="/w", command="cmd", model={"name": "mlp"},
        data={"dataset": "digits", "split": "test", "n": N, "selection": "all"},
        evaluator=one, results=rows, diagnostics=None, verdict="inconclusive: test"))
    assert "| autoattack > fab-t |" in md
    # Each batch split over 4 devices: the same robust examples.
    four = R.Evaluator(fn, x, y, batch_size=N, registry=A.ATTACKS, progress=False,
                       mesh=parallel.make_mesh(jax.devices()[:4]))
    np.testing.assert_array_equal(four.run(spec).robust, res.robust)
    with pytest.raises(R.EvaluationError, match="restarts must be 1"):
        R.paper_spec("autoattack", 0.08, restarts=2)
    with pytest.raises(R.EvaluationError, match="fixed objective"):
        R.parse_attack_name("autoattack:xe", A.ATTACKS)
