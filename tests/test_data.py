"""gce_jax.data: real offline data, small files in every official format, tfds mocks,
error reporting and the batch pipeline."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from gce_jax import data
from gce_jax.testing import FAKE_WNIDS, write_fake_tiny_imagenet
from gce_jax.data import ArrayDataset, DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MNIST_LAYOUT = "train-images-idx3-ubyte"
CIFAR10_LAYOUT = "cifar-10-batches-py"
CIFAR100_LAYOUT = "cifar-100-python"
TINY_LAYOUT = "val_annotations.txt"


# ----------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: proves a failed load changed nothing."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def expect_error(fn, *, path, layout: str | None, root: Path, match: str | None = None) -> str:
    before = snapshot(root)
    existed = root.exists()
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert str(path) in msg, msg
    if layout is not None:
        assert layout in msg, msg
    if match is not None:
        assert match in msg, msg
    assert root.exists() == existed
    assert snapshot(root) == before
    return msg


def rand_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool) -> Path:
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(d: Path, *, gz: bool, n_train=7, n_test=5):
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (img, lbl), n, seed in (("train", data.layout.MNIST_IDX_FILES["train"], n_train, 1),
                                        ("test", data.layout.MNIST_IDX_FILES["test"], n_test, 2)):
        x = rand_images(n, (28, 28), seed)
        y = np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8)
        write_idx(d / img, x, 2051, gz)
        write_idx(d / lbl, y, 2049, gz)
        out[split] = (x, y)
    return out


def cifar_rows(images: np.ndarray) -> np.ndarray:
    # Official row format: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(d: Path, *, protocol=2, per_batch=2, n_test=3):
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rand_images(per_batch, (32, 32, 3), i)
        y = [(i + j) % 10 for j in range(per_batch)]
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(
            {b"batch_label": b"training batch", b"labels": y, b"data": cifar_rows(x),
             b"filenames": [b"x.png"] * per_batch}, protocol=protocol))
        xs.append(x)
        ys += y
    xt = rand_images(n_test, (32, 32, 3), 9)
    yt = [9 - j for j in range(n_test)]
    (d / "test_batch").write_bytes(pickle.dumps({b"labels": yt, b"data": cifar_rows(xt)}, protocol=protocol))
    (d / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072}, protocol=protocol))
    return {"train": (np.concatenate(xs), np.array(ys)), "test": (xt, np.array(yt))}


def write_cifar100(d: Path, *, n_train=6, n_test=4):
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        x = rand_images(n, (32, 32, 3), seed)
        fine = [(17 * j + seed) % 100 for j in range(n)]
        coarse = [f % 20 for f in fine]  # differs from fine: proves which one is read
        (d / split).write_bytes(pickle.dumps(
            {b"data": cifar_rows(x), b"fine_labels": fine, b"coarse_labels": coarse}, protocol=2))
        out[split] = (x, np.array(fine))
    (d / "meta").write_bytes(pickle.dumps(
        {b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
         b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, protocol=2))
    return out


def make_tar(src: Path, tar_path: Path, arcname: str) -> Path:
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return tar_path


def write_image_folder(root: Path, split: str, classes, per_class: int, shape, seed=0):
    """PNG files root/split/<class>/<i>.png; returns {class: [arrays in file-name order]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        out[c] = []
        for i in range(per_class):
            x = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(x[..., 0] if shape[-1] == 1 else x).save(root / split / c / f"{i:03d}.png")
            out[c].append(x)
    return out


WNIDS = list(FAKE_WNIDS)


def write_tiny_imagenet(root: Path, *, wnids=WNIDS, n_val=6) -> Path:
    return write_fake_tiny_imagenet(root, wnids=wnids, n_val=n_val)


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def toy(n=100, shape=(8, 8, 3), seed=0) -> ArrayDataset:
    """label == example index, so every yielded example can be traced back."""
    return ArrayDataset(rand_images(n, shape, seed), np.arange(n, dtype=np.int32), n, "toy")


# ----------------------------------------------------------------------------- real data
def test_real_mnist():
    if not (SHARED / "mnist").is_dir():
        pytest.skip("../shared/data/mnist not present")
    train = data.load_split("mnist", "train", data_dir=SHARED / "mnist", source="local")
    test = data.load_split("mnist", "test", data_dir=SHARED)  # parent dir, auto-detected
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int32 and train.num_classes == 10
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    hist = np.bincount(train.images.ravel(), minlength=256)  # exact, no 47M-float temporaries
    v = np.arange(256) / 255.0
    mean = (hist * v).sum() / hist.sum()
    std = np.sqrt((hist * v**2).sum() / hist.sum() - mean**2)
    assert abs(mean - 0.1307) < 1e-4 and abs(std - 0.3081) < 1e-4
    assert np.bincount(train.labels).min() > 5000


@pytest.fixture(scope="module")
def cifar_jpeg(tmp_path_factory):
    tar = SHARED / "cifar10-jpeg.tar.gz"
    if not tar.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not present")
    cache = tmp_path_factory.mktemp("cache")
    return tar, cache, data.load_split("cifar10", "test", data_dir=tar, cache_dir=cache)


def test_real_cifar10_jpeg_tar(cifar_jpeg):
    tar, cache, ds = cifar_jpeg
    assert ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.name == "cifar10" and ds.split == "test"
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer",
                              "dog", "frog", "horse", "ship", "truck")
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10, dtype=np.int32), 1000))
    assert 100 < ds.images.mean() < 140 and ds.images.std() > 40
    # Decoded once into the cache (never next to ../shared), then read back identically.
    cached = list(cache.glob("cifar10-test-*.npz"))
    assert len(cached) == 1
    again = data.load_split("cifar10", "test", data_dir=SHARED, cache_dir=cache)  # auto: finds the tar
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)
    assert again.class_names == ds.class_names


