"""Reproduce one of the paper's results with one command.

    python -m experiments.reproduce --target table2 --datasets mnist
    python -m experiments.reproduce --target table3 --datasets mnist
    python -m experiments.reproduce --target fig2

Each target trains what it needs into ``runs/<run>`` (a finished run is
reused: training resumes from its last checkpoint and has nothing left to do),
evaluates through ``experiments.evaluation_api.evaluate_checkpoint`` (what
``experiments.evaluate`` runs: same attacks, same report format,
gradient-masking diagnostics included) and writes ``results/<target>/``:
``<target>.md`` (our number beside the paper's, same rows and columns),
``<target>.json`` and the PNGs.

Budgets: ``--budget paper`` uses the paper's schedules; ``--budget reduced``
uses the documented CPU budgets in ``REDUCED`` and labels every number
"reduced". ``--mock_data`` runs any target on ``tfds.testing.mock_data``
(smoke runs for data sets that cannot be downloaded here).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

from experiments import cli, figures, paper_numbers as P
from gce_jax.provenance import atomic_write, git_info, hardware_line, now_iso, write_json

ALPHAS = {"1/2": 0.5, "1/3": 1 / 3, "1/4": 0.25, "1/5": 0.2}
CONFIG_MODULES = {"mnist": "mnist_lenet5", "cifar10": "cifar10_resnet56",
                  "cifar100": "cifar100_resnet56", "tiny_imagenet": "tiny_imagenet_resnet50"}
LOCAL_DATA = {"mnist": "mnist", "cifar10": "cifar10-jpeg.tar.gz"}
TARGET_DATASETS = {"table2": ("mnist", "cifar10", "cifar100", "tiny_imagenet"),
                   "table3": ("mnist", "cifar10"), "table4": ("cifar100", "tiny_imagenet"),
                   "table5": ("mnist", "cifar10"), "table6": ("mnist", "cifar10"),
                   "fig1": ("mnist", "cifar10"), "fig4": ("mnist", "cifar10"),
                   "fig2": (), "fig3": ()}

# CPU budgets (2 cores). Every number produced under one is labelled reduced.
REDUCED: dict[tuple[str, str], dict[str, Any]] = {
    # MNIST natural training fits at the paper's budget (20 epochs).
    # LeNet-5 at eps 0.3 from scratch stayed at chance for 2 epochs without
    # the eps ramp (measured), so the reduced run warms the radius up.
    ("mnist", "adv"): {"epochs": 3, "training.adversarial.steps": 10,
                       "training.adversarial.step_size": 0.03,
                       "training.adversarial.eps_warmup_epochs": 1.0},
    # ResNet-20 takes ~7.5 min per epoch on 2 idle cores (more when shared).
    ("cifar10", "natural"): {"model": "resnet20", "epochs": 2,
                             "lr_schedule.boundaries_epochs": (1.5,)},
    # Adversarial training costs ~(1 + 0.7 x inner steps) natural epochs; one
    # epoch with a 2-step inner PGD (2 x 1.25 eps, random start) is what fits.
    ("cifar10", "adv"): {"model": "resnet20", "epochs": 1,
                         "lr_schedule.boundaries_epochs": (0.75,),
                         "training.adversarial.steps": 2,
                         "training.adversarial.step_size": 1.25 * (8 / 255)},
    ("cifar100", "natural"): {"model": "resnet20", "epochs": 1},
    ("tiny_imagenet", "natural"): {"epochs": 1},
}
# Paper's attack grids (Tables 3-6). eps for C&W is its confidence (kappa=0).
TABLE3_EPS = {"mnist": (0.1, 0.2, 0.3), "cifar10": (0.04, 0.12, 0.2),
              "cifar100": (0.04, 0.12, 0.2), "tiny_imagenet": (0.04, 0.12, 0.2)}
TABLE5_EPS = {"mnist": 0.2, "cifar10": 0.04}
SKIPPED_DIAG = "inconclusive: diagnostics skipped (--skip_diag)"


# ------------------------------------------------------------------ runs
def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def _fake_tiny_imagenet() -> str:
    """A miniature tiny-imagenet-200 (1 image per class, 32 val), made once per machine."""
    import tempfile
    from gce_jax.testing import write_fake_tiny_imagenet

    root = os.path.join(tempfile.gettempdir(), "gce_jax_mock", "tiny-imagenet-200")
    if not os.path.exists(os.path.join(root, "val", "val_annotations.txt")):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(root))
        write_fake_tiny_imagenet(os.path.join(tmp, "tiny-imagenet-200"), n_val=32)
        try:  # atomic: a concurrent run either sees a whole folder or makes its own
            os.rename(os.path.join(tmp, "tiny-imagenet-200"), root)
        except OSError:
            pass
    return root


def make_run(dataset: str, variant: str, *, seed: int, alpha_label: str | None, budget: str,
             data_root: str | None, mock: bool):
    """``(run_name, config)`` for one training run of a table."""
    module = importlib.import_module(f"experiments.configs.{CONFIG_MODULES[dataset]}")
    config = module.get_config(variant)
    name = config.name
    if alpha_label is not None and alpha_label != "1/3":
        config.alpha = ALPHAS[alpha_label]
        name += "_a" + alpha_label.replace("/", "-")
    config.seed = seed
    config.progress_bar = False
    if budget == "reduced":
        kind = "adv" if variant.startswith("adv") else "natural"
        base_model = config.model
        for k, v in REDUCED.get((dataset, kind), {}).items():
            _set(config, k, v)
        if REDUCED.get((dataset, kind)):
            # The run name says which model really trained (e.g. resnet20).
            name = name.replace(base_model, config.model) + "_reduced"
    if mock:
        config.data.source = "tfds"
        config.data.data_dir = None
        if dataset == "tiny_imagenet":  # not in tfds: a fake folder in the official layout
            config.data.source = "local"
            config.data.data_dir = _fake_tiny_imagenet()
        config.epochs = 1
        config.data.val_size = 8
        config.batch_size = 8
        config.eval_batch_size = 16
        name += "_mock"
    elif data_root and dataset in LOCAL_DATA:
        config.data.data_dir = os.path.join(data_root, LOCAL_DATA[dataset])
        config.data.source = "local"
    return f"{name}_s{seed}", config


def train_run(name: str, config, runs_dir: str) -> dict:
    from gce_jax.train import train_and_evaluate
    workdir = os.path.join(runs_dir, name)
    t0 = time.time()
    print(f"[reproduce] train {name} ({config.epochs} epochs)", flush=True)
    out = train_and_evaluate(config, workdir)
    out["wall_time_s"] = time.time() - t0
    return out


def run_fingerprint(workdir: str) -> str:
    """``variables_sha256`` of the checkpoint ``evaluate_checkpoint`` would load."""
    from gce_jax.checkpoint import variables_fingerprint
    from gce_jax.train import load_for_eval
    return variables_fingerprint(load_for_eval(workdir)[1])


def stored_config_hash(report: dict, run_config) -> str | None:
    """The report's ``eval_config_sha256``; for a report from before it had one
    (schema 2), the hash of the settings its command line gives (None if unreadable)."""
    if report.get("eval_config_sha256"):
        return report["eval_config_sha256"]
    from experiments import evaluate
    from experiments.evaluation_api import eval_config_sha256
    try:
        argv = shlex.split(report.get("command", ""))
    except ValueError:
        return None
    if argv[:3] != ["python", "-m", "experiments.evaluate"]:
        return None
    parser = evaluate.build_parser()

    def error(message: str):  # instead of printing and exiting
        raise ValueError(message)

    parser.error = error
    try:
        config = evaluate.eval_config_from_args(parser.parse_args(argv[3:]))
        return eval_config_sha256(config, run_config)
    except (ValueError, cli.UserError):
        return None


def why_not_reuse(report: dict, workdir: str, eval_config) -> str | None:
    """None if ``report`` is this evaluation of this run's weights, else the reason.

    Reused iff the settings' hash and the weights' ``variables_sha256`` match
    (where the report was written does not matter, so evaluation folders can be
    reorganised; a retrained model with the run's name, e.g. on a new machine
    where runs/ is empty, gets a new evaluation), and the records hold every
    setting the attacks have now (the hash covers the settings, not the code).
    """
    from experiments.evaluation_api import eval_config_sha256
    from gce_jax.train import load_config
    run_config = load_config(workdir)
    if stored_config_hash(report, run_config) != eval_config_sha256(eval_config, run_config):
        return "was computed with other settings"
    if not records_current_settings(report):
        return "predates a setting the attacks now have"
    if report.get("model", {}).get("variables_sha256") != run_fingerprint(workdir):
        return "was computed on other weights (or records none)"
    return None


def evaluate_run(name: str, runs_dir: str, out_dir: str, eval_config) -> dict:
    """``evaluate_checkpoint`` on one run with ``eval_config`` (a ConfigDict or a dict
    of its fields) into ``out_dir/<name>``; returns its report (reused if it matches)."""
    from experiments.evaluation_api import evaluate_checkpoint, get_eval_config
    config = get_eval_config(**dict(eval_config))
    config.out, config.progress = os.path.join(out_dir, name), False
    path = os.path.join(config.out, "robustness.json")
    workdir = os.path.join(runs_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        reason = why_not_reuse(report, workdir, config)
        if reason is None:
            print(f"[reproduce] reuse {path}", flush=True)
            return report
        print(f"[reproduce] {path} {reason}: evaluating again", flush=True)
    print(f"[reproduce] evaluate {name}: {_settings_line(config)}", flush=True)
    report = evaluate_checkpoint(workdir, config)
    print(f"[reproduce] wrote {report.json_path}; verdict ({name}): {report.verdict}",
          flush=True)
    return dict(report.document)


def _settings_line(config) -> str:
    """The eval settings that differ from the defaults, as the CLI would name them."""
    from experiments.evaluation_api import eval_flags
    return " ".join(shlex.quote(a) for a in eval_flags(config))


def records_current_settings(report: dict) -> bool:
    """Whether every record holds each setting its attack has now (``attack_spec``).

    A report from before an attack gained a setting (JSMA's ``margin``) ran
    code that no longer exists, with the same command line; it is not reused.
    ``example_offset`` is call plumbing (the evaluator passes each batch's),
    not a setting.
    """
    from gce_jax.attacks import ATTACKS, attack_spec
    not_settings = {"attack", "norm", "loss", "eps", "example_offset"}
    for r in report.get("results", []):
        if r.get("attack") in ATTACKS:
            now = set(attack_spec(r["attack"])) - not_settings
            if not now <= set(r.get("settings", {})):
                return False
    return True


# ----------------------------------------------------------- table helpers
def find_record(report: dict, attack: str, eps: float | None = None, *, loss: str | None = "xe",
                gamma: float | None = None) -> dict | None:
    for r in report.get("results", []):
        if r["attack"] != attack:
            continue
        if loss is not None and r.get("loss") not in (loss, None) and attack not in (
                "jsma", "carlini_wagner_l2"):
            continue
        if eps is not None and (r.get("eps") is None or not math.isclose(r["eps"], eps)):
            continue
        if gamma is not None and not math.isclose(r["settings"].get("gamma", -1), gamma):
            continue
        return r
    return None


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def verdict_mark(report: dict | None) -> str:
    if report is None:
        return ""
    v = report.get("verdict", "")
    if v.startswith("gradient masking suspected"):
        return " ⚠masking"
    if v.startswith("inconclusive"):
        return " (diag. inconclusive)"
    return ""


def write_outputs(out_dir: str, target: str, payload: dict, markdown: str) -> None:
    write_json(os.path.join(out_dir, f"{target}.json"), payload, sort_keys=True)
    atomic_write(os.path.join(out_dir, f"{target}.md"), markdown)
    print(markdown)


def _seeds_str(seeds: dict[str, list[int]]) -> str:
    if len({tuple(v) for v in seeds.values()}) <= 1:
        return str(next(iter(seeds.values()), []))
    return ", ".join(f"{ds} {v}" for ds, v in seeds.items())


def header(target: str, args, extra: str = "") -> str:
    import jax
    cmd = "python -m experiments.reproduce " + " ".join(shlex.quote(a) for a in args.argv)
    return (f"# {target}\n\nCommand: `{cmd}`  \nBudget: **{args.budget}**"
            f"{' (mock data: smoke run, numbers meaningless)' if args.mock_data else ''}; "
            f"seeds {_seeds_str(args.seeds)}; hardware: {hardware_line()}; jax {jax.__version__}; "
            f"git {git_info().get('commit', '?')[:10]}"
            f"; written {now_iso()}.\n{extra}\n")


# ------------------------------------------------------------------ targets
def table2(args) -> None:
    rows, payload = [], {"runs": {}}
    models = [("xe", None)] + [("gce", a) for a in ALPHAS]
    for ds in args.datasets:
        cells = {}
        for variant, alpha in models:
            errs = []
            for seed in args.seeds[ds]:
                name, config = make_run(ds, variant, seed=seed, alpha_label=alpha,
                                        budget=args.budget, data_root=args.data_root,
                                        mock=args.mock_data)
                res = train_run(name, config, args.runs_dir)
                payload["runs"][name] = res
                errs.append(100.0 * (1.0 - res["test_acc"]))
            key = "xe" if variant == "xe" else f"gce_{alpha}"
            cells[key] = errs
        paper = P.TABLE2_ERROR[ds]
        reduced = args.budget == "reduced" and (ds, "natural") in REDUCED
        label = ds + (" (reduced)" if reduced else "") + (" (mock)" if args.mock_data else "")
        rows.append((label, cells, paper))
    lines = ["| Model | " + " | ".join(f"{r[0]} ours | {r[0]} paper" for r in rows) + " |",
             "|---" * (1 + 2 * len(rows)) + "|"]
    for key, title in [("xe", "Baseline (XE)")] + [(f"gce_{a}", f"GCE α={a}") for a in ALPHAS]:
        lines.append(f"| {title} | " + " | ".join(
            f"{mean_std(r[1][key])} | {r[2][key]}" for r in rows) + " |")
    md = header("Table 2: clean test error (%)", args,
                "\nSelection: the run's config (`best_val` on a held-out split of the training "
                "set for MNIST/CIFAR; never the test set). Mean ± std over seeds where more "
                "than one.\n") + "\n".join(lines) + "\n"
    payload["table"] = {r[0]: {"ours": r[1], "paper": r[2]} for r in rows}
    write_outputs(args.out_dir, "table2", payload, md)


def _eval_config_main(ds: str, eps: Sequence[float], args) -> dict[str, Any]:
    return {"attacks": ("fgsm", "bim", "pgd", "mim"), "eps": tuple(eps), "n": args.n,
            "diagnostics": False, "seed": args.eval_seed}


def _eval_config_slow(args) -> dict[str, Any]:
    """JSMA and C&W-L2 on ``--n_slow``; a reduced C&W budget when asked for."""
    return {"attacks": ("jsma", "carlini_wagner_l2"), "n": args.n_slow, "diagnostics": False,
            "seed": args.eval_seed, "cw_binary_steps": args.cw_binary_steps,
            "cw_steps": args.cw_steps}


def _eval_config_diag(eps: Sequence[float], diag_eps: float, attacks: Sequence[str],
                      args, reference: str | None = None) -> dict[str, Any]:
    """The gradient-masking diagnostics on ``--n_diag`` at ``diag_eps``."""
    return {"attacks": tuple(attacks), "eps": tuple(eps), "n": args.n_diag,
            "diag_eps": diag_eps, "seed": args.eval_seed, "restarts": args.restarts,
            "square_queries": args.square_queries, "reference_workdir": reference}


def _slow_tag(args) -> str:
    """``jsma-cw-n1000``; a reduced C&W budget is part of the name (``...-cw5x200``)."""
    from gce_jax.attacks.defaults import ATTACK_DEFAULTS
    paper = ATTACK_DEFAULTS["carlini_wagner_l2"]
    tag = f"jsma-cw-n{args.n_slow}"
    if args.cw_binary_steps is not None or args.cw_steps is not None:
        tag += (f"-cw{args.cw_binary_steps or paper['binary_steps']}"
                f"x{args.cw_steps or paper['steps']}")
    return tag


def _eps_tag(eps: Sequence[float]) -> str:
    return "eps" + "-".join(f"{e:g}" for e in eps)


def _eval_main(name: str, ds: str, args) -> dict:
    """FGSM/BIM/PGD/MIM at Table 3's radii on ``--n`` test images."""
    eps = TABLE3_EPS[ds]
    return evaluate_run(name, args.runs_dir, os.path.join(args.eval_dir, f"main-{_eps_tag(eps)}"),
                        _eval_config_main(ds, eps, args))


def _eval_all(name: str, ds: str, args, *, slow: bool, reference: str | None = None) -> dict:
    """Main table (all ``--n``), JSMA/C&W (``--n_slow``) and diagnostics (``--n_diag``).

    Evaluations live in ``results/evaluations/`` keyed by their arguments, so
    Tables 3 and 5 share the XE and GCE models' reports instead of recomputing.
    """
    root = args.eval_dir
    eps = TABLE3_EPS[ds]
    reports = {"main": _eval_main(name, ds, args)}
    if slow:
        # Keyed by the subset size too: a run on another --n_slow must not
        # overwrite this one's report.
        reports["slow"] = evaluate_run(name, args.runs_dir, os.path.join(root, _slow_tag(args)),
                                       _eval_config_slow(args))
    if args.skip_diag:
        reports["diagnostics"] = {"verdict": SKIPPED_DIAG}
        return reports
    diag_eps = TABLE5_EPS[ds]
    diag = _eval_config_diag(eps, diag_eps, ("fgsm", "bim", "pgd"), args,
                             os.path.join(args.runs_dir, reference) if reference else None)
    reports["diagnostics"] = evaluate_run(name, args.runs_dir,
                                          os.path.join(root, f"diag-{_eps_tag([diag_eps])}"), diag)
    return reports


def _eval_pgd_table(name: str, sub: str, eps: Sequence[float], args, attacks: str) -> dict:
    """Main numbers on ``--n`` images plus diagnostics on ``--n_diag``, one report each."""
    root = os.path.join(args.eval_dir, sub)
    main = evaluate_run(name, args.runs_dir, os.path.join(root, f"main-{_eps_tag(eps)}"),
                        {**_eval_config_main("", eps, args), "attacks": attacks})
    if args.skip_diag:
        main["verdict"] = SKIPPED_DIAG
        return main
    diag = evaluate_run(name, args.runs_dir, os.path.join(root, f"diag-{_eps_tag(eps[:1])}"),
                        _eval_config_diag(eps, eps[0], ("fgsm", "bim", "pgd"), args))
    main["verdict"] = diag.get("verdict")
    return main


def _attack_rows(ds: str, target_table: dict, reports: dict[str, dict], columns: Sequence[str]):
    """Rows (attack, param, {column: (ours, paper)}) for Tables 3 and 5."""
    rows = []
    for (attack, param), paper_vals in target_table[ds].items():
        cells = {}
        for col, paper_v in zip(columns, paper_vals):
            rep = reports.get(col)
            recs = []
            if rep is not None:
                if attack in ("fgsm", "bim", "pgd", "mim"):
                    recs = [find_record(m, attack, param) for m in rep["main"]]
                elif attack == "jsma" and "slow" in rep:
                    recs = [find_record(rep["slow"], "jsma", gamma=param)]
                elif attack == "cw" and "slow" in rep:
                    recs = [find_record(rep["slow"], "carlini_wagner_l2")]
            recs = [r for r in recs if r is not None]
            values = [r["robust_accuracy"] for r in recs]
            # (mean over seeds, paper, n, one value per seed, success and
            # distortion of the first seed's record)
            cells[col] = (float(np.mean(values)) if values else None, paper_v,
                          recs[0]["n"] if recs else None, values,
                          {k: recs[0].get(k) for k in SUCCESS_FIELDS} if recs else None)
        rows.append((attack, param, cells))
    return rows


SUCCESS_FIELDS = ("targeted", "success_rate", "num_success", "mean_l0", "mean_l2")
# The distortion each minimum-norm attack minimises.
_DISTORTION = {"jsma": ("mean_l0", "L0", ".1f"), "cw": ("mean_l2", "L2", ".3f")}


def _success_table_md(rows, columns) -> list[str]:
    """JSMA and C&W: targeted success rate and distortion over the successes."""
    rows = [r for r in rows if r[0] in _DISTORTION]
    if not rows:
        return []
    lines = ["", "JSMA and C&W-L2 above report the paper's *accuracy under attack* (any "
             "misclassification counts). Here: the share of the clean-correct examples "
             "classified as the attack's target, and the mean distortion over those "
             "successes (L0 = features changed):", "",
             "| Attack | Param | " + " | ".join(
                 f"{c.upper()} target reached % | {c.upper()} mean distortion" for c in columns)
             + " | n |", "|---" * (3 + 2 * len(columns)) + "|"]
    for attack, param, cells in rows:
        field, norm, fmt = _DISTORTION[attack]
        out = []
        for c in columns:
            rec = cells[c][4] or {}
            d = rec.get(field)
            out += [pct(rec.get("success_rate")) if rec.get("targeted") else "n/a",
                    "n/a" if d is None else f"{norm} {d:{fmt}}"]
        n = max((c[2] or 0) for c in cells.values())
        pname = {"jsma": "γ", "cw": "κ"}[attack]
        lines.append(f"| {attack.upper()} | {pname}={param:g} | " + " | ".join(out) + f" | {n} |")
    return lines


def _cell_md(values: Sequence[float]) -> str:
    """One seed: ``46.85``; several: ``46.85 ± 1.20`` (sample std, in percent)."""
    return mean_std([100 * v for v in values]) if values else "n/a"


def _attack_table_md(rows, columns, reports) -> list[str]:
    lines = ["| Attack | Param | " + " | ".join(
        f"{c.upper()} ours{verdict_mark(reports.get(c, {}).get('diagnostics'))} | {c.upper()} paper"
        for c in columns) + " | n |", "|---" * (3 + 2 * len(columns)) + "|"]
    for attack, param, cells in rows:
        pname = {"jsma": "γ", "cw": "κ"}.get(attack, "ε")
        n = max((c[2] or 0) for c in cells.values())
        lines.append(f"| {attack.upper()} | {pname}={param:g} | " + " | ".join(
            f"{_cell_md(cells[c][3])} | {cells[c][1]}" for c in columns) + f" | {n} |")
    return lines


def _verdicts_md(reports: dict[str, dict]) -> list[str]:
    out = ["", "Gradient-masking diagnostics (on the diagnostics subset):", ""]
    for col, rep in reports.items():
        d = rep.get("diagnostics") or rep  # --skip_diag leaves only a verdict
        best = d.get("best_robust") or []
        worst = min((b.get("robust_accuracy", 1.0) for b in best), default=None) if best else None
        out.append(f"- {col.upper()}: {d.get('verdict')}"
                   + (f"; per-example worst case over all attacks: {pct(worst)}%" if worst is not None else ""))
    return out


def _natural_attack_target(target: str, args, variants: Sequence[str], table: dict) -> None:
    payload, sections = {}, []
    for ds in args.datasets:
        reports = {}
        for variant in variants:
            # FGSM/BIM/PGD/MIM on every seed; JSMA/C&W and the diagnostics,
            # which cost far more, on the first seed's model only.
            mains = []
            for i, seed in enumerate(args.seeds[ds]):
                name, config = make_run(ds, variant, seed=seed, alpha_label=None,
                                        budget=args.budget, data_root=args.data_root,
                                        mock=args.mock_data)
                train_run(name, config, args.runs_dir)
                if i == 0:
                    xe_name = make_run(ds, "xe", seed=seed, alpha_label=None, budget=args.budget,
                                       data_root=args.data_root, mock=args.mock_data)[0]
                    first = _eval_all(name, ds, args, slow=not args.skip_slow,
                                      reference=xe_name if variant != "xe" else None)
                    mains.append(first["main"])
                else:
                    mains.append(_eval_main(name, ds, args))
            reports[variant] = {**first, "main": mains}
        rows = _attack_rows(ds, table, reports, variants)
        diag_only = {v: r["diagnostics"] for v, r in reports.items()}
        sections += [f"## {ds}", ""] + _attack_table_md(rows, variants, {
            v: {"diagnostics": r["diagnostics"]} for v, r in reports.items()}) + _success_table_md(
            rows, variants) + _verdicts_md(diag_only) + [""]
        payload[ds] = {"rows": [{"attack": a, "param": p, "cells": c} for a, p, c in rows],
                       "verdicts": {v: r["diagnostics"].get("verdict") for v, r in reports.items()},
                       "seeds": args.seeds[ds],
                       "reports": {v: {"main": [m.get("run") for m in r["main"]],
                                       **{k: rep.get("run") for k, rep in r.items()
                                          if k != "main"}}
                                   for v, r in reports.items()}}
    slow_tag = _slow_tag(args)
    reduced_cw = args.cw_binary_steps is not None or args.cw_steps is not None
    if args.skip_slow:
        slow_text = "JSMA and C&W-L2 were not run (`--skip_slow`)"
    else:
        slow_text = ("JSMA (targeted, logit Jacobian) and C&W-L2 (targeted average case, its "
                     f"own margin loss) on a seeded subset of {args.n_slow} (`--n_slow`), as "
                     "accuracy under attack (any misclassification counts; their targeted "
                     "success rates follow the table)"
                     + (f"; C&W budget **reduced** (`{slow_tag}`: binary steps x Adam steps; "
                        "paper 9 x 1000)" if reduced_cw else ""))
    md = header(f"{target}: accuracy (%) under white-box attacks", args,
                "\nAll FGSM/BIM/PGD/MIM numbers attack the **cross-entropy** loss (the paper's "
                "Eqs. 4-7), untargeted, on `--n` test images; " + slow_text
                + (". Where a data set has several training seeds, its FGSM/BIM/PGD/MIM cells "
                   "are mean ± std over them (sample std); JSMA, C&W and the diagnostics used "
                   "the first seed's model"
                   if max(len(args.seeds[d]) for d in args.datasets) > 1 else "")
                + ". ⚠masking marks a model whose diagnostics flag gradient masking: its "
                "numbers are upper bounds, not robustness. Per-attack settings are in "
                f"`{args.eval_dir}/*/<run>/robustness.json`.\n") + "\n".join(sections)
    write_outputs(args.out_dir, target, payload, md)


def table3(args) -> None:
    _natural_attack_target("table3", args, ("xe", "gce"), P.TABLE3_ACC)


def table5(args) -> None:
    _natural_attack_target("table5", args, ("xe", "cot", "gce"), P.TABLE5_ACC)


def _pgd_table_md(ds: str, paper: dict, cols: dict[str, dict], variants: Sequence[str],
                  steps_column: bool = False) -> list[str]:
    """Markdown rows 'PGD | eps | XE ours | XE paper | GCE ours | GCE paper' (Tables 4, 6)."""
    head = "| Attack | ε | XE ours | XE paper | GCE ours | GCE paper |"
    lines = [f"## {ds}", "", head + (" PGD steps |" if steps_column else ""),
             "|---" * (6 + steps_column) + "|"]
    for (_, eps), paper_vals in paper[ds].items():
        cells = []
        for v, paper_v in zip(variants, paper_vals):
            rec = find_record(cols[v], "pgd", eps)
            cells += [f"{pct(rec and rec['robust_accuracy'])}{verdict_mark(cols[v])}", str(paper_v)]
        row = f"| PGD | {eps:g} | " + " | ".join(cells) + " |"
        if steps_column:
            rec = find_record(cols[variants[0]], "pgd", eps)
            row += f" {rec['settings'].get('steps') if rec else '?'} |"
        lines.append(row)
    lines += ["", "Verdicts: " + "; ".join(f"{'GCE' if 'gce' in v else 'XE'}: "
                                            f"{cols[v].get('verdict')}" for v in variants), ""]
    return lines


def _pgd_target(args, target: str, variants: Sequence[str], paper: dict, attacks: str,
                title: str, note: str = "", steps_column: bool = False) -> None:
    """Tables 4 and 6: train XE and GCE (or their adversarial versions), PGD + diagnostics."""
    payload, lines = {}, []
    for ds in args.datasets:
        cols = {}
        for variant in variants:
            name, config = make_run(ds, variant, seed=args.seeds[ds][0], alpha_label=None,
                                    budget=args.budget, data_root=args.data_root,
                                    mock=args.mock_data)
            train_run(name, config, args.runs_dir)
            eps = [e for (_, e) in paper[ds]]
            cols[variant] = _eval_pgd_table(name, target, eps, args, attacks)
        lines += _pgd_table_md(ds, paper, cols, variants, steps_column)
        payload[ds] = {v: r.get("run") for v, r in cols.items()}
    write_outputs(args.out_dir, target, payload, header(title, args, note) + "\n".join(lines))


def table4(args) -> None:
    _pgd_target(args, "table4", ("xe", "gce"), P.TABLE4_ACC, "pgd", "Table 4: PGD accuracy (%)")


def table6(args) -> None:
    _pgd_target(args, "table6", ("adv_xe", "adv_gce"), P.TABLE6_ACC, "fgsm,bim,pgd",
                "Table 6: PGD accuracy (%) after PGD adversarial training",
                "\nInner maximisation: PGD on cross-entropy; outer loss XE or GCE "
                "(α=1/3). Evaluation: PGD on cross-entropy with the config's steps "
                "(MNIST 100, CIFAR-10 40).\n", steps_column=True)


def tsne_target(target: str, args) -> None:
    import jax
    from gce_jax import data as data_lib
    from gce_jax.train import load_for_eval
    variants = ("xe", "gce") if target == "fig1" else ("adv_xe", "adv_gce")
    payload = {}
    for ds in args.datasets:
        feats, labels = {}, None
        for variant in variants:
            name, config = make_run(ds, variant, seed=args.seeds[ds][0], alpha_label=None,
                                    budget=args.budget, data_root=args.data_root,
                                    mock=args.mock_data)
            train_run(name, config, args.runs_dir)
            model, variables, config = load_for_eval(os.path.join(args.runs_dir, name))
            test = data_lib.load_config_split(config, "test")
            idx = np.random.default_rng(args.eval_seed).permutation(len(test))[:args.n_tsne]
            x = test.images[idx].astype(np.float32) / 255.0
            apply = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True)[1])
            feats[variant.upper()] = np.concatenate(
                [np.asarray(apply(variables, x[i:i + 500])) for i in range(0, len(x), 500)])
            labels = test.labels[idx]
        os.makedirs(args.out_dir, exist_ok=True)
        payload[ds] = figures.tsne_figure(feats, labels, os.path.join(args.out_dir, f"{target}_{ds}.png"),
                                          seed=args.eval_seed, title=ds)
    lines = ["| data set | model | silhouette (t-SNE) | silhouette (features) |", "|---|---|---|---|"]
    for ds, p in payload.items():
        for m, s in p["scores"].items():
            lines.append(f"| {ds} | {m} | {s['silhouette_tsne']:.3f} | {s['silhouette_features']:.3f} |")
    write_outputs(args.out_dir, target, payload, header(
        f"{target}: t-SNE of penultimate features", args,
        f"\n{args.n_tsne} random test images; silhouette score by true class (higher = more "
        "separated clusters), the measurable version of the paper's visual claim.\n") + "\n".join(lines))


