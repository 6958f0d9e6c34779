"""Robustness evaluation as a library call: a checkpoint and a ConfigDict in, a report out.

    from experiments.evaluation_api import evaluate_checkpoint, get_eval_config
    report = evaluate_checkpoint("runs/mnist_lenet5_gce",
                                 get_eval_config(attacks=("fgsm", "pgd"), eps=(0.1, 0.3), n=1000))
    report.verdict, report["results"]

:func:`evaluate_checkpoint` is what ``python -m experiments.evaluate`` runs (the
CLI only turns its flags into the eval config) and what
``experiments.reproduce`` calls. It wires a training run (``gce_jax.train``) or
a published-weights folder (``gce_jax.weights``) and its test split to
``gce_jax.robustness``; it lives in ``experiments/`` because the robustness
package knows nothing of checkpoints.

The settings are ``experiments/configs/eval_default.py``'s fields.
:func:`eval_config_sha256` hashes the ones that change the numbers, resolved
against the run's config; every report records it (``eval_config_sha256``) next
to the weights' ``model.variables_sha256``, which is what reuse compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import ml_collections

from experiments import cli
from experiments.configs import eval_default

PNG_NAME = "accuracy_vs_eps.png"
# Where and how, not what: two evaluations that differ only here give the same
# numbers (masks do not depend on the device count: tests/test_parallel.py).
NOT_HASHED = ("out", "run_name", "progress", "devices")
# The attacks that take ``early_stop`` (the iterative core; FGSM has one step).
EARLY_STOP_ATTACKS = ("bim", "pgd", "mim", "pgd_l2")
# Flags that are the negation of a field.
NEGATED_FLAGS = {"diagnostics": "--no_diagnostics", "progress": "--no_progress"}
SELECTIONS = ("last", "best_val")


class EvalConfigError(cli.UserError):
    """Bad evaluation input (settings, workdir, out dir); one line, nothing written.

    Messages name the setting by its CLI flag (``--eps``), which is also the field.
    """


@dataclasses.dataclass(frozen=True)
class Report:
    """A written evaluation: ``robustness.json``'s document (as read back) and where it lies.

    Reads like the document (``report["results"]``); :meth:`to_dict` gives a copy.
    """

    document: Mapping[str, Any]
    json_path: str
    markdown_path: str

    def __getitem__(self, key: str) -> Any:
        return self.document[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.document)

    def get(self, key: str, default: Any = None) -> Any:
        return self.document.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.document))

    @property
    def verdict(self) -> str:
        return self.document["verdict"]

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.document["results"]

    @property
    def clean_accuracy(self) -> float:
        return self.document["clean_accuracy"]

    @property
    def eval_config_sha256(self) -> str:
        return self.document["eval_config_sha256"]

    @property
    def variables_sha256(self) -> str:
        return self.document["model"]["variables_sha256"]


def get_eval_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The default eval config (``experiments/configs/eval_default.py``) with ``overrides``."""
    config = eval_default.get_config()
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise EvalConfigError(f"unknown eval settings {unknown} (known: {sorted(config)})")
    # Untyped fields: a setting need not keep its default's type (eps: None -> a
    # tuple, attacks: a tuple or one string); normalize_eval_config checks them all.
    values = {**config.to_dict(), **overrides}
    return ml_collections.ConfigDict(
        {k: ml_collections.FieldReference(v, field_type=object) for k, v in values.items()})


# ------------------------------------------------------------ settings
def _names(value: Any) -> list[str]:
    parts = [value] if isinstance(value, str) else list(value or ())
    return [n for p in parts for n in str(p).replace(",", " ").split()]


