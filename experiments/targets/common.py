"""What every target shares: its training runs, its evaluations and its output files.

* runs: :func:`make_run` (the config of one table cell: the data set's recipe,
  a built-in ``experiments/configs`` module or a user's config file, with the
  CPU budgets of :data:`REDUCED` and ``--mock_data``) and :func:`train_run`
  (published weights of the same recipe are used as they are; a finished run
  is reused: training resumes and has nothing left to do);
* evaluations: :func:`evaluate_run` calls
  ``experiments.evaluation_api.evaluate_checkpoint`` and reuses a stored report
  iff its settings' hash and the weights match (:func:`why_not_reuse`);
* outputs: :func:`header` (command, budget, seeds, hardware, git) and
  :func:`write_outputs` (``<target>.json`` and ``<target>.md``).
"""

from __future__ import annotations

import importlib
import importlib.util
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


def load_recipe(dataset: str, recipe: str | None = None):
    """The config module that trains ``dataset``'s models: ``recipe`` (a module of
    ``experiments/configs`` by name, or a path to a ``.py`` file defining
    ``get_config(variant)``), by default the built-in one of :data:`CONFIG_MODULES`."""
    if recipe is None:
        if dataset not in CONFIG_MODULES:
            raise cli.UserError(f"no built-in recipe for data set {dataset!r}; give one with "
                                f"--recipe {dataset}=CONFIG.py")
        recipe = CONFIG_MODULES[dataset]
    if not recipe.endswith(".py"):
        return importlib.import_module(f"experiments.configs.{recipe}")
    if not os.path.isfile(recipe):
        raise cli.UserError(f"--recipe {dataset}={recipe}: no such file")
    spec = importlib.util.spec_from_file_location(
        f"_recipe_{dataset.replace('.', '_').replace('-', '_')}", recipe)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- a user's file: one line, not a traceback
        raise cli.UserError(f"--recipe {dataset}={recipe}: {cli.error_line(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise cli.UserError(f"--recipe {dataset}={recipe} defines no get_config(variant)")
    return module


def make_run(dataset: str, variant: str, *, seed: int, alpha_label: str | None, budget: str,
             data_root: str | None, mock: bool, recipe: str | None = None):
    """``(run_name, config)`` for one training run of a table (``recipe``: see
    :func:`load_recipe`)."""
    config = load_recipe(dataset, recipe).get_config(variant)
    if config.dataset != dataset:
        raise cli.UserError(f"the recipe for {dataset!r} trains dataset={config.dataset!r}")
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


def train_cell(args, dataset: str, variant: str, seed: int, alpha_label: str | None = None
               ) -> dict:
    """:func:`make_run` + :func:`train_run` with ``experiments.reproduce``'s parsed
    arguments; the metrics carry the run's ``name`` and ``workdir``."""
    name, config = make_run(dataset, variant, seed=seed, alpha_label=alpha_label,
                            budget=args.budget, data_root=args.data_root, mock=args.mock_data,
                            recipe=args.recipes.get(dataset))
    return {**train_run(name, config, args.runs_dir, args.weights_dir), "name": name}


def _with_resolved_source(run_config: dict) -> dict:
    """``run_config`` with ``data.source='auto'`` replaced by what it read ('local' or
    'tfds'): a model trained with 'auto' on a local copy is that copy's model."""
    from gce_jax.data import DataError
    from gce_jax.data.loading import resolved_source
    data = run_config.get("data") or {}
    if data.get("source") != "auto":
        return run_config
    try:
        source = resolved_source(run_config["dataset"], data.get("data_dir"), "auto")
    except DataError:  # an unknown set: left as "auto", which then differs and retrains
        return run_config
    return {**run_config, "data": {**data, "source": source}}


def why_not_published(path: str, config) -> str | None:
    """None if the published folder ``path`` holds the model ``config`` trains, else why not.

    Same rule as resuming a run: every field a resume refuses to change (seed,
    loss, optimiser, data, ...) must be equal, and all ``config.epochs`` must
    have been trained; where the data lie and how the run was named may differ.
    """
    from gce_jax import train, weights
    try:
        manifest = weights.read_manifest(path)
        recorded = train.read_run_config(path)
    except (weights.WeightsError, train.ConfigError) as e:
        return f"is unreadable ({e})"
    if recorded is None:
        return "has no config.json"
    # Both sides resolved alike: 'auto' on either is compared as what it reads.
    recorded = _with_resolved_source(recorded)
    wanted = _with_resolved_source(train.config_to_dict(config))
    if manifest.get("epochs_trained") != config.epochs:
        return (f"was trained for {manifest.get('epochs_trained')} epochs, this recipe "
                f"trains {config.epochs}")
    try:
        train.resume_changes(recorded, wanted, manifest.get("epochs_trained") or 0, path)
    except train.ConfigError as e:
        return "has another config: " + str(e).split(": ", 1)[-1].split(". Resume")[0]
    return None


def published_summary(path: str) -> dict:
    """What :func:`train_run` returns for a published folder: the selected epoch's
    numbers from its metrics.jsonl (what ``train_and_evaluate`` reported)."""
    from gce_jax import weights
    from gce_jax.train import SPEED_KEYS
    manifest = weights.read_manifest(path)
    with open(os.path.join(path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    record = next((r for r in history if r["epoch"] == manifest["selected_epoch"]), None)
    if record is None or record.get("test_acc") is None:
        raise cli.UserError(f"{path}: metrics.jsonl has no test accuracy for the selected "
                            f"epoch {manifest['selected_epoch']}")
    scored = [r["val_acc"] for r in history if r.get("val_acc") is not None]
    out = {k: v for k, v in record.items() if k not in SPEED_KEYS and k != "epoch"}
    out.update(selection=manifest["selection"], selected_epoch=manifest["selected_epoch"],
               epochs_completed=manifest["epochs_trained"],
               best_val_acc=max(scored) if scored else None, published=path)
    return out


def train_run(name: str, config, runs_dir: str, weights_dir: str | None = None) -> dict:
    """Trains run ``name`` into ``runs_dir/name`` (resuming what is there), unless
    ``weights_dir/name`` is a published folder of this recipe (:func:`why_not_published`).

    Returns the run's final metrics, with ``workdir``: the folder to evaluate.
    """
    from gce_jax import weights
    from gce_jax.train import train_and_evaluate
    published = os.path.join(weights_dir, name) if weights_dir else None
    if published and weights.is_published(published):
        reason = why_not_published(published, config)
        if reason is None:
            print(f"[reproduce] {name}: published weights {published}", flush=True)
            return {**published_summary(published), "workdir": published}
        print(f"[reproduce] {published} {reason}: training {name} instead", flush=True)
    workdir = os.path.join(runs_dir, name)
    t0 = time.time()
    print(f"[reproduce] train {name} ({config.epochs} epochs)", flush=True)
    out = train_and_evaluate(config, workdir)
    out["wall_time_s"] = time.time() - t0
    out["workdir"] = workdir
    return out


def run_fingerprint(workdir: str) -> str:
    """``variables_sha256`` of the weights ``evaluate_checkpoint`` would load from
    ``workdir`` (a run, or a published folder, whose manifest records it)."""
    from gce_jax import weights
    if weights.is_published(workdir):
        return weights.read_manifest(workdir)["variables_sha256"]
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


def evaluate_run(workdir: str, out_dir: str, eval_config) -> dict:
    """``evaluate_checkpoint`` on one run (or published folder) with ``eval_config`` (a
    ConfigDict or a dict of its fields) into ``out_dir/<run name>``; returns its report
    (reused if it matches)."""
    from experiments.evaluation_api import evaluate_checkpoint, get_eval_config
    name = os.path.basename(os.path.normpath(workdir))
    config = get_eval_config(**dict(eval_config))
    config.out, config.progress = os.path.join(out_dir, name), False
    path = os.path.join(config.out, "robustness.json")
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
    recipes = getattr(args, "recipes", None) or {}
    # A user recipe replaces the paper's training setting for its data set.
    budget = f"**{args.budget}**" + "".join(f"; {ds} recipe **{r}** (not the paper's)"
                                            for ds, r in sorted(recipes.items()))
    return (f"# {target}\n\nCommand: `{cmd}`  \nBudget: {budget}"
            f"{' (mock data: smoke run, numbers meaningless)' if args.mock_data else ''}; "
            f"seeds {_seeds_str(args.seeds)}; hardware: {hardware_line()}; jax {jax.__version__}; "
            f"git {git_info().get('commit', '?')[:10]}"
            f"; written {now_iso()}.\n{extra}\n")