def fig2(args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    out = figures.figure2(args.out_dir)
    lines = ["| panel | min loss | low-loss area (fraction of simplex) | low-loss area predicting class 0 | loss range along X=Y |",
             "|---|---|---|---|---|"]
    for k, v in out["panels"].items():
        lines.append(f"| {k} | {v['min_loss']:.4f} | {v['low_loss_area_fraction']:.4f} | "
                     f"{v['low_loss_fraction_predicting_class0']:.3f} | {v['diagonal_loss_range']:.3f} |")
    write_outputs(args.out_dir, "fig2", out, header(
        "Figure 2: loss landscapes on the 3-class simplex", args,
        f"\n![fig2](fig2_landscapes.png)\n\nLow loss = within {figures.LOW_LOSS_BAND} of the "
        "minimum. Class 0 is the label; shaded = class 0 predicted.\n") + "\n".join(lines) + "\n")


def fig3(args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    out = figures.figure3(args.out_dir)
    lines = ["| α | GCE at p_g=0.1 | GCE at p_g→1 |", "|---|---|---|"]
    for k, v in out["curves"].items():
        lines.append(f"| {k} | {v['loss_at_pg_0.1']:.4f} | {v['loss_at_pg_0.999999']:.4f} |")
    write_outputs(args.out_dir, "fig3", out, header(
        "Figure 3: GCE along X = Y", args, "\n![fig3](fig3_profile.png)\n") + "\n".join(lines) + "\n")


TARGETS = {"table2": table2, "table3": table3, "table4": table4, "table5": table5,
           "table6": table6, "fig1": lambda a: tsne_target("fig1", a),
           "fig4": lambda a: tsne_target("fig4", a), "fig2": fig2, "fig3": fig3}


def parse_seeds(specs: Sequence[str], datasets: Sequence[str]) -> dict[str, list[int]]:
    """``["0,1,2", "cifar10=0"]`` -> ``{"mnist": [0, 1, 2], "cifar10": [0]}``.

    Per-data-set seeds let one table mix 3 MNIST seeds with 1 CIFAR-10 seed,
    which is what the CPU budget affords.
    """
    default, override = [0], {}
    for spec in specs:
        ds, _, seeds = spec.rpartition("=")
        try:
            values = [int(v) for v in seeds.split(",")]
        except ValueError:
            raise ValueError(f"{spec!r} is not a comma list of integers") from None
        if ds and ds not in datasets:
            raise ValueError(f"{ds!r} is not one of this run's data sets {list(datasets)}")
        if len(set(values)) != len(values):
            raise ValueError(f"{spec!r} repeats a seed")
        if ds:
            override[ds] = values
        else:
            default = values
    return {ds: override.get(ds, default) for ds in datasets}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    p.add_argument("--datasets", default=None, help="comma list (default: all of the target's)")
    p.add_argument("--budget", choices=("paper", "reduced"), default="paper")
    p.add_argument("--seeds", action="append", default=None, metavar="[DATASET=]S,S,...",
                   help="training seeds, a comma list (default 0); repeat with a DATASET= "
                        "prefix to override one data set, e.g. --seeds 0,1,2 --seeds cifar10=0")
    p.add_argument("--runs_dir", default="runs")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--data_root", default=os.path.join("..", "shared", "data"),
                   help="folder with offline copies (mnist/, cifar10-jpeg.tar.gz); '' for tfds")
    p.add_argument("--mock_data", action="store_true", help="tfds.testing.mock_data smoke run")
    p.add_argument("--n", type=int, default=10000, help="test images for FGSM/BIM/PGD/MIM")
    p.add_argument("--n_slow", type=int, default=1000, help="test images for JSMA and C&W")
    p.add_argument("--n_diag", type=int, default=1000, help="test images for the diagnostics")
    p.add_argument("--n_tsne", type=int, default=2000)
    p.add_argument("--skip_slow", action="store_true", help="no JSMA/C&W")
    p.add_argument("--skip_diag", action="store_true",
                   help="no masking diagnostics (smoke runs only: the verdicts then read "
                        "'inconclusive')")
    p.add_argument("--cw_binary_steps", type=int, default=None,
                   help="reduced C&W-L2 budget (default: the paper's 9 binary steps)")
    p.add_argument("--cw_steps", type=int, default=None,
                   help="reduced C&W-L2 budget (default: the paper's 1000 steps)")
    p.add_argument("--eval_seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--square_queries", type=int, default=5000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    cli.set_log_verbosity(args.verbosity)
    known = TARGET_DATASETS[args.target]
    args.datasets = args.datasets.split(",") if args.datasets else list(known)
    bad = [d for d in args.datasets if d not in known]
    if bad:
        print(f"error: {args.target} covers {list(known)}, not {bad}", file=sys.stderr)
        return 2
    try:
        args.seeds = parse_seeds(args.seeds or ["0"], args.datasets)
    except ValueError as e:
        print(f"error: --seeds: {e}", file=sys.stderr)
        return 2
    for flag in ("n", "n_slow", "n_diag", "n_tsne", "restarts", "square_queries",
                 "cw_binary_steps", "cw_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    args.data_root = args.data_root or None
    root = os.path.join(args.results_dir, "mock") if args.mock_data else args.results_dir
    args.out_dir = os.path.join(root, args.target)
    args.eval_dir = os.path.join(root, "evaluations")
    for flag in ("runs_dir", "results_dir"):
        path = getattr(args, flag)
        if os.path.exists(path) and not os.path.isdir(path):
            print(f"error: --{flag} {path!r} exists and is not a directory", file=sys.stderr)
            return 2

    def run() -> int:
        ctx = contextlib.nullcontext()
        if args.mock_data:
            import tensorflow_datasets as tfds
            ctx = tfds.testing.mock_data(num_examples=64)
        with ctx:
            TARGETS[args.target](args)
        return 0

    return cli.run_reporting_errors(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
