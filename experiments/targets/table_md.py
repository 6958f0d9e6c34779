"""Markdown of the tables: our number beside the paper's, read from robustness.json reports.

Pure functions of report dicts (no training, no evaluation), so they are
tested on hand-written reports.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


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


def attack_rows(ds: str, target_table: dict, reports: dict[str, dict], columns: Sequence[str]):
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


def success_table_md(rows, columns) -> list[str]:
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


def attack_table_md(rows, columns, reports) -> list[str]:
    lines = ["| Attack | Param | " + " | ".join(
        f"{c.upper()} ours{verdict_mark(reports.get(c, {}).get('diagnostics'))} | {c.upper()} paper"
        for c in columns) + " | n |", "|---" * (3 + 2 * len(columns)) + "|"]
    for attack, param, cells in rows:
        pname = {"jsma": "γ", "cw": "κ"}.get(attack, "ε")
        n = max((c[2] or 0) for c in cells.values())
        lines.append(f"| {attack.upper()} | {pname}={param:g} | " + " | ".join(
            f"{_cell_md(cells[c][3])} | {cells[c][1]}" for c in columns) + f" | {n} |")
    return lines


def verdicts_md(reports: dict[str, dict]) -> list[str]:
    out = ["", "Gradient-masking diagnostics (on the diagnostics subset):", ""]
    for col, rep in reports.items():
        d = rep.get("diagnostics") or rep  # --skip_diag leaves only a verdict
        best = d.get("best_robust") or []
        worst = min((b.get("robust_accuracy", 1.0) for b in best), default=None) if best else None
        out.append(f"- {col.upper()}: {d.get('verdict')}"
                   + (f"; per-example worst case over all attacks: {pct(worst)}%" if worst is not None else ""))
    return out


def pgd_table_md(ds: str, paper: dict, cols: dict[str, dict], variants: Sequence[str],
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
