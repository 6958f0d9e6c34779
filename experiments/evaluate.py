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
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from typing import Any, Sequence

from experiments import cli

PNG_NAME = "accuracy_vs_eps.png"


class CLIError(cli.UserError):
    """Bad command-line input; reported as one line, nothing is written."""


def _float_list(text: str) -> list[float]:
    vals = []
    for part in text.replace(",", " ").split():
        try:
            vals.append(float(part))
        except ValueError:
            raise CLIError(f"--eps: {part!r} is not a number") from None
    return vals


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


def _split_names(values: Sequence[str] | None) -> list[str]:
    if values is None:
        return []
    return [n for v in values for n in v.replace(",", " ").split()]


def _check_workdir(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} does not exist or is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{flag} {path!r} has no config.json; is it a training run directory?")
    from gce_jax.train import ConfigError, read_run_config
    try:
        read_run_config(path)
    except ConfigError as e:
        raise CLIError(f"{flag}: {e}") from None
    from gce_jax import weights
    if weights.is_published(path):  # checked (sha256) when it is loaded
        return
    ckpts = [d for d in ("checkpoints", "checkpoints_best")
             if os.path.isdir(os.path.join(path, d)) and os.listdir(os.path.join(path, d))]
    if not ckpts:
        raise CLIError(f"{flag} {path!r} has no checkpoint (expected {path}/checkpoints/<step>)")


def _validate(args: argparse.Namespace) -> None:
    """Everything checkable without loading a model; raises CLIError."""
    if args.n <= 0:
        raise CLIError(f"--n must be > 0, got {args.n}")
    if args.batch_size <= 0:
        raise CLIError(f"--batch_size must be > 0, got {args.batch_size}")
    if args.devices is not None:
        import jax
        if not 1 <= args.devices <= jax.local_device_count():
            raise CLIError(f"--devices must be in [1, {jax.local_device_count()}] "
                           f"(the local devices), got {args.devices}")
    for flag in ("restarts", "apgd_steps", "square_queries", "cw_binary_steps", "cw_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag} must be >= 1, got {value}")
    if args.pgd_steps is not None and args.pgd_steps < 1:
        raise CLIError(f"--pgd_steps must be >= 1, got {args.pgd_steps}")
    if args.pgd_step_size is not None and not args.pgd_step_size > 0:
        raise CLIError(f"--pgd_step_size must be > 0, got {args.pgd_step_size}")
    if args.eps is not None:
        eps = _float_list(" ".join(args.eps))
        if not eps:
            raise CLIError("--eps needs at least one value")
        bad = [e for e in eps if not (e >= 0) or e != e or e == float("inf")]
        if bad:
            raise CLIError(f"--eps must be >= 0 and finite, got {bad}")
        big = [e for e in eps if e > 1]
        if big:
            raise CLIError(f"--eps must be <= 1 (L_inf radii of images in [0, 1]; 8/255 is "
                           f"0.0314), got {big}")
        args.eps = eps
    if args.diag_eps is not None and not (0 < args.diag_eps <= 1):
        raise CLIError(f"--diag_eps must be in (0, 1], got {args.diag_eps}")
    _check_workdir(args.workdir, "--workdir")
    if args.reference_workdir is not None:
        _check_workdir(args.reference_workdir, "--reference_workdir")
    args.run_name = args.run_name or os.path.basename(os.path.normpath(args.workdir))
    args.out = args.out or os.path.join("results", args.run_name)
    _check_out_dir(args.out)