# ----------------------------------------------------------------------------- MNIST IDX
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz, nested):
    d = tmp_path / "mnist" if nested else tmp_path
    want = write_mnist(d, gz=gz)
    for split in ("train", "test"):
        ds = data.load_split("mnist", split, data_dir=tmp_path, source="local")
        np.testing.assert_array_equal(ds.images[..., 0], want[split][0])
        np.testing.assert_array_equal(ds.labels, want[split][1])
        assert ds.images.shape[1:] == (28, 28, 1) and ds.labels.dtype == np.int32


def test_mnist_gzip_without_suffix(tmp_path):
    want = write_mnist(tmp_path, gz=True)
    for f in tmp_path.glob("*.gz"):
        f.rename(f.with_suffix(""))  # gzip content under the raw name
    ds = data.load_split("mnist", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(ds.images[..., 0], want["test"][0])


def _corrupt_mnist(kind: str, d: Path) -> Path:
    """Damage one file of a valid gz layout; returns the path the error must name."""
    img = d / "train-images-idx3-ubyte.gz"
    lbl = d / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(img.read_bytes())
    if kind == "truncated_idx":
        img.write_bytes(gzip.compress(raw[:-100]))
    elif kind == "trailing_bytes":
        img.write_bytes(gzip.compress(raw + b"\0" * 3))
    elif kind == "short_header":
        img.write_bytes(gzip.compress(raw[:10]))
    elif kind == "bad_gzip":
        img.write_bytes(b"this is not gzip data at all")
    elif kind == "truncated_gzip":
        img.write_bytes(img.read_bytes()[:-20])
    elif kind == "wrong_magic":
        img.write_bytes(gzip.compress(struct.pack(">I", 2049) + raw[4:]))
    elif kind == "wrong_dims":
        img.write_bytes(gzip.compress(raw[:8] + struct.pack(">II", 27, 29) + raw[16:]))
    elif kind == "count_mismatch":
        y = np.zeros(6, np.uint8)
        lbl.unlink()
        write_idx(d / "train-labels-idx1-ubyte", y, 2049, gz=True)
        return d
    elif kind == "bad_label":
        lbl.unlink()
        write_idx(d / "train-labels-idx1-ubyte", np.full(7, 10, np.uint8), 2049, gz=True)
        return lbl
    elif kind == "missing_labels":
        lbl.unlink()
        return d / "train-labels-idx1-ubyte"
    return img


@pytest.mark.parametrize("kind", ["truncated_idx", "trailing_bytes", "short_header", "bad_gzip",
                                  "truncated_gzip", "wrong_magic", "wrong_dims", "count_mismatch",
                                  "bad_label", "missing_labels"])
def test_mnist_idx_errors(tmp_path, kind):
    write_mnist(tmp_path, gz=True)
    bad = _corrupt_mnist(kind, tmp_path)
    match = {"wrong_magic": "magic", "truncated_idx": "truncated", "truncated_gzip": "truncated",
             "bad_gzip": "corrupt", "count_mismatch": "labels"}.get(kind)
    expect_error(lambda: data.load_split("mnist", "train", data_dir=tmp_path, source="local"),
                 path=bad, layout=MNIST_LAYOUT, root=tmp_path, match=match)
    # The other split is untouched and still loads.
    assert len(data.load_split("mnist", "test", data_dir=tmp_path, source="local")) == 5


def test_missing_dir_and_no_layout(tmp_path):
    missing = tmp_path / "nope"
    for name, layout in (("mnist", MNIST_LAYOUT), ("cifar10", CIFAR10_LAYOUT),
                         ("cifar100", CIFAR100_LAYOUT), ("tiny_imagenet", TINY_LAYOUT)):
        expect_error(lambda: data.load_split(name, "train", data_dir=missing, source="local"),
                     path=missing, layout=layout, root=missing, match="does not exist")
    (tmp_path / "empty").mkdir()
    expect_error(lambda: data.load_split("cifar10", "train", data_dir=tmp_path / "empty", source="local"),
                 path=tmp_path / "empty", layout=CIFAR10_LAYOUT, root=tmp_path)
    # tiny_imagenet is local-only: with no layout, 'auto' must not fall through to tfds.
    expect_error(lambda: data.load_split("tiny_imagenet", "train", data_dir=tmp_path / "empty"),
                 path=tmp_path / "empty", layout=TINY_LAYOUT, root=tmp_path)
    with pytest.raises(DataError, match="data_dir"):
        data.load_split("mnist", "train", source="local")


@pytest.mark.parametrize("name,layout", [("mnist", MNIST_LAYOUT), ("cifar10", CIFAR10_LAYOUT),
                                         ("cifar100", CIFAR100_LAYOUT)])
def test_auto_source_reports_a_missing_or_empty_data_dir(tmp_path, name, layout):
    # 'auto' used to fall through to tfds here and blame a missing TensorFlow.
    missing, empty, unrelated = tmp_path / "nope", tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    (unrelated / "train").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("not a data set")
    for data_dir, match in ((missing, "does not exist"), (empty, "holds no known"),
                            (unrelated, "holds no known")):
        msg = expect_error(lambda: data.load_split(name, "train", data_dir=data_dir),
                           path=data_dir, layout=layout, root=tmp_path, match=match)
        assert "TensorFlow" not in msg and "is not prepared" not in msg, msg
        assert "\n" not in msg  # one line
    # Naming tfds explicitly still asks tfds, and says the folder does not exist.
    if importlib.util.find_spec("tensorflow_datasets") and not importlib.util.find_spec("tensorflow"):
        with pytest.raises(DataError, match="does not exist"):
            data.load_split(name, "train", data_dir=missing, source="tfds")


# ----------------------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickles_roundtrip(tmp_path, protocol):
    want = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    (tmp_path / "arch").mkdir()
    archive = make_tar(tmp_path / "cifar-10-batches-py", tmp_path / "arch" / "cifar-10-python.tar.gz",
                       "cifar-10-batches-py")
    for data_dir in (tmp_path / "cifar-10-batches-py", tmp_path, archive, archive.parent):
        for split in ("train", "test"):
            ds = data.load_split("cifar10", split, data_dir=data_dir, cache=False)
            np.testing.assert_array_equal(ds.images, want[split][0])
            np.testing.assert_array_equal(ds.labels, want[split][1])
            assert ds.class_names == data.CIFAR10_CLASSES and ds.num_classes == 10
    assert len(data.load_split("cifar10", "train", data_dir=tmp_path)) == 10


def test_cifar100_pickles_roundtrip(tmp_path):
    want = write_cifar100(tmp_path / "cifar-100-python")
    archive = make_tar(tmp_path / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz",
                       "cifar-100-python")
    for data_dir in (tmp_path / "cifar-100-python", tmp_path, archive):
        for split in ("train", "test"):
            ds = data.load_split("cifar100", split, data_dir=data_dir, source="local")
            np.testing.assert_array_equal(ds.images, want[split][0])
            np.testing.assert_array_equal(ds.labels, want[split][1])  # fine, not coarse
            assert ds.num_classes == 100 and ds.class_names[:2] == ("c00", "c01")


def _corrupt_cifar(kind: str, d: Path) -> Path:
    b1 = d / "data_batch_1"
    if kind == "truncated_pickle":
        b1.write_bytes(b1.read_bytes()[:500])
    elif kind == "garbage_pickle":
        b1.write_bytes(b"\x80\x02garbage" * 10)
    elif kind == "missing_batch":
        (d / "data_batch_3").unlink()
        return d / "data_batch_3"
    elif kind == "wrong_keys":
        b1.write_bytes(pickle.dumps({b"pixels": np.zeros((2, 3072), np.uint8)}, protocol=2))
    elif kind == "wrong_shape":
        b1.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, protocol=2))
    elif kind == "meta_9_classes":
        meta = d / "batches.meta"
        meta.write_bytes(pickle.dumps({b"label_names": [b"x"] * 9}, protocol=2))
        return meta
    return b1


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("kind", ["truncated_pickle", "garbage_pickle", "missing_batch",
                                  "wrong_keys", "wrong_shape", "meta_9_classes"])
