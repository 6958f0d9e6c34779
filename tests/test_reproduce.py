"""experiments.reproduce end to end at smoke scale (tfds mock data)."""

import json
import os
import shutil

import pytest

from experiments import reproduce
from experiments.targets import common, table_md, tables


def test_fig3_target_writes_table_json_and_png(tmp_path):
    assert reproduce.main(["--target", "fig3", "--results_dir", str(tmp_path)]) == 0
    out = tmp_path / "fig3"
    md = (out / "fig3.md").read_text()
    assert "python -m experiments.reproduce --target fig3" in md and "hardware:" in md
    assert (out / "fig3_profile.png").exists()
    assert "0.3333" in json.loads((out / "fig3.json").read_text())["curves"]


def test_table3_smoke_on_mock_data_trains_evaluates_and_compares(tmp_path):
    rc = reproduce.main(["--target", "table3", "--datasets", "mnist", "--mock_data",
                         "--skip_slow", "--runs_dir", str(tmp_path / "runs"),
                         "--results_dir", str(tmp_path / "results"), "--n", "16", "--n_diag", "16",
                         "--square_queries", "10", "--restarts", "1"])
    assert rc == 0
    md = (tmp_path / "results" / "mock" / "table3" / "table3.md").read_text()
    assert "mock data: smoke run" in md and "cross-entropy" in md
    # Our column is filled from the evaluation, the paper's from Table 3.
    row = [l for l in md.splitlines() if l.startswith("| PGD | ε=0.1 ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "46.85" and cells[5] == "51.85" and cells[6] == "16"
    assert all(0.0 <= float(cells[i]) <= 100.0 for i in (2, 4))
    assert "XE: inconclusive" in md  # 16 examples cannot support a verdict
    reports = list((tmp_path / "results" / "mock" / "evaluations").rglob("robustness.json"))
    assert len(reports) == 4  # main + diagnostics, for XE and GCE
    rep = json.loads(reports[0].read_text())
    assert all(r["loss"] == "xe" for r in rep["results"] if r["attack"] in ("fgsm", "pgd"))


def test_table3_with_two_seeds_reports_mean_and_std_of_the_main_attacks(tmp_path):
    rc = reproduce.main(["--target", "table3", "--datasets", "mnist", "--mock_data",
                         "--skip_slow", "--skip_diag", "--seeds", "0,1",
                         "--runs_dir", str(tmp_path / "runs"),
                         "--results_dir", str(tmp_path / "results"), "--n", "16"])
    assert rc == 0
    out = tmp_path / "results" / "mock"
    table = json.loads((out / "table3" / "table3.json").read_text())["mnist"]
    assert table["seeds"] == [0, 1] and len(table["reports"]["gce"]["main"]) == 2
    per_seed = {}
    for rep in out.glob("evaluations/main-*/*/robustness.json"):
        r = json.loads(rep.read_text())
        per_seed[r["run"]] = next(x["robust_accuracy"] for x in r["results"]
                                  if x["attack"] == "pgd" and abs(x["eps"] - 0.1) < 1e-9)
    assert len(per_seed) == 4  # XE and GCE, seeds 0 and 1
    row = next(x for x in table["rows"] if x["attack"] == "pgd" and abs(x["param"] - 0.1) < 1e-9)
    values = row["cells"]["xe"][3]
    assert sorted(values) == sorted(v for k, v in per_seed.items() if "_xe_" in k)
    md = (out / "table3" / "table3.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| PGD | ε=0.1 "))
    assert line.split("|")[3].strip() == reproduce.mean_std([100 * v for v in values])
    assert "mean ± std over them" in md
    assert "- XE: inconclusive: diagnostics skipped (--skip_diag)" in md


def test_table4_smoke_without_diagnostics_says_so(tmp_path):
    rc = reproduce.main(["--target", "table4", "--datasets", "cifar100", "--mock_data",
                         "--budget", "reduced", "--skip_diag", "--runs_dir", str(tmp_path / "runs"),
                         "--results_dir", str(tmp_path / "results"), "--n", "8"])
    assert rc == 0
    md = (tmp_path / "results" / "mock" / "table4" / "table4.md").read_text()
    row = [l for l in md.splitlines() if l.startswith("| PGD | 0.04 ")][0]
    assert "(diag. inconclusive)" in row and "| 0.04 |" in row  # the paper's XE number
    assert "diagnostics skipped (--skip_diag)" in md


def test_bad_dataset_for_target_is_rejected(tmp_path, capsys):
    assert reproduce.main(["--target", "table4", "--datasets", "mnist",
                           "--results_dir", str(tmp_path)]) == 2
    assert "covers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_mock_tiny_imagenet_is_a_fake_folder_the_real_loader_reads(tmp_path, monkeypatch):
    # tfds cannot mock Tiny ImageNet: --mock_data points the run at a fake
    # tiny-imagenet-200 in the official layout instead.
    import tempfile
    from gce_jax import data
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    name, config = reproduce.make_run("tiny_imagenet", "xe", seed=0, alpha_label=None,
                                      budget="paper", data_root=None, mock=True)
    assert name.endswith("_mock_s0") and config.data.source == "local"
    assert config.data.data_dir.startswith(str(tmp_path))
    test = data.load_split("tiny_imagenet", "test", data_dir=config.data.data_dir,
                           source="local", cache=False)
    assert test.num_classes == 200 and test.images.shape == (32, 64, 64, 3)
    # A second call reuses the folder rather than rewriting it.
    again = reproduce.make_run("tiny_imagenet", "gce", seed=0, alpha_label=None,
                               budget="paper", data_root=None, mock=True)[1]
    assert again.data.data_dir == config.data.data_dir


def test_pgd_table_rows_put_ours_beside_the_papers_and_mark_masking():
    def report(acc, verdict, steps=100):
        return {"verdict": verdict, "results": [
            {"attack": "pgd", "loss": "xe", "eps": 0.3, "robust_accuracy": acc,
             "settings": {"steps": steps}}]}
    cols = {"adv_xe": report(0.8123, "no masking detected"),
            "adv_gce": report(0.5, "gradient masking suspected: square")}
    lines = table_md.pgd_table_md("mnist", {"mnist": {("pgd", 0.3): (83.67, 83.85)}}, cols,
                                    ("adv_xe", "adv_gce"), steps_column=True)
    row = [l for l in lines if l.startswith("| PGD")][0]
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "PGD", "0.3", "81.23", "83.67", "50.00 ⚠masking", "83.85", "100"]
    assert "GCE: gradient masking suspected: square" in lines[-2]


