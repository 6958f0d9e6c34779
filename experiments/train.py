r"""Train one configuration (every experiment goes through this entry point).

    python -m experiments.train --config experiments/configs/mnist_lenet5.py:gce \
        --workdir runs/mnist_lenet5_gce [--config.epochs=5 ...] [--multihost]

Re-running with the same ``--workdir`` resumes from its latest checkpoint. A
user error prints one line (``--debug``: the traceback) and exits with
status 2; third-party INFO logs are off unless ``--verbosity=0``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from gce_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (one process per host).")
flags.DEFINE_bool("debug", False, "Show the traceback of an error instead of one line.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _config_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with any error (a bad config file too) as one line."""
    config_file = _config_arg(argv).split(":", 1)[0]
    if config_file and not os.path.isfile(config_file):
        cli.fail(f"--config: no such file {config_file!r}")
    try:
        rest = FLAGS(argv)
        _ = FLAGS.config  # a config file is loaded lazily: fail here, not later
        return rest
    except Exception as e:  # noqa: BLE001 -- a config file may raise anything
        if cli.wants_debug(argv):
            raise
        if isinstance(e, (AttributeError, KeyError)):  # an override of a missing field
            field = str(e).strip("\"'")
            flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                         and a.split("=")[0].rsplit(".", 1)[-1] == field), f"--config.{field}")
            cli.fail(f"{flag}: no such config field in {config_file}")
        line = cli.error_line(e)
        if "config file" in str(e):
            line = f"--config {_config_arg(argv)}: {line}"
        cli.fail(line)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        cli.set_log_verbosity(-1)

    def run() -> int:
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
        return 0

    return cli.run_reporting_errors(run, debug=FLAGS.debug)


if __name__ == "__main__":
    runtime.configure_xla_cpu()
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