def test_cifar_pickle_errors(tmp_path, kind):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d)
    bad = _corrupt_cifar(kind, d)
    match = {"meta_9_classes": "class-count mismatch", "truncated_pickle": "pickle"}.get(kind)
    expect_error(lambda: data.load_split("cifar10", "train", data_dir=tmp_path, source="local"),
                 path=bad, layout=CIFAR10_LAYOUT, root=tmp_path, match=match)


def test_cifar_pickle_never_runs_code(tmp_path):
    d = tmp_path / "cifar-100-python"
    write_cifar100(d)
    marker = tmp_path / "pwned"
    (d / "test").write_bytes(pickle.dumps({b"data": _Evil(marker), b"fine_labels": [0]}, protocol=2))
    expect_error(lambda: data.load_split("cifar100", "test", data_dir=d, source="local"),
                 path=d / "test", layout=CIFAR100_LAYOUT, root=tmp_path, match="refusing")
    assert not marker.exists()


def test_corrupt_archives(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(gzip.compress(b"not a tar file" * 100)[:-10])
    expect_error(lambda: data.load_split("cifar10", "test", data_dir=bad),
                 path=bad, layout=CIFAR10_LAYOUT, root=tmp_path, match="corrupt")
    empty = tmp_path / "cifar10-empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tf:
        info = tarfile.TarInfo("readme.txt")
        tf.addfile(info, io.BytesIO(b""))
    expect_error(lambda: data.load_split("cifar10", "test", data_dir=empty),
                 path=empty, layout=CIFAR10_LAYOUT, root=tmp_path)
    # An official archive lacking one of the training batches.
    d = tmp_path / "src" / "cifar-10-batches-py"
    write_cifar10(d)
    (d / "data_batch_5").unlink()
    part = make_tar(d, tmp_path / "part.tar.gz", "cifar-10-batches-py")
    expect_error(lambda: data.load_split("cifar10", "train", data_dir=part),
                 path=part, layout=CIFAR10_LAYOUT, root=tmp_path, match="data_batch_5")


# ----------------------------------------------------------------------------- image folders
def test_image_folder_cifar10_official_order_dir_and_tar(tmp_path):
    classes = list(reversed(data.CIFAR10_CLASSES))  # creation order must not matter
    root = tmp_path / "cifar10-png"
    want = write_image_folder(root, "test", classes, 2, (32, 32, 3))
    write_image_folder(root, "train", classes, 1, (32, 32, 3), seed=1)
    tar = make_tar(root, tmp_path / "cifar10-png.tar.gz", "cifar10-png")  # with a top folder
    cache = tmp_path / "cache"
    for data_dir in (root, tar, tmp_path):  # tmp_path: finds the extracted cifar10-png/
        ds = data.load_split("cifar10", "test", data_dir=data_dir, cache_dir=cache)
        assert ds.class_names == data.CIFAR10_CLASSES
        for label, c in enumerate(data.CIFAR10_CLASSES):
            got = ds.images[ds.labels == label]
            np.testing.assert_array_equal(got, np.stack(want[c]))
        assert len(data.load_split("cifar10", "train", data_dir=data_dir, cache_dir=cache)) == 10
    # Cache lives only in cache_dir (one entry per source and split, the folder found via
    # its parent reuses its entry); nothing was added to the data folder.
    assert len(list(cache.glob("*.npz"))) == 4
    assert not list(root.rglob("*.npz"))


def test_image_folder_class_order_and_grayscale(tmp_path):
    # Numeric class names sort numerically ('10' after '9'); 1-channel datasets decode as L.
    want = write_image_folder(tmp_path, "train", [str(i) for i in range(100)], 1, (32, 32, 3))
    ds = data.load_split("cifar100", "train", data_dir=tmp_path, cache=False)
    assert ds.class_names[:12] == tuple(str(i) for i in range(12))
    np.testing.assert_array_equal(ds.images[10], want["10"][0])
    want = write_image_folder(tmp_path / "m", "test", [str(i) for i in range(10)], 3, (28, 28, 1))
    ds = data.load_split("mnist", "test", data_dir=tmp_path / "m", cache=False, limit_per_class=2)
    assert ds.images.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(ds.images[2], want["1"][0])


def test_image_folder_cache_invalidation(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, "train", data.CIFAR10_CLASSES, 1, (32, 32, 3))
    cache = tmp_path / "cache"
    first = data.load_split("cifar10", "train", data_dir=root, cache_dir=cache)
    new = np.full((32, 32, 3), 7, np.uint8)
    target = root / "train" / "cat" / "000.png"
    Image.fromarray(new).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    second = data.load_split("cifar10", "train", data_dir=root, cache_dir=cache)
    np.testing.assert_array_equal(second.images[3], new)
    assert not np.array_equal(first.images[3], new)
    data.load_split("cifar10", "train", data_dir=root, cache=False, cache_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("kind", ["nine_classes", "wrong_size", "corrupt_png", "missing_split",
                                  "empty_class"])
def test_image_folder_errors(tmp_path, kind):
    root = tmp_path / "imgs"
    classes = data.CIFAR10_CLASSES[:9] if kind == "nine_classes" else data.CIFAR10_CLASSES
    write_image_folder(root, "train", classes, 2, (32, 32, 3))
    path, match = root / "train", None
    if kind == "nine_classes":
        match = "class-count mismatch"
    elif kind == "wrong_size":
        path = root / "train" / "dog" / "001.png"
        Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(path)
    elif kind == "corrupt_png":
        path = root / "train" / "frog" / "000.png"
        path.write_bytes(path.read_bytes()[:60])
        match = "corrupt"
    elif kind == "missing_split":
        path = root / "test"
    elif kind == "empty_class":
        path = root / "train" / "ship"
        shutil.rmtree(path)
        path.mkdir()
    split = "test" if kind == "missing_split" else "train"
    expect_error(lambda: data.load_split("cifar10", split, data_dir=root, source="local", cache=False),
                 path=path, layout=CIFAR10_LAYOUT, root=tmp_path, match=match)


def test_image_folder_tar_class_mismatch(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, "test", data.CIFAR10_CLASSES[:9], 1, (32, 32, 3))
    tar = make_tar(root / "test", tmp_path / "x.tar.gz", "test")
    expect_error(lambda: data.load_split("cifar10", "test", data_dir=tar, cache_dir=tmp_path / "c"),
                 path=tar, layout=CIFAR10_LAYOUT, root=tmp_path, match="class-count mismatch")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


# ----------------------------------------------------------------------------- Tiny ImageNet
def test_tiny_imagenet_roundtrip(tmp_path):
    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    cache = tmp_path / "cache"
    train = data.load_split("tiny_imagenet", "train", data_dir=tmp_path, cache_dir=cache)
    assert train.images.shape == (200, 64, 64, 3) and train.num_classes == 200
    assert train.class_names == tuple(WNIDS)
    np.testing.assert_array_equal(train.labels, np.arange(200))
    for i in (0, 1, 50, 199):  # 0 and 50 are grayscale JPEGs
        w = WNIDS[i]
        np.testing.assert_array_equal(train.images[i], pil_rgb(root / "train" / w / "images" / f"{w}_0.JPEG"))
    assert (train.images[0, ..., 0] == train.images[0, ..., 2]).all()
    for split in ("val", "test"):  # official test labels are private: test == val
        val = data.load_split("tiny_imagenet", split, data_dir=root, source="local", cache=False)
        assert len(val) == 6
        np.testing.assert_array_equal(val.labels, [(7 * j) % 200 for j in range(6)])
        np.testing.assert_array_equal(val.images[3], pil_rgb(root / "val" / "images" / "val_3.JPEG"))


@pytest.mark.parametrize("kind", ["wnids_199", "train_dir_missing", "unknown_wnid", "no_annotations",
                                  "missing_val_image"])
def test_tiny_imagenet_errors(tmp_path, kind):
    wnids = WNIDS[:199] if kind == "wnids_199" else WNIDS
    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200", wnids=wnids)
    split, path, match = "train", root / "wnids.txt", None
    if kind == "wnids_199":
        match = "class-count mismatch"
    elif kind == "train_dir_missing":
        shutil.rmtree(root / "train" / WNIDS[5])
        path, match = root / "train", "class-count mismatch"
    elif kind == "unknown_wnid":
        ann = root / "val" / "val_annotations.txt"
        ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
        split, path = "val", ann
    elif kind == "no_annotations":
        (root / "val" / "val_annotations.txt").unlink()
        (root / "val" / "x.txt").write_text("")  # keep the layout recognisable via wnids.txt
        split, path = "val", root / "val" / "val_annotations.txt"
    elif kind == "missing_val_image":
        (root / "val" / "images" / "val_2.JPEG").unlink()
        split, path = "val", root / "val" / "images" / "val_2.JPEG"
    expect_error(lambda: data.load_split("tiny_imagenet", split, data_dir=tmp_path, cache=False),
                 path=path, layout=TINY_LAYOUT, root=tmp_path, match=match)


# ----------------------------------------------------------------------------- tfds
@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape,k", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
                                          ("cifar100", (32, 32, 3), 100)])
