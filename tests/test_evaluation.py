"""Evaluation: per-example robust masks, records, report schema, atomic writes, CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gce_jax import robustness as R
from gce_jax.attacks import ATTACKS, draw_targets

# Pinned on purpose: robustness.json is parsed by tables and plots downstream.
# Changing these needs a SCHEMA_VERSION bump, not just an edit here.
REPORT_KEYS = [
    "schema_version", "run", "workdir", "created", "command", "eval_config_sha256", "git",
    "hardware", "model", "data", "seed", "batch_size", "clean_accuracy", "results",
    "best_robust", "diagnostics", "verdict",
]
RECORD_KEYS = [
    "label", "attack", "threat", "norm", "eps", "loss", "settings", "source",
    "n", "seed", "clean_accuracy", "robust_accuracy", "num_clean_correct",
    "num_robust", "targeted", "success_rate", "num_success", "max_linf", "mean_l0",
    "mean_l2", "wall_time_s",
]


# ------------------------------------------------------------- toy problem
def toy_logits(x):
    """Class 0 iff the mean pixel exceeds 0.5."""
    m = jnp.mean(x, axis=(1, 2, 3))
    return jnp.stack([m, jnp.full_like(m, 0.5)], axis=-1)


def toy_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    lo = np.where(y == 0, 0.55, 0.0)[:, None, None, None]
    x = (lo + 0.4 * rng.random((n, 4, 4, 1))).astype(np.float32)
    y[:5] = 1 - y[:5]  # a few clean errors
    return x, y


def darken(fn, x, y, *, key, eps, loss="xe", **kw):
    return jnp.clip(x - eps, 0.0, 1.0)


def coin(fn, x, y, *, key, eps, loss="xe", **kw):
    """Succeeds (makes the image black or white) on a random half of the batch."""
    hit = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    flipped = jnp.where(jnp.mean(x, axis=(1, 2, 3), keepdims=True) > 0.5,
                        jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1))
    return jnp.where(hit, flipped, x)


def outside(fn, x, y, *, key, eps, loss="xe", **kw):
    return jnp.clip(x + 2 * eps, 0.0, 1.0)


REG = {"darken": darken, "coin": coin, "outside": outside}


def spec(attack, eps, **kw):
    return R.AttackSpec(attack, eps, threat_norm="linf", **kw)


def evaluator(batch_size=16, seed=0):
    x, y = toy_data()
    return R.Evaluator(toy_logits, x, y, seed=seed, batch_size=batch_size, registry=REG,
                       progress=False)


# --------------------------------------------------------------- evaluator
def test_robust_mask_is_clean_correct_and_adversarially_correct():
    ev = evaluator()
    x, y = toy_data()
    clean = np.asarray(jnp.argmax(toy_logits(x), -1)) == y
    adv = np.asarray(jnp.argmax(toy_logits(np.clip(x - 0.3, 0, 1)), -1)) == y
    res = ev.run(spec("darken", 0.3))
    np.testing.assert_array_equal(ev.clean_correct, clean)
    np.testing.assert_array_equal(res.robust, clean & adv)
    assert 0 < res.robust.sum() < clean.sum() < len(y)  # the toy is not degenerate
    r = res.record
    assert list(r) == RECORD_KEYS
    assert r["num_robust"] == res.robust.sum() and r["n"] == len(y)
    assert r["robust_accuracy"] == pytest.approx(res.robust.mean())
    assert r["clean_accuracy"] == pytest.approx(clean.mean())
    assert r["max_linf"] == pytest.approx(0.3, abs=1e-6) and r["threat"] == "white-box"
    # Untargeted success: the clean-correct examples the attack misclassified;
    # darkening by 0.3 changes every pixel, except those already below 0.3.
    fooled = clean & ~adv
    assert not r["targeted"] and r["num_success"] == fooled.sum()
    assert r["success_rate"] == pytest.approx(fooled.sum() / clean.sum())
    xs = x[fooled].reshape(fooled.sum(), -1)
    moved = np.clip(xs - 0.3, 0, 1) != xs
    assert r["mean_l0"] == pytest.approx(moved.sum(1).mean())
    assert r["mean_l2"] == pytest.approx(
        np.sqrt(((np.clip(xs - 0.3, 0, 1) - xs) ** 2).sum(1)).mean(), rel=1e-5)
    assert ev.run(spec("darken", 0.3)) is res  # cached


def three_class_logits(x):
    """Class k iff the mean pixel is nearest CENTERS[k]."""
    m = jnp.mean(x, axis=(1, 2, 3))
    return -jnp.abs(m[:, None] - jnp.asarray(CENTERS)[None, :])


CENTERS = (1 / 6, 1 / 2, 5 / 6)


def to_class_center(fn, x, y, *, key, targets=None, example_offset=0, **kw):
    """Targeted double: draws targets as the library's attacks do; even
    examples move to their target's centre, odd ones to the third class."""
    t = draw_targets(key, y, 3, example_offset) if targets is None else targets
    third = 3 - y - t
    idx = example_offset + jnp.arange(x.shape[0])
    dest = jnp.where(idx % 2 == 0, t, third)
    return jnp.broadcast_to(jnp.asarray(CENTERS)[dest][:, None, None, None], x.shape)


