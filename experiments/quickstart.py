"""Offline quickstart: train XE and GCE (alpha = 1/3) LeNet-5s and compare them.

    python -m experiments.quickstart                       # sklearn digits, no download
    python -m experiments.quickstart --data_dir ../shared/data/mnist --epochs 2

The digits (8x8, shipped with scikit-learn) are upsampled to 28x28 so the
paper's LeNet-5 applies unchanged. Prints clean accuracy and accuracy under
FGSM and PGD at two epsilons. Every attack states the loss it maximised: the
cross-entropy columns are the paper's protocol; the margin column is the
check that a high number is not just saturated cross-entropy gradients.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments.configs import mnist_lenet5
from gce_jax import attacks, data, models, runtime
from gce_jax.train import load_for_eval, train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MNIST IDX folder; default: scikit-learn digits.")
flags.DEFINE_integer("epochs", None, "Training epochs (default 15 digits / 2 MNIST).")
flags.DEFINE_string("workdir", None, "Where runs go (default: a fresh temp folder).")
flags.DEFINE_integer("n_eval", 1000, "Test examples attacked.")
flags.DEFINE_list("eps", None, "Two Linf budgets (default 0.1,0.2).")
flags.DEFINE_integer("seed", 0, "Seed for training and attacks.")


def quickstart_config(loss: str, *, data_dir: str | None, epochs: int | None, seed: int):
    """The paper's LeNet-5 recipe, on digits (default) or MNIST."""
    config = mnist_lenet5.get_config(loss)
    config.seed = seed
    config.progress_bar = False
    if data_dir is None:
        config.dataset = "digits"
        config.data.resize = (28, 28)
        config.data.val_size = 200
        config.epochs = epochs or 15
    else:
        config.data.data_dir = data_dir
        config.data.source = "local"
        config.epochs = epochs or 2
    config.name = f"quickstart_{config.dataset}_{loss}"
    return config


def attack_table(logits_fn, x, y, eps_values, seed: int) -> dict[str, float]:
    """Accuracy (%) on clean inputs and under each attack, keyed by column name."""
    key = jax.random.key(seed)

    def acc(xs):
        return 100.0 * float(np.mean(np.asarray(logits_fn(xs)).argmax(-1) == y))

    row = {"clean": acc(x)}
    for eps in eps_values:
        row[f"FGSM-xe {eps:g}"] = acc(attacks.fgsm(logits_fn, x, y, eps=eps))
        row[f"PGD40-xe {eps:g}"] = acc(attacks.pgd(logits_fn, x, y, key=key, eps=eps,
                                                  steps=40, step_size=eps / 10))
        row[f"PGD40-margin {eps:g}"] = acc(attacks.pgd(logits_fn, x, y, key=key, eps=eps,
                                                      steps=40, step_size=eps / 10,
                                                      loss="margin"))
    return row


def format_table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def run_quickstart(*, data_dir: str | None, epochs: int | None, workdir: str, n_eval: int,
                   eps_values: list[float], seed: int) -> tuple[dict, int, str]:
    """Trains both models into ``workdir`` and returns ``(rows, n, dataset)``."""
    rows = {}
    for loss in ("xe", "gce"):
        config = quickstart_config(loss, data_dir=data_dir, epochs=epochs, seed=seed)
        run_dir = os.path.join(workdir, config.name)
        print(f"training {config.name} ({config.epochs} epochs) -> {run_dir}", flush=True)
        train_and_evaluate(config, run_dir)
        model, variables, config = load_for_eval(run_dir)
        test = data.load_split(config.dataset, "test", data_dir=config.data.data_dir,
                               source=config.data.source)
        if config.data.get("resize"):
            test = data.resize_dataset(test, tuple(config.data.resize))
        n = min(n_eval, len(test))
        x = test.images[:n].astype(np.float32) / 255.0
        y = test.labels[:n]
        rows["XE" if loss == "xe" else "GCE (alpha=1/3)"] = attack_table(
            models.logits_fn(model, variables), x, y, eps_values, seed)
    return rows, n, config.dataset


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    eps_values = [float(e) for e in (FLAGS.eps or ["0.1", "0.2"])]
    if len(eps_values) != 2 or any(not 0 <= e <= 1 for e in eps_values):
        raise app.UsageError(f"--eps needs two values in [0, 1], got {FLAGS.eps}")
    if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
        raise app.UsageError(f"--data_dir {FLAGS.data_dir} is not a folder with the MNIST IDX files")
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="gce_quickstart_")
    start = time.time()
    rows, n, dataset = run_quickstart(data_dir=FLAGS.data_dir, epochs=FLAGS.epochs,
                                      workdir=workdir, n_eval=FLAGS.n_eval,
                                      eps_values=eps_values, seed=FLAGS.seed)
    print(f"\nAccuracy (%) on {n} {dataset} test images; attack-loss after the name; "
          f"seed {FLAGS.seed}; {time.time() - start:.0f} s on {jax.devices()[0].platform}")
    print(format_table(rows))
    print("\nA model whose xe columns beat its margin column by a wide gap is likely masking "
          "gradients, not robust; see `python -m experiments.evaluate` for the full diagnostics.")
    return 0


if __name__ == "__main__":
    runtime.configure_xla_cpu()
    sys.exit(app.run(main))
