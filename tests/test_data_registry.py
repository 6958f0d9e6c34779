"""A user's data set under its own name: registered, trained, evaluated and reported as itself.

The end-to-end test writes a small set in IDX format (MNIST's), registers it
with its own name, class names and normalisation, trains a tiny LeNet-5 on it
and evaluates the checkpoint with ``experiments.evaluate``; the run's
config.json, the model and the robustness report must all carry that name and
those class names, also when the evaluating process never registered the set.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gce_jax import data
from gce_jax.data import DataError, registry

CLASSES = ("ring", "bar", "dot", "cross")
MEAN, STD = (0.2,), (0.35,)
FILES = {"train": ("shapes-train-images.idx", "shapes-train-labels.idx"),
         "test": ("shapes-test-images.idx", "shapes-test-labels.idx")}


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Each test registers into a copy: nothing leaks into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def write_idx(path: Path, arr: np.ndarray) -> None:
    magic = 0x0800 | arr.ndim  # unsigned bytes, ndim dimensions
    path.write_bytes(struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                     + arr.astype(np.uint8).tobytes())


def learnable(n: int, seed: int, k: int = len(CLASSES), shape=(28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """The class sets which horizontal band of the image is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    x[np.arange(shape[0])[None, :] // (shape[0] // k) == y[:, None]] = 255  # [n, H] rows
    return x, y


def write_shapes(d: Path, n_train: int = 96, n_test: int = 40) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = learnable(n, seed)
        write_idx(d / FILES[split][0], x)
        write_idx(d / FILES[split][1], y)
        out[split] = (x, y)
    return out


def register_shapes(**overrides):
    kw = dict(format="idx", image_shape=(28, 28, 1), class_names=CLASSES, mean=MEAN, std=STD,
              idx_files=FILES)
    kw.update(overrides)
    return data.register_dataset("shapes", **kw)


def tiny_config(data_dir: Path):
    from experiments.configs import default
    c = default.get_config()
    c.name = "shapes_lenet5_xe"
    c.model, c.dataset, c.loss = "lenet5", "shapes", "xe"
    c.data.data_dir = str(data_dir)
    c.data.val_size = 16
    c.optimizer.name, c.optimizer.learning_rate = "adam", 3e-3
    c.batch_size, c.eval_batch_size, c.epochs = 16, 32, 1
    c.progress_bar, c.log_every_steps = False, 2
    c.eval.pgd_eps = (0.1,)
    return c


# ----------------------------------------------------------------------------- registry
def test_register_and_load_under_its_own_name(tmp_path):
    want = write_shapes(tmp_path / "shapes")
    spec = register_shapes()
    assert "shapes" in data.dataset_names() and data.get_dataset("shapes") is spec
    assert data.DATASETS["shapes"] == ((28, 28, 1), 4) == data.dataset_info("shapes")
    assert register_shapes() is spec  # the same values again: a no-op
    # data_dir, or its parent (data_dir/<name>), as for the built-in sets
    for data_dir in (tmp_path / "shapes", tmp_path):
        for split in ("train", "test"):
            ds = data.load_split("shapes", split, data_dir=data_dir)
            assert ds.name == "shapes" and ds.class_names == CLASSES and ds.num_classes == 4
            np.testing.assert_array_equal(ds.images[..., 0], want[split][0])
            np.testing.assert_array_equal(ds.labels, want[split][1])
            assert not os.path.isabs(ds.origin.split(":", 1)[1])
    with pytest.raises(DataError, match="no split 'val'"):
        data.load_split("shapes", "val", data_dir=tmp_path)


def test_registry_rejects_bad_or_conflicting_registrations():
    register_shapes()
    with pytest.raises(DataError, match="already registered"):
        register_shapes(mean=(0.5,))
    assert data.get_dataset("shapes").mean == MEAN  # unchanged
    assert register_shapes(mean=(0.5,), overwrite=True).mean == (0.5,)
    with pytest.raises(DataError, match="built-in"):
        data.register_dataset("mnist", format="idx", image_shape=(28, 28, 1), num_classes=10,
                              overwrite=True)
    bad = [
        (dict(format="hdf5"), "unknown format"),
        (dict(class_names=("a", "b", "a")), "distinct"),
        (dict(class_names=None), "num_classes"),
        (dict(mean=(0.1, 0.2), std=(0.3, 0.3)), "one value per channel"),
        (dict(std=(0.0,)), "std must be > 0"),
        (dict(std=None), "both mean and std"),
        (dict(image_shape=(28, 28)), "image_shape"),
        (dict(mean=(float("nan"),)), "finite"),
    ]
    for kw, match in bad:
        with pytest.raises(DataError, match=match):
            data.register_dataset("other", **{**dict(format="idx", image_shape=(28, 28, 1),
                                                    class_names=CLASSES, mean=MEAN, std=STD), **kw})
    assert "other" not in data.dataset_names()
    with pytest.raises(DataError, match="letters, digits"):
        data.register_dataset("../up", format="idx", image_shape=(28, 28, 1), num_classes=2)
    with pytest.raises(DataError, match="register_dataset"):
        data.get_dataset("svhn")


def test_models_take_normalisation_and_classes_from_the_registry():
    from gce_jax.models import get_model
    register_shapes()
    model = get_model("lenet5", dataset="shapes")
    assert model.num_classes == 4
    assert tuple(model.normalize.mean) == MEAN and tuple(model.normalize.std) == STD
    # The built-in statistics live in the registry too (MNIST: raw pixels).
    cifar = data.get_dataset("cifar10")
    assert tuple(get_model("resnet20", dataset="cifar10").normalize.mean) == cifar.mean
    assert get_model("lenet5", num_classes=10, dataset="mnist").normalize.mean is None
    with pytest.raises(DataError, match="svhn"):
        get_model("lenet5", num_classes=10, dataset="svhn")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("lenet5")


def test_multichannel_idx_and_image_folders_use_the_registered_names(tmp_path):
    # IDX of (N, H, W, C) for C > 1, with MNIST's default file names.
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1], np.uint8)
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "idx" / "t10k-labels-idx1-ubyte", y)
    data.register_dataset("rgb3", format="idx", image_shape=(8, 8, 3), num_classes=3)
    ds = data.load_split("rgb3", "test", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(ds.images, x)
    assert ds.class_names == ("0", "1", "2")
    # Image folders: labels follow the registered class order, not the alphabet.
    names = ("zebra", "ant", "moth")
    for i, c in enumerate(names):
        (tmp_path / "img" / "train" / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "img" / "train" / c / "0.png")
    data.register_dataset("bugs", format="image_folder", image_shape=(8, 8, 1), class_names=names)
    ds = data.load_split("bugs", "train", data_dir=tmp_path / "img", cache=False)
    assert ds.class_names == names
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [0, 40, 80])