def test_tfds_mock_random(tfds, name, shape, k):
    # tfds 4.9.10's mock_data patches the ArrayRecord reader under a real
    # ArrayRecordDataSource, so tfds.data_source and its deserialisation both run.
    with tfds.testing.mock_data(num_examples=9):
        ds = data.load_split(name, "train", source="tfds")
    assert ds.images.shape == (9, *shape) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.num_classes == k
    assert ((ds.labels >= 0) & (ds.labels < k)).all()
    assert ds.images.std() > 0


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_tfds_mock_exact(tfds, tmp_path, name):
    shape, k = data.dataset_info(name)
    x = rand_images(5, shape, 3)
    calls = []

    def as_data_source(self, split, **kwargs):
        calls.append((self.name, split))
        return [{"image": x[i], "label": np.int64((3 * i + 1) % k), "coarse_label": np.int64(19),
                 "id": f"train_{i}"} for i in range(5)]

    # 'auto' with a data_dir that is a tfds data_dir (the set prepared in it) reads tfds.
    prepared = tmp_path / name / "3.0.1"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    before = snapshot(tmp_path)
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        ds = data.load_split(name, "test", data_dir=tmp_path)
    assert calls == [(name, "test")]
    np.testing.assert_array_equal(ds.images, x)
    np.testing.assert_array_equal(ds.labels, [(3 * i + 1) % k for i in range(5)])
    assert snapshot(tmp_path) == before