def test_targeted_success_counts_only_the_target_and_averages_distances_over_successes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40).astype(np.int32)
    x = (np.asarray(CENTERS, np.float32)[y][:, None, None, None]
         + rng.uniform(-0.1, 0.1, (40, 3, 3, 1))).astype(np.float32)
    y[:4] = (y[:4] + 1) % 3  # clean errors: never attacked successfully
    reg = {"to_center": to_class_center}
    spec_ = R.AttackSpec("to_center", None, loss=None, threat_norm="l2")
    records = []
    for bs in (40, 7):  # the targets follow the example index, not the batch
        ev = R.Evaluator(three_class_logits, x, y, batch_size=bs, registry=reg,
                         progress=False)
        res = ev.run(spec_)
        records.append(res.record)
        r = res.record
        clean = ev.clean_correct
        assert clean.sum() == 36
        even = clean & (np.arange(40) % 2 == 0)
        assert r["targeted"] and r["num_robust"] == 0  # every example misclassified ...
        assert r["num_success"] == even.sum()  # ... but only the even ones hit the target
        assert r["success_rate"] == pytest.approx(even.sum() / clean.sum())
        restart0 = jax.random.fold_in(ev.prng_key_for(spec_), 0)
        t = np.asarray(draw_targets(restart0, y, 3))
        dist = np.sqrt(((x - np.asarray(CENTERS, np.float32)[t][:, None, None, None]) ** 2
                        ).reshape(40, -1).sum(1))
        assert r["mean_l2"] == pytest.approx(dist[even].mean(), rel=1e-5)
        assert r["mean_l0"] == 9.0
    assert records[0]["success_rate"] == records[1]["success_rate"]
    md = R.report_to_markdown(_report(ev, [res]))
    row = next(l for l in md.splitlines() if l.startswith("| to_center"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:9] == ["0.00", f"{100 * r['success_rate']:.2f} t", "9.0",
                          f"{r['mean_l2']:.4f}"]


def test_no_success_records_none_distances():
    ev = evaluator()
    r = ev.run(spec("darken", 0.0)).record
    assert r["num_success"] == 0 and r["success_rate"] == 0.0
    assert r["mean_l0"] is None and r["mean_l2"] is None
    assert "| 0.00 | n/a | n/a |" in R.report_to_markdown(_report(ev, [ev.run(spec("darken", 0.0))]))


def test_batching_and_padding_do_not_change_results():
    s = spec("darken", 0.2)
    a = evaluator(batch_size=7).run(s).robust  # 50 = 7*7 + 1: padded last batch
    b = evaluator(batch_size=50).run(s).robust
    np.testing.assert_array_equal(a, b)


def test_restarts_take_the_per_example_worst_case_and_seeds_reproduce():
    one = evaluator().run(spec("coin", 0.5)).robust
    again = evaluator().run(spec("coin", 0.5)).robust
    other_seed = evaluator(seed=1).run(spec("coin", 0.5)).robust
    many = evaluator().run(spec("coin", 0.5, restarts=4)).robust
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other_seed)
    assert many.sum() < one.sum() and many.sum() <= 0.25 * evaluator().clean_correct.sum() + 4


def test_attack_leaving_the_ball_is_an_error():
    with pytest.raises(R.EvaluationError, match="Linf ball"):
        evaluator().run(spec("outside", 0.1))


