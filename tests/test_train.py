"""The training loop end to end on a tiny synthetic problem (LeNet-5, 1 device).

One uninterrupted 2-epoch run and one run stopped after epoch 1 are built once
per module and shared; each test copies what it needs to mutate.
"""

import hashlib
import json
import os
import re
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from gce_jax import parallel, train
from gce_jax.data import ArrayDataset

def synthetic(n, seed, shape=(28, 28, 1), k=10):
    """Learnable toy data: the class sets the brightness of one image row band."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    rows = shape[0] // k
    for i, c in enumerate(y):
        x[i, c * rows:(c + 1) * rows] = 255
    return ArrayDataset(x, y, k, "synthetic")


DATA = train.Datasets(synthetic(64, 0), synthetic(32, 1), synthetic(40, 2))


def tiny_config(**overrides):
    c = default.get_config()
    c.model, c.dataset, c.loss = "lenet5", "mnist", "gce"
    c.optimizer.name, c.optimizer.learning_rate = "adam", 3e-3
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.99
    c.batch_size, c.eval_batch_size = 16, 32
    c.epochs, c.data.val_size, c.selection = 2, 32, "best_val"
    c.checkpoint.keep = 2
    c.progress_bar, c.log_every_steps = False, 2
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def one_device():
    return parallel.make_mesh(jax.devices()[:1])


def tree_digest(path) -> dict:
    """{relative path: sha256} of every file under path (detects any change)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    full, part = str(base / "full"), str(base / "part")
    result = train.train_and_evaluate(tiny_config(), full, datasets=DATA, mesh=one_device())
    train.train_and_evaluate(tiny_config(epochs=1), part, datasets=DATA, mesh=one_device())
    stopped = str(base / "stopped_after_1")
    shutil.copytree(part, stopped)
    # The resumed half prefetches in a thread (the others run synchronously on
    # this small CPU host), so bit-identity below also covers prefetching.
    resumed = train.train_and_evaluate(tiny_config(**{"data.prefetch": 2}), part, datasets=DATA,
                                       mesh=one_device())
    return {"full": full, "resumed": part, "stopped": stopped,
            "result": result, "resumed_result": resumed}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_outputs_metrics_and_selection(runs, caplog):
    wd, result = runs["full"], runs["result"]
    lines = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "epoch_time_s",
                    "wall_time_s", "images_per_s", "data_wait_s"):
            assert key in r and r[key] is not None and np.isfinite(r[key]), key
        assert 0 <= r["data_wait_s"] <= r["epoch_time_s"]
        assert 0 < r["first_step_s"] < r["epoch_time_s"]
        assert r["lr"] == pytest.approx(3e-3)
    assert lines[1]["train_loss"] < lines[0]["train_loss"]  # it learns
    assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tb")))
    with open(os.path.join(wd, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model"] == "lenet5" and cfg["resolved"]["num_classes"] == 10
    assert cfg["resolved"]["input_shape"] == [28, 28, 1]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]

    # best_val selection: the epoch with the highest validation accuracy
    # (first one on ties), and its test accuracy, never the best test one.
    val = [r["val_acc"] for r in lines]
    best = int(np.argmax(val)) + 1
    assert result["selected_epoch"] == best
    assert result["test_acc"] == pytest.approx(lines[best - 1]["test_acc"])
    with caplog.at_level(logging.WARNING, logger="absl"):
        model, variables, config = train.load_for_eval(wd)
    # Reading a run opens no orbax manager: no "Given directory is read only".
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
    assert config.selection == "best_val"
    acc = train.evaluate_accuracy(model, variables, DATA.test, 40, mesh=one_device())
    assert acc == pytest.approx(result["test_acc"])
    # 'last' restores epoch 2, whose test accuracy was logged.
    model, variables, _ = train.load_for_eval(wd, "last")
    acc_last = train.evaluate_accuracy(model, variables, DATA.test, 8)  # all 4 devices
    assert acc_last == pytest.approx(lines[1]["test_acc"])


def test_prefetch_depth_auto_and_explicit(monkeypatch):
    assert train.prefetch_depth(tiny_config(**{"data.prefetch": 3})) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert train.prefetch_depth(tiny_config()) == 0  # 2-core CPU host: no thread
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert train.prefetch_depth(tiny_config()) == 2


def test_resume_is_bit_identical(runs):
    _, v_full, _ = train.load_for_eval(runs["full"], "last")
    _, v_res, _ = train.load_for_eval(runs["resumed"], "last")
    for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_res)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    full = read_jsonl(os.path.join(runs["full"], "metrics.jsonl"))
    res = read_jsonl(os.path.join(runs["resumed"], "metrics.jsonl"))
    assert [r["epoch"] for r in res] == [1, 2]
    assert res[1]["train_loss"] == full[1]["train_loss"]
    assert res[1]["val_acc"] == full[1]["val_acc"]
    # The resumed run really started from epoch 1's checkpoint: a different
    # seed would not reproduce epoch 2.
    assert runs["resumed_result"]["test_acc"] == runs["result"]["test_acc"]


