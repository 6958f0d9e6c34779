"""experiments.evaluation_api: evaluate_checkpoint is the CLI's evaluation, as a call."""

from __future__ import annotations

import json
import os

import ml_collections
import pytest

from experiments import evaluate, evaluation_api as api
from gce_jax import robustness as R
from test_evaluation import tiny_run  # noqa: F401  (the 1-epoch LeNet-5 fixture)


def _comparable(report: dict) -> dict:
    """The report without what differs between two runs of one evaluation (times)."""
    out = {k: v for k, v in report.items() if k != "created"}
    out["results"] = [{k: v for k, v in r.items() if k != "wall_time_s"}
                      for r in report["results"]]
    return out


def test_every_flag_is_a_field_and_the_defaults_agree():
    args = evaluate.build_parser().parse_args(["--workdir", "w"])
    assert evaluate.eval_config_from_args(args).to_dict() == api.get_eval_config().to_dict()
    flags = set(vars(args)) - {"workdir", "debug", "verbosity"}
    fields = {api.NEGATED_FLAGS.get(f, f"--{f}").lstrip("-") for f in api.get_eval_config()}
    assert flags == fields


def test_unknown_or_bad_settings_raise_before_anything_is_read(tmp_path):
    with pytest.raises(api.EvalConfigError, match="unknown eval settings"):
        api.get_eval_config(epsilon=0.1)
    out = tmp_path / "out"
    for bad, message in (({"eps": (0.1, 2)}, "--eps must be <= 1"),
                         ({"attacks": "pgd,nope"}, "unknown attack 'nope'"),
                         ({"n": 0}, "--n must be > 0"), ({"selection": "best"}, "--selection")):
        with pytest.raises(api.EvalConfigError, match=message):
            api.evaluate_checkpoint(str(tmp_path / "nope"), api.get_eval_config(**bad, out=str(out)))
    with pytest.raises(api.EvalConfigError, match="does not exist"):
        api.evaluate_checkpoint(str(tmp_path / "nope"), api.get_eval_config(out=str(out)))
    assert not out.exists()


def test_command_names_the_settings_that_differ_from_the_defaults():
    cfg = api.get_eval_config(attacks=["fgsm", "pgd:margin"], eps="0.1,0.2", n=16,
                              diagnostics=False, progress=False, out="results/x")
    cmd = api.eval_command("runs/r", cfg)
    assert cmd.startswith("python -m experiments.evaluate --workdir runs/r ")
    args = evaluate.build_parser().parse_args(cmd.split()[3:])
    assert (api.normalize_eval_config(evaluate.eval_config_from_args(args)).to_dict()
            == api.normalize_eval_config(cfg).to_dict())
    assert api.eval_command("runs/r", api.get_eval_config()) == (
        "python -m experiments.evaluate --workdir runs/r")


def test_early_stop_reaches_the_iterative_attacks_and_only_then_the_hash():
    cfg = api.get_eval_config(attacks="fgsm,bim,pgd,mim", eps="0.1", early_stop=True)
    run = ml_collections.ConfigDict({
        "dataset": "mnist", "loss": "xe", "selection": "last",
        "eval": {"pgd_eps": [0.1], "pgd_steps": 40, "pgd_step_size": 0.01}})
    specs = api.main_specs(api.resolve_eval_config(cfg, run), run)
    assert {s.attack: s.params.get("early_stop") for s in specs} == {
        "fgsm": None, "bim": True, "pgd": True, "mim": True}
    off = api.get_eval_config(attacks="fgsm,bim,pgd,mim", eps="0.1")
    assert not any("early_stop" in s.params
                   for s in api.main_specs(api.resolve_eval_config(off, run), run))
    # Off is the absent field: the hashes of earlier reports stand.
    no_field = dict(off.to_dict())
    del no_field["early_stop"]
    assert api.eval_config_sha256(off, run) == api.eval_config_sha256(no_field, run)
    assert api.eval_config_sha256(cfg, run) != api.eval_config_sha256(off, run)
    cmd = api.eval_command("runs/r", cfg)
    assert "--early_stop" in cmd.split()
    args = evaluate.build_parser().parse_args(cmd.split()[3:])
    assert evaluate.eval_config_from_args(args).early_stop is True


@pytest.mark.slow
def test_library_call_returns_the_report_the_cli_writes(tiny_run, tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--workdir", tiny_run, "--attacks", "fgsm,pgd", "--eps", "0.05", "0.1", "--n", "48",
            "--seed", "2", "--pgd_steps", "5", "--no_diagnostics", "--no_progress",
            "--out", str(out)]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    from_cli = json.loads((out / "robustness.json").read_text())
    cfg = api.get_eval_config(attacks=("fgsm", "pgd"), eps=(0.05, 0.1), n=48, seed=2,
                              pgd_steps=5, diagnostics=False, progress=False, out=str(out))
    report = api.evaluate_checkpoint(tiny_run, cfg)
    assert isinstance(report, api.Report) and list(report) == list(R.REPORT_KEYS)
    assert _comparable(report.to_dict()) == _comparable(from_cli)
    assert report.json_path == str(out / "robustness.json")
    assert (out / "robustness.json").read_text() == R.report_to_json(report.document)
    # The report names its settings' hash and how to rerun it.
    from gce_jax.train import load_config
    assert report.eval_config_sha256 == api.eval_config_sha256(cfg, load_config(tiny_run))
    assert report["command"] == api.eval_command(tiny_run, cfg)
    assert report.verdict.startswith("inconclusive: diagnostics not run")
    assert report.variables_sha256 == from_cli["model"]["variables_sha256"]


@pytest.mark.slow
def test_reproduce_reuses_a_real_evaluation_and_redoes_a_changed_one(tiny_run, tmp_path):
    from experiments import reproduce
    settings = {"attacks": "fgsm", "eps": (0.1,), "n": 32, "diagnostics": False}
    first = reproduce.evaluate_run(tiny_run, str(tmp_path), settings)
    again = reproduce.evaluate_run(tiny_run, str(tmp_path), settings)
    assert again == first  # reused: the stored document, same creation time
    changed = reproduce.evaluate_run(tiny_run, str(tmp_path), {**settings, "seed": 1})
    assert changed["seed"] == 1 and changed["eval_config_sha256"] != first["eval_config_sha256"]
    assert changed["model"]["variables_sha256"] == first["model"]["variables_sha256"]