def _check_out_dir(path: str) -> None:
    """``--out`` must be a directory that can be created or written; creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"--out {path!r} exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {path!r}: {parent!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CLIError(f"--out {path!r} is not writable ({parent}: {e.strerror})") from None


def _parse_attacks(names: list[str], registry) -> list[tuple[str, str]]:
    from gce_jax.robustness import EvaluationError, parse_attack_name
    out = []
    for n in names:
        try:
            out.append(parse_attack_name(n, registry))
        except EvaluationError as e:
            raise CLIError(str(e)) from None
    return out


def _load(workdir: str, selection: str | None, flag: str):
    from gce_jax import train, weights
    try:
        if weights.is_published(workdir):  # a published-weights folder
            return weights.load_published(workdir)
        return train.load_for_eval(workdir, selection)
    except Exception as e:  # noqa: BLE001 -- any load failure is one clear error
        raise CLIError(f"{flag} {workdir!r}: could not load the checkpoint: "
                       f"{cli.error_line(e)}") from None


def _load_test_set(config, n: int, seed: int):
    import numpy as np

    from gce_jax import data as data_lib
    split = config.data.get("test_split", "test")
    try:
        ds = data_lib.load_config_split(config, split)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"could not load the {config.dataset} {split} split: "
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


def _main_specs(attacks: list[tuple[str, str]], eps: list[float], config, args):
    from experiments.paper_numbers import PAPER_JSMA_GAMMA
    from gce_jax import robustness as R
    specs = []
    pgd_kw = {"steps": args.pgd_steps, "step_size": args.pgd_step_size,
              "random_start": bool(config.eval.get("pgd_random_start", True))}
    for attack, loss in attacks:
        if attack in R.EPS_FREE_ATTACKS:
            if attack == "jsma":
                for g in PAPER_JSMA_GAMMA.get(config.dataset, (0.25,)):
                    specs.append(R.paper_spec(attack, None, gamma=g, label=f"jsma (gamma={g:g})"))
            else:
                # A reduced C&W budget (CPU runs) is recorded in the report's settings.
                cw = {k: v for k, v in (("binary_steps", args.cw_binary_steps),
                                        ("steps", args.cw_steps)) if v is not None}
                specs.append(R.paper_spec(attack, None, **cw))
            continue
        for e in eps:
            kw = dict(pgd_kw) if attack == "pgd" else {}
            if attack in ("apgd", "autoattack"):
                kw["steps"] = args.apgd_steps
            if attack in ("square", "autoattack"):
                kw["n_queries"] = args.square_queries
            specs.append(R.paper_spec(attack, e, loss=loss, **kw))
    return specs


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Runs the evaluation; returns the report (already written)."""
    _validate(args)
    from gce_jax.attacks import ATTACKS
    attacks = _parse_attacks(_split_names(args.attacks) or ["fgsm", "bim", "pgd", "mim"], ATTACKS)

    from experiments.paper_numbers import default_eps
    from gce_jax import models, plots
    from gce_jax import robustness as R
    from gce_jax.checkpoint import variables_fingerprint
    from gce_jax.provenance import portable_path

    model, variables, config = _load(args.workdir, args.selection, "--workdir")
    ref = None
    run_name = args.run_name
    if args.reference_workdir is not None:
        rmodel, rvars, rconfig = _load(args.reference_workdir, None, "--reference_workdir")
        if (rconfig.dataset, rconfig.model) != (config.dataset, config.model):
            raise CLIError(
                f"--reference_workdir is {rconfig.model} on {rconfig.dataset}, but the model "
                f"under test is {config.model} on {config.dataset}; the transfer check needs "
                "the same architecture and data set")
        if rconfig.loss != "xe":
            print(f"warning: reference model was trained with {rconfig.loss!r}, not 'xe'",
                  file=sys.stderr)
        ref = (models.logits_fn(rmodel, rvars),
               os.path.basename(os.path.normpath(args.reference_workdir)))

    ev_cfg = config.get("eval", {})
    args.pgd_steps = args.pgd_steps or int(ev_cfg.get("pgd_steps", 40))
    args.pgd_step_size = args.pgd_step_size or float(ev_cfg.get("pgd_step_size", 0.01))
    eps = args.eps if args.eps is not None else [
        float(e) for e in (ev_cfg.get("pgd_eps") or default_eps(config.dataset))]

    x, y, data_info = _load_test_set(config, args.n, args.seed)
    logits_fn = models.logits_fn(model, variables)
    import jax
    from gce_jax.parallel import make_mesh
    mesh = make_mesh(jax.local_devices()[:args.devices])
    ev = R.Evaluator(logits_fn, x, y, seed=args.seed, batch_size=args.batch_size, mesh=mesh,
                     registry=ATTACKS, progress=not args.no_progress)
    results = []
    try:
        for spec in _main_specs(attacks, eps, config, args):
            results.extend(ev.run(spec).with_components())
    except R.EvaluationError as e:
        raise CLIError(str(e)) from None

    diag_json, diag_results, png = None, [], None
    verdict = f"{R.VERDICT_INCONCLUSIVE}: diagnostics not run (--no_diagnostics)"
    if not args.no_diagnostics:
        dcfg = R.DiagnosticsConfig(
            eps=args.diag_eps, eps_grid=tuple(e for e in eps if e > 0) or (0.1,),
            pgd_steps=args.pgd_steps, pgd_step_size=args.pgd_step_size,
            apgd_steps=args.apgd_steps, square_queries=args.square_queries,
            restarts=args.restarts, model_loss=config.get("loss"))
        diag = R.run_diagnostics(ev, dcfg, reference_logits_fn=ref[0] if ref else None,
                                 reference_name=ref[1] if ref else None,
                                 extra_results=results)
        png = plots.render_accuracy_vs_eps(
            {f"PGD-xe ({args.pgd_steps} steps)": (diag.curve_eps, diag.curve_accuracy)},
            title=f"{run_name}: robust accuracy vs eps", zero_line=R.ZERO_ACC_MAX,
            marks=[diag.eps])
        diag.plot = PNG_NAME
        diag_json = diag.to_json()
        diag_results = diag.results
        verdict = diag.verdict

    resolved = config.get("resolved", {})
    model_info = {
        "name": config.model, "dataset": config.dataset, "loss": config.get("loss"),
        "alpha": config.get("alpha"), "num_classes": resolved.get("num_classes"),
        "selection": args.selection or config.get("selection"),
        "training_method": config.get("training", {}).get("method", "standard"),
        "adversarial_training": bool(config.get("training", {}).get("adversarial", {})
                                     .get("enabled", False)),
        "config_name": config.get("name"),
        "reference_workdir": args.reference_workdir,
        # Which weights were attacked: reuse (experiments.reproduce) compares it.
        "variables_sha256": variables_fingerprint(variables),
    }
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "experiments.evaluate", *argv])
    report = R.build_report(run=run_name, workdir=portable_path(args.workdir),
                            command=command, model=model_info, data=data_info, evaluator=ev,
                            results=results, diagnostics=diag_json, verdict=verdict,
                            extra_results=diag_results)
    jpath, mpath = R.write_report(args.out, report, extra_files={PNG_NAME: png} if png else None)
    print(f"wrote {jpath} and {mpath}")
    print(f"Verdict ({run_name}): {verdict}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cli.set_log_verbosity(args.verbosity)

    def evaluate() -> int:
        run(args, argv)
        return 0

    return cli.run_reporting_errors(evaluate, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