def test_tfds_bad_records_are_data_errors(tfds, tmp_path):
    def as_data_source(self, split, **kwargs):
        return [{"image": np.zeros((27, 28, 1), np.uint8), "label": np.int64(0)}]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source), pytest.raises(DataError, match="shape"):
        data.load_split("mnist", "train", source="tfds", data_dir=tmp_path)

    def missing_label(self, split, **kwargs):
        return [{"image": np.zeros((28, 28, 1), np.uint8)}]

    with tfds.testing.mock_data(as_data_source_fn=missing_label), pytest.raises(DataError, match="tfds"):
        data.load_split("mnist", "train", source="tfds", data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow installed tfds would try to download")
def test_tfds_unprepared_without_tensorflow(tfds, tmp_path):
    d = tmp_path / "tfds"
    d.mkdir()
    msg = expect_error(lambda: data.load_split("cifar100", "train", data_dir=d, source="tfds"),
                       path=d, layout=None, root=tmp_path, match="TensorFlow")
    assert "pip install" in msg and "[prepare]" in msg
    with pytest.raises(DataError, match="tfds catalog"):
        data.load_split("tiny_imagenet", "train", source="tfds", data_dir=d)


# ----------------------------------------------------------------------------- digits / info
def test_digits():
    train, test = data.load_split("digits", "train"), data.load_split("digits", "test")
    assert train.images.shape == (1438, 8, 8, 1) and test.images.shape == (359, 8, 8, 1)
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    assert set(np.unique(train.images)) <= {round(v * 255 / 16) for v in range(17)}
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    again = data.load_split("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)


def test_dataset_info_and_bad_args():
    assert data.dataset_info("mnist") == ((28, 28, 1), 10)
    assert data.dataset_info("cifar10") == ((32, 32, 3), 10)
    assert data.dataset_info("cifar100") == ((32, 32, 3), 100)
    assert data.dataset_info("tiny_imagenet") == ((64, 64, 3), 200)
    assert data.dataset_info("digits") == ((8, 8, 1), 10)
    with pytest.raises(DataError, match="svhn"):
        data.dataset_info("svhn")
    with pytest.raises(DataError, match="val"):
        data.load_split("cifar10", "val")
    with pytest.raises(ValueError):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32), 10, "x")
    with pytest.raises(ValueError):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 10]), 10, "x")