def test_a_config_describes_a_data_set_without_the_registry(tmp_path):
    from gce_jax import train
    write_shapes(tmp_path)
    c = tiny_config(tmp_path)
    with pytest.raises(train.ConfigError, match="unknown dataset 'shapes'"):
        train.validate_config(c)
    c.data.format, c.data.image_shape = "idx", (28, 28, 1)
    c.data.class_names, c.data.mean, c.data.std = CLASSES, MEAN, STD
    c.data.idx_files = {s: list(f) for s, f in FILES.items()}
    train.validate_config(c)
    assert "shapes" not in data.dataset_names()  # describing is not registering
    spec = data.dataset_from_config(c)
    assert spec == register_shapes()  # the same set as the registry call describes
    sets = train.load_datasets(c)
    assert (len(sets.train), len(sets.val), len(sets.test)) == (80, 16, 40)
    assert sets.test.name == "shapes" and sets.test.class_names == CLASSES
    model = train.create_model(c, 4)
    assert tuple(model.normalize.mean) == MEAN
    c.data.mean = (0.9,)  # now it differs from the registered 'shapes'
    with pytest.raises(train.ConfigError, match="already registered"):
        train.validate_config(c)
    c.dataset = "mnist"  # a built-in name cannot be redescribed either
    with pytest.raises(train.ConfigError, match="dataset='mnist'"):
        train.validate_config(c)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_and_evaluate_a_registered_data_set(tmp_path, capsys):
    from experiments import evaluate as cli
    from gce_jax import train
    write_shapes(tmp_path / "data")
    register_shapes()
    workdir = tmp_path / "runs" / "shapes_lenet5_xe"
    metrics = train.train_and_evaluate(tiny_config(tmp_path / "data"), str(workdir))
    assert 0.0 <= metrics["test_acc"] <= 1.0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["dataset"] == "shapes"
    recorded = saved["resolved"]["dataset"]
    assert recorded["name"] == "shapes" and tuple(recorded["class_names"]) == CLASSES
    assert tuple(recorded["mean"]) == MEAN and saved["resolved"]["num_classes"] == 4

    def evaluate(out: Path) -> dict:
        argv = ["--workdir", str(workdir), "--attacks", "fgsm", "--eps", "0.1", "--n", "24",
                "--no_diagnostics", "--no_progress", "--out", str(out)]
        assert cli.main(argv) == 0, capsys.readouterr().err
        return json.loads((out / "robustness.json").read_text())

    rep = evaluate(tmp_path / "results" / "a")
    assert rep["run"] == "shapes_lenet5_xe"
    assert rep["model"]["dataset"] == "shapes" and rep["model"]["num_classes"] == 4
    assert rep["data"]["dataset"] == "shapes" and tuple(rep["data"]["class_names"]) == CLASSES
    assert rep["data"]["total"] == 40 and rep["data"]["n"] == 24
    assert not os.path.isabs(rep["workdir"]) and not rep["workdir"].startswith("/")
    md = (tmp_path / "results" / "a" / "robustness.md").read_text()
    assert "on shapes" in md

    # A fresh process knows nothing of the registration: the run's config.json
    # describes the set, and the model gets the statistics it trained with.
    del registry._REGISTRY["shapes"]
    model, _, _ = train.load_for_eval(str(workdir))
    assert tuple(model.normalize.mean) == MEAN and model.num_classes == 4
    again = evaluate(tmp_path / "results" / "b")
    assert tuple(again["data"]["class_names"]) == CLASSES
    assert again["results"][0]["robust_accuracy"] == rep["results"][0]["robust_accuracy"]


