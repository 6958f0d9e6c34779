"""One training loop for every experiment (XE, GCE, complement, COT, PGD-AT).

Data parallelism follows pmap's per-device model, expressed with
``jax.shard_map`` over a 1-D ``'batch'`` mesh (see ``gce_jax.parallel``):
the state is replicated, each device sees its shard of the global batch, and
gradients, metrics and BatchNorm statistics are averaged explicitly.

Gradient reduction under shard_map (``check_vma=True``, the default): the
replicated params are *unvarying* over ``'batch'``; differentiating a
per-device loss with respect to an unvarying value makes autodiff insert the
transpose of the implicit ``pvary``, i.e. a ``psum``, so ``jax.grad`` would
already return the *sum* of the per-device gradients. To keep pmap's explicit
model, ``_loss_and_grads`` first casts the params to varying
(``jax.lax.pcast(..., to='varying')``), so each device gets its local
gradient, and then takes exactly one ``jax.lax.pmean``. The result is the
gradient of the global-batch mean loss; ``tests/test_parallel.py`` checks that
a 4-device step equals the 1-device step on the same global batch.

Reproducibility: the data order is a pure function of ``(seed, epoch)``
(``gce_jax.data.batches``) and every per-step random number comes from
``fold_in(state.key, state.step)``; together with the checkpointed optimizer
state this makes a resumed run bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from gce_jax import checkpoint as ckpt_lib
from gce_jax import data as data_lib
from gce_jax import losses as losses_lib
from gce_jax import parallel
from gce_jax.models import MODEL_NAMES, get_model

AXIS = parallel.BATCH_AXIS

LOSSES = ("xe", "gce", "complement")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "piecewise", "cosine")
METHODS = ("standard", "cot")
COMPLEMENT_NORMALIZATIONS = ("num_classes", "log_k_minus_1", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SELECTIONS = ("last", "best_val")


class TrainingError(FloatingPointError):
    """A non-finite loss or gradient stopped the run (last good checkpoint kept)."""


class ConfigError(ValueError):
    """An invalid configuration value (raised before anything is written)."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

