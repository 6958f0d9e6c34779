"""Tables 2-6: train the table's models, evaluate them, write the table.

Each ``tableN(args)`` takes ``experiments.reproduce``'s parsed arguments.
Evaluations live in ``results/evaluations/`` keyed by their settings (one
folder per kind: ``main-eps...``, ``jsma-cw-n...``, ``diag-eps...``), so the
tables share their models' reports instead of recomputing them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from experiments import paper_numbers as P
from experiments.targets.common import (ALPHAS, REDUCED, evaluate_run, header, make_run,
                                        train_run, write_outputs)
from experiments.targets.table_md import (attack_rows, attack_table_md, mean_std,
                                          pgd_table_md, success_table_md, verdicts_md)

# Paper's attack grids (Tables 3-6). eps for C&W is its confidence (kappa=0).
TABLE3_EPS = {"mnist": (0.1, 0.2, 0.3), "cifar10": (0.04, 0.12, 0.2),
              "cifar100": (0.04, 0.12, 0.2), "tiny_imagenet": (0.04, 0.12, 0.2)}
TABLE5_EPS = {"mnist": 0.2, "cifar10": 0.04}
SKIPPED_DIAG = "inconclusive: diagnostics skipped (--skip_diag)"


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


def slow_tag(args) -> str:
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
        reports["slow"] = evaluate_run(name, args.runs_dir, os.path.join(root, slow_tag(args)),
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
        rows = attack_rows(ds, table, reports, variants)
        diag_only = {v: r["diagnostics"] for v, r in reports.items()}
        sections += [f"## {ds}", ""] + attack_table_md(rows, variants, {
            v: {"diagnostics": r["diagnostics"]} for v, r in reports.items()}) + success_table_md(
            rows, variants) + verdicts_md(diag_only) + [""]
        payload[ds] = {"rows": [{"attack": a, "param": p, "cells": c} for a, p, c in rows],
                       "verdicts": {v: r["diagnostics"].get("verdict") for v, r in reports.items()},
                       "seeds": args.seeds[ds],
                       "reports": {v: {"main": [m.get("run") for m in r["main"]],
                                       **{k: rep.get("run") for k, rep in r.items()
                                          if k != "main"}}
                                   for v, r in reports.items()}}
    tag = slow_tag(args)
    reduced_cw = args.cw_binary_steps is not None or args.cw_steps is not None
    if args.skip_slow:
        slow_text = "JSMA and C&W-L2 were not run (`--skip_slow`)"
    else:
        slow_text = ("JSMA (targeted, logit Jacobian) and C&W-L2 (targeted average case, its "
                     f"own margin loss) on a seeded subset of {args.n_slow} (`--n_slow`), as "
                     "accuracy under attack (any misclassification counts; their targeted "
                     "success rates follow the table)"
                     + (f"; C&W budget **reduced** (`{tag}`: binary steps x Adam steps; "
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
        lines += pgd_table_md(ds, paper, cols, variants, steps_column)
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
