"""Where a training step's time goes: per-HLO-op breakdown from a jax.profiler trace.

    python -m benchmarks.profile                        # LeNet-5, both formulations
    python -m benchmarks.profile --model resnet20 --batch 128 --steps 3
    python -m benchmarks.profile --smoke

Traces ``--steps`` calls of the jitted training step (after a warm-up call),
sums each HLO instruction's duration over all threads, and prints the top
instructions with what they are (``convolution``, YNNPACK library fusion,
XLA loop fusion, ...) and the shapes they produce, read from the optimised
HLO. Times are thread-time shares, not wall time: use them to see *what*
dominates, and ``benchmarks.training`` for how long a step takes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import shutil
import tempfile
import time

import jax

from benchmarks._harness import hardware_line, say
from benchmarks.training import _input_shape, _model, init_state, make_optimizer, make_step, \
    synthetic_batch


_SIGNIFICANT = ("convolution", "dot", "reduce-window", "reduce", "scatter", "gather",
                "concatenate", "pad", "transpose", "exponential")


def _instructions(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> short description: kind (YNNPACK library call,
    XLA loop fusion, plain op), its main op, and the output shape."""
    ops_in: dict[str, set] = collections.defaultdict(set)
    comp = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            comp = m.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", line)
        if m and comp:
            ops_in[comp].add(m.group(1))
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        desc = op
        if op == "fusion":
            callee = re.search(r"calls=%([\w.\-]+)", line)
            body = ops_in.get(callee.group(1), set()) if callee else set()
            main_op = next((o for o in _SIGNIFICANT if o in body), "elementwise")
            where = "YNNPACK" if "__ynn_fusion" in line or name.startswith("ynn_fusion") \
                else "XLA fusion"
            desc = f"{where}: {main_op}"
        out[name] = f"{desc} -> {shape.split('{')[0]}"
    return out


def profile_step(model: str, conv_impl: str, batch: int, steps: int, top: int) -> str:
    m = _model(model, conv_impl)
    tx = make_optimizer("adam" if model == "lenet5" else "sgd")
    x, y = synthetic_batch(_input_shape(model, batch), 10)
    state = init_state(m, tx, x)
    step = jax.jit(make_step(m, "xe", tx))
    compiled = step.lower(state, x, y).compile()
    described = _instructions(compiled.as_text())
    state = jax.block_until_ready(compiled(state, x, y))
    t0 = time.perf_counter()
    for _ in range(steps):
        state = compiled(state, x, y)
    jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / steps

    from jax._src.lib import _profile_data  # reads the trace back (no TensorBoard needed)

    trace_dir = tempfile.mkdtemp(prefix="gce_jax_profile_")
    try:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            state = compiled(state, x, y)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        data = _profile_data.ProfileData.from_file(
            glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    per_op: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
                continue
            for ev in line.events:
                if ev.name in described:
                    per_op[ev.name] += ev.duration_ns
    total = sum(per_op.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ns in per_op.items():
        by_kind[described[name].split(" -> ")[0]] += ns
    lines = [f"**{model}, conv_impl={conv_impl!r}, batch {batch}**: "
             f"{total / 1e6 / steps:.2f} ms of op time per step (summed over threads; "
             f"untraced wall time {wall * 1e3:.2f} ms)\n",
             "| share | HLO instruction | what |", "|---|---|---|"]
    for name, ns in per_op.most_common(top):
        lines.append(f"| {100 * ns / total:.1f}% | `{name}` | {described[name]} |")
    lines += ["", "| share | kind of op |", "|---|---|"]
    for kind, ns in by_kind.most_common(8):
        lines.append(f"| {100 * ns / total:.1f}% | {kind} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--conv-impl", nargs="*", default=["xla", "im2col"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    batch = args.batch or (64 if args.model == "lenet5" else 128)
    steps = args.steps
    if args.smoke:
        batch, steps = 8, 2
    say(f"hardware: {hardware_line()}")
    impls = args.conv_impl if args.model != "resnet50" else ["n/a"]  # ResNet-50: native only
    for impl in impls:
        say(profile_step(args.model, impl, batch, steps, args.top) + "\n")


if __name__ == "__main__":
    main()