def _adversarial_cfg(config: ml_collections.ConfigDict):
    """The adversarial-training sub-config, or None when disabled."""
    adv = config.get("training", {}).get("adversarial", None)
    if adv is None or not adv.get("enabled", False):
        return None
    return adv


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
    """Raises one ConfigError naming every bad value; writes nothing."""
    errors: list[str] = []

    def check(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    def get(path: str, default: Any = None) -> Any:
        node: Any = config
        for part in path.split("."):
            if node is None or part not in node:
                return default
            node = node[part]
        return node

    check(get("loss") in LOSSES, f"loss={get('loss')!r}: expected one of {LOSSES}")
    alpha = get("alpha", 0.0)
    check(isinstance(alpha, (int, float)) and alpha >= 0 and math.isfinite(alpha),
          f"alpha={alpha!r}: must be a finite number >= 0")
    check(get("model") in MODEL_NAMES, f"model={get('model')!r}: expected one of {MODEL_NAMES}")
    try:
        data_lib.dataset_from_config(config)
    except data_lib.DataError as e:
        errors.append(f"dataset={get('dataset')!r}: {e}")
    check(get("optimizer.name") in OPTIMIZERS,
          f"optimizer.name={get('optimizer.name')!r}: expected one of {OPTIMIZERS}")
    lr = get("optimizer.learning_rate")
    check(isinstance(lr, (int, float)) and lr > 0,
          f"optimizer.learning_rate={lr!r}: must be > 0")
    wd = get("optimizer.weight_decay", 0.0)
    check(isinstance(wd, (int, float)) and wd >= 0,
          f"optimizer.weight_decay={wd!r}: must be >= 0")
    epochs = get("epochs")
    check(isinstance(epochs, int) and epochs >= 1, f"epochs={epochs!r}: must be an int >= 1")
    sched = get("lr_schedule.name")
    check(sched in SCHEDULES, f"lr_schedule.name={sched!r}: expected one of {SCHEDULES}")
    if sched == "piecewise":
        b = list(get("lr_schedule.boundaries_epochs", ()) or ())
        check(all(isinstance(x, (int, float)) and x > 0 for x in b) and b == sorted(b),
              f"lr_schedule.boundaries_epochs={b!r}: must be increasing positive epochs")
        f = get("lr_schedule.decay_factor")
        check(isinstance(f, (int, float)) and f > 0,
              f"lr_schedule.decay_factor={f!r}: must be > 0")
    warm = get("lr_schedule.warmup_epochs", 0.0)
    check(isinstance(warm, (int, float)) and 0 <= warm < epochs,
          f"lr_schedule.warmup_epochs={warm!r}: must be >= 0 and below epochs")
    check(get("selection") in SELECTIONS,
          f"selection={get('selection')!r}: expected one of {SELECTIONS} (never test)")
    val_size = get("data.val_size", 0)
    check(isinstance(val_size, int) and val_size >= 0,
          f"data.val_size={val_size!r}: must be an int >= 0")
    if get("selection") == "best_val":
        check(isinstance(val_size, int) and val_size > 0,
              "selection='best_val' needs a validation split: set data.val_size > 0")
    depth = get("data.prefetch", "auto")
    check(depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool)
                              and depth >= 0),
          f"data.prefetch={depth!r}: must be 'auto' or an int >= 0 (0 = no background thread)")
    check(get("dtype") in DTYPES, f"dtype={get('dtype')!r}: expected one of {tuple(DTYPES)}")
    keep = get("checkpoint.keep", 1)
    check(isinstance(keep, int) and keep >= 1, f"checkpoint.keep={keep!r}: must be an int >= 1")
    n_dev = mesh.devices.size if mesh is not None else jax.device_count()
    n_proc = jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        bs = get(name)
        check(isinstance(bs, int) and bs > 0 and bs % n_dev == 0 and bs % n_proc == 0,
              f"{name}={bs!r}: must be a positive multiple of the device count ({n_dev}) "
              f"and of the process count ({n_proc})")
    method = get("training.method", "standard")
    check(method in METHODS, f"training.method={method!r}: expected one of {METHODS}")
    if method == "cot":
        check(get("loss") == "xe",
              "training.method='cot' alternates cross-entropy and complement entropy "
              f"steps; set loss='xe' (got {get('loss')!r})")
        norm = get("training.cot.complement_normalization", "num_classes")
        check(norm in COMPLEMENT_NORMALIZATIONS,
              f"training.cot.complement_normalization={norm!r}: expected one of "
              f"{COMPLEMENT_NORMALIZATIONS}")
    adv = _adversarial_cfg(config)
    if adv is not None:
        check(method == "standard", "adversarial training is only supported with "
              "training.method='standard'")
        eps, steps, step_size = adv.get("eps"), adv.get("steps"), adv.get("step_size")
        mix = adv.get("mix", 0.0)
        check(isinstance(eps, (int, float)) and eps >= 0,
              f"training.adversarial.eps={eps!r}: must be >= 0")
        check(isinstance(steps, int) and steps >= 1,
              f"training.adversarial.steps={steps!r}: must be an int >= 1")
        check(isinstance(step_size, (int, float)) and step_size > 0,
              f"training.adversarial.step_size={step_size!r}: must be > 0")
        check(isinstance(mix, (int, float)) and 0 <= mix < 1,
              f"training.adversarial.mix={mix!r}: must be in [0, 1)")
        warm = adv.get("eps_warmup_epochs", 0)
        check(isinstance(warm, (int, float)) and warm >= 0,
              f"training.adversarial.eps_warmup_epochs={warm!r}: must be >= 0")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

class Datasets(NamedTuple):
    train: Any  # gce_jax.data.ArrayDataset
    val: Any | None
    test: Any


def load_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Train/val/test ``ArrayDataset``s; the val split is carved out of train."""
    full = data_lib.load_config_split(config, "train")
    test = data_lib.load_config_split(config)
    val = None
    if config.data.val_size > 0:
        full, val = data_lib.train_val_split(full, val_size=config.data.val_size,
                                             seed=config.seed)
    return Datasets(full, val, test)


def train_batches(ds, config: ml_collections.ConfigDict, epoch: int, *,
                  rows: slice | None = None) -> Iterator[dict]:
    """Epoch ``epoch``'s global batches (or their ``rows``); a pure function of (seed, epoch)."""
    return data_lib.batches(ds, config.batch_size, shuffle=True, seed=config.seed,
                            epoch=epoch, augment=config.data.get("augment", False),
                            drop_remainder=True, rows=rows)