def test_finished_run_is_not_retrained(runs, tmp_path):
    wd = str(tmp_path / "done")
    shutil.copytree(runs["full"], wd)
    before = tree_digest(wd)
    result = train.train_and_evaluate(tiny_config(), wd, datasets=DATA, mesh=one_device())
    assert result["test_acc"] == pytest.approx(runs["result"]["test_acc"])
    # Nothing rewritten, config.json and tb/ included: a finished run can be
    # re-opened read-only (tests/test_cli.py runs it in a read-only workdir).
    assert tree_digest(wd) == before


def test_nan_loss_stops_with_step_and_epoch_and_keeps_last_good_checkpoint(
        runs, tmp_path, monkeypatch):
    wd = str(tmp_path / "nan")
    shutil.copytree(runs["stopped"], wd)
    before = tree_digest(os.path.join(wd, "checkpoints"))

    def nan_objective(config):
        return lambda logits, labels: jnp.full(labels.shape, jnp.nan) + jnp.sum(logits, -1)

    monkeypatch.setattr(train, "create_objective", nan_objective)
    with pytest.raises(train.TrainingError, match=r"step 4 \(epoch 2\)"):
        train.train_and_evaluate(tiny_config(), wd, datasets=DATA, mesh=one_device())
    assert isinstance(train.TrainingError("x"), FloatingPointError)
    # Epoch 1's checkpoint untouched, nothing saved or logged for epoch 2.
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1"]
    assert tree_digest(os.path.join(wd, "checkpoints")) == before
    assert len(read_jsonl(os.path.join(wd, "metrics.jsonl"))) == 1
    monkeypatch.undo()
    _, v, _ = train.load_for_eval(wd, "last")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(v))


@pytest.mark.parametrize("field,value,match", [
    ("loss", "hinge", "loss='hinge'"),
    ("model", "vgg16", "model='vgg16'"),
    ("dataset", "imagenet", "dataset='imagenet'"),
    ("alpha", -0.5, "alpha=-0.5"),
    ("batch_size", 10, "batch_size=10"),
    ("optimizer.name", "rmsprop", "optimizer.name"),
    ("selection", "best_test", "never test"),
    ("training.method", "mixup", "training.method"),
    ("data.prefetch", -1, "data.prefetch"),
    # Issue 18: these passed validation, and the run failed later with a NaN.
    ("optimizer.learning_rate", float("inf"), "optimizer.learning_rate=inf"),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate=nan"),
    ("optimizer.b1", 1.5, "optimizer.b1=1.5"),
    ("optimizer.b2", -0.1, "optimizer.b2=-0.1"),
    ("optimizer.eps", 0.0, "optimizer.eps=0.0"),
    ("optimizer.weight_decay", float("inf"), "optimizer.weight_decay=inf"),
    ("alpha", float("nan"), "alpha=nan"),
])
def test_bad_config_raises_before_writing(runs, tmp_path, field, value, match):
    wd = str(tmp_path / "existing")
    shutil.copytree(runs["stopped"], wd)
    before = tree_digest(wd)
    mesh4 = parallel.make_mesh(jax.devices()[:4])
    with pytest.raises(train.ConfigError, match=re.escape(match)) as info:
        train.train_and_evaluate(tiny_config(**{field: value}), wd, datasets=DATA, mesh=mesh4)
    assert "\n" not in str(info.value)
    assert tree_digest(wd) == before
    fresh = str(tmp_path / "fresh")
    with pytest.raises(train.ConfigError):
        train.train_and_evaluate(tiny_config(**{field: value}), fresh, datasets=DATA, mesh=mesh4)
    assert not os.path.exists(fresh)


