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
from experiments.targets.common import (ALPHAS, REDUCED, evaluate_run, header, load_recipe,
                                        train_cell, write_outputs)
from experiments.targets.table_md import (attack_rows, attack_table_md, mean_std,
                                          pgd_table_md, success_table_md, verdicts_md)

# Table 5's single radius; Table 3's grids are paper_numbers.PAPER_EPS.
TABLE5_EPS = {"mnist": 0.2, "cifar10": 0.04}
SKIPPED_DIAG = "inconclusive: diagnostics skipped (--skip_diag)"
NOT_IN_PAPER = "—"  # the paper cell of a data set the paper did not use


def table_eps(ds: str, args) -> tuple[float, ...]:
    """Table 3's radii: the paper's for its data sets; for a user's data set, its
    recipe's ``eval.pgd_eps`` (the xe variant's)."""
    if ds in P.PAPER_EPS:
        return P.PAPER_EPS[ds]
    return tuple(load_recipe(ds, args.recipes.get(ds)).get_config("xe").eval.pgd_eps)


def diag_eps(ds: str, args) -> float:
    """Table 5's radius (where the diagnostics run); for a user's data set the middle
    of :func:`table_eps` (MNIST's choice)."""
    if ds in TABLE5_EPS:
        return TABLE5_EPS[ds]
    eps = table_eps(ds, args)
    return eps[len(eps) // 2]


def paper_cells(table: dict, ds: str, args, columns: int, *, single_eps: bool) -> dict:
    """The paper's rows of Tables 3/5 for ``ds``; for a data set the paper did not use,
    the same attacks at :func:`table_eps` (or :func:`diag_eps`), paper cells
    :data:`NOT_IN_PAPER`."""
    if ds in table:
        return table[ds]
    radii = (diag_eps(ds, args),) if single_eps else table_eps(ds, args)
    attacks = ("fgsm", "bim", "mim") if single_eps else ("fgsm", "bim", "pgd", "mim")
    keys = [(a, e) for a in attacks for e in radii]
    keys += [("jsma", g) for g in P.default_jsma_gammas(ds)][:1 if single_eps else None]
    keys.append(("cw", 0.0))
    return {k: (NOT_IN_PAPER,) * columns for k in keys}


def table2(args) -> None:
    rows, payload = [], {"runs": {}}
    models = [("xe", None)] + [("gce", a) for a in ALPHAS]
    for ds in args.datasets:
        cells = {}
        for variant, alpha in models:
            errs = []
            for seed in args.seeds[ds]:
                res = train_cell(args, ds, variant, seed, alpha)
                payload["runs"][res.pop("name")] = res
                errs.append(100.0 * (1.0 - res["test_acc"]))
            key = "xe" if variant == "xe" else f"gce_{alpha}"
            cells[key] = errs
        paper = P.TABLE2_ERROR.get(ds, dict.fromkeys(cells, NOT_IN_PAPER))
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
            "diagnostics": False, "seed": args.eval_seed, **_early_stop(args)}


def _early_stop(args) -> dict[str, Any]:
    """``{'early_stop': True}`` when asked for; otherwise nothing (the paper's fixed steps)."""
    return {"early_stop": True} if getattr(args, "early_stop", False) else {}


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
            "square_queries": args.square_queries, "reference_workdir": reference,
            **_early_stop(args)}


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


def _eval_main(workdir: str, ds: str, args) -> dict:
    """FGSM/BIM/PGD/MIM at Table 3's radii on ``--n`` test images."""
    eps = table_eps(ds, args)
    return evaluate_run(workdir, os.path.join(args.eval_dir, f"main-{_eps_tag(eps)}"),
                        _eval_config_main(ds, eps, args))


def _eval_all(workdir: str, ds: str, args, *, slow: bool, reference: str | None = None) -> dict:
    """Main table (all ``--n``), JSMA/C&W (``--n_slow``) and diagnostics (``--n_diag``).

    Evaluations live in ``results/evaluations/`` keyed by their arguments, so
    Tables 3 and 5 share the XE and GCE models' reports instead of recomputing.
    """
    root = args.eval_dir
    eps = table_eps(ds, args)
    reports = {"main": _eval_main(workdir, ds, args)}
    if slow:
        # Keyed by the subset size too: a run on another --n_slow must not
        # overwrite this one's report.
        reports["slow"] = evaluate_run(workdir, os.path.join(root, slow_tag(args)),
                                       _eval_config_slow(args))
    if args.skip_diag:
        reports["diagnostics"] = {"verdict": SKIPPED_DIAG}
        return reports
    at = diag_eps(ds, args)
    diag = _eval_config_diag(eps, at, ("fgsm", "bim", "pgd"), args, reference)
    reports["diagnostics"] = evaluate_run(workdir, os.path.join(root, f"diag-{_eps_tag([at])}"),
                                          diag)
    return reports


def _eval_pgd_table(workdir: str, sub: str, eps: Sequence[float], args, attacks: str) -> dict:
    """Main numbers on ``--n`` images plus diagnostics on ``--n_diag``, one report each."""
    root = os.path.join(args.eval_dir, sub)
    main = evaluate_run(workdir, os.path.join(root, f"main-{_eps_tag(eps)}"),
                        {**_eval_config_main("", eps, args), "attacks": attacks})
    if args.skip_diag:
        main["verdict"] = SKIPPED_DIAG
        return main
    diag = evaluate_run(workdir, os.path.join(root, f"diag-{_eps_tag(eps[:1])}"),
                        _eval_config_diag(eps, eps[0], ("fgsm", "bim", "pgd"), args))
    main["verdict"] = diag.get("verdict")
    return main


def _natural_attack_target(target: str, args, variants: Sequence[str], table: dict) -> None:
    payload, sections = {}, []
    for ds in args.datasets:
        reports = {}
        xe_workdir = None  # the diagnostics' reference model (XE comes first)
        for variant in variants:
            # FGSM/BIM/PGD/MIM on every seed; JSMA/C&W and the diagnostics,
            # which cost far more, on the first seed's model only.
            mains = []
            for i, seed in enumerate(args.seeds[ds]):
                workdir = train_cell(args, ds, variant, seed)["workdir"]
                if i == 0:
                    xe_workdir = workdir if variant == "xe" else xe_workdir
                    first = _eval_all(workdir, ds, args, slow=not args.skip_slow,
                                      reference=xe_workdir if variant != "xe" else None)
                    mains.append(first["main"])
                else:
                    mains.append(_eval_main(workdir, ds, args))
            reports[variant] = {**first, "main": mains}
        paper = {ds: paper_cells(table, ds, args, len(variants),
                                 single_eps=table is P.TABLE5_ACC)}
        rows = attack_rows(ds, paper, reports, variants)
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
                "Eqs. 4-7), untargeted, on `--n` test images"
                + (" (`--early_stop`: BIM/PGD/MIM keep each example's first misclassified "
                   "point, so their robust accuracy is at most the fixed-step attacks')"
                   if getattr(args, "early_stop", False) else "") + "; " + slow_text
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
            workdir = train_cell(args, ds, variant, args.seeds[ds][0])["workdir"]
            eps = [e for (_, e) in paper[ds]]
            cols[variant] = _eval_pgd_table(workdir, target, eps, args, attacks)
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