def test_real_attack_settings_are_resolved_and_typos_rejected():
    x, y = toy_data()
    ev = R.Evaluator(toy_logits, x, y, batch_size=50, progress=False)  # default registry
    res = ev.run(R.paper_spec("bim", 0.2))
    s = res.record["settings"]
    assert s["steps"] == 10 and s["step_size"] == pytest.approx(0.02) and s["restarts"] == 1
    assert res.record["loss"] == "xe"
    with pytest.raises(R.EvaluationError, match="unexpected"):
        ev.run(R.AttackSpec("pgd", 0.1, params={"stepz": 3}))


def test_paper_specs_and_attack_names():
    pgd = R.paper_spec("pgd", 0.3)
    assert (pgd.params["steps"], pgd.params["step_size"], pgd.loss) == (40, 0.01, "xe")
    assert R.paper_spec("mim", 0.2).params["step_size"] == pytest.approx(0.005)
    assert R.paper_spec("square", 0.1).loss == "margin"
    assert R.paper_spec("carlini_wagner_l2", None).loss is None
    assert R.parse_attack_name("pgd:margin", ATTACKS) == ("pgd", "margin")
    with pytest.raises(R.EvaluationError, match="known attacks"):
        R.parse_attack_name("pgdd", ATTACKS)
    with pytest.raises(R.EvaluationError, match="loss"):
        R.parse_attack_name("pgd:hinge", ATTACKS)
    with pytest.raises(R.EvaluationError):
        R.AttackSpec("pgd", -0.1)


def test_best_robust_is_per_example_and_grouped_by_eps():
    def res(mask, eps, label):
        mask = np.asarray(mask, bool)
        return R.AttackResult(R.AttackSpec("pgd", eps, label=label), mask,
                              {"robust_accuracy": float(mask.mean()), "source": "self"})

    a = res([1, 1, 0, 0], 0.1, "a")
    b = res([1, 0, 1, 0], 0.1, "b")
    c = res([0, 0, 0, 1], 0.2, "c")
    groups = {g["eps"]: g for g in R.best_robust([a, b, c, a])}
    assert groups[0.1]["robust_accuracy"] == 0.25  # only example 0 survives both
    assert groups[0.1]["strongest_single"] == 0.5  # per-example is stronger than either
    assert groups[0.1]["attacks"] == ["a", "b"]  # the duplicate is counted once
    assert groups[0.2]["robust_accuracy"] == 0.25


# ---------------------------------------------------------------- reports
def _report(ev, results, verdict="no masking detected"):
    return R.build_report(run="toy", workdir="/w", command="cmd", model={"name": "toy"},
                          data={"dataset": "toy", "split": "test", "n": ev.n,
                                "selection": "all"},
                          evaluator=ev, results=results, diagnostics=None, verdict=verdict)


def test_report_schema_is_stable_and_markdown_ends_with_verdict(tmp_path):
    ev = evaluator()
    report = _report(ev, [ev.run(spec("darken", 0.3))])
    jpath, mpath = R.write_report(str(tmp_path), report)
    loaded = json.load(open(jpath))
    assert list(loaded) == REPORT_KEYS
    assert loaded["schema_version"] == 3
    assert all(list(r) == RECORD_KEYS for r in loaded["results"])
    assert {"platform", "devices"} <= set(loaded["hardware"])
    assert {"commit", "dirty"} <= set(loaded["git"])
    md = open(mpath).read().strip().splitlines()
    assert md[-1] == "**Verdict (toy): no masking detected**"


def test_failed_render_leaves_existing_results_untouched(tmp_path):
    ev = evaluator()
    good = _report(ev, [ev.run(spec("darken", 0.3))])
    jpath, mpath = R.write_report(str(tmp_path), good)
    before = (open(jpath).read(), open(mpath).read())
    bad = dict(good)
    del bad["verdict"]
    with pytest.raises(R.EvaluationError, match="missing"):
        R.write_report(str(tmp_path), bad)
    assert (open(jpath).read(), open(mpath).read()) == before
    assert sorted(os.listdir(tmp_path)) == ["robustness.json", "robustness.md"]  # no temp files


# -------------------------------------------------------------------- CLI
@pytest.fixture
def fake_workdir(tmp_path):
    """Looks like a run directory but holds no loadable checkpoint."""
    wd = tmp_path / "fake_run"
    (wd / "checkpoints" / "1").mkdir(parents=True)
    (wd / "config.json").write_text("{}")
    return str(wd)