@pytest.mark.parametrize("field,value,match", [
    ("model", "resnet20", "model 'lenet5' -> 'resnet20'"),
    # Issue 18: these went on silently and rewrote config.json.
    ("seed", 1, "seed 0 -> 1"),
    ("optimizer.learning_rate", 1e-3, "optimizer.learning_rate 0.003 -> 0.001"),
    ("batch_size", 32, "batch_size 16 -> 32"),
    ("data.val_size", 16, "data.val_size 32 -> 16"),
    ("optimizer.b2", 0.999, "optimizer.b2"),
    ("data.augment", True, "data.augment"),
])
def test_resuming_with_a_changed_config_is_refused(runs, tmp_path, field, value, match):
    wd = str(tmp_path / "existing")
    shutil.copytree(runs["stopped"], wd)
    before = tree_digest(wd)
    with pytest.raises(train.ConfigError, match=re.escape(match)):
        train.train_and_evaluate(tiny_config(**{field: value}), wd, datasets=DATA,
                                 mesh=one_device())
    assert tree_digest(wd) == before


def test_more_epochs_on_resume_is_recorded(runs):
    # runs["resumed"] trained 1 epoch, then was resumed with epochs=2.
    with open(os.path.join(runs["resumed"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["epochs"] == 2
    assert cfg["config_history"] == [{"resumed_at_epoch": 1, "changes": {"epochs": [1, 2]}}]
    with open(os.path.join(runs["full"], "config.json")) as f:
        assert "config_history" not in json.load(f)


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": 1}, "already completed 2"),
    ({"epochs": 3, "lr_schedule.name": "cosine"}, "lr_schedule.name"),
])
def test_resume_changes_that_would_rewrite_history_are_refused(runs, tmp_path, overrides,
                                                               match):
    wd = str(tmp_path / "existing")
    shutil.copytree(runs["full"], wd)
    before = tree_digest(wd)
    with pytest.raises(train.ConfigError, match=match):
        train.train_and_evaluate(tiny_config(**overrides), wd, datasets=DATA, mesh=one_device())
    assert tree_digest(wd) == before


def test_resume_changes_are_sorted_into_refused_recorded_and_ignored():
    old = {"seed": 0, "epochs": 2, "lr_schedule": {"name": "cosine"}, "progress_bar": True,
           "eval": {"pgd_eps": [0.1]}, "resolved": {"device_count": 1, "num_classes": 10}}
    new = dict(old, progress_bar=False, eval={"pgd_eps": [0.3]},
               resolved={"device_count": 4, "num_classes": 10}, added_by_upgrade=1)
    assert train.resume_changes(old, new, 2) == {
        "added_by_upgrade": [None, 1], "eval.pgd_eps": [[0.1], [0.3]],
        "resolved.device_count": [1, 4]}
    with pytest.raises(train.ConfigError, match="resolved.num_classes 10 -> 100"):
        train.resume_changes(old, dict(new, resolved={"num_classes": 100}), 2)
    with pytest.raises(train.ConfigError, match="cosine"):
        train.resume_changes(old, dict(old, epochs=3), 2)


@pytest.mark.parametrize("model,loss", [("lenet5", "xe"), ("lenet5", "gce"),
                                        ("resnet20", "gce")])
def test_bfloat16_compute_keeps_training_losses_finite(tmp_path, model, loss):
    # dtype='bfloat16' is the GPU/TPU mixed-precision setting: activations in
    # bf16, params and the loss in float32. It must not make a loss non-finite
    # (the loop would stop with a NaN error, which this would surface).
    overrides = {"dtype": "bfloat16", "epochs": 1, "loss": loss}
    data = DATA
    if model == "resnet20":
        overrides.update(model="resnet20", dataset="cifar10")
        data = train.Datasets(*(synthetic(n, seed, shape=(32, 32, 3))
                                for n, seed in ((64, 0), (32, 1), (40, 2))))
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path), datasets=data,
                             mesh=one_device())
    (line,) = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
        assert np.isfinite(line[key]), key
    if loss == "gce":
        assert -1.0 <= line["train_loss"] <= 0.0  # normalised GCE's range