# ----------------------------------------------------------------------------- pipeline
def collect(it):
    bs = list(it)
    return bs, np.concatenate([b["label"] for b in bs])


def test_batches_values_shapes_and_coverage():
    ds = toy(100)
    bs, labels = collect(data.batches(ds, 32, shuffle=True, seed=3, epoch=0))
    assert [len(b["label"]) for b in bs] == [32, 32, 32, 4] == [32] * 3 + [4]
    assert len(bs) == data.num_batches(ds, 32) == 4
    np.testing.assert_array_equal(np.sort(labels), np.arange(100))  # each exactly once
    assert not np.array_equal(labels, np.arange(100))
    for b in bs:
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
        assert b["image"].shape == (len(b["label"]), 8, 8, 3)
        np.testing.assert_array_equal(b["image"], ds.images[b["label"]] / np.float32(255))
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    full = ArrayDataset(np.full((2, 2, 2, 1), 255, np.uint8), np.zeros(2, np.int32), 1, "x")
    assert next(data.batches(full, 2))["image"].max() == 1.0
    _, unshuffled = collect(data.batches(ds, 30))
    np.testing.assert_array_equal(unshuffled, np.arange(100))


def test_batches_drop_remainder():
    ds = toy(100)
    bs, labels = collect(data.batches(ds, 32, shuffle=True, seed=0, drop_remainder=True))
    assert [len(b["label"]) for b in bs] == [32, 32, 32]
    assert data.num_batches(ds, 32, drop_remainder=True) == 3 and len(set(labels)) == 96
    assert len(list(data.batches(ds, 50, drop_remainder=True))) == 2
    assert list(data.batches(toy(10), 32, drop_remainder=True)) == []