def prefetch_depth(config: ml_collections.ConfigDict) -> int:
    """Batches prepared ahead in a background thread (``config.data.prefetch``).

    ``'auto'``: 2 on accelerators or hosts with more than 4 cores; 0 on small
    CPU-only hosts, where the producer thread takes cycles from XLA's compute
    threads and the step measured slower with it (benchmarks/RESULTS.md).
    """
    depth = config.data.get("prefetch", "auto")
    if depth == "auto":
        return 2 if jax.default_backend() != "cpu" or (os.cpu_count() or 1) > 4 else 0
    return int(depth)


def eval_batches(ds, batch_size: int) -> Iterator[dict]:
    """Fixed-size batches in order; the last one padded, with a 0/1 ``mask``."""
    return data_lib.eval_batches(ds, batch_size)


# --------------------------------------------------------------------------
# Model, optimizer, state
# --------------------------------------------------------------------------

def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 *, bn_axis_name: str | None = AXIS) -> nn.Module:
    """The configured model; BatchNorm averages its statistics over ``bn_axis_name``."""
    return get_model(config.model, num_classes=num_classes,
                     dataset=data_lib.dataset_from_config(config),
                     dtype=DTYPES[config.dtype], bn_axis_name=bn_axis_name)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> optax.Schedule:
    """Step -> learning rate; piecewise boundaries are given in epochs."""
    lr = config.optimizer.learning_rate
    s = config.lr_schedule
    if s.name == "constant":
        return optax.constant_schedule(lr)
    if s.name == "piecewise":
        return optax.piecewise_constant_schedule(
            lr, {int(round(b * steps_per_epoch)): s.decay_factor for b in s.boundaries_epochs})
    if s.name == "cosine":
        total = config.epochs * steps_per_epoch
        warmup = int(round(s.get("warmup_epochs", 0.0) * steps_per_epoch))
        if warmup:  # linear from 0 to lr, then cosine to 0 at the last step
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
        return optax.cosine_decay_schedule(lr, total)
    raise ConfigError(f"unknown lr_schedule.name {s.name!r}")


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam or SGD+momentum with L2 weight decay added to the gradient (PyTorch style)."""
    o = config.optimizer
    lr = create_learning_rate_fn(config, steps_per_epoch)
    if o.name == "adam":
        opt = optax.adam(lr, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8))
    elif o.name == "sgd":
        opt = optax.sgd(lr, momentum=o.get("momentum", 0.0) or None,
                        nesterov=o.get("nesterov", False))
    else:
        raise ConfigError(f"unknown optimizer {o.name!r}")
    if o.get("weight_decay", 0.0):
        # wd * param added to the gradient before momentum, as PyTorch's SGD and
        # Adam(weight_decay=...) do (the paper's "weight decay 1e-4").
        opt = optax.chain(optax.add_decayed_weights(o.weight_decay), opt)
    return opt


@flax.struct.dataclass
class TrainState:
    """Everything a bit-identical resume needs (all replicated over the mesh).

    ``comp_opt_state`` is COT's second optimizer state (its own momentum
    buffers), ``None`` for the other methods. ``key`` is the run's base PRNG
    key; step ``s`` uses ``fold_in(key, s)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    comp_opt_state: Any
    key: jax.Array

    @property
    def variables(self) -> dict:
        return _variables(self.params, self.batch_stats)


def _variables(params: Any, batch_stats: Any) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                       mesh: Mesh, *, tx_comp: optax.GradientTransformation | None = None
                       ) -> TrainState:
    """Initialises the state from ``config.seed``, replicated on ``mesh``."""
    def init(key):
        init_key, run_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params),
                          comp_opt_state=None if tx_comp is None else tx_comp.init(params),
                          key=run_key)

    return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))


def create_objective(config: ml_collections.ConfigDict) -> Callable:
    """The per-example training loss ``(logits, labels) -> [B]`` from config."""
    return losses_lib.get_loss(config.loss, alpha=config.get("alpha", 1.0 / 3.0),
                               normalize=config.get("loss_normalize", True))


def create_complement_objective(config: ml_collections.ConfigDict, num_classes: int) -> Callable:
    """COT's complement objective, per example, scaled as configured.

    ``gce_jax.losses.complement_entropy`` returns ``sum_{j!=g} q_j log q_j``
    (<= 0; minimising it flattens the wrong classes), which has the same sign
    as the COT reference's loss. The reference then divides the batch mean by
    K, hence the default ``'num_classes'``; ``'log_k_minus_1'`` uses the
    paper's Eq. (3) normalisation and ``'none'`` the raw Eq. (1).
    """
    norm = config.training.get("cot", {}).get("complement_normalization", "num_classes")
    scale = {"num_classes": 1.0 / num_classes,
             "log_k_minus_1": 1.0 / math.log(num_classes - 1) if num_classes > 2 else 1.0,
             "none": 1.0}[norm]
    return lambda logits, labels: scale * losses_lib.complement_entropy(logits, labels)


