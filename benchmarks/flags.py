"""XLA:CPU runtime settings for the LeNet-5 and ResNet-20 training steps and PGD, same run.

    python -m benchmarks.flags [--quick | --smoke] [--only lenet|resnet] [--settings ...]

Each setting runs in its own worker process (XLA reads its flags once, at
start-up) and all are interleaved; the reference is the default setting.
Settings tried (the ones the issue suggested, plus the library fusions XLA
uses on this jaxlib):

* ``PJRT_NPROC=1``: one intra-op thread (XLA's CPU client sizes its pool
  from it) -- on a shared machine, parallel ops wait for descheduled threads;
* ``--xla_cpu_multi_thread_eigen=false``: single-threaded Eigen convolutions;
* ``--xla_cpu_use_thunk_runtime=false``: the older whole-program runtime;
* ``--xla_cpu_experimental_ynn_fusion_type=individual_dot``: YNNPACK for dots
  only (by default it also takes reductions and elementwise fusions);
* ``--xla_cpu_use_onednn=true``: oneDNN for what XLA lets it handle;
* ``ynn_fusion_type=-individual_convolution``: YNNPACK for everything it takes
  by default except convolutions, which stay with XLA's Eigen kernels -- the
  setting the experiment commands start with (``gce_jax.runtime``).
"""

from __future__ import annotations

import os

from benchmarks._harness import WorkerCase, hardware_line, measure, say, size_parser, table

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "PJRT_NPROC=1": {"PJRT_NPROC": "1"},
    "multi_thread_eigen=false": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "use_thunk_runtime=false": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
    "ynn_fusion_type=individual_dot": {
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},
    "use_onednn=true": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    "ynn_fusion_type=-individual_convolution": {
        "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"},
}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(extra)
    if "XLA_FLAGS" in extra and os.environ.get("XLA_FLAGS"):
        env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {extra['XLA_FLAGS']}"
    return env


def main(argv=None) -> None:
    p = size_parser(__doc__)
    p.add_argument("--settings", nargs="*", default=None, choices=tuple(SETTINGS))
    p.add_argument("--only", choices=("lenet", "resnet"), default=None)
    args = p.parse_args(argv)
    names = args.settings or (("default", "ynn_fusion_type=-individual_convolution")
                             if args.smoke else tuple(SETTINGS))
    if args.smoke:
        batch, rounds, units, pgd_batch, pgd_steps = 8, 2, 2, 16, 2
    elif args.quick:
        batch, rounds, units, pgd_batch, pgd_steps = 64, 7, 20, 500, 40
    else:
        batch, rounds, units, pgd_batch, pgd_steps = 64, 11, 40, 500, 40
    say(f"hardware: {hardware_line()}")
    if args.only != "lenet":
        _resnet(names, smoke=args.smoke, quick=args.quick)
    if args.only == "resnet":
        return
    for impl in ("im2col",) if args.smoke else ("im2col", "xla"):
        cases = [WorkerCase(f"{impl} step, {n}", "benchmarks.training:step_case",
                            dict(name=n, conv_impl=impl, batch=batch), env=_env(SETTINGS[n]))
                 for n in names]
        res = measure(cases, rounds=rounds, units=units)
        say(table(res.values(), cases[0].name, unit="step",
                  title=f"LeNet-5 training step (conv_impl='{impl}', batch {batch}, Adam, XE)"
                        " under XLA:CPU settings") + "\n")
    cases = [WorkerCase(f"im2col PGD-{pgd_steps}, {n}", "benchmarks.pgd:pgd_case",
                        dict(conv_impl="im2col", batch=pgd_batch, steps=pgd_steps),
                        env=_env(SETTINGS[n])) for n in names]
    res = measure(cases, rounds=max(3, rounds // 2), units=1)
    say(table(res.values(), cases[0].name, unit="attack",
              title=f"PGD-{pgd_steps} on LeNet-5 (im2col), batch {pgd_batch}, "
                    "under XLA:CPU settings"))


def _resnet(names, *, smoke: bool, quick: bool) -> None:
    """ResNet-20 training step (CIFAR-10 shapes, batch 128, SGD), native convolutions."""
    batch, rounds, units = (8, 2, 1) if smoke else (128, 5, 2) if quick else (128, 9, 3)
    cases = [WorkerCase(f"resnet20 step, {n}", "benchmarks.training:step_case",
                        dict(name=n, model="resnet20", conv_impl="xla", batch=batch,
                             optimizer="sgd"), env=_env(SETTINGS[n])) for n in names]
    res = measure(cases, rounds=rounds, units=units)
    say(table(res.values(), cases[0].name, unit="step",
              title=f"ResNet-20 training step (conv_impl='xla', batch {batch}, SGD, XE) "
                    "under XLA:CPU settings") + "\n")


if __name__ == "__main__":
    main()