def test_batches_deterministic_per_seed_and_epoch():
    ds = toy(100)

    def run(**kw):
        return [b for b in data.batches(ds, 16, shuffle=True, augment=True, **kw)]

    a, b = run(seed=1, epoch=2), run(seed=1, epoch=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    for other in (run(seed=1, epoch=3), run(seed=2, epoch=2)):
        assert not np.array_equal(np.concatenate([x["label"] for x in a]),
                                  np.concatenate([x["label"] for x in other]))
    # Augmentation draws from its own stream: the example order does not depend on it.
    _, plain = collect(data.batches(ds, 16, shuffle=True, seed=1, epoch=2))
    np.testing.assert_array_equal(plain, np.concatenate([x["label"] for x in a]))


def _crops(img: np.ndarray, pad: int = 4):
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    h, w = img.shape[:2]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            c = p[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), c
            yield (dy, dx, True), c[:, ::-1]


def test_augmentation_is_padded_shift_and_flip():
    ds = toy(64, (12, 10, 3), seed=4)
    used = set()
    for b in data.batches(ds, 64, shuffle=True, seed=0, augment=True):
        assert b["image"].shape == (64, 12, 10, 3) and b["image"].dtype == np.float32
        for img, label in zip(b["image"], b["label"]):
            u8 = np.rint(img * 255).astype(np.uint8)
            hits = [k for k, c in _crops(ds.images[label]) if np.array_equal(c, u8)]
            assert hits, f"example {label} is not a padded shift/flip of its original"
            used.add(hits[0])
    assert any(k[2] for k in used) and any(not k[2] for k in used)
    assert len({k[:2] for k in used}) > 10  # many different offsets
    # Zero padding enters when shifted: an all-255 image gains zeros at the border.
    white = ArrayDataset(np.full((256, 8, 8, 3), 255, np.uint8), np.zeros(256, np.int32), 1, "w")
    out = next(data.batches(white, 256, augment=True))["image"]
    assert set(np.unique(out)) == {0.0, 1.0} and (out == 1.0).all(axis=(1, 2, 3)).sum() < 64


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), bs=st.integers(1, 80), drop=st.booleans(), seed=st.integers(0, 2**31))
def test_batches_property(n, bs, drop, seed):
    ds = toy(n, (2, 2, 1))
    _, labels = collect(data.batches(ds, bs, shuffle=True, seed=seed, drop_remainder=drop)) \
        if data.num_batches(ds, bs, drop) else ([], np.zeros(0, int))
    assert len(labels) == (n // bs) * bs if drop else n
    assert len(set(labels.tolist())) == len(labels)
    if not drop:
        np.testing.assert_array_equal(np.sort(labels), np.arange(n))


def test_train_val_split():
    ds = toy(100)
    train, val = data.train_val_split(ds, val_size=20, seed=0)
    assert len(train) == 80 and len(val) == 20 and val.split == "val"
    assert not set(train.labels.tolist()) & set(val.labels.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train.labels, val.labels])), np.arange(100))
    np.testing.assert_array_equal(train.images, ds.images[train.labels])
    assert train.num_classes == 100 and train.name == "toy"
    same = data.train_val_split(ds, val_fraction=0.2, seed=0)[1]
    np.testing.assert_array_equal(same.labels, val.labels)
    other = data.train_val_split(ds, val_fraction=0.2, seed=1)[1]
    assert not np.array_equal(other.labels, val.labels)
    for kw in ({}, {"val_size": 5, "val_fraction": 0.1}, {"val_size": 100}, {"val_fraction": 1.0}):
        with pytest.raises(ValueError):
            data.train_val_split(ds, seed=0, **kw)


