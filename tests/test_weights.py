"""Published weights: publish/load round trip, checksums, no partial folders, and
every committed model under ``weights/`` loads and classifies real test images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gce_jax import train, weights
from gce_jax.checkpoint import variables_fingerprint
from test_train import DATA, one_device, tiny_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
PUBLISHED = sorted(p for p in (REPO / "weights").glob("*") if weights.is_published(str(p)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("weights") / "run")
    train.train_and_evaluate(tiny_config(), workdir, datasets=DATA, mesh=one_device())
    return workdir


def _publish(run, out):
    return weights.publish(run, str(out), command="python -m experiments.train (test)",
                           provenance={"git": {}, "hardware": {}})


def test_round_trip_equals_the_run(run, tmp_path):
    out = tmp_path / "pub"
    manifest = _publish(run, out)
    model, variables, config = weights.load_published(str(out))
    ref_model, ref_vars, _ = train.load_for_eval(run)
    assert variables_fingerprint(variables) == variables_fingerprint(ref_vars)
    assert manifest["variables_sha256"] == variables_fingerprint(ref_vars)
    metrics = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    best = max(metrics, key=lambda m: (m["val_acc"], -m["epoch"]))
    assert manifest["selection"] == "best_val" and manifest["selected_epoch"] == best["epoch"]
    x = DATA.test.images[:8].astype(np.float32) / 255.0
    np.testing.assert_array_equal(model.apply(variables, x), ref_model.apply(ref_vars, x))
    assert config.model == "lenet5"


def test_refuses_to_overwrite_and_leaves_nothing_when_interrupted(run, tmp_path, monkeypatch):
    out = tmp_path / "pub"
    _publish(run, out)
    before = sorted(os.listdir(out))
    with pytest.raises(weights.WeightsError, match="exists"):
        _publish(run, out)
    assert sorted(os.listdir(out)) == before

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(shutil, "copyfile", boom)
    with pytest.raises(OSError, match="disk full"):
        _publish(run, tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["pub"]  # no partial folder, no temp left


def test_a_changed_byte_fails_the_checksum(run, tmp_path):
    out = tmp_path / "pub"
    _publish(run, out)
    path = out / weights.VARIABLES_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.load_published(str(out))


def test_not_a_published_folder(tmp_path):
    assert not weights.is_published(str(tmp_path))
    with pytest.raises(weights.WeightsError, match="manifest"):
        weights.load_published(str(tmp_path))


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_committed_weights_load_and_classify(folder):
    from gce_jax.data import load_split

    manifest = weights.read_manifest(str(folder))
    model, variables, config = weights.load_published(str(folder))  # checks the sha256
    assert variables_fingerprint(variables) == manifest["variables_sha256"]
    local = {"mnist": SHARED / "mnist", "cifar10": SHARED / "cifar10-jpeg.tar.gz"}
    data_dir = local.get(config.dataset)
    if data_dir is None or not data_dir.exists():
        pytest.skip(f"no local copy of {config.dataset}")
    test = load_split(config.dataset, "test", data_dir=str(data_dir))
    x = test.images[:200].astype(np.float32) / 255.0
    acc = float(np.mean(np.argmax(jax.jit(model.apply)(variables, x), -1) == test.labels[:200]))
    metrics = [json.loads(l) for l in open(folder / "metrics.jsonl")]
    recorded = next(m["test_acc"] for m in metrics if m["epoch"] == manifest["selected_epoch"])
    # 200 images: within 4 binomial standard deviations of the recorded accuracy.
    assert acc >= recorded - 4 * np.sqrt(recorded * (1 - recorded) / 200) - 0.005, (acc, recorded)


def test_evaluate_runs_on_a_published_folder(run, tmp_path):
    from experiments import evaluate

    pub = tmp_path / "pub"
    manifest = _publish(run, pub)
    out = tmp_path / "report"
    # The tiny run trained on synthetic images; evaluate it on MNIST's test set.
    if not (SHARED / "mnist").exists():
        pytest.skip("../shared/data/mnist not present")
    cfg = json.loads((pub / "config.json").read_text())
    cfg["data"]["data_dir"], cfg["data"]["source"] = str(SHARED / "mnist"), "local"
    (pub / "config.json").write_text(json.dumps(cfg))
    rc = evaluate.main(["--no_progress", "--workdir", str(pub), "--attacks", "fgsm",
                        "--eps", "0.1", "--n", "16", "--no_diagnostics", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["model"]["variables_sha256"] == manifest["variables_sha256"]
    # The library call on the same folder gives the same numbers.
    from experiments.evaluation_api import evaluate_checkpoint, get_eval_config
    lib = evaluate_checkpoint(str(pub), get_eval_config(
        attacks="fgsm", eps=(0.1,), n=16, diagnostics=False, progress=False,
        out=str(tmp_path / "lib")))
    assert lib.variables_sha256 == manifest["variables_sha256"]
    assert lib.eval_config_sha256 == report["eval_config_sha256"]
    assert [r["robust_accuracy"] for r in lib.results] == [
        r["robust_accuracy"] for r in report["results"]]
