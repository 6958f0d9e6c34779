"""Running attacks over a data set: per-example robust masks and their records.

:class:`Evaluator` runs an :class:`~gce_jax.robustness.specs.AttackSpec` over
the whole evaluation set in fixed-size batches and returns an
:class:`AttackResult`: a per-example boolean *robust mask* (clean-correct AND
still correct on the adversarial input) and a JSON-ready record (keys:
:data:`RECORD_KEYS`). Masks are what make an honest worst case possible: an
example counts as robust only if it survives every attack
(:func:`best_robust`), as in AutoAttack.

Besides robust accuracy, every record says how often and at what distortion
the attack *succeeded*, on the clean-correct examples: ``success_rate``
(``targeted`` attacks -- JSMA, C&W -- succeed when the prediction is their
target, recomputed with ``draw_targets`` from the key the attack got; the
others when it is wrong), and ``mean_l0`` (features changed) and ``mean_l2``
over the successful examples only (``None`` when none succeeded). A targeted
attack that only reaches a wrong non-target class lowers robust accuracy but
is no success.

Batches are the data package's (:func:`gce_jax.data.batch_slices`, padded by
:func:`gce_jax.data.pad_to`), so evaluation and training pad the same way.
Imports only :mod:`~gce_jax.robustness.specs` from this package.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm.auto import tqdm

from gce_jax import attacks, parallel
from gce_jax.attacks.autoattack import ROBUST
from gce_jax.data import batch_slices, pad_to
from gce_jax.robustness.specs import (BLACK_BOX_ATTACKS, ENSEMBLE_ATTACKS, FIXED_OBJECTIVE,
                                      AttackFn, AttackSpec, EvaluationError, draws_targets,
                                      resolved_settings)

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# Keys of every attack record. Tests pin these: downstream tables and plots
# parse the file, so change them only with a report SCHEMA_VERSION bump.
RECORD_KEYS = (
    "label", "attack", "threat", "norm", "eps", "loss", "settings", "source",
    "n", "seed", "clean_accuracy", "robust_accuracy", "num_clean_correct",
    "num_robust", "targeted", "success_rate", "num_success", "max_linf", "mean_l0",
    "mean_l2", "wall_time_s",
)

# Slack for float32 round-off when checking an attack stays in its ball.
BOUND_TOL = 1e-5


@dataclasses.dataclass
class AttackResult:
    """Per-example outcome of one spec plus its JSON record."""

    spec: AttackSpec
    robust: np.ndarray  # bool [n]: clean-correct and adversarially correct
    record: dict[str, Any]
    # An ensemble's cumulative rows, one per component (see EnsembleTally);
    # ``component_of`` is the ensemble's label on such a row.
    components: list["AttackResult"] = dataclasses.field(default_factory=list)
    component_of: str = ""

    def with_components(self) -> list["AttackResult"]:
        """This result followed by its component rows (for report tables)."""
        return [self, *self.components]

    @property
    def robust_accuracy(self) -> float:
        return float(self.record["robust_accuracy"])


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


def check_bounds(spec: AttackSpec, x_adv: np.ndarray, linf: np.ndarray,
                 l2: np.ndarray) -> None:
    """Raises EvaluationError if ``x_adv`` leaves [0, 1] or the spec's ball.

    An attack that leaves its ball reports an accuracy that is too low, which
    is as wrong as one that is too high.
    """
    if not np.all(np.isfinite(x_adv)):
        raise EvaluationError(f"{spec.label}: attack returned non-finite inputs")
    if x_adv.min(initial=0.0) < -BOUND_TOL or x_adv.max(initial=1.0) > 1 + BOUND_TOL:
        raise EvaluationError(f"{spec.label}: adversarial inputs leave [0, 1] "
                              f"(range [{x_adv.min():.4g}, {x_adv.max():.4g}])")
    if spec.eps is None:
        return
    if spec.norm == "linf" and linf.max(initial=0.0) > spec.eps + BOUND_TOL:
        raise EvaluationError(f"{spec.label}: perturbation leaves the Linf ball "
                              f"(max {linf.max():.6g} > eps {spec.eps})")
    if spec.norm == "l2" and l2.max(initial=0.0) > spec.eps * (1 + 1e-4) + BOUND_TOL:
        raise EvaluationError(f"{spec.label}: perturbation leaves the L2 ball "
                              f"(max {l2.max():.6g} > eps {spec.eps})")


@dataclasses.dataclass
class _Tally:
    """One spec's per-example outcome, accumulated over restarts and batches.

    Success: a clean-correct example misclassified (untargeted) or classified
    as its target (targeted), in the first restart that got there; its
    distances are that restart's.
    """

    robust: np.ndarray
    success: np.ndarray
    l0: np.ndarray
    l2: np.ndarray
    max_linf: float = 0.0

    @classmethod
    def start(cls, clean_correct: np.ndarray) -> "_Tally":
        n = len(clean_correct)
        return cls(clean_correct.copy(), np.zeros(n, bool), np.zeros(n), np.zeros(n))

    def pending(self, s: slice, clean_correct: np.ndarray, targeted: bool) -> np.ndarray:
        """Examples a later restart can still change: robust, or short of their target."""
        return self.robust[s] | (clean_correct[s] & ~self.success[s] if targeted else False)

    def add(self, s: slice, correct: np.ndarray, hit: np.ndarray, clean_correct: np.ndarray,
            delta: np.ndarray, dist2: np.ndarray) -> None:
        self.robust[s] &= correct
        new = hit & clean_correct[s] & ~self.success[s]
        self.success[s] |= new
        self.l0[s][new] = np.count_nonzero(delta, axis=1)[new]
        self.l2[s][new] = dist2[new]


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
        self.registry = attacks.ATTACKS if registry is None else registry
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
        a = pad_to(a, self.batch_size)
        return a if self._batch_sharding is None else jax.device_put(a, self._batch_sharding)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Argmax predictions of the model under test, in fixed-size batches."""
        out = np.empty(len(x), np.int32)
        for s in batch_slices(len(x), self.batch_size):
            out[s] = np.asarray(self._predict(self._fn, self._batch(x[s])))[: s.stop - s.start]
        return out

    def prng_key_for(self, spec: AttackSpec) -> Array:
        """The PRNG key ``spec`` runs with (restart ``r`` folds in ``r``)."""
        # Derived from the spec itself, so adding or reordering attacks never
        # changes another attack's randomness.
        base = jax.random.key(self.seed)
        return jax.random.fold_in(base, zlib.crc32(spec.spec_id().encode()) & 0x7FFFFFFF)

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
        cache_key = spec.spec_id() + "|" + source
        if cache_key not in self._cache:
            self._cache[cache_key] = self._run_uncached(spec, source_logits_fn, source)
        return self._cache[cache_key]

    def _run_uncached(self, spec: AttackSpec, source_logits_fn: LogitsFn | None,
                      source: str) -> AttackResult:
        attack_fn = self.registry[spec.attack]
        settings = resolved_settings(spec, attack_fn, self.x.shape[1:])
        targeted = draws_targets(attack_fn, settings)
        craft_fn = self._fn if source_logits_fn is None else self._replicate(source_logits_fn)
        ensemble = EnsembleTally(self.n) if spec.attack in ENSEMBLE_ATTACKS else None
        start_t = time.perf_counter()
        tally = self._attack_all(spec, attack_fn, craft_fn, targeted, ensemble, source)
        wall = time.perf_counter() - start_t
        threat = ("transfer" if source_logits_fn is not None
                  else "black-box" if spec.attack in BLACK_BOX_ATTACKS else "white-box")
        record = self._record(spec, settings, tally, targeted=targeted, threat=threat,
                              source=source, wall=wall)
        result = AttackResult(spec, tally.robust, record)
        if ensemble is not None:
            result.components = ensemble.component_results(result, self.clean_correct)
        return result

    def _attack_all(self, spec: AttackSpec, attack_fn: AttackFn, craft_fn: Partial,
                    targeted: bool, ensemble: "EnsembleTally | None", source: str) -> _Tally:
        """Every restart over every batch; later restarts skip settled batches."""
        # No extra jit here: the attacks compile their own cores with eps and
        # step sizes traced, so one compilation serves every eps and batch.
        tally = _Tally.start(self.clean_correct)
        base_key = self.prng_key_for(spec)
        # Attacks that key their draws by the example's index get it, so the
        # numbers do not depend on batch_size or the device count; for any
        # other attack each batch gets its own key.
        keyed_by_example = "example_offset" in inspect.signature(attack_fn).parameters
        slices = list(batch_slices(self.n, self.batch_size))
        bar = tqdm(total=self.n * spec.restarts, desc=progress_name(spec, source),
                   unit="ex", disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            for r in range(spec.restarts):
                rkey = jax.random.fold_in(base_key, r)
                for b, s in enumerate(slices):
                    # Later restarts only need the examples still standing
                    # (or, when targeted, still short of their target).
                    if r == 0 or tally.pending(s, self.clean_correct, targeted).any():
                        call = (dict(key=rkey, example_offset=s.start) if keyed_by_example
                                else dict(key=jax.random.fold_in(rkey, b)))
                        self._attack_batch(spec, attack_fn, craft_fn, s, call, targeted,
                                           ensemble, tally)
                    bar.update(s.stop - s.start)
        finally:
            bar.close()
        return tally

    def _attack_batch(self, spec: AttackSpec, attack_fn: AttackFn, craft_fn: Partial,
                      s: slice, call: dict[str, Any], targeted: bool,
                      ensemble: "EnsembleTally | None", tally: _Tally) -> None:
        """One attack call on rows ``s``; checks its bounds and updates ``tally``."""
        m = s.stop - s.start
        xb, yb = self._batch(self.x[s]), self._batch(self.y[s])
        x_adv = attack_fn(craft_fn, xb, yb, **call, **spec.call_kwargs())
        if ensemble is not None:
            x_adv = ensemble.add(s, x_adv)
        x_adv = np.asarray(x_adv)[:m]
        delta = (x_adv - self.x[s]).reshape(m, -1)
        linf = np.abs(delta).max(axis=1) if delta.size else np.zeros(m)
        dist2 = np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1))
        check_bounds(spec, x_adv, linf, dist2)
        tally.max_linf = max(tally.max_linf, float(linf.max(initial=0.0)))
        pred = self.predict(x_adv)
        if targeted:
            t = attacks.draw_targets(call["key"], yb, self.num_classes,
                                     call.get("example_offset", 0))
            hit = pred == np.asarray(t)[:m]
        else:
            hit = pred != self.y[s]
        tally.add(s, pred == self.y[s], hit, self.clean_correct, delta, dist2)

    def _record(self, spec: AttackSpec, settings: dict[str, Any], tally: _Tally, *,
                targeted: bool, threat: str, source: str, wall: float) -> dict[str, Any]:
        robust, success = tally.robust, tally.success
        record = {
            "label": spec.label,
            "attack": spec.attack,
            "threat": threat,
            "norm": spec.norm,
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
            "max_linf": tally.max_linf,
            "mean_l0": float(tally.l0[success].mean()) if success.any() else None,
            "mean_l2": float(tally.l2[success].mean()) if success.any() else None,
            "wall_time_s": round(wall, 3),
        }
        assert tuple(record) == RECORD_KEYS
        return record


