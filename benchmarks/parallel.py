"""Data-parallel step and attack evaluation: 1, 2 and 4 simulated CPU devices.

    python -m benchmarks.parallel [--quick | --smoke]

Each configuration runs in its own worker process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (XLA reads it once, at
start-up). The step is the project's ``gce_jax.train.make_train_step``
(shard_map over a ``'batch'`` mesh, pmean of gradients, donated state) for
LeNet-5 with a fixed global batch; the reference is a plain jitted step with
no shard_map on one device.

Simulated devices share the same physical cores, so this measures the
*overhead* of the data-parallel program (collectives, per-device dispatch,
smaller per-device GEMMs), not a speed-up. Correctness: every configuration
trains ``--check-steps`` steps from the same initial state on the same
global batches; the parameters must agree with the 1-device run to float
tolerance (the order of the gradient reduction differs).

The second table does the same for attack evaluation as
``gce_jax.robustness.Evaluator(mesh=...)`` runs it: PGD with a random start
on LeNet-5, each batch split across the devices and the model replicated.
Correctness: the set of examples still classified correctly after the attack
must equal the 1-device set.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._harness import (StepCase, WorkerCase, hardware_line, measure, say,
                                 size_parser, table)
from experiments.configs import mnist_lenet5
from gce_jax import parallel, train


def _config(batch: int, loss: str):
    config = mnist_lenet5.get_config(loss)
    config.batch_size = batch
    return config


def _host_batches(batch: int, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((batch, 28, 28, 1), dtype=np.float32),
             "label": rng.integers(0, 10, batch).astype(np.int32)} for _ in range(n)]


def _fingerprint(params) -> list[float]:
    flat = np.concatenate([np.ravel(np.asarray(p)) for p in jax.tree.leaves(params)])
    return flat[::97].astype(float).tolist()


class _DataParallelCase(StepCase):
    """StepCase whose setup first trains the fixed check batches (this also
    compiles the step) and records a fingerprint of the resulting params."""

    def __init__(self, name, step, state, batch, *, check, place, params_of, items_per_unit):
        super().__init__(name, step, state, (place(batch),), items_per_unit=items_per_unit)
        self._check, self._place, self._params_of = check, place, params_of
        self.info: dict = {}

    def _setup(self) -> None:
        state = self._state
        for b in self._check:
            state = self._step(state, self._place(b))
        self.info["fingerprint"] = _fingerprint(self._params_of(state))
        self._state = state
        self._run(1)


def data_parallel_case(name: str = "dp", devices: int = 1, batch: int = 64, loss: str = "gce",
                       check_steps: int = 3, shard_map: bool = True) -> StepCase:
    """The project's step on a ``devices``-device mesh (``shard_map=False``:
    a plain jitted step of the same model/optimizer, no mesh)."""
    if jax.device_count() < devices:
        raise RuntimeError(f"need {devices} devices, have {jax.device_count()}: set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    config = _config(batch, loss)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    model = train.create_model(config, 10, bn_axis_name=None)
    tx = train.create_optimizer(config, steps_per_epoch=100)
    state = train.create_train_state(config, model, tx, (28, 28, 1), mesh)
    check = _host_batches(batch, check_steps, seed=1)
    timing_batch = _host_batches(batch, 1)[0]

    if shard_map:
        step_fn = train.make_train_step(config, model, tx, mesh, 10)
        metrics = parallel.replicate(train.init_train_metrics(), mesh)
        case = _DataParallelCase(
            name, lambda s, b: step_fn(*s, b), (state, metrics), timing_batch, check=check,
            place=lambda b: parallel.shard_batch(b, mesh), params_of=lambda s: s[0].params,
            items_per_unit=batch)
    else:
        loss_fn = train.create_objective(config)

        def plain(carry, b):
            params, opt_state = carry

            def objective(p):
                logits = model.apply({"params": p}, b["image"], train=True)
                return jnp.mean(loss_fn(logits, b["label"]))

            grads = jax.grad(objective)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        case = _DataParallelCase(
            name, jax.jit(plain, donate_argnums=0), (state.params, state.opt_state),
            timing_batch, check=check, place=jax.device_put, params_of=lambda s: s[0],
            items_per_unit=batch)
    case.info["devices"] = devices
    return case


class _AttackCase(StepCase):
    """PGD on a batch split across a mesh; setup records which examples survive."""

    def __init__(self, name, attack, fn, x, y, *, items_per_unit):
        super().__init__(name, lambda _, xb, yb: attack(fn, xb, yb), None, (x, y),
                         items_per_unit=items_per_unit)
        self._fn, self.info = fn, {}

    def _setup(self) -> None:
        x_adv = self._step(None, *self._args)
        pred = np.asarray(jnp.argmax(self._fn(x_adv), -1))
        self.info["survivors"] = (pred == np.asarray(self._args[1])).tolist()
        self._state = x_adv


def evaluation_case(name: str = "eval", devices: int = 1, batch: int = 500,
                    steps: int = 40, eps: float = 0.01) -> StepCase:
    """PGD-``steps`` (step eps/4, random start) on a ``devices``-device mesh,
    placed as ``Evaluator(mesh=...)`` places it. The labels are the model's
    clean predictions, and the small eps leaves some of them standing, so the
    survivor check below is not vacuous."""
    from gce_jax.attacks import pgd
    from gce_jax.models import logits_fn

    if jax.device_count() < devices:
        raise RuntimeError(f"need {devices} devices, have {jax.device_count()}")
    mesh = parallel.make_mesh(jax.devices()[:devices])
    model = train.create_model(_config(batch, "xe"), 10, bn_axis_name=None)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    fn = jax.device_put(logits_fn(model, variables), parallel.replicated(mesh))
    host = _host_batches(batch, 1, seed=2)[0]
    host["label"] = np.asarray(jnp.argmax(fn(host["image"]), -1)).astype(np.int32)
    placed = {k: jax.device_put(v, parallel.batch_sharded(mesh)) for k, v in host.items()}
    attack = lambda f, xb, yb: pgd(f, xb, yb, key=jax.random.PRNGKey(0), eps=eps,  # noqa: E731
                                   steps=steps, step_size=eps / 4)
    case = _AttackCase(name, attack, fn, placed["image"], placed["label"], items_per_unit=batch)
    case.info["devices"] = devices
    return case


def main(argv=None) -> None:
    p = size_parser(__doc__)
    p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--check-steps", type=int, default=3)
    args = p.parse_args(argv)
    batch, rounds, units = (8, 2, 2) if args.smoke else (64, 7, 20) if args.quick else (64, 15, 40)

    say(f"hardware: {hardware_line()}")
    base = os.environ.get("XLA_FLAGS", "")

    def env(n: int) -> dict[str, str]:
        flag = f"--xla_force_host_platform_device_count={n}"
        kept = " ".join(f for f in base.split() if "device_count" not in f)
        return {"XLA_FLAGS": f"{kept} {flag}".strip()}

    cases = [WorkerCase("plain jit step (1 device, no shard_map)",
                        "benchmarks.parallel:data_parallel_case",
                        dict(devices=1, batch=batch, check_steps=args.check_steps,
                             shard_map=False), env=env(1))]
    cases += [WorkerCase(f"shard_map step, {n} device{'s' if n > 1 else ''}",
                         "benchmarks.parallel:data_parallel_case",
                         dict(devices=n, batch=batch, check_steps=args.check_steps),
                         env=env(n)) for n in args.devices]
    res = measure(cases, rounds=rounds, units=units)
    fingerprints = {c.name: c.info["fingerprint"] for c in cases}
    ref_fp = np.asarray(fingerprints[cases[1].name])

    def extra(r):
        fp = np.asarray(fingerprints[r.name])
        diff = float(np.max(np.abs(fp - ref_fp)))
        ok = np.allclose(fp, ref_fp, rtol=1e-4, atol=1e-5)
        return {f"params after {args.check_steps} steps vs 1-device shard_map":
                f"max abs diff {diff:.1e} ({'same' if ok else 'DIFFERENT'})"}

    say(table(res.values(), cases[0].name, unit="step", extra=extra,
              compile_label="first call (check steps + compile)",
              title=f"LeNet-5 data-parallel training step, global batch {batch}, GCE, "
                    "simulated CPU devices on the same cores"))

    eval_batch, steps, eval_rounds = (8, 2, 2) if args.smoke else \
        (100, 10, 5) if args.quick else (500, 40, 7)
    eps = 0.01
    cases = [WorkerCase(f"PGD-{steps}, {n} device{'s' if n > 1 else ''}",
                        "benchmarks.parallel:evaluation_case",
                        dict(devices=n, batch=eval_batch, steps=steps, eps=eps), env=env(n))
             for n in args.devices]
    res = measure(cases, rounds=eval_rounds, units=1)
    survivors = {c.name: c.info["survivors"] for c in cases}
    ref = survivors[cases[0].name]

    def same(r):
        s = survivors[r.name]
        return {"examples still correct": f"{sum(s)}/{len(s)}",
                "vs 1 device": "same" if s == ref else "DIFFERENT"}

    say("")
    say(table(res.values(), cases[0].name, unit="call", extra=same,
              title=f"PGD-{steps} (eps {eps}) evaluation of LeNet-5 (initial weights), batch "
                    f"{eval_batch} split across simulated CPU devices on the same cores"))


if __name__ == "__main__":
    main()