def _eps_list(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    parts = [value] if isinstance(value, (str, int, float)) else list(value)
    eps = []
    for part in (p for v in parts for p in str(v).replace(",", " ").split()):
        try:
            eps.append(float(part))
        except ValueError:
            raise EvalConfigError(f"--eps: {part!r} is not a number") from None
    if not eps:
        raise EvalConfigError("--eps needs at least one value")
    bad = [e for e in eps if not (e >= 0) or e != e or e == float("inf")]
    if bad:
        raise EvalConfigError(f"--eps must be >= 0 and finite, got {bad}")
    big = [e for e in eps if e > 1]
    if big:
        raise EvalConfigError(f"--eps must be <= 1 (L_inf radii of images in [0, 1]; 8/255 "
                              f"is 0.0314), got {big}")
    return tuple(eps)


def _check_numbers(c: Mapping[str, Any]) -> None:
    for name, low in (("n", 1), ("batch_size", 1), ("restarts", 1), ("apgd_steps", 1),
                      ("square_queries", 1), ("cw_binary_steps", 1), ("cw_steps", 1),
                      ("pgd_steps", 1), ("seed", None)):
        value = c[name]
        if value is None and name.startswith(("cw_", "pgd_")):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise EvalConfigError(f"--{name} must be an integer, got {value!r}")
        if low is not None and value < low:
            op = "> 0" if name in ("n", "batch_size") else f">= {low}"
            raise EvalConfigError(f"--{name} must be {op}, got {value}")
    if c["devices"] is not None:
        import jax
        if not (isinstance(c["devices"], int) and 1 <= c["devices"] <= jax.local_device_count()):
            raise EvalConfigError(f"--devices must be in [1, {jax.local_device_count()}] "
                                  f"(the local devices), got {c['devices']}")
    if c["pgd_step_size"] is not None and not float(c["pgd_step_size"]) > 0:
        raise EvalConfigError(f"--pgd_step_size must be > 0, got {c['pgd_step_size']}")
    if c["diag_eps"] is not None and not 0 < float(c["diag_eps"]) <= 1:
        raise EvalConfigError(f"--diag_eps must be in (0, 1], got {c['diag_eps']}")
    if c["selection"] not in (None, *SELECTIONS):
        raise EvalConfigError(f"--selection must be one of {SELECTIONS}, got {c['selection']!r}")


def normalize_eval_config(eval_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A checked copy with canonical types (attack names and eps as tuples, floats as
    floats); missing fields take their defaults. Reads no files. EvalConfigError if bad."""
    from gce_jax.attacks import ATTACKS
    from gce_jax.robustness import EvaluationError, parse_attack_name
    c = get_eval_config(**dict(eval_config)).to_dict()
    c["attacks"] = tuple(_names(c["attacks"])) or eval_default.DEFAULT_ATTACKS
    for name in c["attacks"]:
        try:
            parse_attack_name(name, ATTACKS)
        except EvaluationError as e:
            raise EvalConfigError(str(e)) from None
    _check_numbers(c)
    c["eps"] = _eps_list(c["eps"])
    for name in ("pgd_step_size", "diag_eps"):
        c[name] = None if c[name] is None else float(c[name])
    c["diagnostics"], c["progress"] = bool(c["diagnostics"]), bool(c["progress"])
    if c["reference_workdir"] is not None:
        c["reference_workdir"] = os.path.normpath(str(c["reference_workdir"]))
    return ml_collections.ConfigDict(c)


def resolve_eval_config(eval_config: Mapping[str, Any],
                        run_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``normalize_eval_config`` with the run's defaults filled in (eps grid, PGD
    steps and step size, checkpoint selection): the settings that actually run."""
    from experiments.paper_numbers import default_eps
    c = normalize_eval_config(eval_config)
    ev = run_config.get("eval", None) or {}
    if c.eps is None:
        c.eps = tuple(float(e) for e in (ev.get("pgd_eps") or default_eps(run_config.get("dataset"))))
    c.pgd_steps = c.pgd_steps or int(ev.get("pgd_steps", 40))
    c.pgd_step_size = c.pgd_step_size or float(ev.get("pgd_step_size", 0.01))
    c.selection = c.selection or run_config.get("selection")
    return c


def eval_config_sha256(eval_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the resolved settings, minus :data:`NOT_HASHED`.

    Resolved, so an evaluation that took its eps from the run's config and one
    that named the same eps hash alike, and a changed run default does not hide.
    """
    c = resolve_eval_config(eval_config, run_config).to_dict()
    kept = {k: v for k, v in c.items() if k not in NOT_HASHED}
    if not kept.get("early_stop"):
        # Absent when off, so reports made before the field existed keep their hash.
        kept.pop("early_stop", None)
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def eval_flags(eval_config: Mapping[str, Any]) -> list[str]:
    """``experiments.evaluate`` flags for the settings that differ from the defaults."""
    c, default = normalize_eval_config(eval_config), eval_default.get_config()
    argv = []
    for key in default:
        value = tuple(c[key]) if key == "attacks" else c[key]
        if value == default[key]:
            continue
        if key in NEGATED_FLAGS:
            argv.append(NEGATED_FLAGS[key])
        elif key == "attacks":
            argv += ["--attacks", ",".join(value)]
        elif key == "eps":
            argv += ["--eps", *(repr(e) for e in value)]
        elif isinstance(default[key], bool):
            argv.append(f"--{key}")  # a store_true flag (the value differs: True)
        else:
            argv += [f"--{key}", str(value)]
    return argv


def eval_command(workdir: str, eval_config: Mapping[str, Any]) -> str:
    """The ``python -m experiments.evaluate ...`` line that reruns this evaluation."""
    argv = ["python", "-m", "experiments.evaluate", "--workdir", workdir,
            *eval_flags(eval_config)]
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------ paths
def check_workdir(path: str, flag: str = "--workdir") -> None:
    """A run directory with a readable config.json and a checkpoint, or a published folder."""
    if not os.path.isdir(path):
        raise EvalConfigError(f"{flag} {path!r} does not exist or is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EvalConfigError(f"{flag} {path!r} has no config.json; is it a training run "
                              "directory?")
    from gce_jax.train import ConfigError, read_run_config
    try:
        read_run_config(path)
    except ConfigError as e:
        raise EvalConfigError(f"{flag}: {e}") from None
    from gce_jax import weights
    if weights.is_published(path):  # checked (sha256) when it is loaded
        return
    ckpts = [d for d in ("checkpoints", "checkpoints_best")
             if os.path.isdir(os.path.join(path, d)) and os.listdir(os.path.join(path, d))]
    if not ckpts:
        raise EvalConfigError(f"{flag} {path!r} has no checkpoint (expected "
                              f"{path}/checkpoints/<step>)")


def check_out_dir(path: str) -> None:
    """``out`` must be a directory that can be created or written; creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise EvalConfigError(f"--out {path!r} exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EvalConfigError(f"--out {path!r}: {parent!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise EvalConfigError(f"--out {path!r} is not writable ({parent}: {e.strerror})") from None


def prepare(workdir: str, eval_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Everything checkable without loading a model: the normalized config with
    ``run_name`` and ``out`` filled in. Raises EvalConfigError."""
    c = normalize_eval_config(eval_config)
    check_workdir(workdir, "--workdir")
    if c.reference_workdir is not None:
        check_workdir(c.reference_workdir, "--reference_workdir")
    c.run_name = c.run_name or os.path.basename(os.path.normpath(workdir))
    c.out = c.out or os.path.join("results", c.run_name)
    check_out_dir(c.out)
    return c


# ------------------------------------------------------------ loading
def load_model(workdir: str, selection: str | None = None, flag: str = "--workdir"):
    """``(model, variables, config)`` of a run or a published-weights folder."""
    from gce_jax import train, weights
    try:
        if weights.is_published(workdir):
            return weights.load_published(workdir)
        return train.load_for_eval(workdir, selection)
    except Exception as e:  # noqa: BLE001 -- any load failure is one clear error
        raise EvalConfigError(f"{flag} {workdir!r}: could not load the checkpoint: "
                              f"{cli.error_line(e)}") from None


def _load_reference(path: str, config) -> tuple[Any, str]:
    """``(logits_fn, name)`` of the transfer check's XE twin."""
    from gce_jax import models
    rmodel, rvars, rconfig = load_model(path, None, "--reference_workdir")
    if (rconfig.dataset, rconfig.model) != (config.dataset, config.model):
        raise EvalConfigError(
            f"--reference_workdir is {rconfig.model} on {rconfig.dataset}, but the model "
            f"under test is {config.model} on {config.dataset}; the transfer check needs "
            "the same architecture and data set")
    if rconfig.loss != "xe":
        print(f"warning: reference model was trained with {rconfig.loss!r}, not 'xe'",
              file=sys.stderr)
    return models.logits_fn(rmodel, rvars), os.path.basename(os.path.normpath(path))


def load_test_set(config, n: int, seed: int):
    """``(x, y, data_info)``: the run's test split, or a seeded random subset of ``n``."""
    import numpy as np

    from gce_jax import data as data_lib
    split = config.data.get("test_split", "test")
    try:
        ds = data_lib.load_config_split(config, split)
    except Exception as e:  # noqa: BLE001
        raise EvalConfigError(f"could not load the {config.dataset} {split} split: "
                              f"{type(e).__name__}: {e}") from None
    total = len(ds)
    if n >= total:
        idx = np.arange(total)
        selection = f"all {total} examples"
    else:
        # A seeded random subset: test splits may be ordered by class.
        idx = np.sort(np.random.default_rng(seed).permutation(total)[:n])
        selection = f"random subset of {n}/{total} (numpy default_rng({seed}))"
    info = {"dataset": ds.name, "class_names": ds.class_names, "split": split,
            "n": int(len(idx)), "total": total, "selection": selection,
            "origin": getattr(ds, "origin", "")}
    return ds.images[idx], ds.labels[idx], info


# ------------------------------------------------------------ attacks
def main_specs(c: ml_collections.ConfigDict, config) -> list:
    """The report's attack specs for resolved settings ``c`` on a run with ``config``."""
    from experiments.paper_numbers import default_jsma_gammas
    from gce_jax import robustness as R
    from gce_jax.attacks import ATTACKS
    specs = []
    pgd_kw = {"steps": c.pgd_steps, "step_size": c.pgd_step_size,
              "random_start": bool(config.eval.get("pgd_random_start", True))}
    stop = {"early_stop": True} if c.get("early_stop") else {}
    for attack, loss in (R.parse_attack_name(n, ATTACKS) for n in c.attacks):
        if attack == "jsma":
            specs += [R.paper_spec(attack, None, gamma=g, label=f"jsma (gamma={g:g})")
                      for g in default_jsma_gammas(config.dataset)]
            continue
        if attack in R.EPS_FREE_ATTACKS:
            # A reduced C&W budget (CPU runs) is recorded in the report's settings.
            cw = {k: v for k, v in (("binary_steps", c.cw_binary_steps),
                                    ("steps", c.cw_steps)) if v is not None}
            specs.append(R.paper_spec(attack, None, **cw))
            continue
        for e in c.eps:
            kw = dict(pgd_kw) if attack == "pgd" else {}
            if attack in EARLY_STOP_ATTACKS:
                kw.update(stop)
            if attack in ("apgd", "autoattack"):
                kw["steps"] = c.apgd_steps
            if attack in ("square", "autoattack"):
                kw["n_queries"] = c.square_queries
            specs.append(R.paper_spec(attack, e, loss=loss, **kw))
    return specs


def _diagnose(ev, c: ml_collections.ConfigDict, config, reference, results):
    """``(diagnostics JSON, their results, PNG bytes, verdict)``; all empty when off."""
    from gce_jax import plots
    from gce_jax import robustness as R
    if not c.diagnostics:
        return None, [], None, f"{R.VERDICT_INCONCLUSIVE}: diagnostics not run (--no_diagnostics)"
    dcfg = R.DiagnosticsConfig(
        eps=c.diag_eps, eps_grid=tuple(e for e in c.eps if e > 0) or (0.1,),
        pgd_steps=c.pgd_steps, pgd_step_size=c.pgd_step_size, apgd_steps=c.apgd_steps,
        square_queries=c.square_queries, restarts=c.restarts, model_loss=config.get("loss"))
    diag = R.run_diagnostics(ev, dcfg, reference_logits_fn=reference[0] if reference else None,
                             reference_name=reference[1] if reference else None,
                             extra_results=results)
    png = plots.render_accuracy_vs_eps(
        {f"PGD-xe ({c.pgd_steps} steps)": (diag.curve_eps, diag.curve_accuracy)},
        title=f"{c.run_name}: robust accuracy vs eps", zero_line=R.ZERO_ACC_MAX,
        marks=[diag.eps])
    diag.plot = PNG_NAME
    return diag.to_json(), diag.results, png, diag.verdict


def _model_info(config, c: ml_collections.ConfigDict, variables) -> dict[str, Any]:
    from gce_jax.checkpoint import variables_fingerprint
    training = config.get("training", {})
    return {
        "name": config.model, "dataset": config.dataset, "loss": config.get("loss"),
        "alpha": config.get("alpha"),
        "num_classes": config.get("resolved", {}).get("num_classes"),
        "selection": c.selection,
        "training_method": training.get("method", "standard"),
        "adversarial_training": bool(training.get("adversarial", {}).get("enabled", False)),
        "config_name": config.get("name"),
        "reference_workdir": c.reference_workdir,
        # Which weights were attacked: reuse (experiments.reproduce) compares it.
        "variables_sha256": variables_fingerprint(variables),
    }


def evaluate_checkpoint(workdir_or_weights: str, eval_config: Mapping[str, Any]) -> Report:
    """Attacks a run (``runs/<name>``) or published weights (``weights/<name>``) with the
    settings of ``eval_config`` (fields of ``experiments/configs/eval_default.py``), checks
    for gradient masking and writes ``robustness.json`` / ``.md`` (and the curve PNG) into
    ``eval_config.out``, atomically and only once every attack has finished.

    Bad input raises EvalConfigError before any attack runs and writes nothing.
    """
    import jax

    from gce_jax import models
    from gce_jax import robustness as R
    from gce_jax.attacks import ATTACKS
    from gce_jax.parallel import make_mesh
    from gce_jax.provenance import portable_path

    workdir = workdir_or_weights
    c = prepare(workdir, eval_config)
    model, variables, config = load_model(workdir, c.selection)
    reference = None if c.reference_workdir is None else _load_reference(c.reference_workdir,
                                                                          config)
    config_hash = eval_config_sha256(c, config)
    c = resolve_eval_config(c, config)
    x, y, data_info = load_test_set(config, c.n, c.seed)
    ev = R.Evaluator(models.logits_fn(model, variables), x, y, seed=c.seed,
                     batch_size=c.batch_size, mesh=make_mesh(jax.local_devices()[:c.devices]),
                     registry=ATTACKS, progress=c.progress)
    results = []
    try:
        for spec in main_specs(c, config):
            results.extend(ev.run(spec).with_components())
    except R.EvaluationError as e:
        raise EvalConfigError(str(e)) from None
    diag_json, diag_results, png, verdict = _diagnose(ev, c, config, reference, results)
    # The command names the settings as given (the run's defaults stay unnamed, so a
    # rerun resolves them the same way) and the out dir used.
    given = normalize_eval_config(eval_config)
    given.out = c.out
    document = R.build_report(
        run=c.run_name, workdir=portable_path(workdir),
        command=eval_command(workdir, given),
        eval_config_sha256=config_hash, model=_model_info(config, c, variables),
        data=data_info, evaluator=ev, results=results, diagnostics=diag_json,
        verdict=verdict, extra_results=diag_results)
    jpath, mpath = R.write_report(c.out, document,
                                  extra_files={PNG_NAME: png} if png else None)
    # What robustness.json holds (lists, floats, null), so a fresh report and a stored
    # one read back compare equal.
    return Report(json.loads(R.report_to_json(document)), jpath, mpath)


__all__ = ["NOT_HASHED", "PNG_NAME", "EvalConfigError", "Report", "check_out_dir",
           "check_workdir", "eval_command", "eval_flags", "eval_config_sha256", "evaluate_checkpoint",
           "get_eval_config", "load_model", "load_test_set", "main_specs",
           "normalize_eval_config", "prepare", "resolve_eval_config"]