class EnsembleTally:
    """Collects an ensemble's ``broken_by`` over the batches of one spec."""

    def __init__(self, n: int):
        self.broken_by = np.full(n, ROBUST, np.int32)
        self.names: tuple[str, ...] = ()
        self.seconds: np.ndarray | None = None

    def add(self, s: slice, out: Any) -> Array:
        """Records batch ``s`` of an ``AutoAttackResult``; returns its ``x_adv``."""
        if not isinstance(out, attacks.AutoAttackResult):
            raise EvaluationError(f"an ensemble attack must return an AutoAttackResult, "
                                  f"got {type(out).__name__}")
        self.broken_by[s] = np.asarray(out.broken_by)[: s.stop - s.start]
        self.names = out.components
        secs = np.asarray(out.seconds, np.float64)
        self.seconds = secs if self.seconds is None else self.seconds + secs
        return out.x_adv

    def component_results(self, main: AttackResult,
                          clean_correct: np.ndarray) -> list[AttackResult]:
        """One cumulative row per component: robust to it and every one before it.

        The last row's mask is the ensemble's own (an example the final
        check finds robust counts as robust at every stage). Success is
        cumulative too; distortion columns are left empty: they describe the
        ensemble's result.
        """
        rows = []
        n_correct = int(clean_correct.sum())
        for c, name in enumerate(self.names):
            robust = main.robust | (clean_correct & (self.broken_by > c))
            fooled = n_correct - int(robust.sum())
            record = dict(main.record)
            record.update(
                label=f"{main.spec.label} > {name}", robust_accuracy=float(robust.mean()),
                num_robust=int(robust.sum()), max_linf=None, mean_l2=None, mean_l0=None,
                num_success=fooled, success_rate=fooled / n_correct if n_correct else None,
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


__all__ = ["BOUND_TOL", "RECORD_KEYS", "AttackResult", "EnsembleTally", "Evaluator",
           "best_robust", "check_bounds", "progress_name", "to_float_images"]
