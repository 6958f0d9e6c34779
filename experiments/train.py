r"""Train one configuration (every experiment goes through this entry point).

    python -m experiments.train --config experiments/configs/mnist_lenet5.py:gce \
        --workdir runs/mnist_lenet5_gce [--config.epochs=5 ...] [--multihost]

Re-running with the same ``--workdir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (one process per host).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # after flag parsing so --help is fast

    if FLAGS.multihost:
        jax.distributed.initialize()
    from gce_jax import train

    logging.info("JAX %s: process %d/%d, %d local / %d global devices", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
