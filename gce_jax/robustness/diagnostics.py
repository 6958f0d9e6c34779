"""Gradient-masking diagnostics and the per-model verdict.

A robustness number is only as good as the attack behind it. GCE drives
``p_g`` towards 1, which can make the cross-entropy input gradient underflow
to exactly zero in float32, so sign-gradient attacks on cross-entropy stall and
report robustness that is not there. This module runs the sanity checks of
Athalye et al. (2018), Carlini et al. (2019) and AutoAttack (Croce & Hein
2020) on one model and turns them into a verdict:

1. PGD accuracy-vs-eps curve up to eps = 1: non-increasing; reaches ~0%.
2. Iterative beats single step: PGD <= BIM <= FGSM.
3. Loss sensitivity: xe-PGD is not much weaker than margin/DLR PGD, APGD-CE
   and APGD-DLR.
4. Black box (Square) does not beat the best white-box attack.
5. Transfer from a cross-entropy twin does not beat white-box PGD.
6. Convergence: doubling iterations / adding restarts changes little.
7. Few examples have an exactly-zero cross-entropy input gradient.
8. (info) per-example worst case over all attacks.
9. The worst case includes AutoAttack standard (APGD-CE, APGD-T, FAB-T,
   Square): without it no verdict says "no masking detected".

Every comparison is *paired* (same examples), and an excess counts only if it
is both larger than the check's tolerance and statistically clear under a
sign test on the discordant examples, so a 200-example smoke test does not
flag noise while a saturated model still fails by a wide margin.

Each check is a small function returning its :class:`Check` (verdict and
evidence); :func:`run_diagnostics` runs the attacks they need, one step per
check (:data:`CHECK_STEPS`). Imports :mod:`~gce_jax.robustness.specs` and
:mod:`~gce_jax.robustness.evaluator` from this package, never the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from gce_jax.attacks.defaults import ATTACK_DEFAULTS, MADRY_STEP_SCALE, derived_step_size
from gce_jax.data import batch_slices, pad_to
from gce_jax.losses import cross_entropy
from gce_jax.robustness.evaluator import AttackResult, Evaluator, best_robust
from gce_jax.robustness.specs import AttackSpec, paper_spec

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# ------------------------------------------------------------------- thresholds
# Below this many correctly classified examples one example moves accuracy by
# more than 2 pp and the tolerances below stop meaning anything.
MIN_CORRECT_EXAMPLES = 50
# Sign-test z for paired excesses: (b - c) > Z * sqrt(b + c), b/c discordant
# counts (~97.7% one-sided); keeps small smoke tests from flagging noise.
SIGNIFICANCE_Z = 2.0
# Accuracy may rise with eps by at most 1 pp (random-start noise).
MONOTONE_TOL = 0.01
# At eps = 1 every image in [0,1]^n is reachable: a working attack leaves <= 1%.
ZERO_ACC_MAX = 0.01
# The curve is extended (doubling eps) up to this budget; images live in [0,1].
CURVE_MAX_EPS = 1.0
# Madry et al.'s step rule for the curve, so large budgets are actually covered.
CURVE_STEP_FACTOR = MADRY_STEP_SCALE
# PGD may be at most 1 pp weaker than BIM, and BIM than FGSM.
ITERATIVE_TOL = 0.01
# "Much weaker": xe-PGD more than 5 pp above the best margin/DLR/APGD attack.
LOSS_GAP_TOL = 0.05
# AutoAttack's rule: Square beating the best white-box attack by > 0.2 pp.
BLACK_BOX_TOL = 0.002
# Transfer from an XE twin may beat white-box PGD by at most 1 pp.
TRANSFER_TOL = 0.01
# Doubling steps / adding restarts may lower accuracy by at most 3 pp.
CONVERGENCE_TOL = 0.03
# More than 1% of examples with an exactly-zero xe input gradient: xe attacks
# are blind there by construction.
ZERO_GRAD_MAX_FRACTION = 0.01

THRESHOLDS = {
    "MIN_CORRECT_EXAMPLES": MIN_CORRECT_EXAMPLES, "SIGNIFICANCE_Z": SIGNIFICANCE_Z,
    "MONOTONE_TOL": MONOTONE_TOL, "ZERO_ACC_MAX": ZERO_ACC_MAX,
    "CURVE_MAX_EPS": CURVE_MAX_EPS, "CURVE_STEP_FACTOR": CURVE_STEP_FACTOR,
    "ITERATIVE_TOL": ITERATIVE_TOL, "LOSS_GAP_TOL": LOSS_GAP_TOL,
    "BLACK_BOX_TOL": BLACK_BOX_TOL, "TRANSFER_TOL": TRANSFER_TOL,
    "CONVERGENCE_TOL": CONVERGENCE_TOL, "ZERO_GRAD_MAX_FRACTION": ZERO_GRAD_MAX_FRACTION,
}

PASS, FAIL, SKIPPED, INFO = "pass", "fail", "skipped", "info"
VERDICT_OK = "no masking detected"
VERDICT_MASKING = "gradient masking suspected"
VERDICT_INCONCLUSIVE = "inconclusive"

CHECK_NAMES = ("curve_monotone", "curve_reaches_zero", "iterative_vs_single_step",
               "loss_sensitivity", "black_box_vs_white_box", "transfer_vs_white_box",
               "convergence", "zero_gradients", "worst_case", "autoattack_standard",
               "attack_budget")
# AutoAttack standard's components and its budgets (iterations, Square queries).
AUTOATTACK_COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_STEPS = ATTACK_DEFAULTS["autoattack"]["steps"]
AUTOATTACK_QUERIES = ATTACK_DEFAULTS["autoattack"]["n_queries"]


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Attack budgets for the diagnostics. Defaults: paper / AutoAttack settings.

    Attributes:
      eps: L_inf budget of checks 2-6; None picks the grid eps whose PGD
        accuracy is nearest half the clean accuracy (the most informative).
      eps_grid: starting eps grid of the curve (extended up to eps = 1).
      pgd_steps, pgd_step_size: the headline PGD (paper: 40, 0.01); a None
        step size means ``2.5 * eps / steps``.
      bim_steps: paper: 10. apgd_steps: AutoAttack: 100.
      square_queries: AutoAttack: 5000. restarts: for the convergence check.
      model_loss: the model's training loss; ``'gce'`` adds a GCE-loss PGD
        (the authors' evaluation) as an informational row.
      autoattack: run AutoAttack standard at the diagnostics eps (its APGD and
        FAB iterations are ``apgd_steps``, Square's queries ``square_queries``).
        Without it, or an equivalent set of rows, the verdict cannot be
        "no masking detected".
    """

    eps: float | None = None
    eps_grid: tuple[float, ...] = (0.1, 0.2, 0.3)
    pgd_steps: int = ATTACK_DEFAULTS["pgd"]["steps"]
    pgd_step_size: float | None = ATTACK_DEFAULTS["pgd"]["step_size"]
    bim_steps: int = ATTACK_DEFAULTS["bim"]["steps"]
    apgd_steps: int = ATTACK_DEFAULTS["apgd"]["steps"]
    square_queries: int = ATTACK_DEFAULTS["square"]["n_queries"]
    restarts: int = 5
    curve_max_eps: float = CURVE_MAX_EPS
    model_loss: str | None = None
    autoattack: bool = True

    def pgd_step(self, eps: float) -> float:
        """The headline PGD's step size at ``eps``."""
        if self.pgd_step_size is None:
            return derived_step_size(CURVE_STEP_FACTOR, eps, self.pgd_steps)
        return self.pgd_step_size


