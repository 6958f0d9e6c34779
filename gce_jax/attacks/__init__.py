"""Adversarial attacks in JAX: pure, jit-compiled, per-example, batch-chunkable.

Every attack has the signature ::

    attack(logits_fn, x, y, *, key, eps, ..., loss='xe') -> x_adv

* ``logits_fn(x) -> logits``: the model in inference mode. Prefer
  ``gce_jax.models.logits_fn(model, variables)`` (a ``jax.tree_util.Partial``): the
  compiled attack is then reused across weights. A plain callable also works;
  the compiled attack is cached per function *object*, so reuse the closure
  (see ``gce_jax.attacks._common`` for the design).
* ``x``: ``[B, ...]`` floats in [0, 1]; ``y``: ``[B]`` integer labels.
* ``key``: explicit PRNG key; example ``i`` uses ``fold_in(key, i)``, so results
  do not depend on the batch size or ``batch_chunk``.
* ``loss``: the objective maximised, from ``objectives.OBJECTIVES``
  (``xe | margin | dlr | gce``). JSMA (Jacobian of the logits) and C&W (its own
  margin) have fixed objectives; ``attack_spec`` records them.
* Defaults: the paper's settings (AutoAttack's for APGD, FAB, Square), one
  table in :mod:`gce_jax.attacks.defaults` that the evaluator and the
  diagnostics read too.

Attacks: ``fgsm, bim, pgd, mim, pgd_l2, jsma, carlini_wagner_l2, apgd``
(APGD-T with ``targeted=True``), ``fab`` (FAB / FAB-T), ``square``, and the
ensemble ``autoattack`` (APGD-CE, APGD-T, FAB-T, Square; it returns an
``AutoAttackResult`` with the component that broke each example).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from gce_jax.attacks._common import draw_targets
from gce_jax.attacks.apgd import apgd, apgd_checkpoints, resolved_loss
from gce_jax.attacks.autoattack import (CLEAN_MISCLASSIFIED, ROBUST, AutoAttackResult,
                                        autoattack, autoattack_components)
from gce_jax.attacks.cw import carlini_wagner_l2
from gce_jax.attacks.defaults import (ATTACK_DEFAULTS, STEP_SCALE, default_settings,
                                      derived_step_size)
from gce_jax.attacks.fab import fab
from gce_jax.attacks.gradient import bim, fgsm, mim, pgd, pgd_l2
from gce_jax.attacks.jsma import jsma
from gce_jax.attacks.objectives import OBJECTIVES, get_objective, targeted_objective
from gce_jax.attacks.square import square

ATTACKS: dict[str, Callable[..., Any]] = {
    "fgsm": fgsm,
    "bim": bim,
    "pgd": pgd,
    "mim": mim,
    "pgd_l2": pgd_l2,
    "jsma": jsma,
    "carlini_wagner_l2": carlini_wagner_l2,
    "apgd": apgd,
    "fab": fab,
    "square": square,
    "autoattack": autoattack,
}

# Threat model of each attack (JSMA and C&W are minimum-norm attacks: their
# success is not bounded by an eps) and, for attacks without a ``loss``
# argument, the fixed objective they use. The evaluator records both.
ATTACK_NORMS: dict[str, str] = {
    "fgsm": "linf", "bim": "linf", "pgd": "linf", "mim": "linf", "apgd": "linf",
    "fab": "linf", "square": "linf", "autoattack": "linf", "pgd_l2": "l2",
    "carlini_wagner_l2": "l2", "jsma": "l0"}
FIXED_OBJECTIVES: dict[str, str] = {
    "jsma": "logit_jacobian_saliency", "carlini_wagner_l2": "cw_margin",
    "fab": "linearised_boundary",
    "autoattack": "apgd-ce:xe, apgd-t:dlr_targeted, fab-t:linearised_boundary, square:margin"}
_NOT_RECORDED = ("logits_fn", "x", "y", "key", "targets", "batch_chunk")


def attack_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """The full, resolved configuration of ``ATTACKS[name](..., **kwargs)``.

    For the evaluator to record next to each number: every keyword with its
    default filled in (derived defaults such as ``step_size = eps / steps``
    resolved when ``eps`` is given), ``norm`` and ``loss`` (the fixed objective
    for JSMA / C&W). Unknown keywords raise ``TypeError``, like the call would;
    a derived step size with ``steps=0`` raises ``ValueError``.
    """
    try:
        fn = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}") from None
    params = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
              for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_RECORDED}
    unknown = set(kwargs) - set(params) - {"key", "targets", "batch_chunk"}
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword(s) {sorted(unknown)}")
    params.update({k: v for k, v in kwargs.items() if k in params})
    if name in STEP_SCALE and params.get("step_size") is None and params.get("eps") is not None:
        params["step_size"] = derived_step_size(STEP_SCALE[name], float(params["eps"]),
                                                params["steps"])
    spec = {"attack": name, "norm": ATTACK_NORMS[name]}
    spec["loss"] = params.pop("loss", FIXED_OBJECTIVES.get(name))
    if name == "apgd" and spec["loss"] is None:
        spec["loss"] = resolved_loss(None, bool(params.get("targeted")))
    spec.update(params)
    if "targets" in kwargs and kwargs["targets"] is not None:
        spec["targets"] = "given"
    return spec


__all__ = ["ATTACKS", "ATTACK_DEFAULTS", "ATTACK_NORMS", "CLEAN_MISCLASSIFIED",
           "FIXED_OBJECTIVES", "OBJECTIVES", "ROBUST", "STEP_SCALE", "AutoAttackResult",
           "attack_spec", "apgd", "apgd_checkpoints", "autoattack", "autoattack_components",
           "bim", "carlini_wagner_l2", "default_settings", "derived_step_size", "draw_targets",
           "fab", "fgsm", "get_objective", "jsma", "mim", "pgd", "pgd_l2", "square",
           "targeted_objective"]