def test_reduced_run_names_the_model_that_trains():
    name, config = reproduce.make_run("cifar10", "gce", seed=1, alpha_label="1/4",
                                      budget="reduced", data_root=None, mock=False)
    assert config.model == "resnet20" and name == "cifar10_resnet20_gce_a1-4_reduced_s1"
    assert reproduce.make_run("mnist", "xe", seed=0, alpha_label=None, budget="reduced",
                              data_root=None, mock=False)[0] == "mnist_lenet5_xe_s0"


def test_per_dataset_seeds_override_the_default():
    seeds = reproduce.parse_seeds(["0,1,2", "cifar10=0"], ["mnist", "cifar10"])
    assert seeds == {"mnist": [0, 1, 2], "cifar10": [0]}
    assert reproduce.parse_seeds(["3"], ["mnist"]) == {"mnist": [3]}


def test_bad_seeds_are_rejected_before_anything_is_written(tmp_path, capsys):
    for bad in (["cifar100=0"], ["0,x"], ["1,1"]):
        assert reproduce.main(["--target", "table2", "--datasets", "mnist,cifar10",
                               *sum((["--seeds", b] for b in bad), []),
                               "--runs_dir", str(tmp_path / "runs"),
                               "--results_dir", str(tmp_path / "results")]) == 2
        assert "--seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_reduced_cw_budget_gets_its_own_evaluation_folder():
    args = reproduce.build_parser().parse_args(["--target", "table3", "--n_slow", "100"])
    assert tables.slow_tag(args) == "jsma-cw-n100"  # the paper's budget: unchanged name
    assert tables._eval_config_slow(args)["cw_steps"] is None
    args = reproduce.build_parser().parse_args(["--target", "table3", "--n_slow", "100",
                                                "--cw_steps", "200"])
    assert tables.slow_tag(args) == "jsma-cw-n100-cw9x200"
    assert tables._eval_config_slow(args)["cw_steps"] == 200


