"""Writes a published model's logits, gradients and FGSM images on real test images.

    python tests/_gradients_worker.py FOLDER DATA_DIR N OUT.npz

Run in a fresh process per XLA setting (XLA reads ``XLA_FLAGS`` once per
process) by ``tests/test_fast_paths.py``, which compares the files.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from gce_jax import attacks, weights
from gce_jax.data import load_split
from gce_jax.losses import cross_entropy, guided_complement_entropy
from gce_jax.models import logits_fn

LOSSES = {"xe": cross_entropy,
          "gce": lambda z, y: guided_complement_entropy(z, y, alpha=1 / 3)}


def main(folder: str, data_dir: str, n: int, out: str) -> None:
    model, variables, config = weights.load_published(folder)
    test = load_split(config.dataset, "test", data_dir=data_dir)
    x = jnp.asarray(test.images[:n].astype(np.float32) / 255.0)
    y = jnp.asarray(test.labels[:n])
    arrays = {"logits": model.apply(variables, x)}
    for name, loss in LOSSES.items():
        def infer(p, x_):
            return loss(model.apply({**variables, "params": p}, x_), y).sum()

        def train(p):
            z, _ = model.apply({**variables, "params": p}, x, train=True,
                               mutable=["batch_stats"])
            return loss(z, y).sum()

        arrays[f"{name}/input_grad"] = jax.jit(jax.grad(infer, argnums=1))(variables["params"], x)
        grads = jax.jit(jax.grad(train))(variables["params"])
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
            arrays[f"{name}/param_grad{jax.tree_util.keystr(path)}"] = leaf
        arrays[f"{name}/fgsm"] = attacks.fgsm(logits_fn(model, variables), x, y, eps=8 / 255,
                                              loss=name)
    np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
