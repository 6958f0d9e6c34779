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

Published weights: a run whose folder ``weights/<run>`` (``--weights_dir``)
holds the same recipe's model is evaluated from it, not retrained.

A user's data set (registered, or described by its recipe's ``data.format``)
gets Tables 2, 3, 5 and Figure 1 with ``--datasets NAME --recipe NAME=CONFIG.py``,
where ``CONFIG.py`` defines ``get_config(variant)`` for the variants ``xe``,
``gce`` and ``cot`` (as ``experiments/configs/mnist_lenet5.py`` does); its
tables have no paper column to compare with, and take their radii from the
recipe's ``eval.pgd_eps``.

Budgets: ``--budget paper`` uses the paper's schedules; ``--budget reduced``
uses the documented CPU budgets in ``REDUCED`` and labels every number
"reduced". ``--mock_data`` runs any target on ``tfds.testing.mock_data``
(smoke runs for data sets that cannot be downloaded here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

from experiments import cli
# The targets' modules; their shared pieces are re-exported here, where scripts
# and tests have always found them.
from experiments.targets.common import (ALPHAS, REDUCED, evaluate_run,  # noqa: F401
                                        load_recipe, make_run, records_current_settings,
                                        run_fingerprint, stored_config_hash, train_run,
                                        why_not_reuse)
from experiments.targets.figures import fig2, fig3, tsne_target
from experiments.targets.table_md import find_record, mean_std, pct  # noqa: F401
from experiments.targets.tables import table2, table3, table4, table5, table6
from gce_jax import runtime

TARGET_DATASETS = {"table2": ("mnist", "cifar10", "cifar100", "tiny_imagenet"),
                   "table3": ("mnist", "cifar10"), "table4": ("cifar100", "tiny_imagenet"),
                   "table5": ("mnist", "cifar10"), "table6": ("mnist", "cifar10"),
                   "fig1": ("mnist", "cifar10"), "fig4": ("mnist", "cifar10"),
                   "fig2": (), "fig3": ()}
# Targets that need nothing of a data set beyond its recipe (no paper radii).
USER_DATASET_TARGETS = ("table2", "table3", "table5", "fig1")
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


def parse_recipes(specs: Sequence[str]) -> dict[str, str]:
    """``["shapes=my/shapes.py"]`` -> ``{"shapes": "my/shapes.py"}``."""
    out = {}
    for spec in specs:
        ds, sep, recipe = spec.partition("=")
        if not sep or not ds or not recipe:
            raise ValueError(f"{spec!r} is not DATASET=CONFIG (a .py file or a module of "
                             "experiments/configs)")
        if ds in out:
            raise ValueError(f"{ds!r} has two recipes")
        out[ds] = recipe
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    p.add_argument("--datasets", default=None, help="comma list (default: all of the target's)")
    p.add_argument("--budget", choices=("paper", "reduced"), default="paper")
    p.add_argument("--seeds", action="append", default=None, metavar="[DATASET=]S,S,...",
                   help="training seeds, a comma list (default 0); repeat with a DATASET= "
                        "prefix to override one data set, e.g. --seeds 0,1,2 --seeds cifar10=0")
    p.add_argument("--recipe", action="append", default=None, metavar="DATASET=CONFIG",
                   help="the config that trains DATASET's models: a .py file with "
                        "get_config(variant), or a module of experiments/configs; needed for "
                        "a data set without a built-in recipe")
    p.add_argument("--runs_dir", default="runs")
    p.add_argument("--weights_dir", default="weights",
                   help="published weights (gce_jax.weights) used instead of training where "
                        "they hold the same recipe's model; '' to always train")
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
    p.add_argument("--early_stop", action="store_true",
                   help="BIM/PGD/MIM stop at each example's first misclassified point (robust "
                        "accuracy can only drop; far cheaper on weak models): "
                        "experiments.evaluate --early_stop")
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
    try:
        args.recipes = parse_recipes(args.recipe or [])
    except ValueError as e:
        print(f"error: --recipe: {e}", file=sys.stderr)
        return 2
    args.datasets = args.datasets.split(",") if args.datasets else list(known)
    user_ok = args.target in USER_DATASET_TARGETS
    bad = [d for d in args.datasets if d not in known and not (user_ok and d in args.recipes)]
    if bad:
        extra = (" (another data set needs --recipe NAME=CONFIG.py)" if user_ok else "")
        print(f"error: {args.target} covers {list(known)}{extra}, not {bad}", file=sys.stderr)
        return 2
    if unused := sorted(set(args.recipes) - set(args.datasets)):
        print(f"error: --recipe for {unused}, which --datasets does not name", file=sys.stderr)
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
    args.weights_dir = args.weights_dir or None
    root = os.path.join(args.results_dir, "mock") if args.mock_data else args.results_dir
    args.out_dir = os.path.join(root, args.target)
    args.eval_dir = os.path.join(root, "evaluations")
    for flag in ("runs_dir", "results_dir"):
        path = getattr(args, flag)
        if os.path.exists(path) and not os.path.isdir(path):
            print(f"error: --{flag} {path!r} exists and is not a directory", file=sys.stderr)
            return 2

    def run() -> int:
        for ds, recipe in args.recipes.items():  # a bad recipe fails before any training
            make_run(ds, "xe", seed=0, alpha_label=None, budget=args.budget,
                     data_root=args.data_root, mock=args.mock_data, recipe=recipe)
        ctx = contextlib.nullcontext()
        if args.mock_data:
            import tensorflow_datasets as tfds
            ctx = tfds.testing.mock_data(num_examples=64)
        with ctx:
            TARGETS[args.target](args)
        return 0

    return cli.run_reporting_errors(run, debug=args.debug)


if __name__ == "__main__":
    runtime.configure_xla_cpu()
    sys.exit(main())
