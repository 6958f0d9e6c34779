"""The CIFAR ResNets' 3x3 convolutions alone: forward, input and weight gradients.

    python -m benchmarks.convolutions [--quick | --smoke]

One table per pass: the three stage shapes of a CIFAR ResNet (16 channels at
32x32, 32 at 16x16, 64 at 8x8; each pass is the same 0.6 GFLOP at batch 128)
under XLA:CPU's defaults and under the commands' setting (``gce_jax.runtime``),
each in its own worker process. This is where the ResNet step's time goes:
the weight gradient is the pass whose kernel the setting changes most.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks._harness import FnCase, WorkerCase, hardware_line, measure, say, size_parser, \
    table
from benchmarks.training import _xla_settings

STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, height = width)
PASSES = ("forward", "input gradient", "weight gradient")


def _conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_case(name: str = "conv", pass_: str = "forward", channels: int = 16, size: int = 32,
              batch: int = 128) -> FnCase:
    """One pass of a 3x3, stride-1 convolution, ``channels`` in and out (one unit)."""
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, channels))
    k = 0.1 * jax.random.normal(kk, (3, 3, channels, channels))
    g = jax.random.normal(kg, (batch, size, size, channels))
    if pass_ == "forward":
        fn, args = jax.jit(_conv), (x, k)
    elif pass_ == "input gradient":
        fn, args = jax.jit(lambda k, g: jax.vjp(lambda x_: _conv(x_, k), x)[1](g)[0]), (k, g)
    elif pass_ == "weight gradient":
        fn, args = jax.jit(lambda x, g: jax.vjp(lambda k_: _conv(x, k_), k)[1](g)[0]), (x, g)
    else:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")

    def run(n: int) -> None:
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
    return FnCase(name, run, items_per_unit=batch)


def gflops(channels: int, size: int, batch: int) -> float:
    return 2 * 9 * batch * size * size * channels * channels / 1e9


def main(argv=None) -> None:
    args = size_parser(__doc__).parse_args(argv)
    batch, rounds, units = (4, 2, 1) if args.smoke else (128, 5, 5) if args.quick else \
        (128, 9, 10)
    stages = STAGES[:1] if args.smoke else STAGES
    say(f"hardware: {hardware_line()}")
    for pass_ in PASSES:
        cases, flops = [], {}
        for c, s in stages:
            for setting, env in _xla_settings().items():
                cases.append(WorkerCase(f"{c}ch {s}x{s} [{setting}]",
                                        "benchmarks.convolutions:conv_case",
                                        dict(pass_=pass_, channels=c, size=s, batch=batch),
                                        env=env))
                flops[cases[-1].name] = gflops(c, s, batch)
        res = measure(cases, rounds=rounds, units=units)

        def extra(r):
            return {"GFLOP/s": f"{flops[r.name] / r.wall_s:.3g}"}
        say(table(res.values(), cases[0].name, unit="call", extra=extra,
                  title=f"3x3 convolution, {pass_}, batch {batch}, float32") + "\n")


if __name__ == "__main__":
    main()