def test_optimizer_and_schedule():
    c = tiny_config(**{"optimizer.name": "sgd", "optimizer.learning_rate": 0.1,
                       "optimizer.weight_decay": 1e-4, "lr_schedule.name": "piecewise",
                       "lr_schedule.boundaries_epochs": (100, 150)})
    lr = train.create_learning_rate_fn(c, steps_per_epoch=10)
    assert float(lr(999)) == pytest.approx(0.1)
    assert float(lr(1000)) == pytest.approx(0.01)
    assert float(lr(1500)) == pytest.approx(0.001)
    # PyTorch SGD semantics: buf = m*buf + (g + wd*p); p -= lr*buf.
    tx = train.create_optimizer(c, steps_per_epoch=10)
    p, g = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 0.25])}
    s = tx.init(p)
    u1, s = tx.update(g, s, p)
    buf = g["w"] + 1e-4 * p["w"]
    np.testing.assert_allclose(u1["w"], -0.1 * buf, rtol=1e-6)
    p2 = {"w": p["w"] + u1["w"]}
    u2, _ = tx.update(g, s, p2)
    np.testing.assert_allclose(u2["w"], -0.1 * (0.9 * buf + g["w"] + 1e-4 * p2["w"]), rtol=1e-6)


CONFIGS = {
    "mnist_lenet5": ("xe", "gce", "cot", "adv_xe", "adv_gce"),
    "cifar10_resnet56": ("xe", "gce", "cot", "adv_xe", "adv_gce"),
    "cifar100_resnet56": ("xe", "gce"),
    "tiny_imagenet_resnet50": ("xe", "gce"),
    "cifar10_reduced": ("xe", "gce", "cot", "adv_xe", "adv_gce"),
}


def _load(name, variant):
    import importlib
    return importlib.import_module(f"experiments.configs.{name}").get_config(variant)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_experiment_configs_are_valid(name):
    mesh4 = parallel.make_mesh(jax.devices()[:4])
    for variant in CONFIGS[name]:
        c = _load(name, variant)
        train.validate_config(c, mesh4)
        assert c.selection in ("last", "best_val")
        if variant in ("xe", "gce"):
            assert c.loss == variant
    with pytest.raises(ValueError):
        _load(name, "nope")


def test_paper_settings_in_configs():
    m = _load("mnist_lenet5", "gce")
    assert (m.optimizer.name, m.optimizer.learning_rate, m.optimizer.b1, m.optimizer.b2,
            m.batch_size, m.epochs, m.alpha) == ("adam", 1e-3, 0.9, 0.99, 64, 20, 1 / 3)
    r = _load("cifar10_resnet56", "xe")
    assert (r.model, r.optimizer.name, r.optimizer.momentum, r.optimizer.weight_decay,
            r.optimizer.learning_rate, tuple(r.lr_schedule.boundaries_epochs),
            r.lr_schedule.decay_factor, r.epochs, r.batch_size) == (
        "resnet56", "sgd", 0.9, 1e-4, 0.1, (100, 150), 0.1, 200, 128)
    assert _load("cifar100_resnet56", "gce").dataset == "cifar100"
    t = _load("tiny_imagenet_resnet50", "gce")
    assert (t.model, t.dataset, t.epochs) == ("resnet50", "tiny_imagenet", 200)
    red = _load("cifar10_reduced", "gce")
    assert red.model == "resnet20" and red.epochs < 20 and "reduced" in red.name


def test_config_names_come_from_the_registries():
    from gce_jax import losses
    from gce_jax.models import MODEL_NAMES

    mesh4 = parallel.make_mesh(jax.devices()[:4])
    for field, value, names in [("loss", "hinge", losses.LOSS_NAMES),
                                ("model", "vgg16", MODEL_NAMES),
                                ("training.cot.complement_normalization", "k",
                                 train.COMPLEMENT_NORMALIZATIONS)]:
        c = tiny_config(**{field: value, "loss": "xe" if field != "loss" else value,
                           "training.method": "cot"})
        with pytest.raises(train.ConfigError, match=re.escape(f"{field}={value!r}: expected "
                                                               f"one of {tuple(names)}")):
            train.validate_config(c, mesh4)
    with pytest.raises(train.ConfigError, match="dataset='nope'"):
        train.validate_config(tiny_config(dataset="nope"), mesh4)
    # Every bad value of every section is named in the one error.
    c = tiny_config(**{"optimizer.learning_rate": -1.0, "epochs": 0, "data.val_size": -1,
                       "batch_size": 10})
    with pytest.raises(train.ConfigError) as info:
        train.validate_config(c, mesh4)
    for part in ("optimizer.learning_rate=-1.0", "epochs=0", "data.val_size=-1",
                 "batch_size=10"):
        assert part in str(info.value)
