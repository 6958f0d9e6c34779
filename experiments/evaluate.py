r"""Robustness evaluation of a trained checkpoint, with gradient-masking checks.

    python -m experiments.evaluate --workdir runs/<name> \
        [--attacks fgsm,bim,pgd,mim] [--eps 0.1,0.2,0.3] [--n 10000] [--seed 0] \
        [--reference_workdir runs/<xe run>] [--out results/<name>]

Writes ``<out>/robustness.json``, ``<out>/robustness.md`` and (with the
diagnostics) ``<out>/accuracy_vs_eps.png``; ``<out>`` defaults to
``results/<basename of workdir>``. Every file is written to a temporary file
and renamed, and only after all attacks have finished, so an interrupted or
failed run never leaves partial results. Bad input (the workdir, its
config.json, ``--out``, the eps, ...) is checked before any attack runs and
gives one error line on stderr, exit status 2, and writes nothing;
``--debug`` shows the traceback instead.

Attack names are those of ``gce_jax.attacks.ATTACKS``, optionally with the
objective: ``pgd:margin``, ``apgd:dlr``, ``square:xe``. Attacks without an
eps (``jsma``, ``carlini_wagner_l2``) run once with the paper's settings.
``autoattack`` (AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square) gives
one row plus one cumulative row per component, with ``--apgd_steps`` and
``--square_queries`` as its budgets.

This is a thin CLI: the flags become an eval config (one field per flag,
``experiments/configs/eval_default.py``) and
``experiments.evaluation_api.evaluate_checkpoint`` does the work, so a
script gets the same report from one call.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import ml_collections

from experiments import cli
from experiments.evaluation_api import PNG_NAME, EvalConfigError, evaluate_checkpoint
from gce_jax import runtime

# Bad command-line input; reported as one line, nothing is written.
CLIError = EvalConfigError


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments.evaluate",
        description="Attack a checkpoint and check the result for gradient masking.")
    p.add_argument("--workdir", required=True, help="training run directory, or a published-weights folder (weights/<name>)")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="attack names, comma or space separated; name:loss picks the "
                        "objective (xe|margin|dlr|gce). Default: fgsm,bim,pgd,mim (the paper's)")
    p.add_argument("--eps", nargs="+", default=None,
                   help="L_inf budgets (also the start of the diagnostics' curve). "
                        "Default: the run's config.eval.pgd_eps")
    p.add_argument("--n", type=int, default=10000,
                   help="test examples (a seeded random subset when fewer than the split)")
    p.add_argument("--seed", type=int, default=0, help="subset selection and attack randomness")
    p.add_argument("--reference_workdir", default=None,
                   help="cross-entropy run with the same architecture, for the transfer check")
    p.add_argument("--out", default=None, help="output directory (default results/<run>)")
    p.add_argument("--run_name", default=None, help="name in the report (default: basename of workdir)")
    p.add_argument("--selection", choices=("last", "best_val"), default=None,
                   help="checkpoint to load (default: the run's config.selection)")
    p.add_argument("--batch_size", type=int, default=500, help="examples per attack call")
    p.add_argument("--devices", type=int, default=None,
                   help="local devices each attack batch is split across (default: all; "
                        "batch_size is rounded up to a multiple)")
    p.add_argument("--pgd_steps", type=int, default=None, help="default: config.eval.pgd_steps")
    p.add_argument("--pgd_step_size", type=float, default=None,
                   help="default: config.eval.pgd_step_size")
    p.add_argument("--no_diagnostics", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--diag_eps", type=float, default=None,
                   help="eps of diagnostics checks 2-6 (default: grid eps nearest half clean accuracy)")
    p.add_argument("--early_stop", action="store_true",
                   help="BIM/PGD/MIM keep each example's first misclassified point and stop a "
                        "batch once all are fooled (robust accuracy can only drop; far fewer "
                        "steps on a weak model); default: the paper's fixed steps")
    p.add_argument("--restarts", type=int, default=5, help="PGD restarts for the convergence check")
    p.add_argument("--apgd_steps", type=int, default=100,
                   help="APGD iterations, also AutoAttack's per component (AutoAttack: 100)")
    p.add_argument("--square_queries", type=int, default=5000,
                   help="Square queries, also in AutoAttack (AutoAttack: 5000)")
    p.add_argument("--cw_binary_steps", type=int, default=None,
                   help="C&W-L2 binary search steps over c (default: the paper's 9)")
    p.add_argument("--cw_steps", type=int, default=None,
                   help="C&W-L2 Adam steps per binary step (default: the paper's 1000)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    return p


def eval_config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The eval config the flags describe (``--no_X`` flags are ``X = False``)."""
    from experiments.evaluation_api import get_eval_config
    fields = {k: v for k, v in vars(args).items()
              if k not in ("workdir", "debug", "verbosity", "no_diagnostics", "no_progress")}
    if fields["attacks"] is None:
        del fields["attacks"]
    return get_eval_config(**fields, diagnostics=not args.no_diagnostics,
                           progress=not args.no_progress)


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the evaluation; returns the report (already written). ``argv`` is unused:
    the report's command is rebuilt from the settings."""
    report = evaluate_checkpoint(args.workdir, eval_config_from_args(args))
    print(f"wrote {report.json_path} and {report.markdown_path}")
    print(f"Verdict ({report['run']}): {report.verdict}")
    return dict(report.document)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cli.set_log_verbosity(args.verbosity)

    def evaluate() -> int:
        run(args, argv)
        return 0

    return cli.run_reporting_errors(evaluate, debug=args.debug)


__all__ = ["PNG_NAME", "CLIError", "build_parser", "eval_config_from_args", "main", "run"]


if __name__ == "__main__":
    runtime.configure_xla_cpu()
    sys.exit(main())
