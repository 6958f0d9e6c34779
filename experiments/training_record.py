"""A published model's training record for ``results/``: JSON plus a markdown table.

    python -m experiments.training_record --weights weights/cifar10_cpu_resnet20_xe_s0 \\
        --out results/cifar10_cpu_2026-12-03/training_xe_s0 --budget "CPU budget" \\
        --conditions "quiet cores" [--target_acc 0.88 --target_min 60]

Everything in the record is read from the published folder (its manifest's
training command, its ``config.json`` and per-epoch ``metrics.jsonl``); only
the budget label and the machine conditions, which no file knows, are given.
Writes ``OUT.json`` and ``OUT.md`` and refuses to overwrite either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from experiments import cli


def _recipe(c: dict) -> str:
    opt, sched = c.get("optimizer", {}), c.get("lr_schedule", {})
    parts = [c.get("model", "?"), f"batch {c.get('batch_size')}",
             f"{opt.get('name', '?')}"
             + (f" momentum {opt.get('momentum')}" if opt.get("momentum") else "")
             + (" Nesterov" if opt.get("nesterov") else ""),
             f"wd {opt.get('weight_decay')}", f"lr {opt.get('learning_rate')}",
             f"schedule {sched.get('name')}"
             + (f" ({sched.get('warmup_epochs')}-epoch warm-up)" if sched.get("warmup_epochs")
                else ""),
             f"{c.get('epochs')} epochs", f"loss {c.get('loss')}"
             + (f" alpha {c.get('alpha'):.4g}" if c.get("loss") == "gce" and c.get("alpha")
                else ""),
             f"augment {c.get('data', {}).get('augment')}", f"selection {c.get('selection')}"]
    return ", ".join(str(p) for p in parts)


def build_record(folder: str, *, budget: str, conditions: str, target_acc: float | None,
                 target_min: float | None) -> dict[str, Any]:
    from gce_jax import weights
    manifest = weights.read_manifest(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    if not epochs:
        raise cli.UserError(f"{folder}: metrics.jsonl has no epochs")
    selected = next((m for m in epochs if m["epoch"] == manifest["selected_epoch"]), epochs[-1])
    minutes = sum(m["epoch_time_s"] for m in epochs) / 60
    record = {"run": manifest["name"], "command": manifest["command"], "budget": budget,
              "recipe": _recipe(config), "seed": config.get("seed"),
              "hardware": manifest["published"]["hardware"], "conditions": conditions,
              "epochs": epochs, "sum_epoch_time_min": minutes,
              "wall_time_min": epochs[-1].get("wall_time_s", 0) / 60,
              "selected_epoch": selected["epoch"], "val_acc": selected.get("val_acc"),
              "test_acc": selected.get("test_acc"), "weights": folder}
    if target_acc is not None and target_min is not None:
        record["target"] = {"test_acc": target_acc, "minutes": target_min,
                            "reached": (selected.get("test_acc") or 0) >= target_acc
                            and minutes <= target_min}
    return record


def record_md(r: dict[str, Any]) -> str:
    hw = r["hardware"]
    lines = [f"# Training record: {r['run']}", "",
             f"Command: `{r['command']}`  ",
             f"Budget: **{r['budget']}**; {r['recipe']}; seed {r['seed']}; hardware: "
             f"{hw.get('cpu_count')} x {hw.get('cpu')} ({hw.get('platform')}), "
             f"jax {hw.get('jax')}.  ", f"Conditions: {r['conditions']}", "",
             "| epoch | train loss | train acc % | val acc % | test acc % | lr at epoch start "
             "| epoch time s | img/s |", "|---|---|---|---|---|---|---|---|"]
    for m in r["epochs"]:
        lines.append(f"| {m['epoch']} | {m['train_loss']:.4f} | {100 * m['train_acc']:.2f} | "
                     f"{100 * m.get('val_acc', float('nan')):.2f} | "
                     f"{100 * m.get('test_acc', float('nan')):.2f} | {m.get('lr', 0):.4g} | "
                     f"{m['epoch_time_s']:.0f} | {m.get('images_per_s', float('nan')):.0f} |")
    lines += ["", f"Selected on validation: epoch {r['selected_epoch']} (val "
              f"{100 * r['val_acc']:.2f}%), **test {100 * r['test_acc']:.2f}%**. Training time: "
              f"{r['sum_epoch_time_min']:.1f} min summed over epochs ({r['wall_time_min']:.1f} min "
              "wall, per-epoch evaluation included)."]
    if "target" in r:
        t = r["target"]
        lines += ["", f"Target ({100 * t['test_acc']:.0f}% test accuracy in at most "
                  f"{t['minutes']:.0f} min of training): **"
                  f"{'reached' if t['reached'] else 'not reached'}**."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="a published folder (gce_jax.weights)")
    p.add_argument("--out", required=True, help="path without extension: OUT.json, OUT.md")
    p.add_argument("--budget", required=True, help='e.g. "CPU budget (not the paper\'s)"')
    p.add_argument("--conditions", required=True, help="what else ran on the machine")
    p.add_argument("--target_acc", type=float, default=None)
    p.add_argument("--target_min", type=float, default=None)
    args = p.parse_args(argv)

    def run() -> int:
        from gce_jax.provenance import atomic_write
        paths = [args.out + ".json", args.out + ".md"]
        if taken := [q for q in paths if os.path.exists(q)]:
            raise cli.UserError(f"{taken[0]} exists; not overwriting a result")
        record = build_record(args.weights, budget=args.budget, conditions=args.conditions,
                              target_acc=args.target_acc, target_min=args.target_min)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        atomic_write(paths[0], json.dumps(record, indent=1) + "\n")
        atomic_write(paths[1], record_md(record))
        print(paths[1])
        return 0

    return cli.run_reporting_errors(run, debug=False)


if __name__ == "__main__":
    sys.exit(main())