@pytest.mark.parametrize("extra,message", [
    (["--attacks", "pgd,nope"], "unknown attack 'nope'"),
    (["--eps", "0.1", "-0.2"], "--eps must be >= 0"),
    (["--n", "0"], "--n must be > 0"),
    (["--cw_steps", "0"], "--cw_steps must be >= 1"),
    (["--devices", "99"], "--devices must be in [1, 4]"),
    ([], "could not load the checkpoint"),
])
def test_cli_bad_input_gives_one_error_and_writes_nothing(fake_workdir, tmp_path, capsys,
                                                          extra, message):
    from experiments import evaluate as cli
    out = tmp_path / "out"
    rc = cli.main(["--workdir", fake_workdir, "--out", str(out), "--no_progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("WARNING:absl")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_cli_missing_workdir_or_checkpoint(tmp_path, capsys):
    from experiments import evaluate as cli
    out = tmp_path / "out"
    assert cli.main(["--workdir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert cli.main(["--workdir", str(empty), "--out", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch LeNet-5 on digits (resized to 28x28), trained by gce_jax.train."""
    from experiments.configs import default
    from gce_jax import train
    c = default.get_config()
    c.model, c.dataset, c.loss = "lenet5", "digits", "xe"
    c.data.resize = (28, 28)
    c.data.val_size = 0
    c.optimizer.name, c.optimizer.learning_rate = "adam", 3e-3
    c.batch_size, c.epochs, c.progress_bar = 64, 1, False
    c.eval.pgd_eps = (0.1, 0.2)
    wd = str(tmp_path_factory.mktemp("runs") / "digits_lenet5_xe")
    train.train_and_evaluate(c, wd)
    return wd


@pytest.mark.slow
def test_cli_end_to_end_on_a_trained_checkpoint(tiny_run, tmp_path, capsys):
    from experiments import evaluate as cli
    out = tmp_path / "results" / "digits_lenet5_xe"
    argv = ["--workdir", tiny_run, "--attacks", "fgsm", "pgd:margin", "--eps", "0.05,0.1",
            "--n", "64", "--seed", "3", "--pgd_steps", "10", "--pgd_step_size", "0.025",
            "--restarts", "2", "--apgd_steps", "10", "--square_queries", "100",
            "--reference_workdir", tiny_run, "--out", str(out), "--no_progress"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    rep = json.load(open(out / "robustness.json"))
    assert list(rep) == REPORT_KEYS
    assert rep["run"] == "digits_lenet5_xe" and rep["seed"] == 3
    assert rep["data"]["n"] == 64 and rep["model"]["name"] == "lenet5"
    assert "--reference_workdir" in rep["command"]
    labels = [(r["label"], r["eps"]) for r in rep["results"]]
    assert labels == [("fgsm-xe", 0.05), ("fgsm-xe", 0.1), ("pgd-margin", 0.05),
                      ("pgd-margin", 0.1)]
    for r in rep["results"]:
        assert list(r) == RECORD_KEYS and r["n"] == 64 and r["seed"] == 3
        assert 0 <= r["robust_accuracy"] <= r["clean_accuracy"] <= 1
        assert r["max_linf"] <= r["eps"] + 1e-5 and r["wall_time_s"] >= 0
    assert rep["results"][2]["settings"]["steps"] == 10
    diag = rep["diagnostics"]
    names = {c["name"] for c in diag["checks"]}
    assert {"curve_monotone", "transfer_vs_white_box", "zero_gradients"} <= names
    assert diag["curve"]["plot"] == "accuracy_vs_eps.png"
    png = (out / "accuracy_vs_eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    verdict = rep["verdict"]
    assert verdict.split(":")[0] in ("no masking detected", "gradient masking suspected",
                                     "inconclusive")
    assert f"Verdict (digits_lenet5_xe): {verdict}" in stdout
    md = (out / "robustness.md").read_text().strip().splitlines()
    assert md[-1] == f"**Verdict (digits_lenet5_xe): {verdict}**"
    # Every table row has its header's columns (the diagnostics' attacks included).
    assert "Diagnostic attacks:" in md
    header = None
    for line in md:
        header = (header or line.count("|")) if line.startswith("|") else None
        assert header is None or line.count("|") == header, line
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_cli_reduced_cw_budget_is_used_and_recorded(tiny_run, tmp_path):
    from experiments import evaluate as cli
    out = tmp_path / "cw"
    assert cli.main(["--workdir", tiny_run, "--attacks", "carlini_wagner_l2", "--n", "16",
                     "--cw_binary_steps", "2", "--cw_steps", "5", "--no_diagnostics",
                     "--out", str(out), "--no_progress"]) == 0
    (rec,) = json.load(open(out / "robustness.json"))["results"]
    assert rec["attack"] == "carlini_wagner_l2"
    assert rec["settings"]["binary_steps"] == 2 and rec["settings"]["steps"] == 5


def test_evaluation_is_independent_of_batch_size_and_device_count():
    # conftest.py gives the process 4 CPU devices. The attacks are per-example,
    # so splitting each batch across devices must not change which examples
    # survive; nor may the batch size (the draws are keyed by example index).
    from gce_jax import parallel
    from gce_jax.models import get_model, logits_fn

    model = get_model("lenet5", num_classes=10, dataset="mnist")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    fn = logits_fn(model, variables)
    x = np.random.default_rng(0).random((30, 28, 28, 1)).astype(np.float32)
    y = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1)).astype(np.int32)
    y[::3] = (y[::3] + 1) % 10  # some clean errors
    specs = [R.AttackSpec("fgsm", 0.02), R.AttackSpec("pgd", 0.02, params={"steps": 4}),
             R.AttackSpec("apgd", 0.02, params={"steps": 4}),
             R.AttackSpec("square", 0.02, loss="margin", params={"n_queries": 8}),
             R.AttackSpec("carlini_wagner_l2", None, loss=None,
                          params={"binary_steps": 2, "steps": 5})]  # targets drawn
    mesh = parallel.make_mesh(jax.devices()[:4])
    one = R.Evaluator(fn, x, y, batch_size=30, progress=False)
    small = R.Evaluator(fn, x, y, batch_size=7, progress=False)  # 30 = 4*7 + 2: padded
    four = R.Evaluator(fn, x, y, batch_size=18, progress=False, mesh=mesh)
    assert four.batch_size == 20  # rounded up to a multiple of the devices
    np.testing.assert_array_equal(four.clean_correct, one.clean_correct)
    for s in specs:
        a = one.run(s)
        for other in (small, four):
            b = other.run(s)
            np.testing.assert_array_equal(b.robust, a.robust, err_msg=s.label)
            assert b.record["max_linf"] == pytest.approx(a.record["max_linf"], abs=1e-6)
            for k in ("success_rate", "num_success", "targeted"):
                assert b.record[k] == a.record[k], (s.label, k)
            for k in ("mean_l0", "mean_l2"):
                assert (b.record[k] is None) == (a.record[k] is None), (s.label, k)
                if a.record[k] is not None:
                    assert b.record[k] == pytest.approx(a.record[k], rel=1e-4, abs=1e-6)
    assert any(0 < one.run(s).robust.sum() < one.clean_correct.sum() for s in specs)


@pytest.mark.slow
def test_cli_autoattack_end_to_end(tiny_run, tmp_path):
    from experiments import evaluate as cli
    out = tmp_path / "aa"
    assert cli.main(["--workdir", tiny_run, "--attacks", "autoattack", "pgd", "--eps", "0.1",
                     "--n", "24", "--pgd_steps", "5", "--apgd_steps", "3",
                     "--square_queries", "20", "--no_diagnostics", "--out", str(out),
                     "--no_progress"]) == 0
    rep = json.load(open(out / "robustness.json"))
    rows = rep["results"]
    assert [r["label"] for r in rows] == [
        "autoattack", "autoattack > apgd-ce", "autoattack > apgd-t", "autoattack > fab-t",
        "autoattack > square", "pgd-xe"]
    assert rows[0]["settings"]["steps"] == 3 and rows[0]["settings"]["n_queries"] == 20
    assert rows[0]["max_linf"] <= 0.1 + 1e-5
    cumulative = [r["robust_accuracy"] for r in rows[1:5]]
    assert cumulative == sorted(cumulative, reverse=True)
    assert cumulative[-1] == rows[0]["robust_accuracy"] < rows[0]["clean_accuracy"]
    (group,) = rep["best_robust"]
    assert group["attacks"] == ["autoattack", "pgd-xe"]
    assert group["robust_accuracy"] <= rows[0]["robust_accuracy"]
    assert "| autoattack > apgd-t |" in (out / "robustness.md").read_text()