# --------------------------------------------------------------------------
# Steps (per device; run under shard_map)
# --------------------------------------------------------------------------

def _pmean_if_varying(tree: Any) -> Any:
    # BatchNorm with axis_name already pmeans its statistics (unvarying); this
    # only acts on a model built without bn_axis_name, keeping replicas equal.
    def f(x):
        return jax.lax.pmean(x, AXIS) if AXIS in getattr(jax.typeof(x), "vma", ()) else x
    return jax.tree.map(f, tree)


def _loss_and_grads(model: nn.Module, loss_fn: Callable, params: Any, batch_stats: Any,
                    x: jax.Array, y: jax.Array):
    """Global-batch mean loss, its gradient, logits and updated BN statistics.

    See the module docstring: params are cast to varying so the per-device
    gradient is local, then reduced by exactly one pmean.
    """
    def objective(p):
        variables = _variables(p, batch_stats)
        if batch_stats:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x, train=True), batch_stats
        return jnp.mean(loss_fn(logits, y)), (logits, new_stats)

    local_params = jax.lax.pcast(params, AXIS, to="varying")
    (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(local_params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    return loss, grads, logits, _pmean_if_varying(new_stats)


def _apply_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def adversarial_eps_scale(step: jax.Array, warmup_steps: int) -> jax.Array:
    """Fraction of the final eps used at ``step``: a linear ramp over ``warmup_steps``.

    Small networks trained at the full radius from scratch can stay at chance
    (LeNet-5 at MNIST eps 0.3 did, for two epochs); ramping the radius up is
    the usual remedy. ``warmup_steps=0`` is Madry et al.'s constant radius.
    """
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / warmup_steps)


def _mix_fraction(mix: float) -> fractions.Fraction:
    return fractions.Fraction(mix).limit_denominator(1000)


def natural_rows(index: jax.Array, mix: float) -> jax.Array:
    r"""Which examples, by index in the global batch, stay natural under ``mix``.

    Row ``i`` is natural when :math:`\lfloor (i+1)\,m \rfloor > \lfloor i\,m \rfloor`:
    ``floor(mix * B)`` of a global batch of ``B``, evenly spread, and a function
    of the index alone, so the choice does not depend on how the batch is split
    across devices. ``mix`` is taken as the nearest fraction with a denominator
    of at most 1000, so the test is exact integer arithmetic.
    """
    f = _mix_fraction(mix)
    index = jnp.asarray(index, jnp.int32)
    return (index + 1) * f.numerator // f.denominator > index * f.numerator // f.denominator


def adversarial_inputs(model: nn.Module, variables: dict, x: jax.Array, y: jax.Array, *,
                       key: jax.Array, adv: Any, eps_scale: Any = 1.0,
                       example_offset: Any = 0) -> jax.Array:
    """Madry et al.'s inner maximisation: PGD on cross-entropy, BatchNorm in inference.

    With ``mix > 0`` the rows :func:`natural_rows` picks stay natural. The
    attack sees the model with ``train=False``, so running statistics cannot
    change during it, and its output is a constant for the outer gradient
    (Danskin). ``eps_scale`` shrinks the radius and the step together (eps
    warm-up). ``example_offset`` is the index of ``x[0]`` in the global batch:
    the random starts and the natural rows are keyed by it (see
    :func:`gce_jax.attacks.pgd`), so a step gives the same result on any
    number of devices.
    """
    from gce_jax.attacks import inference_logits_fn, pgd

    attack = functools.partial(
            pgd, inference_logits_fn(model, variables), key=key, eps=adv.eps * eps_scale,
            steps=adv.steps, step_size=adv.step_size * eps_scale,
            random_start=adv.get("random_start", True), loss="xe")
    mix = adv.get("mix", 0.0)
    if not mix:
        x_adv = attack(x, y, example_offset=example_offset)
        return jax.lax.stop_gradient(x_adv).astype(x.dtype)
    b = x.shape[0]
    index = example_offset + jnp.arange(b)
    natural = natural_rows(index, mix)
    # Any b consecutive indices hold at most this many adversarial rows; a
    # shard with fewer attacks one natural row too and keeps it as it was.
    n_adv = b - math.floor(b * _mix_fraction(mix))
    if n_adv == 0:
        return x
    pick = jnp.argsort(natural, stable=True)[:n_adv]  # adversarial rows first
    x_adv = attack(x[pick], y[pick], example_offset=index[pick])
    keep = natural[pick].reshape((n_adv,) + (1,) * (x.ndim - 1))
    x_adv = jnp.where(keep, x[pick], jax.lax.stop_gradient(x_adv).astype(x.dtype))
    return x.at[pick].set(x_adv, unique_indices=True)


def init_train_metrics() -> dict:
    """Zeroed per-epoch accumulators (kept on device, fetched once in a while)."""
    f = lambda: jnp.zeros((), jnp.float32)
    return {"loss_sum": f(), "comp_loss_sum": f(), "grad_norm_sum": f(),
            "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32),
            "steps": jnp.zeros((), jnp.int32),
            # First step whose loss or gradient was not finite; -1 = none yet.
            "first_bad_step": jnp.full((), -1, jnp.int32)}


def train_step(state: TrainState, metrics: dict, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: Callable,
               tx_comp: optax.GradientTransformation | None = None,
               comp_loss_fn: Callable | None = None, adversarial: Any = None,
               adv_warmup_steps: int = 0) -> tuple[TrainState, dict]:
    """One optimisation step on this device's shard (call under shard_map).

    Standard: one update on ``loss_fn`` (on PGD examples if ``adversarial``).
    COT (``tx_comp`` given): an update on ``loss_fn`` (cross-entropy), then a
    second forward pass at the new parameters and an update on
    ``comp_loss_fn`` with its own optimizer state; BatchNorm statistics are
    updated in both passes.
    """
    x, y = batch["image"], batch["label"]
    step_key = jax.random.fold_in(state.key, state.step)
    if adversarial is not None:
        # Random starts and natural rows keyed by the example's index in the
        # global batch, so they do not depend on the device count.
        offset = jax.lax.axis_index(AXIS) * x.shape[0]
        x = adversarial_inputs(model, state.variables, x, y, key=step_key, adv=adversarial,
                               eps_scale=adversarial_eps_scale(state.step, adv_warmup_steps),
                               example_offset=offset)

    loss, grads, logits, stats = _loss_and_grads(model, loss_fn, state.params,
                                                 state.batch_stats, x, y)
    params, opt_state = _apply_update(tx, grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    comp_loss = jnp.zeros((), jnp.float32)
    comp_opt_state = state.comp_opt_state
    if tx_comp is not None:
        comp_loss, comp_grads, _, stats = _loss_and_grads(model, comp_loss_fn, params,
                                                          stats, x, y)
        params, comp_opt_state = _apply_update(tx_comp, comp_grads, comp_opt_state, params)
        ok &= jnp.isfinite(comp_loss) & jnp.isfinite(optax.tree.norm(comp_grads))

    correct = jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.int32), AXIS)
    count = jax.lax.psum(jnp.asarray(y.shape[0], jnp.int32), AXIS)
    new_metrics = {
        "loss_sum": metrics["loss_sum"] + loss.astype(jnp.float32),
        "comp_loss_sum": metrics["comp_loss_sum"] + comp_loss.astype(jnp.float32),
        "grad_norm_sum": metrics["grad_norm_sum"] + grad_norm.astype(jnp.float32),
        "correct": metrics["correct"] + correct,
        "count": metrics["count"] + count,
        "steps": metrics["steps"] + 1,
        "first_bad_step": jnp.where((metrics["first_bad_step"] < 0) & ~ok,
                                    state.step, metrics["first_bad_step"]),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state, comp_opt_state=comp_opt_state)
    return new_state, new_metrics


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: Mesh, num_classes: int, *,
                    tx_comp: optax.GradientTransformation | None = None,
                    steps_per_epoch: int | None = None
                    ) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """Jitted data-parallel ``(state, metrics, batch) -> (state, metrics)``.

    State and metrics are donated (updated in place); the batch must be
    sharded over ``'batch'`` (``parallel.shard_batch``). ``steps_per_epoch``
    converts ``training.adversarial.eps_warmup_epochs`` into steps.
    """
    if (config.training.get("method", "standard") == "cot") != (tx_comp is not None):
        raise ConfigError("training.method='cot' needs tx_comp (and only COT takes it)")
    adv = _adversarial_cfg(config)
    warmup_epochs = adv.get("eps_warmup_epochs", 0) if adv is not None else 0
    if warmup_epochs and not steps_per_epoch:
        raise ConfigError("training.adversarial.eps_warmup_epochs needs steps_per_epoch")
    warmup_steps = int(round(warmup_epochs * (steps_per_epoch or 0)))
    step = functools.partial(
        train_step, model=model, tx=tx, loss_fn=create_objective(config), tx_comp=tx_comp,
        comp_loss_fn=(create_complement_objective(config, num_classes)
                      if tx_comp is not None else None),
        adversarial=adv, adv_warmup_steps=warmup_steps)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0, 1))