def test_readme_data_set_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- readme-data-example")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    spec = data.get_dataset("fashion_mnist")
    assert spec.num_classes == 10 and spec.class_names[-1] == "ankle boot"
    assert scope["model"].num_classes == 10 and tuple(scope["model"].normalize.mean) == (0.286,)


RECIPE = '''
from experiments.configs import default


def get_config(variant="xe"):
    c = default.get_config()
    c.name = f"shapes_lenet5_{{variant}}"
    c.model, c.dataset = "lenet5", "shapes"
    c.loss = "gce" if variant == "gce" else "xe"
    c.data.format, c.data.image_shape = "idx", (28, 28, 1)
    c.data.class_names, c.data.mean, c.data.std = {classes!r}, {mean!r}, {std!r}
    c.data.idx_files = {files!r}
    c.data.data_dir = {data_dir!r}
    c.data.val_size = 16
    c.optimizer.name, c.optimizer.learning_rate = "adam", 3e-3
    c.batch_size, c.eval_batch_size, c.epochs = 16, 32, 1
    c.eval.pgd_eps = (0.1, 0.2)
    return c
'''


@pytest.mark.slow
def test_reproduce_a_table_on_a_user_data_set(tmp_path, capsys):
    """Table 3 on a set the paper never used: the recipe file describes it (what a
    command-line user writes), and every run, report and table carries its name."""
    from experiments import reproduce
    write_shapes(tmp_path / "data")
    recipe = tmp_path / "shapes_lenet5.py"
    recipe.write_text(RECIPE.format(classes=CLASSES, mean=MEAN, std=STD,
                                    files={s: list(f) for s, f in FILES.items()},
                                    data_dir=str(tmp_path / "data")))
    argv = ["--target", "table3", "--datasets", "shapes", "--recipe", f"shapes={recipe}",
            "--skip_slow", "--skip_diag", "--n", "24", "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--weights_dir", ""]
    assert reproduce.main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "shapes_lenet5_gce_s0", "shapes_lenet5_xe_s0"]
    reports = sorted((tmp_path / "results" / "evaluations").rglob("robustness.json"))
    assert [p.parent.parent.name for p in reports] == ["main-eps0.1-0.2"] * 2
    for p in reports:
        rep = json.loads(p.read_text())
        assert rep["run"].startswith("shapes_lenet5_")
        assert rep["data"]["dataset"] == "shapes" and tuple(rep["data"]["class_names"]) == CLASSES
        assert {r["eps"] for r in rep["results"] if r["attack"] == "pgd"} == {0.1, 0.2}
    table = json.loads((tmp_path / "results" / "table3" / "table3.json").read_text())
    assert list(table) == ["shapes"] and table["shapes"]["reports"]["gce"]["main"] == [
        "shapes_lenet5_gce_s0"]
    md = (tmp_path / "results" / "table3" / "table3.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| PGD | ε=0.2 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == cells[5] == "—" and 0.0 <= float(cells[2]) <= 100.0  # no paper column
    assert "## shapes" in md and "mnist" not in md
    assert f"shapes recipe **{recipe}** (not the paper's)" in md  # the header names the recipe
    # A data set with neither a built-in recipe nor --recipe: one line, nothing written.
    bad = reproduce.main(["--target", "table3", "--datasets", "other",
                          "--results_dir", str(tmp_path / "r2"), "--runs_dir", str(tmp_path / "r3")])
    assert bad == 2 and "--recipe" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()
