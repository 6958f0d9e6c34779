"""The GPU/TPU workload: ResNet-56 training in fp32 vs bf16, and PGD-40 on ResNet-56.

    python -m benchmarks.accelerator            # on a GPU/TPU: the paper's shapes
    python -m benchmarks.accelerator --quick    # CPU-sized: ResNet-20, small batches
                                                # (the default on a CPU backend)
    python -m benchmarks.accelerator --smoke

1. The project's training step (``gce_jax.train.make_train_step``, shard_map
   over every device, CIFAR-10 shapes, batch 128, SGD momentum + weight
   decay) with XE and GCE, in float32 and in bfloat16 compute (parameters,
   logits and the loss stay float32). Reference row: float32 XE. The GCE/XE
   ratio is the paper's "for free" claim where its users train.
2. PGD-40 (eps 8/255, step 2/255, random start, cross-entropy) on ResNet-56
   in inference mode, batch 500, float32 and bfloat16 compute. Reference:
   float32.

After timing, every case's accumulated metrics must show finite losses
(a NaN in bf16 would make the timing meaningless). Prints the device kind with every table.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks._harness import hardware_line, measure, say, table
from benchmarks.pgd import pgd_case
from benchmarks.training import CIFAR_TRAIN, _epoch_col, project_step_case


def _check_finite(case) -> None:
    """After the timed steps: every loss was finite (else the timing is meaningless)."""
    _, metrics = case.state
    loss, bad = (float(jax.device_get(metrics[k])) for k in ("loss_sum", "first_bad_step"))
    if not np.isfinite(loss) or bad != -1:
        raise FloatingPointError(f"{case.name}: non-finite training loss (first at step {bad})")


def train_table(args) -> str:
    cases = []
    for dtype in ("float32", "bfloat16"):
        for loss in ("xe", "gce"):
            c = project_step_case(f"{args.model} {loss.upper()} {dtype}", model=args.model,
                                  loss=loss, batch=args.batch, dtype=dtype)
            cases.append(c)
    res = measure(cases, rounds=args.rounds, units=args.units)
    for c in cases:
        _check_finite(c)
    return table(res.values(), cases[0].name, unit="step", extra=_epoch_col(CIFAR_TRAIN),
                 title=f"Project training step, {args.model}, CIFAR-10 shapes, global batch "
                       f"{args.batch} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
                       "SGD: float32 vs bfloat16 compute, XE vs GCE")


def pgd_table(args) -> str:
    cases = [pgd_case(f"PGD-{args.pgd_steps} {args.model} {dtype}", batch=args.pgd_batch,
                      steps=args.pgd_steps, eps=8 / 255, step_size=2 / 255, model=args.model,
                      dtype=dtype) for dtype in ("float32", "bfloat16")]
    res = measure(cases, rounds=max(2, args.rounds // 2), units=1)
    return table(res.values(), cases[0].name, unit="attack",
                 title=f"PGD-{args.pgd_steps} (eps 8/255, random start, XE), {args.model}, batch "
                       f"{args.pgd_batch}, on {jax.devices()[0].device_kind}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    mode.add_argument("--full", action="store_true",
                      help="the accelerator sizes even on a CPU backend (hours on 2 cores)")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not (args.smoke or args.quick or args.full):
        say("CPU backend: using the --quick sizes (pass --full for ResNet-56, batch 128/500)")
        args.quick = True
    if args.smoke:
        args.model, args.batch, args.rounds, args.units = "resnet20", 4, 2, 1
        args.pgd_batch, args.pgd_steps = 4, 2
    elif args.quick:
        args.model, args.batch, args.rounds, args.units = "resnet20", 32, 5, 2
        args.pgd_batch, args.pgd_steps = 32, 10
    else:
        args.model, args.batch, args.rounds, args.units = "resnet56", 128, 11, 20
        args.pgd_batch, args.pgd_steps = 500, 40
    say(f"hardware: {hardware_line()}")
    say(train_table(args) + "\n")
    say(pgd_table(args) + "\n")


if __name__ == "__main__":
    main()
