r"""Publishes a trained run's selected weights as a small, checksummed folder.

    python -m experiments.publish --workdir runs/<name> --out weights/<name> \
        --train_command "python -m experiments.train ..."

Writes ``variables.msgpack``, ``config.json``, ``metrics.jsonl`` and
``manifest.json`` (format in ``gce_jax.weights``). ``--out`` must not exist.
Bad input: one error line, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from gce_jax import runtime


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train_command", required=True,
                   help="the command that trained the run (recorded in the manifest)")
    p.add_argument("--selection", default=None, choices=("last", "best_val"))
    args = p.parse_args(argv)
    from gce_jax import provenance, weights
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        print(f"error: --workdir {args.workdir!r} is not a training run (no config.json)",
              file=sys.stderr)
        return 2
    # Where and when the folder was written (the training run's own record is
    # its config.json and metrics.jsonl).
    record = {"published": {"git": provenance.git_info(), "hardware": provenance.hardware_info(),
                            "date": provenance.now_iso()}}
    try:
        manifest = weights.publish(args.workdir, args.out, command=args.train_command,
                                   provenance=record, selection=args.selection)
    except weights.WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {args.out}: epoch {manifest['selected_epoch']} ({manifest['selection']}), "
          f"sha256 {manifest['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    runtime.configure_xla_cpu()
    sys.exit(main())
