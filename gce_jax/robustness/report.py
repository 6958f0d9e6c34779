"""The robustness report: ``robustness.json`` and ``robustness.md``.

:func:`build_report` assembles the document (keys :data:`REPORT_KEYS`, one
record per attack with the evaluator's ``RECORD_KEYS``) from an evaluator, its
results and the diagnostics' JSON; :func:`report_to_json` and
:func:`report_to_markdown` render it, every markdown table through
:func:`markdown_table`; :func:`write_report` writes both files atomically.

The top module of :mod:`gce_jax.robustness`: it may import the other three,
and none of them imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from gce_jax.provenance import atomic_write, git_info, hardware_info, now_iso
from gce_jax.robustness.diagnostics import FAIL
from gce_jax.robustness.evaluator import AttackResult, Evaluator, best_robust
from gce_jax.robustness.specs import EvaluationError, to_jsonable

# 2: success_rate / num_success / targeted / mean_l0 added; mean_l2 is over
# the successful examples (v1: over all examples, failures counted as 0).
# 3: eval_config_sha256 added (the settings' hash that reuse compares).
SCHEMA_VERSION = 3

# Top-level keys of robustness.json. Tests pin these: downstream tables and
# plots parse the file, so change them only with a SCHEMA_VERSION bump.
REPORT_KEYS = (
    "schema_version", "run", "workdir", "created", "command", "eval_config_sha256", "git",
    "hardware",
    "model", "data", "seed", "batch_size", "clean_accuracy", "results",
    "best_robust", "diagnostics", "verdict",
)

# Columns of an attack row (main table and the diagnostics' attacks).
ATTACK_COLUMNS = ("attack", "threat", "norm", "eps", "loss", "robust acc %", "success %",
                  "mean L0", "mean L2", "n", "settings", "time s")


def build_report(*, run: str, workdir: str, command: str, model: Mapping[str, Any],
                 data: Mapping[str, Any], evaluator: Evaluator,
                 results: Sequence[AttackResult], diagnostics: Mapping[str, Any] | None,
                 verdict: str, extra_results: Sequence[AttackResult] = (),
                 eval_config_sha256: str | None = None) -> dict[str, Any]:
    """The robustness.json document (keys: REPORT_KEYS, records: RECORD_KEYS).

    ``extra_results`` (e.g. the diagnostics' attacks) join ``best_robust``
    but not the ``results`` table. ``eval_config_sha256`` identifies the
    settings (``experiments.evaluation_api.eval_config_sha256``); None when
    the caller has no such config.
    """
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "workdir": workdir,
        "created": now_iso(),
        "command": command,
        "eval_config_sha256": eval_config_sha256,
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
    """The report as indented JSON (non-finite floats as null); checks its keys."""
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise EvaluationError(f"report is missing keys {missing}")
    return json.dumps(to_jsonable(dict(report)), indent=2, allow_nan=False) + "\n"


# ----------------------------------------------------------------------- markdown
def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table: header, separator, one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _eps_str(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def success_cell(r: Mapping[str, Any]) -> str:
    """``62.50 t`` for a targeted success rate, ``62.50`` otherwise (``n/a`` if absent)."""
    return _pct(r.get("success_rate")) + (" t" if r.get("targeted") else "")


def record_cells(r: Mapping[str, Any]) -> list[str]:
    """One attack record as the cells of :data:`ATTACK_COLUMNS`."""
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
    src = r["threat"] + ("" if r["source"] == "self" else f" from {r['source']}")
    return [r["label"], src, r["norm"], _eps_str(r["eps"]), str(r["loss"]),
            _pct(r["robust_accuracy"]), success_cell(r), _num(r.get("mean_l0"), ".1f"),
            _num(r.get("mean_l2"), ".4f"), str(r["n"]), settings, f"{r['wall_time_s']:.1f}"]


def _header_markdown(report: Mapping[str, Any]) -> list[str]:
    m, d, g, hw = report["model"], report["data"], report["git"], report["hardware"]
    alpha = (f" (alpha={m['alpha']})"
             if m.get("alpha") is not None and m.get("loss") == "gce" else "")
    return [
        f"# Robustness report: {report['run']}",
        "",
        f"- workdir: `{report['workdir']}`",
        f"- model: {m.get('name')} trained with {m.get('loss')}{alpha} on {d.get('dataset')}",
        f"- data: {d.get('split')} split, n={d.get('n')} ({d.get('selection')})",
        f"- clean accuracy: {_pct(report['clean_accuracy'])}%",
        f"- seed: {report['seed']}, batch size: {report['batch_size']}",
        f"- created: {report['created']}; git {g.get('commit')}"
        + (" (dirty)" if g.get("dirty") else ""),
        f"- hardware: {hw.get('platform')} x{hw.get('num_devices')} ({hw.get('device_kind')})",
        f"- command: `{report['command']}`",
    ]


_ATTACKS_INTRO = [
    "Robust accuracy = correctly classified both clean and after the attack. "
    "`loss` is the objective the attack maximised.",
    "",
    "Success = share of the clean-correct examples the attack fooled: for a targeted "
    "attack (marked `t`: JSMA, C&W) those classified as *its target*, otherwise those "
    "misclassified. Robust accuracy counts any misclassification, also for the targeted "
    "attacks (the paper's \"accuracy under attack\"). Mean L0 (features changed) and "
    "mean L2 are over the successful examples only.",
]


def _worst_case_markdown(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [[g["norm"], _eps_str(g["eps"]), _pct(g["robust_accuracy"]),
             _pct(g["strongest_single"]), ", ".join(g["attacks"])] for g in groups]
    return ["## Worst case over attacks (per example)", "",
            "An example counts as robust only if it survives every attack listed.", "",
            *markdown_table(("norm", "eps", "robust acc %", "strongest single %", "attacks"),
                            rows)]


def diagnostics_markdown(diag: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the diagnostics section of robustness.md."""
    curve = diag["curve"]
    lines = ["## Gradient-masking diagnostics", "",
             f"Checks 2-6 at L_inf eps = {diag['eps']:g} ({diag['eps_choice']}).", "",
             f"Accuracy vs eps (PGD-xe, {curve['steps']} steps, step {curve['step_size']}):",
             "",
             *markdown_table(["eps", *(f"{e:g}" for e in curve["eps"])],
                             [["robust acc %",
                               *(f"{100 * a:.2f}" for a in curve["robust_accuracy"])]]),
             ""]
    if curve.get("plot"):
        lines += [f"![accuracy vs eps]({curve['plot']})", ""]
    lines += markdown_table(("check", "status", "detail"),
                            [[c["name"], c["status"].upper() if c["status"] == FAIL
                              else c["status"], c["message"]] for c in diag["checks"]])
    if diag["records"]:
        lines += ["", "Diagnostic attacks:", "",
                  *markdown_table(ATTACK_COLUMNS, map(record_cells, diag["records"]))]
    if diag["errors"]:
        lines += ["", "Attacks that failed to run:", ""]
        lines += [f"- {k}: {v}" for k, v in diag["errors"].items()]
    return lines


def report_to_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable report; the last line is the verdict."""
    lines = [*_header_markdown(report), "", "## Attacks", "", *_ATTACKS_INTRO, "",
             *markdown_table(ATTACK_COLUMNS, map(record_cells, report["results"]))]
    if report["best_robust"]:
        lines += ["", *_worst_case_markdown(report["best_robust"])]
    if report.get("diagnostics"):
        lines += ["", *diagnostics_markdown(report["diagnostics"])]
    lines += ["", f"**Verdict ({report['run']}): {report['verdict']}**", ""]
    return "\n".join(lines)


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


__all__ = ["ATTACK_COLUMNS", "REPORT_KEYS", "SCHEMA_VERSION", "build_report",
           "diagnostics_markdown", "markdown_table", "record_cells", "report_to_json",
           "report_to_markdown", "success_cell", "write_report"]