def eval_step(variables: dict, counts: jax.Array, batch: dict, *, model: nn.Module) -> jax.Array:
    """Adds this shard's ``(correct, total)`` to ``counts`` (run under shard_map).

    Padded rows (``mask == 0``) count for neither.
    """
    logits = model.apply(variables, batch["image"], train=False)
    hit = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * batch["mask"]
    local = jnp.stack([jnp.sum(hit), jnp.sum(batch["mask"])]).astype(jnp.int32)
    return counts + jax.lax.psum(local, AXIS)


@functools.lru_cache(maxsize=32)
def _make_eval_step(model: nn.Module, mesh: Mesh) -> Callable:
    sharded = jax.shard_map(functools.partial(eval_step, model=model), mesh=mesh,
                            in_specs=(P(), P(), P(AXIS)), out_specs=P())
    return jax.jit(sharded, donate_argnums=(1,))


def evaluate_accuracy(model: nn.Module, variables: dict, ds: Any, batch_size: int,
                      *, mesh: Mesh | None = None) -> float:
    """Clean top-1 accuracy of ``model`` on ``ds`` (BatchNorm in inference mode).

    Data parallel over ``mesh`` (default: all devices); ``batch_size`` must be
    a multiple of the device count.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(batch_size, mesh, "eval batch_size")
    step = _make_eval_step(model, mesh)
    variables = parallel.replicate(variables, mesh)
    counts = parallel.replicate(jnp.zeros((2,), jnp.int32), mesh)
    for batch in eval_batches(ds, batch_size):
        counts = step(variables, counts, parallel.shard_batch(batch, mesh))
    correct, total = (int(v) for v in jax.device_get(counts))
    return correct / max(total, 1)


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

class _Logger:
    """metrics.jsonl + TensorBoard; a no-op on processes other than 0."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._path = os.path.join(workdir, "metrics.jsonl")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                self._tb.add_scalar(k, v, record["epoch"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _summarise(m: dict) -> dict:
    steps = max(int(m["steps"]), 1)
    return {"train_loss": float(m["loss_sum"]) / steps,
            "train_acc": int(m["correct"]) / max(int(m["count"]), 1),
            "grad_norm": float(m["grad_norm_sum"]) / steps,
            "train_complement_loss": float(m["comp_loss_sum"]) / steps}


