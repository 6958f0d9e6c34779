"""Robustness evaluation: run attacks over a data set, keep per-example masks.

The unit of work is an :class:`AttackSpec` (attack name, eps, objective loss,
attack parameters, restarts). :class:`Evaluator` runs a spec over the whole
evaluation set in fixed-size batches and returns a :class:`AttackResult`: a
per-example boolean *robust mask* (clean-correct AND still correct on the
adversarial input) and a JSON-ready record. Masks are what make an honest
worst case possible: an example counts as robust only if it survives every
attack (:func:`best_robust`), as in AutoAttack.

Besides robust accuracy, every record says how often and at what distortion
the attack *succeeded*, on the clean-correct examples: ``success_rate``
(``targeted`` attacks -- JSMA, C&W -- succeed when the prediction is their
target, recomputed with ``draw_targets`` from the key the attack got; the
others when it is wrong), and ``mean_l0`` (features changed) and ``mean_l2``
over the successful examples only (``None`` when none succeeded). A targeted
attack that only reaches a wrong non-target class lowers robust accuracy but
is no success.

Nothing here knows about checkpoints or the CLI; ``experiments/evaluate.py``
wires a trained model to this module and to :mod:`gce_jax.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm.auto import tqdm

from gce_jax import attacks as _attacks
from gce_jax import parallel
from gce_jax.attacks.jsma import max_iterations as jsma_max_iterations
from gce_jax.provenance import atomic_write, git_info, hardware_info, now_iso
from gce_jax.attacks.autoattack import ROBUST

Array = jax.Array
LogitsFn = Callable[[Array], Array]
AttackFn = Callable[..., Array]

# 2: success_rate / num_success / targeted / mean_l0 added; mean_l2 is over
# the successful examples (v1: over all examples, failures counted as 0).
SCHEMA_VERSION = 2

# Top-level keys of robustness.json and keys of every attack record. Tests pin
# these: downstream tables and plots parse the file, so change them only with
# a SCHEMA_VERSION bump.
REPORT_KEYS = (
    "schema_version", "run", "workdir", "created", "command", "git", "hardware",
    "model", "data", "seed", "batch_size", "clean_accuracy", "results",
    "best_robust", "diagnostics", "verdict",
)
RECORD_KEYS = (
    "label", "attack", "threat", "norm", "eps", "loss", "settings", "source",
    "n", "seed", "clean_accuracy", "robust_accuracy", "num_clean_correct",
    "num_robust", "targeted", "success_rate", "num_success", "max_linf", "mean_l0",
    "mean_l2", "wall_time_s",
)

# Threat model of each registry attack (one table, in gce_jax.attacks). Bounded
# attacks are checked against their ball after every batch: an attack that
# leaves it reports an accuracy that is too low, which is as wrong as one that
# is too high.
ATTACK_NORMS: dict[str, str] = _attacks.ATTACK_NORMS
BOUNDED_NORMS = ("linf", "l2")
# Attacks that never see a gradient of the attacked model.
BLACK_BOX_ATTACKS = frozenset({"square"})
# Attacks with their own fixed objective: no ``loss=`` is passed and the
# record names the objective they use (JSMA and C&W also take no eps).
FIXED_OBJECTIVE: dict[str, str] = _attacks.FIXED_OBJECTIVES
# Minimum-norm attacks without a budget argument (JSMA, C&W): one run each.
EPS_FREE_ATTACKS = frozenset(name for name, fn in _attacks.ATTACKS.items()
                             if "eps" not in inspect.signature(fn).parameters)
# Ensembles: the attack returns an ``AutoAttackResult``, and the evaluator
# adds one cumulative row per component (``AttackResult.components``).
ENSEMBLE_ATTACKS = frozenset({"autoattack"})

# Slack for float32 round-off when checking an attack stays in its ball.
_BOUND_TOL = 1e-5

# The paper's attack settings (Sec. 5.2 and the authors' advertorch PGD);
# APGD and Square follow AutoAttack's defaults. Values that depend on eps are
# callables of eps. Keys are the keyword names of gce_jax.attacks.
PAPER_PARAMS: dict[str, dict[str, Any]] = {
    "fgsm": {},
    "bim": {"steps": 10, "step_size": lambda eps: eps / 10},
    "pgd": {"steps": 40, "step_size": 0.01, "random_start": True},
    "mim": {"steps": 40, "step_size": lambda eps: eps / 40, "decay": 1.0},
    "pgd_l2": {"steps": 40, "step_size": lambda eps: 2.5 * eps / 40},
    "apgd": {"steps": 100},
    "fab": {"steps": 100},
    "square": {"n_queries": 5000, "p_init": 0.8},
    "autoattack": {"version": "standard", "steps": 100, "n_queries": 5000},
    "jsma": {"gamma": 0.25, "theta": 1.0},  # gamma per data set: PAPER_JSMA_GAMMA
    "carlini_wagner_l2": {"binary_steps": 9, "steps": 1000, "initial_const": 1e-3,
                          "confidence": 0.0, "targeted": True},
}
# Default objective per attack: the paper's is cross-entropy; Square's
# natural (and AutoAttack's) objective is the margin.
DEFAULT_LOSS: dict[str, str | None] = {
    "square": "margin", "jsma": None, "carlini_wagner_l2": None, "fab": None,
    "autoattack": None,
}

# Paper eps grids (Tables 3-4) per data set family.
PAPER_EPS: dict[str, tuple[float, ...]] = {
    "mnist": (0.1, 0.2, 0.3),
    "digits": (0.1, 0.2, 0.3),
    "cifar10": (0.04, 0.12, 0.2),
    "cifar100": (0.04, 0.12, 0.2),
    "tiny_imagenet": (0.04, 0.12, 0.2),
}
# JSMA's gamma (max. fraction of pixels changed), Table 3.
PAPER_JSMA_GAMMA: dict[str, tuple[float, ...]] = {
    "mnist": (0.25, 0.5), "digits": (0.25, 0.5), "cifar10": (0.07, 0.14),
    "cifar100": (0.07, 0.14), "tiny_imagenet": (0.07, 0.14),
}
DEFAULT_ATTACKS = ("fgsm", "bim", "pgd", "mim")
ATTACK_LOSSES = ("xe", "margin", "dlr", "gce")
# Sentinel for "the attack's default objective" (DEFAULT_LOSS, else xe).
DEFAULT_OBJECTIVE = "default"


class EvaluationError(ValueError):
    """Bad evaluation input, or an attack that broke its threat model."""


# ----------------------------------------------------------------------------- specs
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
        out = {k: _jsonable(v) for k, v in sorted(self.params.items())}
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

    def key(self) -> str:
        """Stable identity, used for caching and for deriving the PRNG key."""
        return json.dumps({"a": self.attack, "e": self.eps, "l": self.loss,
                           "p": self.settings(), "n": self.norm}, sort_keys=True)


def paper_spec(attack: str, eps: float | None, *, loss: str | None = DEFAULT_OBJECTIVE,
               restarts: int = 1, label: str = "", **overrides: Any) -> AttackSpec:
    """An :class:`AttackSpec` with the paper's settings for ``attack``.

    eps-dependent defaults (e.g. BIM's ``eps / steps``) are resolved here;
    ``overrides`` replace individual parameters.
    """
    if loss == DEFAULT_OBJECTIVE:
        loss = DEFAULT_LOSS.get(attack, "xe")
    params = {}
    for k, v in {**PAPER_PARAMS.get(attack, {}), **overrides}.items():
        params[k] = v(eps) if callable(v) else v
    return AttackSpec(attack, eps, loss, params, restarts, label)


def default_eps(dataset: str | None) -> tuple[float, ...]:
    """The paper's eps grid for a data set (MNIST's for unknown names)."""
    return PAPER_EPS.get(dataset or "", PAPER_EPS["mnist"])


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


# ---------------------------------------------------------------------------- results
def resolved_settings(spec: AttackSpec, attack_fn: AttackFn,
                      example_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Every setting the attack ran with, defaults filled in, plus restarts.

    Uses ``gce_jax.attacks.attack_spec`` for registry attacks (which also
    rejects misspelt keywords before any compute); other attacks (test
    doubles) record what was passed. With ``example_shape``, JSMA's
    iteration budget is resolved too (``max_iters``, from gamma and the
    number of features).
    """
    if _attacks.ATTACKS.get(spec.attack) is not attack_fn:
        return spec.settings()
    try:
        full = _attacks.attack_spec(spec.attack, **spec.call_kwargs())
    except TypeError as e:
        raise EvaluationError(f"{spec.label}: {e}") from None
    # example_offset is per batch (the evaluator passes each batch's), not a setting.
    out = {k: _jsonable(v) for k, v in sorted(full.items())
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


@dataclasses.dataclass
class AttackResult:
    """Per-example outcome of one spec plus its JSON record."""

    spec: AttackSpec
    robust: np.ndarray  # bool [n]: clean-correct and adversarially correct
    record: dict[str, Any]
    # An ensemble's cumulative rows, one per component (see component_results);
    # ``component_of`` is the ensemble's label on such a row.
    components: list["AttackResult"] = dataclasses.field(default_factory=list)
    component_of: str = ""

    def with_components(self) -> list["AttackResult"]:
        """This result followed by its component rows (for report tables)."""
        return [self, *self.components]

    @property
    def robust_accuracy(self) -> float:
        return float(self.record["robust_accuracy"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _batches(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating rows.

    A constant batch shape means one compilation per spec. Padding rows are
    real examples, so attacks see nothing degenerate; their outputs are dropped.
    """
    if len(a) == size:
        return a
    reps = np.resize(np.arange(len(a)), size - len(a))
    return np.concatenate([a, a[reps]], axis=0)


def to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 in [0, 1] (float input is only range-checked)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.size and (images.min() < 0 or images.max() > 1):
        raise EvaluationError("float images must lie in [0, 1]")
    return images


def progress_name(spec: AttackSpec, source: str = "") -> str:
    """Progress-bar name: attack, loss and eps (two PGD bars must read differently)."""
    base = spec.attack + (f"-{spec.loss}" if spec.loss else "")
    # The rest of a custom label, e.g. "(2x steps)" of "pgd-xe (2x steps)".
    extra = spec.label[len(base):] if spec.label.startswith(base) else f" {spec.label}"
    eps = "" if spec.eps is None else f" eps={spec.eps:g}"
    return (base + eps + extra.rstrip() + (f" [{source}]" if source else "")).strip()


def _argmax_logits(fn: Partial, x: Array) -> Array:
    return jnp.argmax(fn(x), axis=-1)


class Evaluator:
    """Runs attack specs on a fixed evaluation set; caches results by spec.

    Args:
      logits_fn: inference-mode ``x -> logits`` of the model under test.
      x: float32 NHWC images in [0, 1]; y: int labels.
      seed: base seed; each spec's key is derived from it and the spec.
      batch_size: examples per attack call (the last batch is padded).
      registry: ``name -> attack``; defaults to ``gce_jax.attacks.ATTACKS``.
      progress: show a tqdm bar per attack.
      mesh: a 1-D ``'batch'`` mesh (``gce_jax.parallel.make_mesh``). Each
        attack batch is then split across its devices and the model
        replicated: the attacks are per-example, so jit partitions them with
        no communication beyond batch-level loop conditions. ``batch_size`` is
        rounded up to a multiple of the device count. ``None``: one device.
    """

    def __init__(self, logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *,
                 seed: int = 0, batch_size: int = 256,
                 registry: Mapping[str, AttackFn] | None = None,
                 progress: bool = True, mesh: jax.sharding.Mesh | None = None):
        x = to_float_images(x)
        y = np.asarray(y).astype(np.int32)
        if len(x) == 0 or len(x) != len(y):
            raise EvaluationError(
                f"need a non-empty evaluation set with one label per image; got "
                f"{len(x)} images and {len(y)} labels")
        if batch_size <= 0:
            raise EvaluationError(f"batch_size must be > 0, got {batch_size}")
        self.logits_fn = logits_fn
        self.x, self.y = x, y
        self.seed = int(seed)
        self.batch_size = int(min(batch_size, len(x)))
        self._batch_sharding = self._replicated = None
        if mesh is not None and mesh.size > 1:
            self.batch_size = -(-self.batch_size // mesh.size) * mesh.size
            self._batch_sharding = parallel.batch_sharded(mesh)
            self._replicated = parallel.replicated(mesh)
        self.registry = _attacks.ATTACKS if registry is None else registry
        self.progress = progress
        # The model goes in as a Partial argument, not a closure, so its weights
        # are traced inputs rather than constants baked into the executable.
        self._fn = self._replicate(logits_fn)
        self._predict = jax.jit(_argmax_logits)
        self._cache: dict[str, AttackResult] = {}
        self.num_classes = int(jax.eval_shape(self._fn, jnp.asarray(x[:1])).shape[-1])
        self.clean_correct = self.predict(x) == y

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.mean())

    def _replicate(self, logits_fn: LogitsFn) -> Partial:
        fn = logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)
        return fn if self._replicated is None else jax.device_put(fn, self._replicated)

    def _batch(self, a: np.ndarray) -> Any:
        """One padded batch, split across the mesh's devices if there is one."""
        a = _pad(a, self.batch_size)
        return a if self._batch_sharding is None else jax.device_put(a, self._batch_sharding)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Argmax predictions of the model under test, in fixed-size batches."""
        out = np.empty(len(x), np.int32)
        for s, e in _batches(len(x), self.batch_size):
            out[s:e] = np.asarray(self._predict(self._fn, self._batch(x[s:e])))[: e - s]
        return out

    def spec_key(self, spec: AttackSpec) -> Array:
        # Derived from the spec itself, so adding or reordering attacks never
        # changes another attack's randomness.
        base = jax.random.key(self.seed)
        return jax.random.fold_in(base, zlib.crc32(spec.key().encode()) & 0x7FFFFFFF)

    def run(self, spec: AttackSpec, *, source_logits_fn: LogitsFn | None = None,
            source: str = "") -> AttackResult:
        """Runs ``spec``; returns the cached result if it already ran.

        ``source_logits_fn`` crafts the examples on another model (transfer);
        robustness is always judged on this evaluator's model.
        """
        if spec.attack not in self.registry:
            raise EvaluationError(
                f"unknown attack {spec.attack!r}; known attacks: "
                f"{', '.join(sorted(self.registry))}")
        if source_logits_fn is not None and not source:
            raise EvaluationError("a transfer attack needs a source name")
        cache_key = spec.key() + "|" + source
        if cache_key in self._cache:
            return self._cache[cache_key]

        attack_fn = self.registry[spec.attack]
        craft_fn = self._fn if source_logits_fn is None else self._replicate(source_logits_fn)
        kwargs = spec.call_kwargs()
        settings = resolved_settings(spec, attack_fn, self.x.shape[1:])
        targeted = draws_targets(attack_fn, settings)

        # No extra jit here: the attacks compile their own cores with eps and
        # step sizes traced, so one compilation serves every eps and batch.
        robust = self.clean_correct.copy()
        # Success: a clean-correct example misclassified (untargeted) or
        # classified as its target (targeted), in the first restart that got
        # there; its distances are that restart's.
        success = np.zeros(self.n, bool)
        l0 = np.zeros(self.n)
        l2 = np.zeros(self.n)
        max_linf = 0.0
        start_t = time.perf_counter()
        spec_key = self.spec_key(spec)
        # Attacks that key their draws by the example's index get it, so the
        # numbers do not depend on batch_size or the device count; for any
        # other attack each batch gets its own key.
        keyed_by_example = "example_offset" in inspect.signature(attack_fn).parameters
        batches = list(_batches(self.n, self.batch_size))
        ensemble = _EnsembleTally(self.n) if spec.attack in ENSEMBLE_ATTACKS else None
        bar = tqdm(total=self.n * spec.restarts, desc=progress_name(spec, source),
                   unit="ex", disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            for r in range(spec.restarts):
                rkey = jax.random.fold_in(spec_key, r)
                for b, (s, e) in enumerate(batches):
                    # Later restarts only need the examples still standing
                    # (or, when targeted, still short of their target).
                    pending = robust[s:e] | (self.clean_correct[s:e] & ~success[s:e]
                                             if targeted else False)
                    if r > 0 and not pending.any():
                        bar.update(e - s)
                        continue
                    xb, yb = self._batch(self.x[s:e]), self._batch(self.y[s:e])
                    if keyed_by_example:
                        call = dict(key=rkey, example_offset=s)
                    else:
                        call = dict(key=jax.random.fold_in(rkey, b))
                    x_adv = attack_fn(craft_fn, xb, yb, **call, **kwargs)
                    if ensemble is not None:
                        x_adv = ensemble.add(s, e, x_adv)
                    x_adv = np.asarray(x_adv)[: e - s]
                    delta = (x_adv - self.x[s:e]).reshape(e - s, -1)
                    linf = np.abs(delta).max(axis=1) if delta.size else np.zeros(e - s)
                    dist2 = np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1))
                    self._check_bounds(spec, x_adv, linf, dist2)
                    max_linf = max(max_linf, float(linf.max(initial=0.0)))
                    pred = self.predict(x_adv)
                    robust[s:e] &= pred == self.y[s:e]
                    if targeted:
                        t = _attacks.draw_targets(call["key"], yb, self.num_classes,
                                                  call.get("example_offset", 0))
                        hit = pred == np.asarray(t)[: e - s]
                    else:
                        hit = pred != self.y[s:e]
                    new = hit & self.clean_correct[s:e] & ~success[s:e]
                    success[s:e] |= new
                    l0[s:e][new] = np.count_nonzero(delta, axis=1)[new]
                    l2[s:e][new] = dist2[new]
                    bar.update(e - s)
        finally:
            bar.close()
        wall = time.perf_counter() - start_t

        norm = spec.norm
        threat = ("transfer" if source_logits_fn is not None
                  else "black-box" if spec.attack in BLACK_BOX_ATTACKS else "white-box")
        record = {
            "label": spec.label,
            "attack": spec.attack,
            "threat": threat,
            "norm": norm,
            "eps": spec.eps,
            "loss": FIXED_OBJECTIVE.get(spec.attack, spec.loss),
            "settings": settings,
            "source": source or "self",
            "n": self.n,
            "seed": self.seed,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": float(robust.mean()),
            "num_clean_correct": int(self.clean_correct.sum()),
            "num_robust": int(robust.sum()),
            "targeted": targeted,
            "success_rate": (float(success.sum() / self.clean_correct.sum())
                             if self.clean_correct.any() else None),
            "num_success": int(success.sum()),
            "max_linf": max_linf,
            "mean_l0": float(l0[success].mean()) if success.any() else None,
            "mean_l2": float(l2[success].mean()) if success.any() else None,
            "wall_time_s": round(wall, 3),
        }
        assert tuple(record) == RECORD_KEYS
        result = AttackResult(spec, robust, record)
        if ensemble is not None:
            result.components = ensemble.component_results(result, self.clean_correct)
        self._cache[cache_key] = result
        return result

    def _check_bounds(self, spec: AttackSpec, x_adv: np.ndarray, linf: np.ndarray,
                      l2: np.ndarray) -> None:
        if not np.all(np.isfinite(x_adv)):
            raise EvaluationError(f"{spec.label}: attack returned non-finite inputs")
        if x_adv.min(initial=0.0) < -_BOUND_TOL or x_adv.max(initial=1.0) > 1 + _BOUND_TOL:
            raise EvaluationError(f"{spec.label}: adversarial inputs leave [0, 1] "
                                  f"(range [{x_adv.min():.4g}, {x_adv.max():.4g}])")
        if spec.eps is None:
            return
        if spec.norm == "linf" and linf.max(initial=0.0) > spec.eps + _BOUND_TOL:
            raise EvaluationError(f"{spec.label}: perturbation leaves the Linf ball "
                                  f"(max {linf.max():.6g} > eps {spec.eps})")
        if spec.norm == "l2" and l2.max(initial=0.0) > spec.eps * (1 + 1e-4) + _BOUND_TOL:
            raise EvaluationError(f"{spec.label}: perturbation leaves the L2 ball "
                                  f"(max {l2.max():.6g} > eps {spec.eps})")


class _EnsembleTally:
    """Collects an ensemble's ``broken_by`` over the batches of one spec."""

    def __init__(self, n: int):
        self.broken_by = np.full(n, ROBUST, np.int32)
        self.names: tuple[str, ...] = ()
        self.seconds: np.ndarray | None = None

    def add(self, s: int, e: int, out: Any) -> Array:
        if not isinstance(out, _attacks.AutoAttackResult):
            raise EvaluationError(f"an ensemble attack must return an AutoAttackResult, "
                                  f"got {type(out).__name__}")
        self.broken_by[s:e] = np.asarray(out.broken_by)[: e - s]
        self.names = out.components
        secs = np.asarray(out.seconds, np.float64)
        self.seconds = secs if self.seconds is None else self.seconds + secs
        return out.x_adv

    def component_results(self, main: AttackResult,
                          clean_correct: np.ndarray) -> list[AttackResult]:
        """One cumulative row per component: robust to it and every one before it.

        The last row's mask is the ensemble's own (an example the final
        check finds robust counts as robust at every stage). Distortion
        columns are left empty: they describe the ensemble's result.
        """
        rows = []
        for c, name in enumerate(self.names):
            robust = main.robust | (clean_correct & (self.broken_by > c))
            record = dict(main.record)
            record.update(
                label=f"{main.spec.label} > {name}", robust_accuracy=float(robust.mean()),
                num_robust=int(robust.sum()), max_linf=None, mean_l2=None,
                wall_time_s=round(float(self.seconds[c]), 3),
                settings={"component": c, "name": name, "cumulative": True,
                          "broke": int(np.sum(self.broken_by == c))})
            spec = dataclasses.replace(main.spec, label=record["label"])
            rows.append(AttackResult(spec, robust, record, component_of=main.spec.label))
        return rows


def best_robust(results: Sequence[AttackResult]) -> list[dict[str, Any]]:
    """Per-example worst case over attacks sharing a threat model.

    Results are grouped by (norm, eps); within a group an example is robust
    only if every attack (white-box, black-box or transfer) failed on it.
    Attacks without an eps (JSMA, C&W) form one group per configuration.
    An ensemble's component rows are skipped: the ensemble's own row is the
    strongest of them.
    """
    groups: dict[tuple, list[AttackResult]] = {}
    seen: set[int] = set()
    for r in results:
        if id(r) in seen or r.component_of:  # cached results can be listed twice
            continue
        seen.add(id(r))
        key = ((r.spec.norm, r.spec.eps) if r.spec.eps is not None
               else (r.spec.norm, None, r.spec.label + json.dumps(r.record["settings"])))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        mask = np.logical_and.reduce([r.robust for r in rs])
        out.append({
            "norm": key[0],
            "eps": key[1],
            "robust_accuracy": float(mask.mean()),
            "num_robust": int(mask.sum()),
            "n": int(mask.size),
            "attacks": [r.spec.label + ("" if r.record["source"] == "self"
                                        else f"@{r.record['source']}") for r in rs],
            "strongest_single": min(r.robust_accuracy for r in rs),
        })
    return out


def build_report(*, run: str, workdir: str, command: str, model: Mapping[str, Any],
                 data: Mapping[str, Any], evaluator: Evaluator,
                 results: Sequence[AttackResult], diagnostics: Mapping[str, Any] | None,
                 verdict: str, extra_results: Sequence[AttackResult] = ()) -> dict[str, Any]:
    """The robustness.json document (keys: REPORT_KEYS, records: RECORD_KEYS).

    ``extra_results`` (e.g. the diagnostics' attacks) join ``best_robust``
    but not the ``results`` table.
    """
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "workdir": workdir,
        "created": now_iso(),
        "command": command,
        "git": git_info(),
        "hardware": hardware_info(),
        "model": dict(model),
        "data": dict(data),
        "seed": evaluator.seed,
        "batch_size": evaluator.batch_size,
        "clean_accuracy": evaluator.clean_accuracy,
        "results": [dict(r.record) for r in results],
        "best_robust": best_robust([*results, *extra_results]),
        "diagnostics": None if diagnostics is None else dict(diagnostics),
        "verdict": verdict,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def report_to_json(report: Mapping[str, Any]) -> str:
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise EvaluationError(f"report is missing keys {missing}")
    return json.dumps(_jsonable(dict(report)), indent=2, allow_nan=False) + "\n"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _eps_str(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def report_to_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable report; the last line is the verdict."""
    m = report["model"]
    lines = [
        f"# Robustness report: {report['run']}",
        "",
        f"- workdir: `{report['workdir']}`",
        f"- model: {m.get('name')} trained with {m.get('loss')}"
        + (f" (alpha={m['alpha']})" if m.get("alpha") is not None and m.get("loss") == "gce" else "")
        + f" on {report['data'].get('dataset')}",
        f"- data: {report['data'].get('split')} split, n={report['data'].get('n')} "
        f"({report['data'].get('selection')})",
        f"- clean accuracy: {_pct(report['clean_accuracy'])}%",
        f"- seed: {report['seed']}, batch size: {report['batch_size']}",
        f"- created: {report['created']}; git {report['git'].get('commit')}"
        + (" (dirty)" if report["git"].get("dirty") else ""),
        f"- hardware: {report['hardware'].get('platform')} "
        f"x{report['hardware'].get('num_devices')} ({report['hardware'].get('device_kind')})",
        f"- command: `{report['command']}`",
        "",
        "## Attacks",
        "",
        "Robust accuracy = correctly classified both clean and after the attack. "
        "`loss` is the objective the attack maximised.",
        "",
        "Success = share of the clean-correct examples the attack fooled: for a targeted "
        "attack (marked `t`: JSMA, C&W) those classified as *its target*, otherwise those "
        "misclassified. Robust accuracy counts any misclassification, also for the targeted "
        "attacks (the paper's \"accuracy under attack\"). Mean L0 (features changed) and "
        "mean L2 are over the successful examples only.",
        "",
        "| attack | threat | norm | eps | loss | robust acc % | success % | mean L0 | mean L2 "
        "| n | settings | time s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(_record_row(r))
    if report["best_robust"]:
        lines += ["", "## Worst case over attacks (per example)", "",
                  "An example counts as robust only if it survives every attack listed.", "",
                  "| norm | eps | robust acc % | strongest single % | attacks |",
                  "| --- | --- | --- | --- | --- |"]
        for g in report["best_robust"]:
            lines.append(f"| {g['norm']} | {_eps_str(g['eps'])} | {_pct(g['robust_accuracy'])} | "
                         f"{_pct(g['strongest_single'])} | {', '.join(g['attacks'])} |")
    diag = report.get("diagnostics")
    if diag:
        from gce_jax.diagnostics import diagnostics_markdown
        lines += ["", *diagnostics_markdown(diag)]
    lines += ["", f"**Verdict ({report['run']}): {report['verdict']}**", ""]
    return "\n".join(lines)


def _record_row(r: Mapping[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
    src = r["threat"] + ("" if r["source"] == "self" else f" from {r['source']}")
    return (f"| {r['label']} | {src} | {r['norm']} | {_eps_str(r['eps'])} | {r['loss']} | "
            f"{_pct(r['robust_accuracy'])} | {success_cell(r)} | "
            f"{_num(r.get('mean_l0'), '.1f')} | {_num(r.get('mean_l2'), '.4f')} | "
            f"{r['n']} | {settings} | {r['wall_time_s']:.1f} |")


def success_cell(r: Mapping[str, Any]) -> str:
    """``62.50 t`` for a targeted success rate, ``62.50`` otherwise (``n/a`` if absent)."""
    return _pct(r.get("success_rate")) + (" t" if r.get("targeted") else "")


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def write_report(out_dir: str, report: Mapping[str, Any], *,
                 extra_files: Mapping[str, bytes] | None = None) -> tuple[str, str]:
    """Writes ``robustness.json``, ``robustness.md`` (and ``extra_files``, e.g.
    the curve PNG) into ``out_dir``, each atomically; returns the two paths.

    All texts are rendered before any file is touched, so a rendering error
    leaves existing results as they were. The JSON goes last: its presence
    means the run completed.
    """
    js = report_to_json(report)
    md = report_to_markdown(report)
    jpath = os.path.join(out_dir, "robustness.json")
    mpath = os.path.join(out_dir, "robustness.md")
    for name, data in (extra_files or {}).items():
        atomic_write(os.path.join(out_dir, name), data)
    atomic_write(mpath, md)
    atomic_write(jpath, js)
    return jpath, mpath
