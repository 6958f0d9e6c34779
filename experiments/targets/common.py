"""What every target shares: its training runs, its evaluations and its output files.

* runs: :func:`make_run` (the paper's config of one table cell, with the CPU
  budgets of :data:`REDUCED` and ``--mock_data``) and :func:`train_run`
  (a finished run is reused: training resumes and has nothing left to do);
* evaluations: :func:`evaluate_run` calls
  ``experiments.evaluation_api.evaluate_checkpoint`` and reuses a stored report
  iff its settings' hash and the weights match (:func:`why_not_reuse`);
* outputs: :func:`header` (command, budget, seeds, hardware, git) and
  :func:`write_outputs` (``<target>.json`` and ``<target>.md``).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import time
from typing import Any

from experiments import cli
from gce_jax.provenance import atomic_write, git_info, hardware_line, now_iso, write_json

ALPHAS = {"1/2": 0.5, "1/3": 1 / 3, "1/4": 0.25, "1/5": 0.2}
CONFIG_MODULES = {"mnist": "mnist_lenet5", "cifar10": "cifar10_resnet56",
                  "cifar100": "cifar100_resnet56", "tiny_imagenet": "tiny_imagenet_resnet50"}
LOCAL_DATA = {"mnist": "mnist", "cifar10": "cifar10-jpeg.tar.gz"}

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