def test_early_stop_is_asked_for_in_the_main_and_diagnostics_configs_only_when_given():
    args = reproduce.build_parser().parse_args(["--target", "table3"])
    assert "early_stop" not in tables._eval_config_main("mnist", (0.1,), args)
    assert "early_stop" not in tables._eval_config_diag((0.1,), 0.1, ("pgd",), args)
    args = reproduce.build_parser().parse_args(["--target", "table3", "--early_stop"])
    assert tables._eval_config_main("mnist", (0.1,), args)["early_stop"] is True
    assert tables._eval_config_diag((0.1,), 0.1, ("pgd",), args)["early_stop"] is True
    assert tables._eval_config_slow(args).get("early_stop") is None  # JSMA/C&W: their own rules


RUN_CONFIG = {"dataset": "mnist", "selection": "last",
              "eval": {"pgd_eps": [0.1, 0.2, 0.3], "pgd_steps": 40, "pgd_step_size": 0.01}}


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A run ``runs/r`` (config only, weights "aaa"), a stored report of
    ``EVAL`` on it, and a fake ``evaluate_checkpoint`` that records its calls."""
    from experiments import evaluation_api
    runs, out = tmp_path / "runs", tmp_path / "evals"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "config.json").write_text(json.dumps(RUN_CONFIG))
    report = {"command": "python -m experiments.evaluate --workdir elsewhere",
              "eval_config_sha256": evaluation_api.eval_config_sha256(EVAL, RUN_CONFIG),
              "model": {"variables_sha256": "aaa"}, "results": []}
    calls = []

    def fake(workdir, config):
        calls.append((workdir, config))
        return evaluation_api.Report({"new": 1, "verdict": "v"}, "j", "m")

    monkeypatch.setattr(evaluation_api, "evaluate_checkpoint", fake)
    monkeypatch.setattr(common, "run_fingerprint", lambda w: "aaa")

    def store(rep):
        (out / "r").mkdir(parents=True, exist_ok=True)
        (out / "r" / "robustness.json").write_text(json.dumps(rep))
    store(report)
    return {"runs": str(runs), "out": str(out), "report": report, "calls": calls,
            "store": store}


EVAL = {"attacks": "fgsm", "n": 8, "diagnostics": False}


def test_same_settings_and_weights_are_reused(evaluated):
    e = evaluated
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL) == e["report"]
    # Where the report lies and how it ran (progress bars) do not matter.
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], {**EVAL, "progress": True,
                                                             "devices": 1}) == e["report"]
    assert not e["calls"]


def test_other_weights_are_evaluated_again(evaluated, monkeypatch):
    e = evaluated
    monkeypatch.setattr(common, "run_fingerprint", lambda w: "bbb")
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL) == {"new": 1, "verdict": "v"}
    (workdir, config), = e["calls"]
    assert workdir == os.path.join(e["runs"], "r") and config.out == os.path.join(e["out"], "r")
    assert config.n == 8 and not config.progress
    # A report that records no weights is not trusted either.
    monkeypatch.setattr(common, "run_fingerprint", lambda w: "aaa")
    del e["report"]["model"]["variables_sha256"]
    e["store"](e["report"])
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL) == {"new": 1, "verdict": "v"}


@pytest.mark.parametrize("change", [{"n": 9}, {"seed": 1}, {"eps": (0.1,)},
                                    {"attacks": "fgsm,pgd"}, {"cw_steps": 10},
                                    {"diagnostics": True}])
def test_a_changed_setting_changes_the_hash_and_is_evaluated_again(evaluated, change):
    from experiments.evaluation_api import eval_config_sha256
    e = evaluated
    assert eval_config_sha256({**EVAL, **change}, RUN_CONFIG) != e["report"]["eval_config_sha256"]
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], {**EVAL, **change})["new"] == 1
    assert len(e["calls"]) == 1


def test_the_hash_is_of_the_resolved_settings():
    from experiments.evaluation_api import eval_config_sha256
    # The run's eps grid named or taken by default: the same evaluation.
    assert (eval_config_sha256({"eps": (0.1, 0.2, 0.3)}, RUN_CONFIG)
            == eval_config_sha256({}, RUN_CONFIG) == eval_config_sha256({"eps": "0.1,0.2,0.3"},
                                                                         RUN_CONFIG))
    other = {**RUN_CONFIG, "eval": {**RUN_CONFIG["eval"], "pgd_steps": 100}}
    assert eval_config_sha256({}, other) != eval_config_sha256({}, RUN_CONFIG)
    assert eval_config_sha256({"out": "a", "run_name": "b"}, RUN_CONFIG) == eval_config_sha256(
        {}, RUN_CONFIG)


def test_a_report_from_before_the_hash_is_matched_by_its_command(evaluated):
    e = evaluated
    legacy = {k: v for k, v in e["report"].items() if k != "eval_config_sha256"}
    legacy["command"] = ("python -m experiments.evaluate --workdir runs/r --out x "
                         "--no_progress --attacks fgsm --n 8 --no_diagnostics")
    e["store"](legacy)
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL) == legacy
    legacy["command"] = legacy["command"].replace("--n 8", "--n 16")
    e["store"](legacy)
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL)["new"] == 1
    legacy["command"] = "python -m experiments.evaluate --n x"  # unreadable: not reused
    e["store"](legacy)
    assert reproduce.evaluate_run(os.path.join(e["runs"], "r"), e["out"], EVAL)["new"] == 1


def test_variables_fingerprint_sees_values_shapes_and_names():
    import numpy as np
    from gce_jax.checkpoint import variables_fingerprint
    v = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}}
    fp = variables_fingerprint(v)
    assert fp == variables_fingerprint({"params": {"b": np.zeros(3, np.float32),
                                                   "w": np.arange(6, dtype=np.float32).reshape(2, 3)}})
    w2 = v["params"]["w"].copy()
    w2[1, 2] = np.nextafter(w2[1, 2], np.float32(10))
    assert variables_fingerprint({"params": {**v["params"], "w": w2}}) != fp
    assert variables_fingerprint({"params": {**v["params"], "w": v["params"]["w"].reshape(3, 2)}}) != fp
    assert variables_fingerprint({"params": {"w2": v["params"]["w"], "b": v["params"]["b"]}}) != fp


def test_jsma_and_cw_rows_get_targeted_success_and_distortion_columns():
    def rec(attack, acc, success, l0, l2, **settings):
        return {"attack": attack, "loss": None, "eps": None, "robust_accuracy": acc, "n": 100,
                "settings": settings, "targeted": True, "success_rate": success,
                "num_success": 50, "mean_l0": l0, "mean_l2": l2}
    reports = {v: {"main": [], "slow": {"results": [
        rec("jsma", 0.02, s, 57.25, 3.0, gamma=0.25), rec("carlini_wagner_l2", 0.0, s, 784.0, d)]}}
        for v, s, d in (("xe", 0.66, 1.2345), ("gce", 0.261, None))}
    table = {"mnist": {("fgsm", 0.1): (78.32, 87.66), ("jsma", 0.25): (1.53, 26.24),
                       ("cw", 0.0): (0.0, 25.6)}}
    rows = table_md.attack_rows("mnist", table, reports, ("xe", "gce"))
    lines = table_md.success_table_md(rows, ("xe", "gce"))
    assert "accuracy under attack" in lines[1]
    body = [[c.strip() for c in l.strip("|").split("|")] for l in lines if l.startswith("| ")][1:]
    assert body == [["JSMA", "γ=0.25", "66.00", "L0 57.2", "26.10", "L0 57.2", "100"],
                    ["CW", "κ=0", "66.00", "L2 1.234", "26.10", "n/a", "100"]]
    assert table_md.success_table_md([r for r in rows if r[0] == "fgsm"], ("xe", "gce")) == []


def test_reports_without_a_current_attack_setting_are_not_reused(tmp_path, monkeypatch):
    from experiments import evaluate
    from gce_jax.attacks import attack_spec
    jsma_now = {k: v for k, v in attack_spec("jsma").items()
                if k not in ("attack", "norm", "loss", "eps", "example_offset")}
    assert "margin" in jsma_now
    old = {k: v for k, v in jsma_now.items() if k != "margin"}
    assert reproduce.records_current_settings({"results": [
        {"attack": "jsma", "settings": {**jsma_now, "restarts": 1}}]})
    assert not reproduce.records_current_settings({"results": [
        {"attack": "jsma", "settings": {**old, "restarts": 1}}]})
    assert reproduce.records_current_settings({"results": [{"attack": "double", "settings": {}}]})
    # evaluate_run: same settings and weights, but JSMA has gained `margin` since.
    from experiments import evaluation_api
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.json").write_text(json.dumps(RUN_CONFIG))
    settings = {"attacks": "jsma", "n": 8}
    report = {"command": "", "model": {"variables_sha256": "aaa"},
              "eval_config_sha256": evaluation_api.eval_config_sha256(settings, RUN_CONFIG),
              "results": [{"attack": "jsma", "settings": {**old, "restarts": 1}}]}
    (tmp_path / "evals" / "r").mkdir(parents=True)
    (tmp_path / "evals" / "r" / "robustness.json").write_text(json.dumps(report))
    monkeypatch.setattr(evaluation_api, "evaluate_checkpoint",
                        lambda w, c: evaluation_api.Report({"new": 1, "verdict": "v"}, "j", "m"))
    monkeypatch.setattr(common, "run_fingerprint", lambda w: "aaa")
    assert reproduce.evaluate_run(str(tmp_path / "runs" / "r"), str(tmp_path / "evals"),
                                  settings)["new"] == 1


# ------------------------------------------------------------------ published weights
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, "..", "shared", "data", "mnist")
XE_S0 = os.path.join(REPO, "weights", "mnist_lenet5_xe_s0")


@pytest.mark.skipif(not os.path.isdir(XE_S0), reason="no published weights")
def test_published_weights_stand_in_only_for_the_same_recipe(tmp_path):
    name, config = reproduce.make_run("mnist", "xe", seed=0, alpha_label=None, budget="paper",
                                      data_root=os.path.join("..", "shared", "data"), mock=False)
    assert name == os.path.basename(XE_S0)
    assert common.why_not_published(XE_S0, config) is None
    config.data.data_dir = "/elsewhere/mnist"  # where the data lie does not matter
    assert common.why_not_published(XE_S0, config) is None
    other = reproduce.make_run("mnist", "xe", seed=1, alpha_label=None, budget="paper",
                               data_root=None, mock=False)[1]
    assert "seed 0 -> 1" in common.why_not_published(XE_S0, other)
    config.epochs = 3
    assert "trained for 20 epochs" in common.why_not_published(XE_S0, config)
    config.epochs, config.optimizer.learning_rate = 20, 0.1
    assert "optimizer.learning_rate" in common.why_not_published(XE_S0, config)
    # A model trained with data.source='auto' on a local copy (experiments.train's
    # default) is that copy's model; one read from tfds is not.
    auto = tmp_path / "auto"
    shutil.copytree(XE_S0, auto)
    recorded = json.loads((auto / "config.json").read_text())
    recorded["data"].update(source="auto", data_dir=os.path.join("..", "shared", "data", "mnist"))
    (auto / "config.json").write_text(json.dumps(recorded))
    config.epochs, config.optimizer.learning_rate = 20, 1e-3
    assert common.why_not_published(str(auto), config) is None
    recorded["data"].update(data_dir=None)  # 'auto' without a folder: tfds
    (auto / "config.json").write_text(json.dumps(recorded))
    assert "data.source 'tfds' -> 'local'" in common.why_not_published(str(auto), config)
    summary = common.published_summary(XE_S0)
    metrics = [json.loads(l) for l in open(os.path.join(XE_S0, "metrics.jsonl"))]
    assert summary["test_acc"] == metrics[summary["selected_epoch"] - 1]["test_acc"]
    assert summary["epochs_completed"] == 20 and summary["published"] == XE_S0


@pytest.mark.skipif(not (os.path.isdir(XE_S0) and os.path.isdir(MNIST)),
                    reason="no published weights or no local MNIST")
def test_reproduce_runs_on_published_weights_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the published configs name the data relative to the repository
    argv = ["--target", "fig1", "--datasets", "mnist", "--n_tsne", "60",
            "--runs_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "mnist_lenet5_xe_s0: published weights weights/mnist_lenet5_xe_s0" in out
    assert "[reproduce] train" not in out and not (tmp_path / "runs").exists()
    scores = json.loads((tmp_path / "results" / "fig1" / "fig1.json").read_text())["mnist"]
    assert set(scores["scores"]) == {"XE", "GCE"}