def test_resize_dataset_keeps_labels_and_range():
    ds = data.load_split("digits", "train")
    big = data.resize_dataset(ds, (28, 28))
    assert big.images.shape == (len(ds), 28, 28, 1) and big.images.dtype == np.uint8
    np.testing.assert_array_equal(big.labels, ds.labels)
    # Bilinear upsampling preserves the mean intensity approximately.
    assert abs(big.images.mean() - ds.images.mean()) < 5
    assert data.resize_dataset(ds, (8, 8)) is ds
    with pytest.raises(ValueError, match="positive"):
        data.resize_dataset(ds, (0, 28))


def test_batch_rows_are_the_same_rows_of_the_full_batch():
    # A host preparing only its share (multi-host input) gets bit-identical
    # rows: same order, same crops and flips as the whole batch would have.
    ds = toy(100)
    kw = dict(shuffle=True, seed=4, epoch=1, augment=True, drop_remainder=True)
    full = list(data.batches(ds, 32, **kw))
    for rows in (slice(0, 16), slice(16, 32), slice(8, 16)):
        part = list(data.batches(ds, 32, rows=rows, **kw))
        assert len(part) == len(full) == 3
        for p, f in zip(part, full):
            np.testing.assert_array_equal(p["label"], f["label"][rows])
            np.testing.assert_array_equal(p["image"], f["image"][rows])
    # Without the rows argument nothing changed: augment_batch on the gathered
    # images with the epoch's augmentation stream is still the whole batch.
    perm_rng, aug_rng = data.pipeline._epoch_rngs(4, 1)
    idx = perm_rng.permutation(100)[:32]
    np.testing.assert_array_equal(
        full[0]["image"], data.augment_batch(ds.images[idx], aug_rng) / np.float32(255))


def test_eval_batches_fixed_shape_mask_and_padding():
    ds = toy(70)
    got = list(data.eval_batches(ds, 32))
    assert [b["image"].shape for b in got] == [(32, 8, 8, 3)] * 3
    assert [int(b["mask"].sum()) for b in got] == [32, 32, 6]
    # The real rows are exactly the unshuffled batches; padding repeats real rows.
    plain = np.concatenate([b["image"] for b in data.batches(ds, 32)])
    real = np.concatenate([b["image"][b["mask"] == 1] for b in got])
    np.testing.assert_array_equal(real, plain)
    last = got[-1]
    np.testing.assert_array_equal(last["label"], np.resize(np.arange(64, 70), 32))
    np.testing.assert_array_equal(last["image"][6:12], last["image"][:6])
    # A mapping of arrays is batched as it is (no conversion), with the same mask.
    keys = np.arange(70, dtype=np.uint32) * 3
    (b0, b1, b2) = data.eval_batches({"x": ds.images, "k": keys}, 32)
    assert b2["x"].dtype == np.uint8 and b2["k"][5] == 69 * 3 and b2["k"][6] == 64 * 3
    assert [s.stop for s in data.batch_slices(70, 32)] == [32, 64, 70]
    with pytest.raises(ValueError, match="one length"):
        next(data.eval_batches({"x": ds.images, "k": keys[:3]}, 32))


def test_pad_to():
    a = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(data.pad_to(a, 7)[:, 0], [0, 2, 4, 0, 2, 4, 0])
    assert data.pad_to(a, 3) is a
    for size in (2, 0):
        with pytest.raises(ValueError, match="cannot pad"):
            data.pad_to(a, size)
    with pytest.raises(ValueError, match="cannot pad"):
        data.pad_to(a[:0], 4)