def _check_finite(m: dict, epoch: int) -> None:
    bad = int(m["first_bad_step"])
    if bad >= 0:
        raise TrainingError(
            f"non-finite loss or gradient at step {bad} (epoch {epoch}); training stopped. "
            "The last good checkpoint is kept and the bad state was not saved. "
            "Lower the learning rate or check the data/loss configuration.")


def _config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_resume_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    if ckpt_lib.latest_epoch_on_disk(workdir) is None or not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _config_to_dict(config)
    # Resuming with another objective would silently mix two experiments.
    keys = ("model", "dataset", "dtype", "loss", "alpha")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    old_m = old.get("training", {}).get("method", "standard")
    if old_m != new.get("training", {}).get("method", "standard"):
        diff.append("training.method")
    if diff:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with different {', '.join(diff)}; "
            "use a new --workdir (or delete the old one) instead of resuming it")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       datasets: Datasets | None = None,
                       mesh: Mesh | None = None) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: checkpoints, ``metrics.jsonl``, ``tb/`` and ``config.json``.
      datasets: pre-loaded ``Datasets`` (tests); default ``load_datasets(config)``.
      mesh: data-parallel mesh; default all devices.

    Returns:
      Final metrics: last-epoch train/val/test numbers and ``test_acc`` of the
      selected model (``config.selection``: last epoch or best validation).

    Raises:
      ConfigError: bad config, before anything is written to ``workdir``.
      TrainingError: non-finite loss/gradient; the last good checkpoint stays.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate_config(config, mesh)
    _check_resume_compatible(config, workdir)
    is_main = jax.process_index() == 0

    datasets = load_datasets(config) if datasets is None else datasets
    num_classes = int(datasets.train.num_classes)
    steps_per_epoch = len(datasets.train.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the training set "
                          f"({len(datasets.train.labels)} examples)")
    model = create_model(config, num_classes)
    tx = create_optimizer(config, steps_per_epoch)
    cot = config.training.get("method", "standard") == "cot"
    tx_comp = create_optimizer(config, steps_per_epoch) if cot else None
    state = create_train_state(config, model, tx, datasets.train.images.shape[1:], mesh,
                               tx_comp=tx_comp)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch)
    train_step_fn = make_train_step(config, model, tx, mesh, num_classes, tx_comp=tx_comp,
                                    steps_per_epoch=steps_per_epoch)

    # ---- from here on the workdir is written ----
    os.makedirs(workdir, exist_ok=True)
    store = ckpt_lib.CheckpointStore(workdir, keep=config.checkpoint.keep)
    meta: dict = {"epoch": 0, "best_val_acc": None, "best_epoch": None}
    start_epoch = store.latest_epoch() or 0
    if start_epoch:
        state, meta = store.restore(ckpt_lib.abstract_like(state))
    if is_main:
        resolved = _config_to_dict(config)
        # What load_for_eval needs to rebuild the model without the data.
        resolved["resolved"] = {
            "dataset": data_lib.dataset_from_config(config).to_dict(),
            "num_classes": num_classes,
            "input_shape": list(datasets.train.images.shape[1:]),
            "steps_per_epoch": steps_per_epoch, "device_count": int(mesh.devices.size),
            "process_count": jax.process_count()}
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    logger = _Logger(workdir, is_main)
    eval_model = create_model(config, num_classes, bn_axis_name=None)
    eval_bs = config.eval_batch_size
    record: dict = {}
    run_start = time.time()
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            state, record = _train_one_epoch(
                config, state, train_step_fn, datasets.train, epoch, steps_per_epoch, mesh,
                lr=float(lr_fn((epoch - 1) * steps_per_epoch)),
                show=is_main and config.get("progress_bar", True))
            variables = state.variables
            record["val_acc"] = (None if datasets.val is None else evaluate_accuracy(
                eval_model, variables, datasets.val, eval_bs, mesh=mesh))
            record["test_acc"] = (evaluate_accuracy(eval_model, variables, datasets.test,
                                                    eval_bs, mesh=mesh)
                                  if config.get("eval_test_every_epoch", True) else None)
            best = (record["val_acc"] is not None and
                    (meta["best_val_acc"] is None or record["val_acc"] > meta["best_val_acc"]))
            if best:
                meta["best_val_acc"], meta["best_epoch"] = record["val_acc"], epoch
            meta.update(epoch=epoch, val_acc=record["val_acc"], test_acc=record["test_acc"])
            # Checkpoint before logging: a logged epoch always has its checkpoint.
            store.save(epoch, state, dict(meta), best=best)
            record["wall_time_s"] = time.time() - run_start
            logger.write(record)
        return _final_metrics(config, store, state, meta, record, eval_model, datasets,
                              mesh)
    finally:
        logger.close()
        store.close()


