"""Runs the whole benchmark suite; prints markdown for benchmarks/RESULTS.md.

    python -m benchmarks.run_all            # full (tens of minutes on 2 CPU cores)
    python -m benchmarks.run_all --quick    # ~10 minutes
    python -m benchmarks.run_all --smoke    # checks that everything runs
    python -m benchmarks                    # same as run_all

Sections (each its own module, runnable alone): losses, training, pgd,
parallel, flags, convolutions. Every figure is printed beside a reference
measured in the same run (see ``benchmarks/_harness.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import time
import traceback

from benchmarks._harness import hardware_line, say

SECTIONS = ("losses", "training", "pgd", "parallel", "flags", "convolutions")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=None)
    p.add_argument("--skip", nargs="*", choices=SECTIONS, default=())
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference rows")
    args = p.parse_args(argv)
    flag = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]

    say("# gce_jax benchmark results\n")
    cmd = " ".join(["python -m benchmarks.run_all",
                    *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    say(f"Command: `{cmd}`\n")
    say(f"Hardware: {hardware_line()}\n")
    failures = 0
    for name in sections:
        module = __import__(f"benchmarks.{name}", fromlist=["main"])
        extra = ["--no-torch"] if args.no_torch and name in ("training", "pgd") else []
        say(f"## {name}\n")
        t0 = time.perf_counter()
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                module.main(flag + extra)
        except Exception:  # noqa: BLE001 - one failing section must not hide the others
            failures += 1
            say(buf.getvalue())
            say(f"**section {name} FAILED**:\n```\n{traceback.format_exc()[-3000:]}```\n")
            continue
        # Sections print their own hardware line; run_all printed it once already.
        say("\n".join(l for l in buf.getvalue().splitlines() if not l.startswith("hardware: ")))
        say(f"\n_({name}: {time.perf_counter() - t0:.0f} s)_\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
