"""Cost of GCE vs cross-entropy: the loss alone and inside whole training steps.

    python -m benchmarks.losses            # full
    python -m benchmarks.losses --quick
    python -m benchmarks.losses --smoke

1. Loss alone, jitted forward+backward of the batch mean, for K in
   {10, 100, 200} classes x batch in {128, 1024}: ``gce_jax``'s GCE (alpha
   1/3, normalised) and cross-entropy against
   ``optax.softmax_cross_entropy_with_integer_labels`` (the reference).
   Target: GCE <= 1.5x.
2. Whole training steps with GCE vs with XE (same model, optimizer, batch):
   LeNet-5 (batch 64, Adam) and ResNet-20 (batch 128, SGD momentum).
   Target: <= 1.05x.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from benchmarks._harness import (StepCase, WorkerCase, hardware_line, measure, say,
                                 size_parser, table)
from benchmarks.training import step_case
from gce_jax.losses import cross_entropy, guided_complement_entropy

LOSSES = {
    "optax XE": optax.softmax_cross_entropy_with_integer_labels,
    "gce_jax XE": cross_entropy,
    "gce_jax GCE": lambda z, y: guided_complement_entropy(z, y, alpha=1.0 / 3.0),
}


def loss_case(name: str, loss: str, k: int, batch: int) -> StepCase:
    """Forward+backward of ``mean(loss(logits, labels))`` (unit = one call).

    The gradient is threaded through as the "state" so consecutive calls
    are data-dependent (nothing can be skipped or overlapped).
    """
    fn = LOSSES[loss]
    vg = jax.value_and_grad(lambda z, y: jnp.mean(fn(z, y)))

    @jax.jit
    def step(z, y):
        _, g = vg(z, y)
        return z + 1e-3 * g  # keeps logits changing a little, cheaply

    kz, ky = jax.random.split(jax.random.key(k * 7919 + batch))
    z = 3.0 * jax.random.normal(kz, (batch, k))
    y = jax.random.randint(ky, (batch,), 0, k)
    return StepCase(name, step, z, (y,), items_per_unit=batch)


def loss_tables(args) -> str:
    out = []
    rows = []
    for k in args.ks:
        for b in args.batches:
            cases = [loss_case(f"{name} K={k} B={b}", name, k, b) for name in LOSSES]
            if args.single_thread:
                cases += [WorkerCase(f"{c.name} [PJRT_NPROC=1]", "benchmarks.losses:loss_case",
                                     dict(name=c.name, loss=n, k=k, batch=b),
                                     env={"PJRT_NPROC": "1"})
                          for c, n in zip(cases, LOSSES)]
            res = measure(cases, rounds=args.rounds, units=args.loss_units)
            ref = res[cases[0].name]
            for c in cases:
                r = res[c.name]
                ref_r = res[cases[3].name] if "[PJRT" in c.name else ref
                rows.append((k, b, c.name.split(" K=")[0] + (" [1 thread]" if "[PJRT" in c.name else ""),
                             r.wall_s, r.wall_s / ref_r.wall_s, r.cpu_s / ref_r.cpu_s,
                             r.spread, r.compile_s))
    out.append("**Loss alone: jitted forward+backward of the batch mean** "
               "(ratios vs `optax XE` at the same K, B and thread setting, same run)\n")
    out.append("| K | batch | loss | wall / call | ratio (wall) | ratio (CPU) | IQR/median | compile |")
    out.append("|---|---|---|---|---|---|---|---|")
    from benchmarks._harness import fmt_time
    for k, b, name, w, rw, rc, spread, comp in rows:
        out.append(f"| {k} | {b} | `{name}` | {fmt_time(w)} | {rw:.2f} | {rc:.2f} | "
                   f"{spread:.2f} | {fmt_time(comp)} |")
    return "\n".join(out)


def step_tables(args) -> str:
    out = []
    specs = [("lenet5", args.lenet_batch, "adam", args.step_units)]
    if args.resnet:
        specs.append(("resnet20", args.resnet_batch, "sgd", args.resnet_units))
    for model, b, opt, units in specs:
        cases = [step_case(f"{model} {loss.upper()}", model=model, loss=loss, batch=b,
                           optimizer=opt, formulation="jit+donate") for loss in ("xe", "gce")]
        rounds = args.rounds if model == "lenet5" else max(4, args.rounds // 2)
        res = measure(cases, rounds=rounds, units=units)
        out.append(table(res.values(), cases[0].name, unit="step",
                         title=f"Whole training step, {model} batch {b} ({opt}): GCE vs XE"))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = size_parser(__doc__)
    p.add_argument("--single-thread", action="store_true",
                   help="also time each loss in a PJRT_NPROC=1 worker")
    args = p.parse_args(argv)
    if args.smoke:
        args.ks, args.batches, args.rounds, args.loss_units = (10,), (16,), 2, 5
        args.lenet_batch, args.step_units, args.resnet = 8, 2, False
    elif args.quick:
        args.ks, args.batches, args.rounds, args.loss_units = (10, 100, 200), (128, 1024), 9, 50
        args.lenet_batch, args.step_units, args.resnet = 64, 20, False
        args.resnet_batch, args.resnet_units = 128, 1
    else:
        args.ks, args.batches, args.rounds, args.loss_units = (10, 100, 200), (128, 1024), 21, 100
        args.lenet_batch, args.step_units, args.resnet = 64, 40, True
        args.resnet_batch, args.resnet_units = 128, 2
    say(f"hardware: {hardware_line()}")
    say(loss_tables(args) + "\n")
    say(step_tables(args))


if __name__ == "__main__":
    main()