def _train_one_epoch(config: ml_collections.ConfigDict, state: TrainState, step_fn: Callable,
                     train_ds: Any, epoch: int, steps_per_epoch: int, mesh: Mesh, *,
                     lr: float, show: bool) -> tuple[TrainState, dict]:
    """Runs one epoch and returns ``(state, log record)``.

    Raises TrainingError on a non-finite loss; the (donated, possibly NaN)
    state is then dropped, never saved.
    """
    from tqdm import tqdm

    metrics = parallel.replicate(init_train_metrics(), mesh)
    log_every = max(1, int(config.get("log_every_steps", 100)))
    # Each host prepares (gathers, augments) only its own rows of the global batch.
    rows = parallel.process_slice(config.batch_size)
    batches = (parallel.shard_batch(b, mesh, process_local=True)
               for b in train_batches(train_ds, config, epoch, rows=rows))
    depth = prefetch_depth(config)
    if depth > 0:
        batches = parallel.prefetch(batches, size=depth)
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
               disable=not show, leave=False, dynamic_ncols=True)
    t0 = time.time()
    # Host time blocked on the input pipeline. Steps are dispatched
    # asynchronously, so this bounds how long the device could have starved.
    data_wait = 0.0
    first_step = 0.0
    try:
        i = 0
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t_wait
            if batch is None:
                break
            i += 1
            state, metrics = step_fn(state, metrics, batch)
            if i == 1:
                # One sync, so the first step (which compiles in the first
                # epoch of a process) is timed apart from the steady state.
                jax.block_until_ready(metrics)
                first_step = time.time() - t0
            bar.update(1)
            # Fetching is a host-device sync: only every log_every steps.
            if i % log_every == 0:
                m = jax.device_get(metrics)
                _check_finite(m, epoch)
                s = _summarise(m)
                bar.set_postfix(loss=f"{s['train_loss']:.4f}", acc=f"{s['train_acc']:.3f}")
        m = jax.device_get(metrics)
    finally:
        batches.close()  # stops the prefetch thread on errors too
        bar.close()
    elapsed = time.time() - t0
    _check_finite(m, epoch)
    # Steady-state throughput: the first step (compilation included) is
    # reported as first_step_s and left out, assuming equal batches.
    images = int(m["count"]) * (i - 1) / max(i, 1)
    record = {"epoch": epoch, **_summarise(m), "lr": lr, "epoch_time_s": elapsed,
              "first_step_s": first_step,
              "images_per_s": images / max(elapsed - first_step, 1e-9) if i > 1
              else int(m["count"]) / max(elapsed, 1e-9),
              "data_wait_s": data_wait, "prefetch": depth}
    if state.comp_opt_state is None:
        record.pop("train_complement_loss")
    return state, record


