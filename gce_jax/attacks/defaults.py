"""Default attack settings: the one table the attacks, the evaluator and the diagnostics read.

The defaults are the paper's settings (Sec. 5.2 and the authors' advertorch
PGD); APGD, FAB, Square and AutoAttack follow AutoAttack's (Croce & Hein
2020). Every keyword default of an attack in :data:`ATTACK_DEFAULTS` is the
value its function signature has (``tests/test_attacks.py`` pins that), so a
number in a report means the same whether the setting was given or not.

Step sizes that depend on the budget are not stored: BIM, MIM and L2 PGD
derive theirs as ``scale * eps / steps`` (:func:`derived_step_size`, scales in
:data:`STEP_SCALE`). Paper numbers that are not attack settings (eps grids,
JSMA's gamma per data set) live in ``experiments/paper_numbers.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

# Keyword defaults per registry attack (keys are the attacks' keyword names).
ATTACK_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "fgsm": {},
    "bim": {"steps": 10},
    "pgd": {"steps": 40, "step_size": 0.01, "random_start": True},
    "mim": {"steps": 40, "decay": 1.0},
    "pgd_l2": {"steps": 40},
    "apgd": {"steps": 100},
    "fab": {"steps": 100},
    "square": {"n_queries": 5000, "p_init": 0.8},
    "autoattack": {"version": "standard", "steps": 100, "n_queries": 5000},
    # gamma: the paper's MNIST value; other data sets use their own
    # (experiments/paper_numbers.py, PAPER_JSMA_GAMMA).
    "jsma": {"gamma": 0.25, "theta": 1.0},
    "carlini_wagner_l2": {"binary_steps": 9, "steps": 1000, "initial_const": 1e-3,
                          "confidence": 0.0, "targeted": True},
}

# Madry et al.'s step rule, 2.5 * eps / steps: the iterates can travel to the
# boundary of the ball and back whatever eps is.
MADRY_STEP_SCALE = 2.5
# Attacks whose step size, when none is given, is ``scale * eps / steps``:
# BIM and MIM take ``eps / steps`` (the paper's), L2 PGD Madry's rule.
STEP_SCALE: Mapping[str, float] = {"bim": 1.0, "mim": 1.0, "pgd_l2": MADRY_STEP_SCALE}


def derived_step_size(scale: float, eps: float, steps: int) -> float:
    """``scale * eps / steps``: the step size of an attack that derives it from its budget.

    Args:
      scale: the attack's factor (:data:`STEP_SCALE`, or :data:`MADRY_STEP_SCALE`).
      eps: the attack's budget (a traced value works too).
      steps: number of iterations; must be >= 1.

    Returns:
      The step size, a Python float.

    Raises:
      ValueError: ``steps < 1`` (no iteration, so no step to derive).
    """
    if steps < 1:
        raise ValueError(f"a step size derived as {scale:g} * eps / steps needs steps >= 1, "
                         f"got steps={steps}; give step_size explicitly")
    return scale * eps / steps


def default_settings(attack: str, eps: float | None, **overrides: Any) -> dict[str, Any]:
    """The attack's defaults with ``overrides`` applied and a derived step size resolved.

    A derived step (BIM, MIM, L2 PGD) uses the resolved ``steps``, so
    ``default_settings('bim', 0.3, steps=5)`` has ``step_size = 0.06``; an
    explicit ``step_size`` override is kept as given. Unknown attacks get
    ``overrides`` only.
    """
    settings = {**ATTACK_DEFAULTS.get(attack, {}), **overrides}
    if attack in STEP_SCALE and "step_size" not in overrides and eps is not None:
        settings["step_size"] = derived_step_size(STEP_SCALE[attack], eps, settings["steps"])
    return settings


__all__ = ["ATTACK_DEFAULTS", "MADRY_STEP_SCALE", "STEP_SCALE", "default_settings",
           "derived_step_size"]