@dataclasses.dataclass
class Check:
    """One diagnostic: ``status`` in pass | fail | skipped | info."""

    name: str
    status: str
    message: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    required: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- primitives
def _scaled_logits(logits_fn: LogitsFn, scale: Array, x: Array) -> Array:
    return scale * logits_fn(x)


def saturate(logits_fn: LogitsFn, scale: float = 1e4) -> LogitsFn:
    """``x -> scale * logits_fn(x)``: a positive control for these diagnostics.

    Predictions are unchanged, but the softmax saturates, so the cross-entropy
    input gradient underflows to exactly zero on confidently classified
    examples. A correct evaluation must still find the model non-robust.
    Returned as a ``jax.tree_util.Partial`` so the attacks compile once for it.
    """
    if not isinstance(logits_fn, Partial):
        logits_fn = Partial(logits_fn)
    return Partial(_scaled_logits, logits_fn, jnp.float32(scale))


def _input_grad_is_zero(fn: Partial, x: Array, y: Array) -> Array:
    g = jax.grad(lambda v: jnp.sum(cross_entropy(fn(v), y)))(x)
    return jnp.all(g == 0, axis=tuple(range(1, x.ndim)))


def _logits(fn: Partial, x: Array) -> Array:
    return fn(x)


def zero_gradient_mask(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                       batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per example: is the cross-entropy input gradient exactly zero in float32?

    Returns ``(exact, compiled)``:

    * ``exact``: the float32 gradient with respect to the logits, evaluated op
      by op, is exactly zero (then so is the input gradient, ``J^T 0 = 0``), or
      the compiled input gradient is. This is the arithmetic fact that the
      softmax saturated.
    * ``compiled``: the input gradient as a jit-compiled attack computes it is
      exactly zero. XLA's fused exp/log kernels can leave a rounding residue
      (~1e-9) where exact float32 gives 0, so this fraction depends on the
      backend; an attack that only moves because of that residue is not one
      to trust, hence ``exact`` is what the check uses.
    """
    fn = logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)
    compiled_fn = jax.jit(_input_grad_is_zero)
    logits_jit = jax.jit(_logits)
    # Deliberately not jitted: each primitive is evaluated on its own, so no
    # fusion changes the float32 rounding of softmax - onehot.
    logit_grad = jax.grad(lambda z, yb: jnp.sum(cross_entropy(z, yb)))
    exact = np.empty(len(x), bool)
    compiled = np.empty(len(x), bool)
    bs = min(batch_size, len(x))
    for s in batch_slices(len(x), bs):
        m = s.stop - s.start
        xb = pad_to(np.asarray(x[s], np.float32), bs)
        yb = pad_to(np.asarray(y[s], np.int32), bs)
        c = np.asarray(compiled_fn(fn, xb, yb))[:m]
        gz = np.asarray(logit_grad(jnp.asarray(logits_jit(fn, xb), jnp.float32), jnp.asarray(yb)))
        compiled[s] = c
        exact[s] = np.all(gz[:m] == 0, axis=-1) | c
    return exact, compiled


def paired_excess(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[float, bool]:
    """Is robust-accuracy(a) clearly above robust-accuracy(b)?

    Returns ``(acc(a) - acc(b), flagged)``; flagged needs both the difference
    above ``tol`` and a sign-test excess of discordant pairs above
    ``SIGNIFICANCE_Z`` standard deviations.
    """
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    diff = float(a.mean() - b.mean())
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(b & ~a))
    significant = (only_a - only_b) > SIGNIFICANCE_Z * math.sqrt(only_a + only_b)
    return diff, bool(diff > tol and significant)


def extend_eps_grid(grid: Sequence[float], max_eps: float = CURVE_MAX_EPS) -> list[float]:
    """Sorted positive grid plus doubling steps up to ``max_eps`` (inclusive)."""
    pts = sorted({float(e) for e in grid if 0 < e <= max_eps})
    if not pts:
        pts = [max_eps / 8]
    ext = []
    last = pts[-1]
    while last < max_eps:
        last = min(max_eps, 2 * last)
        ext.append(last)
    if len(ext) > 6:  # a tiny grid would take many doublings; thin them out
        ext = [float(v) for v in np.geomspace(pts[-1], max_eps, 7)[1:]]
    return pts + ext


def choose_eps(grid: Sequence[float], accs: Sequence[float], clean: float) -> float:
    """Grid eps whose accuracy is nearest ``clean / 2`` (ties: the larger eps).

    Attack comparisons carry the most information in the middle of the curve;
    at 0% or at clean accuracy every attack ties.
    """
    best = min(zip(grid, accs), key=lambda ea: (abs(ea[1] - clean / 2), -ea[0]))
    return float(best[0])


# --------------------------------------------------------------------- checks
def check_curve(eps: Sequence[float], masks: Sequence[np.ndarray],
                max_eps: float = CURVE_MAX_EPS) -> list[Check]:
    """Checks 1a/1b on a curve that starts at eps = 0 (the clean mask)."""
    accs = [float(m.mean()) for m in masks]
    worst = (0.0, None)
    flagged = []
    for i in range(1, len(masks)):
        diff, bad = paired_excess(masks[i], masks[i - 1], MONOTONE_TOL)
        if diff > worst[0]:
            worst = (diff, eps[i])
        if bad:
            flagged.append(eps[i])
    vals = {"eps": list(eps), "robust_accuracy": accs, "max_rise": worst[0],
            "max_rise_at_eps": worst[1]}
    mono = Check("curve_monotone", FAIL if flagged else PASS,
                 (f"accuracy rises with eps at eps={flagged}" if flagged else
                  f"non-increasing within {MONOTONE_TOL:.0%} (max rise {worst[0]:.2%})"),
                 vals)
    final_eps, final_acc = eps[-1], accs[-1]
    if final_acc <= ZERO_ACC_MAX:
        zero = Check("curve_reaches_zero", PASS,
                     f"{final_acc:.2%} robust at eps={final_eps:g}",
                     {"eps": final_eps, "robust_accuracy": final_acc})
    elif final_eps >= max_eps:
        zero = Check("curve_reaches_zero", FAIL,
                     f"{final_acc:.2%} still robust at eps={final_eps:g} "
                     f"(> {ZERO_ACC_MAX:.0%}); every image is reachable at eps=1",
                     {"eps": final_eps, "robust_accuracy": final_acc})
    else:
        zero = Check("curve_reaches_zero", SKIPPED,
                     f"curve stopped at eps={final_eps:g} < {max_eps:g}",
                     {"eps": final_eps, "robust_accuracy": final_acc})
    return [mono, zero]


def check_iterative(pgd: AttackResult | None, bim: AttackResult | None,
                    fgsm: AttackResult | None) -> Check:
    """Check 2: PGD <= BIM <= FGSM in robust accuracy."""
    if pgd is None or bim is None or fgsm is None:
        return Check("iterative_vs_single_step", SKIPPED, "PGD, BIM or FGSM did not run")
    d1, bad1 = paired_excess(pgd.robust, bim.robust, ITERATIVE_TOL)
    d2, bad2 = paired_excess(bim.robust, fgsm.robust, ITERATIVE_TOL)
    vals = {"pgd": pgd.robust_accuracy, "bim": bim.robust_accuracy,
            "fgsm": fgsm.robust_accuracy, "pgd_minus_bim": d1, "bim_minus_fgsm": d2}
    bad = [s for s, b in (("PGD weaker than BIM", bad1), ("BIM weaker than FGSM", bad2)) if b]
    return Check("iterative_vs_single_step", FAIL if bad else PASS,
                 "; ".join(bad) if bad else
                 f"PGD {pgd.robust_accuracy:.2%} <= BIM {bim.robust_accuracy:.2%} "
                 f"<= FGSM {fgsm.robust_accuracy:.2%} (tol {ITERATIVE_TOL:.0%})", vals)


def check_loss_sensitivity(xe_pgd: AttackResult | None,
                           others: Mapping[str, AttackResult | None],
                           info: Mapping[str, AttackResult | None] = {}) -> Check:
    """Check 3: xe-PGD not much weaker than any margin/DLR/APGD attack."""
    ran = {k: r for k, r in others.items() if r is not None}
    if xe_pgd is None or not ran:
        return Check("loss_sensitivity", SKIPPED, "xe-PGD or all comparison attacks did not run")
    vals: dict[str, Any] = {"pgd-xe": xe_pgd.robust_accuracy}
    gaps, bad = {}, []
    for k, r in ran.items():
        diff, flag = paired_excess(xe_pgd.robust, r.robust, LOSS_GAP_TOL)
        vals[k] = r.robust_accuracy
        gaps[k] = diff
        if flag:
            bad.append(k)
    for k, r in info.items():
        if r is not None:
            vals[k] = r.robust_accuracy
    vals["gap_vs"] = gaps
    missing = [k for k, r in others.items() if r is None]
    vals["did_not_run"] = missing
    best = min(ran, key=lambda k: ran[k].robust_accuracy)
    if bad:
        msg = (f"xe-PGD {xe_pgd.robust_accuracy:.2%} much weaker than "
               + ", ".join(f"{k} {ran[k].robust_accuracy:.2%}" for k in bad)
               + f" (gap > {LOSS_GAP_TOL:.0%})")
    else:
        msg = (f"xe-PGD {xe_pgd.robust_accuracy:.2%} vs best {best} "
               f"{ran[best].robust_accuracy:.2%} (gap tol {LOSS_GAP_TOL:.0%})")
    if missing:
        msg += f"; did not run: {', '.join(missing)}"
    return Check("loss_sensitivity", FAIL if bad else PASS, msg, vals)


def check_black_box(square: AttackResult | None,
                    white: Mapping[str, AttackResult | None]) -> Check:
    """Check 4: Square may not beat the best white-box attack by > 0.2 pp."""
    ran = {k: r for k, r in white.items() if r is not None}
    if square is None or not ran:
        return Check("black_box_vs_white_box", SKIPPED, "Square or all white-box attacks did not run")
    best = min(ran, key=lambda k: ran[k].robust_accuracy)
    diff, flag = paired_excess(ran[best].robust, square.robust, BLACK_BOX_TOL)
    vals = {"square": square.robust_accuracy, "best_white_box": best,
            "best_white_box_accuracy": ran[best].robust_accuracy,
            "white_minus_square": diff}
    return Check("black_box_vs_white_box", FAIL if flag else PASS,
                 f"Square {square.robust_accuracy:.2%} vs best white-box {best} "
                 f"{ran[best].robust_accuracy:.2%}"
                 + (f": black box wins by {diff:.2%} (> {BLACK_BOX_TOL:.1%})" if flag else ""),
                 vals)


def check_transfer(transfer: AttackResult | None, white: AttackResult | None,
                   *, reference: str | None) -> Check:
    """Check 5: PGD crafted on an XE twin may not beat white-box PGD."""
    if reference is None:
        return Check("transfer_vs_white_box", SKIPPED,
                     "no reference cross-entropy model given (--reference_workdir)",
                     required=False)
    if transfer is None or white is None:
        return Check("transfer_vs_white_box", SKIPPED, "transfer or white-box PGD did not run")
    diff, flag = paired_excess(white.robust, transfer.robust, TRANSFER_TOL)
    vals = {"transfer": transfer.robust_accuracy, "white_box": white.robust_accuracy,
            "white_minus_transfer": diff, "reference": reference}
    return Check("transfer_vs_white_box", FAIL if flag else PASS,
                 f"transfer from {reference} {transfer.robust_accuracy:.2%} vs white-box "
                 f"PGD {white.robust_accuracy:.2%}"
                 + (f": transfer wins by {diff:.2%}" if flag else ""), vals)


def check_convergence(base: AttackResult | None, doubled: AttackResult | None,
                      restarted: AttackResult | None) -> Check:
    """Check 6: more iterations / restarts must not lower accuracy a lot."""
    if base is None or doubled is None or restarted is None:
        return Check("convergence", SKIPPED, "PGD, 2x-steps PGD or restarted PGD did not run")
    # The restarted run adds its restarts to the base run's one.
    with_restarts = base.robust & restarted.robust
    d_steps, bad_steps = paired_excess(base.robust, doubled.robust, CONVERGENCE_TOL)
    d_rest, bad_rest = paired_excess(base.robust, with_restarts, CONVERGENCE_TOL)
    vals = {"base": base.robust_accuracy, "double_steps": doubled.robust_accuracy,
            "with_restarts": float(with_restarts.mean()),
            "delta_double_steps": -d_steps, "delta_restarts": -d_rest,
            "restarts": restarted.spec.restarts}
    bad = [s for s, b in (("doubling steps", bad_steps), ("restarts", bad_rest)) if b]
    msg = (f"2x steps: {-d_steps:+.2%}, +{restarted.spec.restarts} restarts: {-d_rest:+.2%}"
           + (f"; large drop from {', '.join(bad)} (> {CONVERGENCE_TOL:.0%})" if bad else ""))
    return Check("convergence", FAIL if bad else PASS, msg, vals)


def check_zero_gradients(masks: tuple[np.ndarray, np.ndarray] | None,
                         clean_correct: np.ndarray) -> Check:
    """Check 7: fraction of examples with an exactly-zero xe input gradient."""
    if masks is None:
        return Check("zero_gradients", SKIPPED, "gradient computation failed")
    exact, compiled = masks
    frac = float(exact.mean())
    vals = {"fraction": frac, "count": int(exact.sum()),
            "fraction_of_clean_correct": (float(exact[clean_correct].mean())
                                          if clean_correct.any() else 0.0),
            "fraction_compiled": float(compiled.mean())}
    bad = frac > ZERO_GRAD_MAX_FRACTION
    return Check("zero_gradients", FAIL if bad else PASS,
                 f"{frac:.2%} of examples have an exactly-zero cross-entropy gradient in "
                 f"float32 ({vals['fraction_compiled']:.2%} as compiled for the attacks)"
                 + (f"; > {ZERO_GRAD_MAX_FRACTION:.0%}" if bad else ""), vals)


def autoattack_coverage(results: Sequence[AttackResult]) -> list[str]:
    """AutoAttack standard's components that none of ``results`` covers.

    An ``autoattack`` row (version standard) covers all four; otherwise
    ``apgd`` with cross-entropy covers APGD-CE, targeted ``apgd`` APGD-T,
    targeted ``fab`` FAB-T and margin ``square`` Square. Transfer rows and
    an ensemble's component rows cover nothing.
    """
    covered: set[str] = set()
    for r in results:
        if r.component_of or r.record.get("source", "self") != "self":
            continue
        a, p, loss = r.spec.attack, r.spec.params, r.spec.loss
        if a == "autoattack" and p.get("version", "standard") == "standard":
            covered.update(AUTOATTACK_COMPONENTS)
        elif a == "apgd" and p.get("targeted"):
            covered.add("apgd-t")
        elif a == "apgd" and loss in (None, "xe"):
            covered.add("apgd-ce")
        elif a == "fab" and p.get("targeted"):
            covered.add("fab-t")
        elif a == "square" and loss == "margin":
            covered.add("square")
    return [c for c in AUTOATTACK_COMPONENTS if c not in covered]


def check_autoattack(results: Sequence[AttackResult], eps: float) -> Check:
    """Check 9: the worst case at ``eps`` includes AutoAttack standard."""
    missing = autoattack_coverage(results)
    aa = [r for r in results if r.spec.attack == "autoattack" and not r.component_of]
    vals: dict[str, Any] = {"eps": eps, "missing": missing}
    if missing:
        return Check("autoattack_standard", SKIPPED,
                     f"the worst case at eps={eps:g} lacks AutoAttack standard: "
                     f"missing {', '.join(missing)}", vals)
    msg = f"the worst case at eps={eps:g} includes AutoAttack standard"
    if aa:
        p = aa[0].spec.params
        steps, queries = p.get("steps", AUTOATTACK_STEPS), p.get("n_queries", AUTOATTACK_QUERIES)
        vals.update(autoattack=aa[0].robust_accuracy, steps=steps, n_queries=queries)
        msg += f" ({aa[0].robust_accuracy:.2%} robust"
        if steps < AUTOATTACK_STEPS or queries < AUTOATTACK_QUERIES:
            msg += (f"; reduced budgets: {steps} iterations, {queries} queries, standard "
                    f"{AUTOATTACK_STEPS}, {AUTOATTACK_QUERIES}")
        msg += ")"
    return Check("autoattack_standard", PASS, msg, vals)


def _skipped_curve(why: str) -> list[Check]:
    return [Check("curve_monotone", SKIPPED, why), Check("curve_reaches_zero", SKIPPED, why)]


def _user_grid(config: DiagnosticsConfig) -> list[float]:
    return sorted({float(e) for e in config.eps_grid if e > 0})


def select_eps(config: DiagnosticsConfig, curve_eps: Sequence[float],
               curve_masks: Sequence[np.ndarray], clean_accuracy: float) -> tuple[float, str]:
    """The L_inf budget of checks 2-6 and how it was chosen.

    ``config.eps`` if given; else the grid eps whose curve accuracy is nearest
    half the clean accuracy (:func:`choose_eps`); else, without a curve, the
    largest grid eps.
    """
    if config.eps is not None:
        return float(config.eps), "given"
    user_grid = _user_grid(config)
    on_grid = [(e, float(m.mean())) for e, m in zip(curve_eps, curve_masks) if e in user_grid]
    if on_grid:
        eps = choose_eps([e for e, _ in on_grid], [a for _, a in on_grid], clean_accuracy)
        return eps, "grid eps with curve accuracy nearest half the clean accuracy"
    return (max(user_grid, default=config.curve_max_eps / 8),
            "largest grid eps (curve unavailable)")


def check_attack_budget(config: DiagnosticsConfig, eps: float) -> Check:
    """(info) Can the headline PGD travel to the boundary of the ball?

    A PGD that cannot fails checks 2, 3 and 6 because of its budget, not the
    model; :func:`verdict` says so next to a masking verdict.
    """
    step = config.pgd_step(eps)
    reach = config.pgd_steps * step
    short = reach < eps * (1 - 1e-6)
    return Check(
        "attack_budget", INFO,
        f"PGD steps x step size = {config.pgd_steps} x {step:g} = {reach:g}"
        + (f" < eps {eps:g}: the headline PGD cannot reach the boundary of the ball"
           if short else f" >= eps {eps:g}"),
        {"steps": config.pgd_steps, "step_size": step, "eps": eps,
         "reaches_boundary": not short}, required=False)


def check_worst_case(results: Sequence[AttackResult], eps: float) -> Check:
    """Check 8 (info): per-example worst case over ``results`` (all at ``eps``)."""
    groups = best_robust(results)
    if not groups:
        return Check("worst_case", SKIPPED, "no attack ran", required=False)
    worst = groups[0]
    return Check(
        "worst_case", INFO,
        f"{worst['robust_accuracy']:.2%} robust to all {len(worst['attacks'])} attacks at "
        f"eps={eps:g} (strongest single attack: {worst['strongest_single']:.2%})",
        dict(worst), required=False)


def verdict(checks: Sequence[Check], *, num_clean_correct: int) -> str:
    """One line: no masking detected | gradient masking suspected: ... | inconclusive: ...

    "no masking detected" needs every required check to pass, the
    AutoAttack check included. A masking verdict notes a PGD budget that
    cannot reach the boundary of the ball (an ``attack_budget`` check).
    """
    failed = [c.name for c in checks if c.status == FAIL]
    if num_clean_correct < MIN_CORRECT_EXAMPLES:
        msg = (f"{VERDICT_INCONCLUSIVE}: only {num_clean_correct} correctly classified "
               f"examples (< {MIN_CORRECT_EXAMPLES})")
        return msg + (f"; failed: {', '.join(failed)}" if failed else "")
    if failed:
        short = any(c.name == "attack_budget" and not c.values.get("reaches_boundary", True)
                    for c in checks)
        return f"{VERDICT_MASKING}: {', '.join(failed)}" + (
            " (note: PGD steps x step size < eps; see attack_budget)" if short else "")
    skipped = [c for c in checks if c.status == SKIPPED and c.required]
    if skipped:
        parts = []
        others = [c.name for c in skipped if c.name != "autoattack_standard"]
        if others:
            parts.append(f"could not run {', '.join(others)}")
        parts += [f"worst case lacks AutoAttack standard (missing: "
                  f"{', '.join(c.values.get('missing', AUTOATTACK_COMPONENTS))})"
                  for c in skipped if c.name == "autoattack_standard"]
        return f"{VERDICT_INCONCLUSIVE}: {'; '.join(parts)}"
    return VERDICT_OK


# ------------------------------------------------------------------- driver
@dataclasses.dataclass
class Diagnostics:
    """Outcome of :func:`run_diagnostics`; ``to_json()`` goes into the report."""

    eps: float
    eps_choice: str
    curve_eps: list[float]
    curve_accuracy: list[float]
    checks: list[Check]
    results: list[AttackResult]
    errors: dict[str, str]
    verdict: str
    worst_case: dict[str, Any]
    config: DiagnosticsConfig
    plot: str | None = None

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAIL]

    def to_json(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg["eps_grid"] = list(cfg["eps_grid"])
        return {
            "eps": self.eps,
            "eps_choice": self.eps_choice,
            "config": cfg,
            "thresholds": dict(THRESHOLDS),
            "curve": {"attack": "pgd", "loss": "xe", "eps": self.curve_eps,
                      "robust_accuracy": self.curve_accuracy,
                      "step_size": f"{CURVE_STEP_FACTOR} * eps / steps",
                      "steps": self.config.pgd_steps, "plot": self.plot},
            "checks": [c.to_json() for c in self.checks],
            "worst_case": self.worst_case,
            "records": [r.record for r in self.results],
            "errors": dict(self.errors),
            "verdict": self.verdict,
        }


@dataclasses.dataclass
class _Run:
    """What the check steps of one :func:`run_diagnostics` call share."""

    ev: Evaluator
    config: DiagnosticsConfig
    reference: tuple[LogitsFn, str] | None
    extra_results: Sequence[AttackResult]
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    results: list[AttackResult] = dataclasses.field(default_factory=list)
    zero_masks: tuple[np.ndarray, np.ndarray] | None = None
    curve_eps: list[float] = dataclasses.field(default_factory=list)
    curve_masks: list[np.ndarray] = dataclasses.field(default_factory=list)
    eps: float = math.nan
    eps_choice: str = ""
    # White-box results at ``eps`` by name, in the order they ran (None: it raised).
    white: dict[str, AttackResult | None] = dataclasses.field(default_factory=dict)

    def attempt(self, spec: AttackSpec, **kw: Any) -> AttackResult | None:
        """``ev.run(spec)``; an attack that raises is recorded in ``errors``."""
        name = spec.label + (f"@{kw['source']}" if kw.get("source") else "")
        try:
            res = self.ev.run(spec, **kw)
        except Exception as e:  # noqa: BLE001 -- reported, and the verdict says so
            self.errors[name] = f"{type(e).__name__}: {e}"
            return None
        self.results.append(res)
        return res

    def pgd(self, loss: str = "xe", **kw: Any) -> AttackSpec:
        """The headline PGD at the diagnostics eps (``kw`` overrides settings)."""
        kw = {"steps": self.config.pgd_steps, "step_size": self.config.pgd_step(self.eps), **kw}
        return paper_spec("pgd", self.eps, loss=loss, **kw)

    def same_eps(self) -> list[AttackResult]:
        return [r for r in [*self.results, *self.extra_results]
                if r.spec.norm == "linf" and r.spec.eps == self.eps]


def _zero_gradient_step(run: _Run) -> list[Check]:
    # Runs first (cheap, and explains most of what follows); reported as check 7.
    ev = run.ev
    try:
        run.zero_masks = zero_gradient_mask(ev.logits_fn, ev.x, ev.y, batch_size=ev.batch_size)
    except Exception as e:  # noqa: BLE001
        run.errors["zero_gradients"] = f"{type(e).__name__}: {e}"
    return []


def _curve_step(run: _Run) -> list[Check]:
    """Check 1: accuracy vs eps, PGD-xe with the step scaled to eps."""
    cfg = run.config
    run.curve_eps, run.curve_masks = [0.0], [run.ev.clean_correct]
    top = max(_user_grid(cfg), default=0.0)
    for e in extend_eps_grid(cfg.eps_grid, cfg.curve_max_eps):
        # Past the user's grid, extend only while accuracy is above zero.
        if e > top and float(run.curve_masks[-1].mean()) <= ZERO_ACC_MAX:
            break
        r = run.attempt(paper_spec(
            "pgd", e, loss="xe", steps=cfg.pgd_steps, label="pgd-xe (curve)",
            step_size=derived_step_size(CURVE_STEP_FACTOR, e, cfg.pgd_steps)))
        if r is None:
            break
        run.curve_eps.append(e)
        run.curve_masks.append(r.robust)
    if len(run.curve_eps) == 1:
        return _skipped_curve("PGD did not run")
    return check_curve(run.curve_eps, run.curve_masks, cfg.curve_max_eps)


def _eps_step(run: _Run) -> list[Check]:
    run.eps, run.eps_choice = select_eps(run.config, run.curve_eps, run.curve_masks,
                                         run.ev.clean_accuracy)
    return []


def _iterative_step(run: _Run) -> list[Check]:
    """Check 2 at eps: PGD, FGSM and BIM (the paper's eps / steps step)."""
    run.white["pgd-xe"] = run.attempt(run.pgd("xe"))
    run.white["fgsm-xe"] = run.attempt(paper_spec("fgsm", run.eps, loss="xe"))
    run.white["bim-xe"] = run.attempt(paper_spec("bim", run.eps, loss="xe",
                                                 steps=run.config.bim_steps))
    w = run.white
    return [check_iterative(w["pgd-xe"], w["bim-xe"], w["fgsm-xe"])]


def _loss_sensitivity_step(run: _Run) -> list[Check]:
    """Check 3: margin / DLR PGD and APGD-CE / APGD-DLR against xe-PGD."""
    apgd = {"steps": run.config.apgd_steps}
    others = {
        "pgd-margin": run.attempt(run.pgd("margin")),
        "pgd-dlr": run.attempt(run.pgd("dlr")),
        "apgd-ce": run.attempt(paper_spec("apgd", run.eps, loss="xe", label="apgd-ce", **apgd)),
        "apgd-dlr": run.attempt(paper_spec("apgd", run.eps, loss="dlr", label="apgd-dlr",
                                           **apgd)),
    }
    run.white.update(others)
    info = {}
    if run.config.model_loss == "gce":
        info["pgd-gce"] = run.attempt(run.pgd("gce"))
    return [check_loss_sensitivity(run.white["pgd-xe"], others, info)]


def _black_box_step(run: _Run) -> list[Check]:
    square = run.attempt(paper_spec("square", run.eps, n_queries=run.config.square_queries))
    return [check_black_box(square, run.white)]


def _transfer_step(run: _Run) -> list[Check]:
    transfer, name = None, None
    if run.reference is not None:
        fn, name = run.reference
        transfer = run.attempt(run.pgd("xe"), source_logits_fn=fn, source=name)
    return [check_transfer(transfer, run.white["pgd-xe"], reference=name)]


def _convergence_step(run: _Run) -> list[Check]:
    cfg = run.config
    doubled = run.attempt(run.pgd("xe", steps=2 * cfg.pgd_steps, label="pgd-xe (2x steps)"))
    restarted = run.attempt(run.pgd("xe", restarts=cfg.restarts,
                                    label=f"pgd-xe ({cfg.restarts} restarts)"))
    return [check_convergence(run.white["pgd-xe"], doubled, restarted)]


def _zero_gradient_check_step(run: _Run) -> list[Check]:
    return [check_zero_gradients(run.zero_masks, run.ev.clean_correct)]


def _autoattack_run_step(run: _Run) -> list[Check]:
    # Runs before checks 8 and 9, whose worst case it joins.
    if run.config.autoattack:
        aa = run.attempt(paper_spec("autoattack", run.eps, steps=run.config.apgd_steps,
                                    n_queries=run.config.square_queries))
        if aa is not None:
            run.results.extend(aa.components)
    return []


def _worst_case_step(run: _Run) -> list[Check]:
    return [check_worst_case(run.same_eps(), run.eps)]


def _autoattack_check_step(run: _Run) -> list[Check]:
    return [check_autoattack(run.same_eps(), run.eps)]


def _attack_budget_step(run: _Run) -> list[Check]:
    return [check_attack_budget(run.config, run.eps)]


# The checks in report order; each step runs the attacks its check needs
# (some only prepare state for later ones: zero-gradient masks, eps, AutoAttack).
CHECK_STEPS: tuple[Callable[[_Run], list[Check]], ...] = (
    _zero_gradient_step, _curve_step, _eps_step, _iterative_step, _loss_sensitivity_step,
    _black_box_step, _transfer_step, _convergence_step, _zero_gradient_check_step,
    _autoattack_run_step, _worst_case_step, _autoattack_check_step, _attack_budget_step)


def run_diagnostics(ev: Evaluator, config: DiagnosticsConfig = DiagnosticsConfig(), *,
                    reference_logits_fn: LogitsFn | None = None,
                    reference_name: str | None = None,
                    extra_results: Sequence[AttackResult] = ()) -> Diagnostics:
    """Runs checks 1-9 on ``ev``'s model and returns them with the verdict.

    An attack that raises is recorded in ``errors`` and its checks are
    skipped (which makes the verdict inconclusive unless another check fails).
    ``extra_results`` (e.g. the main attack table) join the worst case.
    """
    if reference_logits_fn is not None and not reference_name:
        raise ValueError("reference_logits_fn needs a reference_name")
    reference = None if reference_logits_fn is None else (reference_logits_fn, reference_name)
    run = _Run(ev, config, reference, tuple(extra_results))
    checks = [check for step in CHECK_STEPS for check in step(run)]
    worst = next(c for c in checks if c.name == "worst_case")
    return Diagnostics(eps=run.eps, eps_choice=run.eps_choice, curve_eps=run.curve_eps,
                       curve_accuracy=[float(m.mean()) for m in run.curve_masks],
                       checks=checks, results=run.results, errors=run.errors,
                       verdict=verdict(checks, num_clean_correct=int(ev.clean_correct.sum())),
                       worst_case=dict(worst.values), config=config)


__all__ = ["AUTOATTACK_COMPONENTS", "AUTOATTACK_QUERIES", "AUTOATTACK_STEPS", "BLACK_BOX_TOL",
           "CONVERGENCE_TOL", "CURVE_MAX_EPS", "CURVE_STEP_FACTOR", "ITERATIVE_TOL",
           "LOSS_GAP_TOL", "MIN_CORRECT_EXAMPLES", "MONOTONE_TOL", "SIGNIFICANCE_Z",
           "TRANSFER_TOL", "ZERO_ACC_MAX", "ZERO_GRAD_MAX_FRACTION", "CHECK_NAMES",
           "CHECK_STEPS", "FAIL", "INFO", "PASS", "SKIPPED", "THRESHOLDS",
           "VERDICT_INCONCLUSIVE", "VERDICT_MASKING", "VERDICT_OK",
           "Check", "Diagnostics", "DiagnosticsConfig", "autoattack_coverage",
           "check_attack_budget", "check_autoattack", "check_black_box", "check_convergence",
           "check_curve", "check_iterative", "check_loss_sensitivity", "check_transfer",
           "check_worst_case", "check_zero_gradients", "choose_eps", "extend_eps_grid",
           "paired_excess", "run_diagnostics", "saturate", "select_eps", "verdict",
           "zero_gradient_mask"]
