"""PGD-40 throughput on LeNet-5 (MNIST shapes), the paper's robustness workload.

    python -m benchmarks.pgd [--quick | --smoke] [--attack-table]

``gce_jax.attacks.pgd`` (eps 0.3, 40 steps of 0.01, random start, XE) with
random LeNet-5 weights, labels = the model's own predictions. Rows:

* ``flax-conv`` (reference): LeNet-5 with ``conv_impl='xla'`` (nn.Conv/max_pool);
* ``im2col``: the library's CPU formulation (default on CPU), same attack;
* a larger batch (evaluation/attack batches are free to be larger than the
  training batch; throughput per image is what matters);
* ``PJRT_NPROC=1`` (single-threaded XLA) and the PyTorch reference
  (``benchmarks.torch_ref.pgd_case``, if torch is installed), in workers.

``--attack-table`` additionally runs ``benchmarks/attacks.py`` (every attack,
ratio to iterations x fwd+bwd) on the default model.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from benchmarks._harness import (FnCase, WorkerCase, hardware_line, measure, say,
                                 size_parser, table, torch_available)
from gce_jax import attacks as A
from gce_jax.models import get_model, logits_fn


def pgd_case(name: str = "pgd", conv_impl: str = "auto", batch: int = 500, steps: int = 40,
             eps: float = 0.3, step_size: float = 0.01, model: str = "lenet5",
             dtype: str = "float32") -> FnCase:
    """One PGD attack on a batch (unit = one attack call on ``batch`` images).

    Random weights, labels = the model's own predictions. ``model`` is
    ``lenet5`` (MNIST shapes, ``conv_impl`` applies) or a CIFAR ResNet (CIFAR
    shapes); ``dtype`` is the compute dtype.
    """
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    if model == "lenet5":
        net = get_model("lenet5", num_classes=10, dtype=compute).clone(conv_impl=conv_impl)
        shape = (batch, 28, 28, 1)
    else:
        net = get_model(model, num_classes=10, dataset="cifar10", dtype=compute)
        shape = (batch, 32, 32, 3)
    x = jax.random.uniform(jax.random.key(0), shape)
    variables = net.init(jax.random.key(1), x[:1])
    fn = logits_fn(net, variables)
    y = jnp.argmax(fn(x), axis=-1)
    key = jax.random.key(2)

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = A.pgd(fn, x, y, key=key, eps=eps, steps=steps, step_size=step_size)
        jax.block_until_ready(out)

    return FnCase(name, run, items_per_unit=batch)


def main(argv=None) -> None:
    p = size_parser(__doc__)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--attack-table", action="store_true",
                   help="also run benchmarks/attacks.py (all attacks)")
    args = p.parse_args(argv)
    if args.smoke:
        batch, big, steps, rounds = 16, 32, 3, 2
    elif args.quick:
        batch, big, steps, rounds = 500, 2000, 40, 5
    else:
        batch, big, steps, rounds = 500, 2000, 40, 9

    say(f"hardware: {hardware_line()}")
    cases = [pgd_case(f"flax-conv B={batch}", "xla", batch, steps),
             pgd_case(f"im2col B={batch}", "im2col", batch, steps),
             pgd_case(f"im2col B={big}", "im2col", big, steps)]
    if not args.smoke:
        cases += [WorkerCase(f"{impl} B={batch} [PJRT_NPROC=1]", "benchmarks.pgd:pgd_case",
                             dict(conv_impl=impl, batch=batch, steps=steps),
                             env={"PJRT_NPROC": "1"})
                  for impl in ("xla", "im2col")]
    if torch_available() and not args.no_torch and not args.smoke:
        from benchmarks.training import torch_cases

        for c in torch_cases("benchmarks.torch_ref:pgd_case", dict(batch=batch, steps=steps)):
            c.name = c.name.replace("pytorch", f"pytorch B={batch}")
            cases.append(c)
    res = measure(cases, rounds=rounds, units=1)
    say(table(res.values(), cases[0].name, unit="attack",
              title=f"PGD-{steps} (eps 0.3, step 0.01, random start), LeNet-5, MNIST shapes"))
    if args.attack_table:
        from benchmarks import attacks as attack_bench

        say("\n`benchmarks/attacks.py` (all attacks, default LeNet-5 formulation):\n")
        attack_bench.main(["--quick"] if (args.quick or args.smoke) else [])


if __name__ == "__main__":
    main()
