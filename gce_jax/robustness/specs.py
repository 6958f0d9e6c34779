"""What to attack with: :class:`AttackSpec`, attack names and the settings a run records.

The unit of work of an evaluation is an :class:`AttackSpec` (attack name, eps,
objective loss, attack parameters, restarts). :func:`paper_spec` fills in the
paper's settings from ``gce_jax.attacks.defaults``; :func:`parse_attack_name`
reads ``'pgd'`` / ``'pgd:margin'`` from a command line; :func:`resolved_settings`
is every setting an attack ran with, for the record.

The lowest module of :mod:`gce_jax.robustness`: it imports only
:mod:`gce_jax.attacks`, never the evaluator, diagnostics or report.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gce_jax import attacks
from gce_jax.attacks.defaults import default_settings
from gce_jax.attacks.jsma import max_iterations as jsma_max_iterations

AttackFn = Callable[..., Any]

# Threat model of each registry attack (one table, in gce_jax.attacks). Bounded
# attacks are checked against their ball after every batch.
ATTACK_NORMS: Mapping[str, str] = attacks.ATTACK_NORMS
# Attacks that never see a gradient of the attacked model.
BLACK_BOX_ATTACKS = frozenset({"square"})
# Attacks with their own fixed objective: no ``loss=`` is passed and the
# record names the objective they use (JSMA and C&W also take no eps).
FIXED_OBJECTIVE: Mapping[str, str] = attacks.FIXED_OBJECTIVES
# Minimum-norm attacks without a budget argument (JSMA, C&W): one run each.
EPS_FREE_ATTACKS = frozenset(name for name, fn in attacks.ATTACKS.items()
                             if "eps" not in inspect.signature(fn).parameters)
# Ensembles: the attack returns an ``AutoAttackResult``, and the evaluator
# adds one cumulative row per component (``AttackResult.components``).
ENSEMBLE_ATTACKS = frozenset({"autoattack"})

# Default objective per attack: the paper's is cross-entropy; Square's
# natural (and AutoAttack's) objective is the margin.
DEFAULT_LOSS: Mapping[str, str | None] = {
    "square": "margin", "jsma": None, "carlini_wagner_l2": None, "fab": None,
    "autoattack": None,
}
ATTACK_LOSSES = ("xe", "margin", "dlr", "gce")
# Sentinel for "the attack's default objective" (DEFAULT_LOSS, else xe).
DEFAULT_OBJECTIVE = "default"


class EvaluationError(ValueError):
    """Bad evaluation input, or an attack that broke its threat model."""


def to_jsonable(v: Any) -> Any:
    """``v`` with numpy scalars, tuples and non-finite floats made JSON-ready."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack configuration.

    Attributes:
      attack: registry name in ``gce_jax.attacks.ATTACKS``.
      eps: budget in the attack's norm (``None`` for attacks without one).
      loss: objective passed as ``loss=`` (``None``: the attack's own).
      params: further keyword arguments, e.g. ``{'steps': 40}``.
      restarts: independent runs with different keys; an example is robust
        only if it survives all of them.
      label: display name; defaults to ``attack-loss``.
      threat_norm: threat model (``linf | l2 | l0``); defaults to the
        registry attack's (``ATTACK_NORMS``).
    """

    attack: str
    eps: float | None
    loss: str | None = "xe"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    restarts: int = 1
    label: str = ""
    threat_norm: str | None = None

    def __post_init__(self):
        if self.eps is not None and (not math.isfinite(self.eps) or self.eps < 0):
            raise EvaluationError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.restarts < 1:
            raise EvaluationError(f"restarts must be >= 1, got {self.restarts}")
        if self.attack in ENSEMBLE_ATTACKS and self.restarts != 1:
            raise EvaluationError(f"{self.attack} runs its components' own restarts; "
                                  f"restarts must be 1, got {self.restarts}")
        if not self.label:
            suffix = f"-{self.loss}" if self.loss else ""
            object.__setattr__(self, "label", f"{self.attack}{suffix}")

    @property
    def norm(self) -> str:
        return self.threat_norm or ATTACK_NORMS.get(self.attack, "unknown")

    def settings(self) -> dict[str, Any]:
        """JSON-ready attack settings (params plus restarts), as requested."""
        out = {k: to_jsonable(v) for k, v in sorted(self.params.items())}
        out["restarts"] = self.restarts
        return out

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the attack call (besides ``key``)."""
        kw = dict(self.params)
        if self.eps is not None:
            kw["eps"] = self.eps
        if self.loss is not None and self.attack not in FIXED_OBJECTIVE:
            kw["loss"] = self.loss
        return kw

    def spec_id(self) -> str:
        """Canonical JSON of what the attack computes (not the label).

        Stable across runs: the evaluator caches by it and derives the
        spec's PRNG key from it, so equal specs give equal masks.
        """
        return json.dumps({"a": self.attack, "e": self.eps, "l": self.loss,
                           "p": self.settings(), "n": self.norm}, sort_keys=True)


def paper_spec(attack: str, eps: float | None, *, loss: str | None = DEFAULT_OBJECTIVE,
               restarts: int = 1, label: str = "", **overrides: Any) -> AttackSpec:
    """An :class:`AttackSpec` with the paper's settings for ``attack``.

    Settings come from ``gce_jax.attacks.defaults``; ``overrides`` replace
    individual ones, and an eps-derived step size (BIM, MIM, L2 PGD:
    ``scale * eps / steps``) is resolved here from the final ``steps``.
    """
    if loss == DEFAULT_OBJECTIVE:
        loss = DEFAULT_LOSS.get(attack, "xe")
    return AttackSpec(attack, eps, loss, default_settings(attack, eps, **overrides),
                      restarts, label)


def parse_attack_name(name: str, registry: Mapping[str, AttackFn]) -> tuple[str, str]:
    """``'pgd'`` or ``'pgd:margin'`` -> (attack, loss or DEFAULT_OBJECTIVE).

    Raises EvaluationError naming the known attacks for an unknown one.
    """
    attack, _, loss = name.strip().partition(":")
    if attack not in registry:
        raise EvaluationError(
            f"unknown attack {attack!r}; known attacks: {', '.join(sorted(registry))}")
    if loss and attack in FIXED_OBJECTIVE:
        raise EvaluationError(f"attack {attack!r} has a fixed objective; drop ':{loss}'")
    if loss and loss not in ATTACK_LOSSES:
        raise EvaluationError(
            f"unknown attack loss {loss!r} in {name!r}; expected xe, margin, dlr or gce")
    return attack, (loss or DEFAULT_OBJECTIVE)


def resolved_settings(spec: AttackSpec, attack_fn: AttackFn,
                      example_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Every setting the attack ran with, defaults filled in, plus restarts.

    Uses ``gce_jax.attacks.attack_spec`` for registry attacks (which also
    rejects misspelt keywords before any compute); other attacks (test
    doubles) record what was passed. With ``example_shape``, JSMA's
    iteration budget is resolved too (``max_iters``, from gamma and the
    number of features).
    """
    if attacks.ATTACKS.get(spec.attack) is not attack_fn:
        return spec.settings()
    try:
        full = attacks.attack_spec(spec.attack, **spec.call_kwargs())
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{spec.label}: {e}") from None
    # example_offset is per batch (the evaluator passes each batch's), not a setting.
    out = {k: to_jsonable(v) for k, v in sorted(full.items())
           if k not in ("attack", "norm", "loss", "eps", "example_offset")}
    if spec.attack == "jsma" and example_shape is not None:
        out["max_iters"] = jsma_max_iterations(out["gamma"], math.prod(example_shape))
    out["restarts"] = spec.restarts
    return out


def draws_targets(attack_fn: AttackFn, settings: Mapping[str, Any]) -> bool:
    """Whether the attack is targeted at classes it draws itself.

    The library's contract: an attack with a ``targets`` argument that is
    called without one draws them as ``draw_targets(key, y, K,
    example_offset)`` (JSMA; C&W unless ``targeted=False``), so the
    evaluator can recompute them from the same key.
    """
    params = inspect.signature(attack_fn).parameters
    return "targets" in params and bool(settings.get("targeted", True))


__all__ = ["ATTACK_LOSSES", "ATTACK_NORMS", "BLACK_BOX_ATTACKS", "DEFAULT_LOSS",
           "DEFAULT_OBJECTIVE", "ENSEMBLE_ATTACKS", "EPS_FREE_ATTACKS", "FIXED_OBJECTIVE",
           "AttackSpec", "EvaluationError", "draws_targets", "paper_spec", "parse_attack_name",
           "resolved_settings", "to_jsonable"]