def _final_metrics(config, store, state, meta, record, eval_model, datasets, mesh) -> dict:
    out = {k: v for k, v in record.items()}
    out.update(epoch=meta.get("epoch"), selection=config.selection,
               last_test_acc=meta.get("test_acc"), best_val_acc=meta.get("best_val_acc"))
    if config.selection == "best_val" and meta.get("best_epoch") is not None:
        best_state, best_meta = store.restore(ckpt_lib.abstract_like(state), which="best_val")
        test_acc = best_meta.get("test_acc")
        if test_acc is None:
            test_acc = evaluate_accuracy(eval_model, best_state.variables, datasets.test,
                                         config.eval_batch_size, mesh=mesh)
        out.update(selected_epoch=best_meta["epoch"], test_acc=test_acc,
                   val_acc=best_meta.get("val_acc"))
    else:
        test_acc = meta.get("test_acc")
        if test_acc is None:
            test_acc = evaluate_accuracy(eval_model, state.variables, datasets.test,
                                         config.eval_batch_size, mesh=mesh)
        out.update(selected_epoch=meta.get("epoch"), test_acc=test_acc,
                   val_acc=meta.get("val_acc"))
    return out


# --------------------------------------------------------------------------
# Evaluation entry point
# --------------------------------------------------------------------------

def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in ``workdir/config.json``."""
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_for_eval(workdir: str, selection: str | None = None
                  ) -> tuple[nn.Module, dict, ml_collections.ConfigDict]:
    """Restores ``(model, variables, config)`` of a finished or running run.

    ``selection`` (default: the run's ``config.selection``) is ``'last'`` (latest
    epoch) or ``'best_val'`` (best validation accuracy). The model is built in
    inference form (no BatchNorm axis) and the variables live on one device.
    """
    config = load_config(workdir)
    which = selection or config.selection
    latest = ckpt_lib.latest_epoch_on_disk(workdir, which)
    if latest is None:
        raise FileNotFoundError(
            f"no {which!r} checkpoint in {ckpt_lib.checkpoint_dir(workdir, which)}")
    store = ckpt_lib.CheckpointStore(workdir, keep=config.checkpoint.keep, read_only=True)
    try:
        info = config.resolved
        mesh = parallel.make_mesh(jax.devices()[:1])
        model = create_model(config, info.num_classes, bn_axis_name=None)
        # Only the state's structure matters here (the schedule is not restored).
        tx = create_optimizer(config, info.steps_per_epoch)
        tx_comp = tx if config.training.get("method", "standard") == "cot" else None
        abstract = jax.eval_shape(
            lambda: create_train_state(config, model, tx, tuple(info.input_shape), mesh,
                                       tx_comp=tx_comp))
        sharding = parallel.replicated(mesh)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        state, _ = store.restore(abstract, which=which)
    finally:
        store.close()
    return model, state.variables, config
