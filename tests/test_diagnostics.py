"""Gradient-masking diagnostics: a saturated model is flagged, a normal one is not.

The positive control is a trained digits MLP whose logits are multiplied by
1e4 (``robustness.saturate``): predictions are unchanged, the softmax
saturates and the float32 cross-entropy gradient is exactly zero, so
xe-based attacks stall while margin/DLR/Square attacks still succeed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from gce_jax import robustness as R
from gce_jax.attacks import ATTACKS

N_TEST = 200
# Small budgets for a loaded 2-core CPU; the library defaults stay the paper's.
SMALL = R.DiagnosticsConfig(eps_grid=(0.05, 0.1, 0.2), pgd_steps=10, pgd_step_size=None,
                            bim_steps=5, apgd_steps=10, square_queries=200, restarts=2)


# ----------------------------------------------------------------- fixtures
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def train_digits_mlp(seed: int, steps: int = 300):
    """A cross-entropy MLP on sklearn digits; returns (logits_fn, x_test, y_test)."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:1400], perm[1400:1400 + N_TEST]
    model = MLP()
    params = model.init(jax.random.key(seed), x[:1])
    opt = optax.adam(1e-2)
    state = opt.init(params)
    xtr, ytr = jnp.asarray(x[tr]), jnp.asarray(y[tr])

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, xtr), ytr).mean())(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    # One module-level function for every model: the attacks compile once.
    return jax.tree_util.Partial(_apply, params), x[te], y[te]


def _apply(params, x):
    return MLP().apply(params, x)


@pytest.fixture(scope="module")
def digits():
    return train_digits_mlp(0)


@pytest.fixture(scope="module")
def twin():
    """Same architecture, another seed: the transfer source."""
    return train_digits_mlp(1)[0]


def _result(mask, label="a", eps=0.1, attack="pgd"):
    mask = np.asarray(mask, bool)
    spec = R.AttackSpec(attack, eps, "xe", label=label)
    return R.AttackResult(spec, mask, {"robust_accuracy": float(mask.mean()),
                                       "source": "self"})


def _mask(n_true, n=200):
    m = np.zeros(n, bool)
    m[:n_true] = True
    return m


# ------------------------------------------------------------ end to end
def test_saturated_model_is_flagged(digits, twin):
    logits_fn, x, y = digits
    normal = R.Evaluator(logits_fn, x, y, batch_size=N_TEST, registry=ATTACKS, progress=False)
    masked = R.saturate(logits_fn)
    ev = R.Evaluator(masked, x, y, batch_size=N_TEST, registry=ATTACKS, progress=False)
    np.testing.assert_array_equal(ev.clean_correct, normal.clean_correct)
    diag = R.run_diagnostics(ev, SMALL, reference_logits_fn=twin, reference_name="xe-twin")
    failed = set(diag.failed())
    assert diag.verdict.startswith(R.VERDICT_MASKING), diag.verdict
    # The mechanism itself, and the two comparisons that expose it.
    assert {"zero_gradients", "loss_sensitivity", "transfer_vs_white_box"} <= failed, failed
    checks = {c.name: c for c in diag.checks}
    assert checks["zero_gradients"].values["fraction"] > 0.5
    ls = checks["loss_sensitivity"].values
    assert ls["pgd-xe"] - min(ls["pgd-margin"], ls["apgd-dlr"]) > 0.3
    assert not diag.errors
    js = diag.to_json()
    assert js["verdict"] == diag.verdict and js["curve"]["eps"][0] == 0.0


def test_normal_model_is_not_flagged(digits, twin):
    logits_fn, x, y = digits
    ev = R.Evaluator(logits_fn, x, y, batch_size=N_TEST, registry=ATTACKS, progress=False)
    assert ev.clean_accuracy > 0.9
    diag = R.run_diagnostics(ev, SMALL, reference_logits_fn=twin, reference_name="xe-twin")
    statuses = {c.name: c.status for c in diag.checks}
    assert diag.verdict == R.VERDICT_OK, (diag.verdict, [c.message for c in diag.checks])
    assert all(s in (R.PASS, R.INFO) for s in statuses.values()), statuses
    assert set(statuses) == set(R.CHECK_NAMES)
    # The curve starts at clean accuracy, runs to zero, and the plot data match.
    assert diag.curve_accuracy[0] == pytest.approx(ev.clean_accuracy)
    assert diag.curve_accuracy[-1] <= R.ZERO_ACC_MAX
    assert diag.eps in SMALL.eps_grid
    # AutoAttack standard ran at the diagnostics eps, joined the worst case
    # (its component rows did not), and is what allows "no masking detected".
    labels = [r.spec.label for r in diag.results]
    assert "autoattack" in labels and "autoattack > square" in labels
    assert "autoattack" in diag.worst_case["attacks"]
    assert not any(">" in a for a in diag.worst_case["attacks"])
    aa = next(r for r in diag.results if r.spec.label == "autoattack")
    assert diag.worst_case["robust_accuracy"] <= aa.robust_accuracy


def test_noop_attacks_are_flagged_and_broken_attacks_make_checks_skip(digits):
    """An attack that does nothing looks exactly like masking; one that raises is reported."""
    logits_fn, x, y = digits

    def noop(fn, xb, yb, *, key, eps, loss="xe", **kw):
        return xb

    def broken(*a, **k):
        raise RuntimeError("boom")

    registry = {name: noop for name in ("fgsm", "bim", "pgd", "apgd")}
    registry["square"] = broken
    ev = R.Evaluator(logits_fn, x[:60], y[:60], batch_size=60, registry=registry, progress=False)
    diag = R.run_diagnostics(ev, SMALL)
    status = {c.name: c.status for c in diag.checks}
    assert status["curve_reaches_zero"] == R.FAIL
    assert status["black_box_vs_white_box"] == R.SKIPPED
    assert any("boom" in e for e in diag.errors.values())
    assert diag.verdict.startswith(R.VERDICT_MASKING)
    assert "curve_reaches_zero" in diag.verdict


def test_zero_gradient_mask(digits):
    logits_fn, x, y = digits
    exact, _ = R.zero_gradient_mask(logits_fn, x, y, batch_size=64)
    assert exact.mean() == 0.0
    exact, _ = R.zero_gradient_mask(R.saturate(logits_fn), x, y, batch_size=64)
    correct = np.asarray(jnp.argmax(logits_fn(x), -1)) == y
    assert exact.mean() > 0.5
    assert not exact[~correct].any()  # a misclassified example always has a gradient


# ---------------------------------------------------------- unit: checks
def test_paired_excess_needs_size_and_significance():
    a, b = _mask(101), _mask(100)  # one discordant example: 0.5 pp, noise
    assert paired_flag(a, b, 0.002) is False
    a, b = _mask(150), _mask(100)
    diff, flag = R.paired_excess(a, b, 0.05)
    assert diff == pytest.approx(0.25) and flag
    assert R.paired_excess(b, a, 0.05)[1] is False  # direction matters
    assert R.paired_excess(a, b, 0.3)[1] is False  # below tolerance


def paired_flag(a, b, tol):
    return R.paired_excess(a, b, tol)[1]


def test_check_curve():
    eps = [0.0, 0.1, 0.2, 1.0]
    good = [_mask(190), _mask(100), _mask(20), _mask(0)]
    mono, zero = R.check_curve(eps, good)
    assert (mono.status, zero.status) == (R.PASS, R.PASS)
    rising = [_mask(190), _mask(50), _mask(120), _mask(0)]
    assert R.check_curve(eps, rising)[0].status == R.FAIL
    plateau = [_mask(190), _mask(100), _mask(60), _mask(40)]
    assert R.check_curve(eps, plateau)[1].status == R.FAIL
    short = [_mask(190), _mask(100)]
    assert R.check_curve([0.0, 0.1], short)[1].status == R.SKIPPED


def test_check_iterative_black_box_transfer_convergence():
    strong, weak = _result(_mask(40)), _result(_mask(120))
    assert R.check_iterative(strong, strong, weak).status == R.PASS
    assert R.check_iterative(weak, strong, weak).status == R.FAIL  # PGD weaker than BIM
    assert R.check_iterative(strong, weak, strong).status == R.FAIL  # FGSM beats BIM
    assert R.check_iterative(None, strong, weak).status == R.SKIPPED

    assert R.check_black_box(weak, {"pgd": strong}).status == R.PASS
    assert R.check_black_box(strong, {"pgd": weak, "x": None}).status == R.FAIL
    assert R.check_black_box(None, {"pgd": strong}).status == R.SKIPPED

    skipped = R.check_transfer(None, None, reference=None)
    assert skipped.status == R.SKIPPED and not skipped.required
    assert R.check_transfer(strong, weak, reference="r").status == R.FAIL
    assert R.check_transfer(weak, strong, reference="r").status == R.PASS

    assert R.check_convergence(strong, strong, strong).status == R.PASS
    c = R.check_convergence(weak, strong, _result(_mask(120)))
    assert c.status == R.FAIL and c.values["delta_double_steps"] == pytest.approx(-0.4)
    # Restarts add to the base run: robust only if robust in both.
    c = R.check_convergence(weak, weak, _result(_mask(120, 200)[::-1].copy()))
    assert c.values["with_restarts"] == pytest.approx(np.mean(_mask(120) & _mask(120)[::-1]))
    assert c.status == R.FAIL


def test_check_loss_sensitivity():
    xe, margin = _result(_mask(150)), _result(_mask(10))
    c = R.check_loss_sensitivity(xe, {"pgd-margin": margin, "apgd-dlr": None})
    assert c.status == R.FAIL and "pgd-margin" in c.message and c.values["did_not_run"] == ["apgd-dlr"]
    c = R.check_loss_sensitivity(margin, {"pgd-margin": margin})
    assert c.status == R.PASS
    assert R.check_loss_sensitivity(xe, {"pgd-margin": None}).status == R.SKIPPED


def test_verdict():
    ok = [R.Check("a", R.PASS, ""), R.Check("t", R.SKIPPED, "", required=False)]
    assert R.verdict(ok, num_clean_correct=500) == R.VERDICT_OK
    bad = ok + [R.Check("zero_gradients", R.FAIL, ""), R.Check("b", R.SKIPPED, "")]
    assert R.verdict(bad, num_clean_correct=500) == f"{R.VERDICT_MASKING}: zero_gradients"
    v = R.verdict(ok + [R.Check("b", R.SKIPPED, "")], num_clean_correct=500)
    assert v.startswith(R.VERDICT_INCONCLUSIVE) and "b" in v
    v = R.verdict(bad, num_clean_correct=R.MIN_CORRECT_EXAMPLES - 1)
    assert v.startswith(R.VERDICT_INCONCLUSIVE) and "zero_gradients" in v


def test_verdict_needs_autoattack_standard_in_the_worst_case():
    def row(attack, loss, source="self", **params):
        spec = R.AttackSpec(attack, 0.1, loss, params=params)
        return R.AttackResult(spec, _mask(50), {"robust_accuracy": 0.25, "source": source})

    passed = [R.Check("a", R.PASS, "")]
    ce, square = row("apgd", "xe"), row("square", "margin")
    c = R.check_autoattack([ce, square, row("apgd", "dlr")], 0.1)
    assert c.status == R.SKIPPED and c.required and c.values["missing"] == ["apgd-t", "fab-t"]
    v = R.verdict(passed + [c], num_clean_correct=500)
    assert v == (f"{R.VERDICT_INCONCLUSIVE}: worst case lacks AutoAttack standard "
                 "(missing: apgd-t, fab-t)")
    # The components run separately cover it too; a transfer row does not.
    parts = [ce, square, row("apgd", "dlr", targeted=True), row("fab", None, targeted=True)]
    assert R.check_autoattack(parts, 0.1).status == R.PASS
    assert R.autoattack_coverage([row("autoattack", None, source="xe-twin")]) == list(
        R.AUTOATTACK_COMPONENTS)
    aa = row("autoattack", None, version="standard", steps=10, n_queries=100)
    c = R.check_autoattack([aa], 0.1)
    assert c.status == R.PASS and "reduced budgets" in c.message
    assert R.verdict(passed + [c], num_clean_correct=500) == R.VERDICT_OK
    # A failed check still wins over a missing AutoAttack.
    missing = R.check_autoattack([ce], 0.1)
    assert R.verdict([R.Check("convergence", R.FAIL, ""), missing],
                     num_clean_correct=500) == f"{R.VERDICT_MASKING}: convergence"


def test_eps_grid_extension_and_choice():
    assert R.extend_eps_grid([0.3, 0.1, 0.2]) == [0.1, 0.2, 0.3, 0.6, 1.0]
    assert R.extend_eps_grid([1.0]) == [1.0]
    tiny = R.extend_eps_grid([0.001])
    assert tiny[-1] == pytest.approx(1.0) and len(tiny) <= 7 and tiny == sorted(tiny)
    assert R.choose_eps([0.1, 0.2, 0.3], [0.8, 0.45, 0.1], clean=0.9) == 0.2
