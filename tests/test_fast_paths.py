"""Every fast formulation of a model equals its native one on real data.

A fast path (im2col, custom VJP, another layout) is a drop-in replacement for
the plain flax model only if it gives the same *gradients*, not just the same
logits: attacks follow input gradients, training follows parameter gradients.
Each entry of ``FAST_PATHS`` is checked on real test images with weights from a
short real training run, where exact ties (flat MNIST background, ReLU zeros)
are common, for:

* input gradients and parameter gradients of XE and GCE (float32 tolerance);
* FGSM's adversarial images (equal except where the input gradient is within
  rounding of zero, where the sign is noise on either path);
* a non-vacuity check: the images do contain the ties the path must handle.

Add every new fast path here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gce_jax import attacks
from gce_jax.data import load_split
from gce_jax.losses import cross_entropy, guided_complement_entropy
from gce_jax.models.lenet import LeNet5

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class FastPath:
    name: str
    native: nn.Module
    fast: nn.Module
    dataset: str
    data_dir: Path
    # (model, variables, x) -> number of exact ties the fast path must resolve
    # like the native one.
    count_ties: Callable[[nn.Module, dict, jax.Array], int]
    train_images: int = 4096
    train_steps: int = 120


def _lenet_pool_ties(model: nn.Module, variables: dict, x: jax.Array) -> int:
    """2x2 windows of the first conv whose positive maximum is tied."""
    _, inter = model.apply(variables, x, capture_intermediates=True)
    z = jax.nn.relu(inter["intermediates"]["Conv_0"]["__call__"][0])  # NHWC
    b, h, w, c = z.shape
    win = z.reshape(b, h // 2, 2, w // 2, 2, c)
    top = win.max(axis=(2, 4), keepdims=True)
    tied = ((win == top).sum(axis=(2, 4)) > 1) & (top[:, :, 0, :, 0] > 0)
    return int(tied.sum())


FAST_PATHS = [
    FastPath("lenet5-im2col", LeNet5(conv_impl="xla"), LeNet5(conv_impl="im2col"),
             "mnist", DATA / "mnist", _lenet_pool_ties),
]


def _train(path: FastPath, x: np.ndarray, y: np.ndarray) -> dict:
    """A short Adam run on the native model: real, not random, weights."""
    model = path.native
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    opt = optax.adam(1e-3)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        loss = lambda p: cross_entropy(model.apply({**variables, "params": p}, xb), yb).mean()
        g = jax.grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state

    rng = np.random.default_rng(0)
    for _ in range(path.train_steps):
        idx = rng.integers(0, len(x), 64)
        params, state = step(params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return {**variables, "params": params}


@pytest.fixture(scope="module", params=FAST_PATHS, ids=lambda p: p.name)
def trained(request):
    path: FastPath = request.param
    if not path.data_dir.exists():
        pytest.skip(f"{path.data_dir} not present")
    tr = load_split(path.dataset, "train", data_dir=path.data_dir)
    te = load_split(path.dataset, "test", data_dir=path.data_dir)
    xtr = tr.images[: path.train_images].astype(np.float32) / 255.0
    variables = _train(path, xtr, tr.labels[: path.train_images])
    x = jnp.asarray(te.images[:128].astype(np.float32) / 255.0)
    y = jnp.asarray(te.labels[:128])
    return path, variables, x, y


LOSSES = {
    "xe": cross_entropy,
    "gce": lambda z, y: guided_complement_entropy(z, y, alpha=1 / 3),
}


def _grads(model, variables, x, y, loss):
    def f(params, x):
        return LOSSES[loss](model.apply({**variables, "params": params}, x), y).sum()
    return jax.jit(jax.grad(f, argnums=(0, 1)))(variables["params"], x)


def test_images_contain_ties(trained):
    path, variables, x, _ = trained
    # Without ties the gradient checks below could not tell tie rules apart.
    assert path.count_ties(path.native, variables, x) > len(x)


def test_the_model_is_trained(trained):
    path, variables, x, y = trained
    acc = float(jnp.mean(jnp.argmax(path.native.apply(variables, x), -1) == y))
    assert acc > 0.8, acc


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_input_and_parameter_gradients_equal(trained, loss):
    path, variables, x, y = trained
    np.testing.assert_allclose(path.fast.apply(variables, x), path.native.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    (gp_n, gx_n), (gp_f, gx_f) = (_grads(m, variables, x, y, loss)
                                  for m in (path.native, path.fast))
    scale = float(jnp.abs(gx_n).max())
    np.testing.assert_allclose(gx_f, gx_n, rtol=1e-4, atol=1e-5 * scale)
    rel = float(jnp.linalg.norm(gx_f - gx_n) / jnp.linalg.norm(gx_n))
    assert rel < 1e-5, rel
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(gp_n), jax.tree.leaves(gp_f)):
        s = float(jnp.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * s,
                                   err_msg=jax.tree_util.keystr(kp))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_fgsm_images_equal(trained, loss):
    path, variables, x, y = trained
    eps = 0.1
    advs = [attacks.fgsm(attacks.inference_logits_fn(m, variables), x, y, eps=eps, loss=loss)
            for m in (path.native, path.fast)]
    _, gx = _grads(path.native, variables, x, y, loss)
    # Pixels whose gradient is rounding noise may flip sign on either path.
    noise = jnp.abs(gx) <= 1e-6 * jnp.abs(gx).reshape(len(x), -1).max(1)[:, None, None, None]
    differ = (advs[0] != advs[1]) & ~noise
    assert int(differ.sum()) == 0, f"{int(differ.sum())} pixels differ"
    assert float(jnp.mean(noise)) < 0.5  # the comparison is not empty
