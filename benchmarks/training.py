"""Training throughput: LeNet-5 / MNIST and ResNet-20/56 / CIFAR-10 shapes.

    python -m benchmarks.training            # full
    python -m benchmarks.training --quick    # fewer rounds, ResNet-20 only
    python -m benchmarks.training --smoke    # seconds: tiny shapes, checks it runs

Three tables, each with ratios against a reference measured in the same run
(interleaved rounds, medians; compilation timed separately):

1. LeNet-5, batch 64, Adam (the authors' MNIST settings), cross-entropy.
   Reference: ``flax-conv/jit``, the straightforward flax model (``nn.Conv``,
   ``nn.max_pool``) with a jitted step. Rows: the library's CPU formulation
   (``conv_impl='im2col'``), buffer donation, ``lax.scan`` over steps, the
   project's own data-parallel step (``gce_jax.train.make_train_step``:
   shard_map, metrics, donation), single-threaded XLA (``PJRT_NPROC=1``) and
   the PyTorch reference (``benchmarks.torch_ref``, if torch is installed).
2. ResNet-20/56, batch 128, SGD momentum 0.9, CIFAR-10 shapes (train mode BN).
3. Input pipeline: the time a step waits for data from ``gce_jax.data.batches``
   over real MNIST (falls back to a synthetic uint8 dataset if the IDX files
   are missing), synchronous and with ``gce_jax.parallel.prefetch``, and a
   device-resident dataset gathered on device, vs synthetic on-device data.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._harness import (REPO_ROOT, FnCase, StepCase, WorkerCase, fmt_time,
                                 hardware_line, measure, say, table, torch_available)
from gce_jax import runtime
from gce_jax.losses import get_loss
from gce_jax.models import get_model

MNIST_TRAIN = 60_000
CIFAR_TRAIN = 50_000
DEFAULT_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------
# Step construction (plain jit; the project's step is built by gce_jax.train)
# --------------------------------------------------------------------------

def make_optimizer(name: str) -> optax.GradientTransformation:
    """The authors' optimisers: Adam(1e-3, b2=0.99) for MNIST, SGD(0.1, m=0.9) for CIFAR."""
    if name == "adam":
        return optax.adam(1e-3, b1=0.9, b2=0.99)
    if name == "sgd":
        return optax.sgd(0.1, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def make_step(model, loss: str, tx: optax.GradientTransformation) -> Callable:
    """``(state, x, y) -> state`` with ``state = (params, batch_stats, opt_state, loss)``.

    The loss rides along in the state so nothing is fetched per step.
    """
    loss_fn = get_loss(loss)

    def step(state, x, y):
        params, stats, opt_state, _ = state

        def objective(p):
            if stats:
                logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])
                return jnp.mean(loss_fn(logits, y)), upd["batch_stats"]
            return jnp.mean(loss_fn(model.apply({"params": p}, x, train=True), y)), stats

        (value, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, value

    return step


def init_state(model, tx, x: jax.Array, seed: int = 0):
    variables = model.init(jax.random.key(seed), x[:1])
    params = variables["params"]
    return (params, variables.get("batch_stats", {}), tx.init(params), jnp.zeros(()))


def synthetic_batch(shape: tuple[int, ...], num_classes: int, seed: int = 0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return (jax.random.uniform(kx, shape, jnp.float32),
            jax.random.randint(ky, (shape[0],), 0, num_classes))


def _model(name: str, conv_impl: str, num_classes: int = 10, input_grad: str = "auto"):
    if name == "lenet5":
        return get_model("lenet5", num_classes=num_classes).clone(conv_impl=conv_impl)
    m = get_model(name, num_classes=num_classes, dataset="cifar10")
    if hasattr(m, "input_grad"):
        m = m.clone(input_grad=input_grad)
    return m.clone(conv_impl=conv_impl) if hasattr(m, "conv_impl") else m


def _input_shape(model_name: str, batch: int) -> tuple[int, ...]:
    return (batch, 28, 28, 1) if model_name == "lenet5" else (batch, 32, 32, 3)


# --------------------------------------------------------------------------
# Case factories (module level: WorkerCase builds them in other processes)
# --------------------------------------------------------------------------

def step_case(name: str = "step", model: str = "lenet5", conv_impl: str = "auto",
              loss: str = "xe", batch: int = 64, optimizer: str = "adam",
              formulation: str = "jit", scan_length: int = 10,
              input_grad: str = "auto") -> StepCase:
    """One training step on a fixed synthetic batch already on the device.

    formulation: ``jit`` | ``jit+donate`` | ``scan`` (``scan_length`` steps
    per call, one unit = one step). ``input_grad``: the CIFAR ResNets' conv
    input gradient (``gce_jax.models.resnet``).
    """
    m = _model(model, conv_impl, input_grad=input_grad)
    tx = make_optimizer(optimizer)
    x, y = synthetic_batch(_input_shape(model, batch), 10)
    state = init_state(m, tx, x)
    step = make_step(m, loss, tx)
    if formulation == "jit":
        return StepCase(name, jax.jit(step), state, (x, y), items_per_unit=batch)
    if formulation == "jit+donate":
        return StepCase(name, jax.jit(step, donate_argnums=0), state, (x, y),
                        items_per_unit=batch)
    if formulation == "scan":
        xs = jnp.broadcast_to(x, (scan_length, *x.shape))
        ys = jnp.broadcast_to(y, (scan_length, *y.shape))

        @functools.partial(jax.jit, donate_argnums=0)
        def steps(state, xs, ys):
            return jax.lax.scan(lambda s, xy: (step(s, *xy), None), state, (xs, ys))[0]

        case = StepCase(name, steps, state, (xs, ys), items_per_unit=batch * scan_length)
        case.scan_length = scan_length
        return case
    raise ValueError(f"unknown formulation {formulation!r}")


def project_step_case(name: str = "project", model: str = "lenet5", loss: str = "xe",
                      batch: int = 64, conv_impl: str = "auto",
                      dtype: str = "float32") -> StepCase:
    """The project's step: ``gce_jax.train.make_train_step`` on all devices.

    LeNet-5 uses the MNIST config (Adam), the ResNets the CIFAR-10 one (SGD
    momentum, weight decay); ``dtype`` is the compute dtype (params stay
    float32), ``loss`` a config variant (``xe``, ``gce``).
    """
    from experiments.configs import cifar10_resnet56, mnist_lenet5
    from gce_jax import parallel, train

    if model == "lenet5":
        config, shape, n_train = mnist_lenet5.get_config(loss), (28, 28, 1), MNIST_TRAIN
    else:
        config, shape, n_train = cifar10_resnet56.get_config(loss), (32, 32, 3), CIFAR_TRAIN
        config.model = model
    config.batch_size = batch
    config.dtype = dtype
    mesh = parallel.make_mesh(jax.devices())
    m = train.create_model(config, 10)
    if model == "lenet5":
        m = m.clone(conv_impl=conv_impl)
    tx = train.create_optimizer(config, steps_per_epoch=n_train // batch)
    state = train.create_train_state(config, m, tx, shape, mesh)
    metrics = parallel.replicate(train.init_train_metrics(), mesh)
    x, y = synthetic_batch((batch, *shape), 10)
    sharded = parallel.shard_batch({"image": np.asarray(x), "label": np.asarray(y)}, mesh)
    step_fn = train.make_train_step(config, m, tx, mesh, 10)
    return StepCase(name, lambda s, b: step_fn(*s, b), (state, metrics), (sharded,),
                    items_per_unit=batch)


def pipeline_case(name: str, mode: str, batch: int = 64, data_dir: str | None = None,
                  conv_impl: str = "auto", prefetch: int = 2) -> FnCase:
    """LeNet-5 training fed by the project's input pipeline (one unit = one step).

    mode: ``host-only`` (pipeline alone, no step), ``sync`` (batches ->
    device_put -> step), ``prefetch`` (the same through
    ``gce_jax.parallel.prefetch``, as ``gce_jax.train`` does), ``device``
    (whole uint8 dataset on the device, batches gathered on device by a
    shuffled index, as one jitted step).
    """
    from gce_jax import data as data_lib
    from gce_jax import parallel

    ds = load_mnist_or_synthetic(data_dir)
    m = _model("lenet5", conv_impl)
    tx = make_optimizer("adam")
    x0, _ = synthetic_batch((batch, 28, 28, 1), 10)
    state_box = [init_state(m, tx, x0)]
    step = make_step(m, "xe", tx)
    jstep = jax.jit(step, donate_argnums=0)
    n_batches = len(ds) // batch

    def host_batches():
        epoch = 0
        while True:
            yield from data_lib.batches(ds, batch, shuffle=True, seed=0, epoch=epoch,
                                        drop_remainder=True)
            epoch += 1

    if mode == "host-only":
        it = host_batches()

        def run(n):
            for _ in range(n):
                next(it)
        return FnCase(name, run, items_per_unit=batch)

    if mode in ("sync", "prefetch"):
        src = (jax.device_put(b) for b in host_batches())
        it = parallel.prefetch(src, size=prefetch) if mode == "prefetch" else src

        def run(n):
            state = state_box[0]
            for _ in range(n):
                b = next(it)
                state = jstep(state, b["image"], b["label"])
            jax.block_until_ready(state)
            state_box[0] = state
        # Closing the generator stops prefetch's producer thread.
        return FnCase(name, run, items_per_unit=batch, close=getattr(it, "close", None))

    if mode == "device":
        images = jax.device_put(ds.images)  # uint8 on device: 4x less than float32
        labels = jax.device_put(ds.labels)

        @functools.partial(jax.jit, donate_argnums=0)
        def device_step(state, perm, i):
            idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
            x = images[idx].astype(jnp.float32) / 255.0
            return step(state, x, labels[idx])

        perm_box = [jax.random.permutation(jax.random.key(0), len(ds)), 0]

        def run(n):
            state = state_box[0]
            perm, i = perm_box
            for _ in range(n):
                if i == n_batches:
                    perm, i = jax.random.permutation(jax.random.key(i), len(ds)), 0
                state = device_step(state, perm, i)
                i += 1
            jax.block_until_ready(state)
            state_box[0], perm_box[:] = state, [perm, i]
        return FnCase(name, run, items_per_unit=batch)

    raise ValueError(f"unknown pipeline mode {mode!r}")


@functools.lru_cache(maxsize=4)
def load_mnist_or_synthetic(data_dir: str | None, n_synthetic: int = 6400):
    """Real MNIST train split if the IDX files are there, else random uint8 images."""
    from gce_jax import data as data_lib

    path = Path(data_dir) if data_dir else DEFAULT_MNIST_DIR
    if path.is_dir():
        try:
            return data_lib.load_split("mnist", "train", data_dir=str(path), source="local")
        except Exception as e:  # noqa: BLE001 - benchmark falls back, says so
            say(f"  (could not read MNIST from {path}: {e}; using synthetic data)")
    rng = np.random.default_rng(0)
    return data_lib.ArrayDataset(
        images=rng.integers(0, 256, (n_synthetic, 28, 28, 1), dtype=np.uint8),
        labels=rng.integers(0, 10, n_synthetic).astype(np.int32), num_classes=10,
        name="synthetic-mnist")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

def torch_cases(factory: str, kwargs: dict, label: str = "pytorch") -> list[WorkerCase]:
    """PyTorch rows: 2 threads with passive OpenMP waiting, and 1 thread.

    PyTorch's default (active, spinning) OpenMP barriers collapse on a
    shared machine: with other processes busy, a step took 30x longer (see
    benchmarks/RESULTS.md), which would make any ratio against it meaningless.
    """
    return [WorkerCase(f"{label} (2 threads, OMP_WAIT_POLICY=PASSIVE)", factory, dict(kwargs),
                       env={"OMP_WAIT_POLICY": "PASSIVE"}),
            WorkerCase(f"{label} (1 thread)", factory, dict(kwargs, threads=1))]


def _epoch_col(n_train: int):
    def extra(r):
        steps = math.ceil(n_train / r.items_per_unit) if r.items_per_unit else 0
        return {"s/epoch": f"{r.wall_s * steps:.1f}"} if steps else {"s/epoch": "-"}
    return extra


def lenet_table(args) -> str:
    b = args.lenet_batch
    cases: list = [
        step_case("flax-conv/jit", conv_impl="xla", batch=b),
        step_case("im2col/jit", conv_impl="im2col", batch=b),
        step_case("im2col/jit+donate", conv_impl="im2col", batch=b, formulation="jit+donate"),
        step_case("im2col/scan", conv_impl="im2col", batch=b, formulation="scan",
                  scan_length=args.scan_length),
        project_step_case(f"project train_step (shard_map, {jax.device_count()} dev)", batch=b,
                          conv_impl="im2col"),
    ]
    if not args.smoke:
        for label, impl in (("flax-conv/jit", "xla"), ("im2col/jit", "im2col")):
            cases.append(WorkerCase(
                f"{label} [PJRT_NPROC=1]", "benchmarks.training:step_case",
                dict(name=label, conv_impl=impl, batch=b), env={"PJRT_NPROC": "1"}))
    if torch_available() and not args.no_torch:
        cases += torch_cases("benchmarks.torch_ref:train_case", dict(batch=b))
    units = {c.name: args.units for c in cases}
    units["im2col/scan"] = max(1, args.units // args.scan_length) * args.scan_length
    res = measure(cases, rounds=args.rounds, units=units, log=say if args.verbose else None)
    # scan: one call = scan_length steps; report per step
    for r in res.values():
        if r.name == "im2col/scan":
            r.wall = [w / args.scan_length for w in r.wall]
            r.cpu = [c / args.scan_length for c in r.cpu]
            r.items_per_unit //= args.scan_length
    return table(res.values(), "flax-conv/jit", unit="step", extra=_epoch_col(MNIST_TRAIN),
                 title=f"LeNet-5, MNIST shapes, batch {b}, Adam, cross-entropy")


def _xla_settings() -> dict[str, dict[str, str]]:
    """Worker environments: XLA:CPU's defaults, and the commands' (``gce_jax.runtime``)."""
    base = runtime.strip_cpu_flags(os.environ.get("XLA_FLAGS", ""))
    return {"XLA default": {"XLA_FLAGS": base},
            "gce_jax.runtime": {"XLA_FLAGS": " ".join([base, *runtime.CPU_FLAGS]).strip()}}


def resnet_table(args) -> str:
    b = args.resnet_batch
    depths = args.resnet_depths
    cases = []
    for d in depths:
        # Both XLA settings run in workers: XLA reads its flags once per process.
        for setting, env in _xla_settings().items():
            cases.append(WorkerCase(
                f"resnet{d} nn.Conv/jit+donate [{setting}]", "benchmarks.training:step_case",
                dict(model=f"resnet{d}", conv_impl="xla", batch=b, optimizer="sgd",
                     formulation="jit+donate"), env=env))
        # The commands' setting with XLA's own conv input gradient (the CPU
        # default is gce_jax.models.conv_grad's explicit one).
        native_env = _xla_settings()["gce_jax.runtime"]
        cases.append(WorkerCase(
            f"resnet{d} nn.Conv/jit+donate [gce_jax.runtime, native input grad]",
            "benchmarks.training:step_case",
            dict(model=f"resnet{d}", conv_impl="xla", batch=b, optimizer="sgd",
                 formulation="jit+donate", input_grad="native"), env=native_env))
        cases.append(step_case(f"resnet{d} im2col/jit+donate", model=f"resnet{d}",
                               conv_impl="im2col", batch=b, optimizer="sgd",
                               formulation="jit+donate"))
    if torch_available() and not args.no_torch and 20 in depths:
        cases += torch_cases("benchmarks.torch_ref:resnet20_train_case", dict(batch=b),
                             label="pytorch resnet20")
    res = measure(cases, rounds=max(4, args.rounds // 3), units=args.resnet_units,
                  log=say if args.verbose else None)
    out = table(res.values(), cases[0].name, unit="step", extra=_epoch_col(CIFAR_TRAIN),
                title=f"CIFAR ResNets, CIFAR-10 shapes, batch {b}, SGD momentum 0.9, "
                      "cross-entropy, train-mode BatchNorm")
    torch_rows = [r for r in res.values() if r.name.startswith("pytorch")]
    ours = [r for r in res.values() if r.name.startswith("resnet20 ")]
    if torch_rows and ours:
        # The target is against the better PyTorch thread setting.
        best = min(torch_rows, key=lambda r: r.wall_s)
        fast = min(ours, key=lambda r: r.wall_s)
        out += (f"\nFastest ResNet-20 step ({fast.name}) / best PyTorch ({best.name}): "
                f"**{fast.wall_s / best.wall_s:.2f}x** wall time (same run)\n")
    return out


def pipeline_table(args) -> str:
    b = args.lenet_batch
    ds = load_mnist_or_synthetic(args.data_dir)
    cases = [
        step_case("synthetic on-device batch", conv_impl="im2col", batch=b,
                  formulation="jit+donate"),
        pipeline_case("gce_jax.data.batches, sync", "sync", b, args.data_dir),
        pipeline_case("gce_jax.data.batches + prefetch(2)", "prefetch", b, args.data_dir),
        pipeline_case("device-resident uint8 + on-device gather", "device", b, args.data_dir),
        pipeline_case("pipeline alone (no step)", "host-only", b, args.data_dir),
    ]
    res = measure(cases, rounds=args.rounds, units=args.units, log=say if args.verbose else None)
    ref = res["synthetic on-device batch"]

    def extra(r):
        if r.name.startswith("pipeline alone"):
            return {"waits for data / step": "-"}
        return {"waits for data / step": fmt_time(max(0.0, r.wall_s - ref.wall_s))}
    return table(res.values(), ref.name, unit="step", extra=extra,
                 title=f"Input pipeline, LeNet-5 batch {b} ({ds.name} {ds.split or ''}, "
                       f"{len(ds):,} images)".replace(" )", ")"))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer rounds, ResNet-20 only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; checks that it runs")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--data-dir", default=None, help=f"MNIST IDX files (default {DEFAULT_MNIST_DIR})")
    p.add_argument("--only", nargs="*", choices=("lenet", "resnet", "pipeline"), default=None)
    p.add_argument("--verbose", action="store_true")


def resolve(args) -> argparse.Namespace:
    if args.smoke:
        args.rounds, args.units, args.lenet_batch, args.scan_length = 2, 2, 8, 2
        args.resnet_batch, args.resnet_depths, args.resnet_units = 4, (20,), 1
        args.no_torch = True
    elif args.quick:
        args.rounds, args.units, args.lenet_batch, args.scan_length = 7, 20, 64, 10
        args.resnet_batch, args.resnet_depths, args.resnet_units = 128, (20,), 1
    else:
        args.rounds, args.units, args.lenet_batch, args.scan_length = 15, 40, 64, 10
        args.resnet_batch, args.resnet_depths, args.resnet_units = 128, (20, 56), 2
    return args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(p)
    args = resolve(p.parse_args(argv))
    say(f"hardware: {hardware_line()}")
    only = set(args.only or ("lenet", "resnet", "pipeline"))
    if "lenet" in only:
        say(lenet_table(args) + "\n")
    if "resnet" in only:
        say(resnet_table(args) + "\n")
    if "pipeline" in only:
        say(pipeline_table(args) + "\n")


if __name__ == "__main__":
    main()
