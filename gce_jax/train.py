"""One training loop for every experiment (XE, GCE, complement, COT, PGD-AT).

A step is an input transform (natural, or PGD examples) followed by an update
(standard, or COT's two steps), composed by ``make_train_step``.

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

import contextlib
import dataclasses
import fractions
import functools
import json
import math
import os
import sys
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

from gce_jax import attacks as attacks_lib
from gce_jax import checkpoint as ckpt_lib
from gce_jax import data as data_lib
from gce_jax import losses as losses_lib
from gce_jax import parallel
from gce_jax.models import MODEL_NAMES, get_model, logits_fn
from gce_jax.provenance import append_line, atomic_write

AXIS = parallel.BATCH_AXIS

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "piecewise", "cosine")
METHODS = ("standard", "cot")
# COT's complement-step scale, by training.cot.complement_normalization, of K.
COMPLEMENT_SCALES: dict[str, Callable[[int], float]] = {
    "num_classes": lambda k: 1.0 / k,
    "log_k_minus_1": lambda k: 1.0 / math.log(k - 1) if k > 2 else 1.0,
    "none": lambda k: 1.0,
}
COMPLEMENT_NORMALIZATIONS = tuple(COMPLEMENT_SCALES)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SELECTIONS = ("last", "best_val")
# What adversarial training maximises unless training.adversarial.loss names
# another objective of gce_jax.attacks.OBJECTIVES.
ADVERSARIAL_OBJECTIVE = "xe"


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


class _Checks:
    """Collects every bad value of a config, so one ConfigError names them all."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.errors: list[str] = []

    def check(self, cond: bool, msg: str) -> None:
        if not cond:
            self.errors.append(msg)

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in path.split("."):
            if node is None or part not in node:
                return default
            node = node[part]
        return node

    def one_of(self, path: str, names: Any, *, default: Any = None, note: str = "") -> None:
        v, names = self.get(path, default), tuple(names)
        self.check(v in names, f"{path}={v!r}: expected one of {names}{note}")

    def number(self, path: str, low: float, high: float = math.inf, *, default: Any = None,
               low_open: bool = False, high_open: bool = True) -> None:
        """A finite real in the interval (an open end excludes the bound)."""
        v = self.get(path, default)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
        lo, hi = "(["[not low_open], ")]"[not high_open]
        self.check(ok, f"{path}={v!r}: must be a finite number in {lo}{low:g}, {high:g}{hi}")


def _check_objective(c: _Checks) -> None:
    """Loss, model and data set, by the names their modules register."""
    c.one_of("loss", losses_lib.LOSS_NAMES)
    c.number("alpha", 0, default=0.0)
    c.one_of("model", MODEL_NAMES)
    try:
        data_lib.dataset_from_config(c.config)
    except data_lib.DataError as e:
        c.errors.append(f"dataset={c.get('dataset')!r}: {e}")
    c.one_of("dtype", DTYPES)


def _check_optimizer(c: _Checks) -> None:
    c.one_of("optimizer.name", OPTIMIZERS)
    c.number("optimizer.learning_rate", 0, low_open=True)
    c.number("optimizer.weight_decay", 0, default=0.0)
    if c.get("optimizer.name") == "adam":
        c.number("optimizer.b1", 0, 1, default=0.9)
        c.number("optimizer.b2", 0, 1, default=0.999)
        c.number("optimizer.eps", 0, default=1e-8, low_open=True)
    if c.get("optimizer.name") == "sgd":
        c.number("optimizer.momentum", 0, 1, default=0.0)


def _check_schedule(c: _Checks) -> None:
    """Epochs and the learning-rate schedule (its warm-up must fit in the run)."""
    epochs = c.get("epochs")
    c.check(isinstance(epochs, int) and epochs >= 1, f"epochs={epochs!r}: must be an int >= 1")
    c.one_of("lr_schedule.name", SCHEDULES)
    if c.get("lr_schedule.name") == "piecewise":
        b = list(c.get("lr_schedule.boundaries_epochs", ()) or ())
        c.check(all(isinstance(x, (int, float)) and 0 < x < math.inf for x in b)
                and b == sorted(b),
                f"lr_schedule.boundaries_epochs={b!r}: must be increasing positive epochs")
        c.number("lr_schedule.decay_factor", 0, low_open=True)
    epochs_bound = epochs if isinstance(epochs, int) else math.inf
    c.number("lr_schedule.warmup_epochs", 0, epochs_bound, default=0.0)


def _check_data_and_selection(c: _Checks) -> None:
    """Model selection (never on test), the validation split, prefetch and checkpoints."""
    c.one_of("selection", SELECTIONS, note=" (never test)")
    val_size = c.get("data.val_size", 0)
    c.check(isinstance(val_size, int) and val_size >= 0,
            f"data.val_size={val_size!r}: must be an int >= 0")
    if c.get("selection") == "best_val":
        c.check(isinstance(val_size, int) and val_size > 0,
                "selection='best_val' needs a validation split: set data.val_size > 0")
    depth = c.get("data.prefetch", "auto")
    c.check(depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool)
                                and depth >= 0),
            f"data.prefetch={depth!r}: must be 'auto' or an int >= 0 (0 = no background thread)")
    keep = c.get("checkpoint.keep", 1)
    c.check(isinstance(keep, int) and keep >= 1, f"checkpoint.keep={keep!r}: must be an int >= 1")


def _check_batch_sizes(c: _Checks, mesh: Mesh | None) -> None:
    """Global batches split evenly over devices and hosts."""
    n_dev = mesh.devices.size if mesh is not None else jax.device_count()
    n_proc = jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        bs = c.get(name)
        c.check(isinstance(bs, int) and bs > 0 and bs % n_dev == 0 and bs % n_proc == 0,
                f"{name}={bs!r}: must be a positive multiple of the device count ({n_dev}) "
                f"and of the process count ({n_proc})")


def _check_method(c: _Checks) -> None:
    """The update: standard, or COT's (cross-entropy, then complement entropy)."""
    c.one_of("training.method", METHODS, default="standard")
    if c.get("training.method", "standard") == "cot":
        c.check(c.get("loss") == "xe",
                "training.method='cot' alternates cross-entropy and complement entropy "
                f"steps; set loss='xe' (got {c.get('loss')!r})")
        c.one_of("training.cot.complement_normalization", COMPLEMENT_NORMALIZATIONS,
                 default="num_classes")


def _check_adversarial(c: _Checks) -> None:
    """The PGD inner maximisation, its objective named in the attacks' registry."""
    adv = _adversarial_cfg(c.config)
    if adv is None:
        return
    c.check(c.get("training.method", "standard") == "standard",
            "adversarial training is only supported with training.method='standard'")
    # Images are in [0, 1]: a larger L_inf radius is no constraint at all.
    c.number("training.adversarial.eps", 0, 1, high_open=False)
    steps = adv.get("steps")
    c.check(isinstance(steps, int) and steps >= 1,
            f"training.adversarial.steps={steps!r}: must be an int >= 1")
    c.number("training.adversarial.step_size", 0, low_open=True)
    c.number("training.adversarial.mix", 0, 1, default=0.0)
    c.number("training.adversarial.eps_warmup_epochs", 0, default=0)
    c.one_of("training.adversarial.loss", sorted(attacks_lib.OBJECTIVES),
             default=ADVERSARIAL_OBJECTIVE)


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
    """Raises one ConfigError naming every bad value; writes nothing."""
    c = _Checks(config)
    for section in (_check_objective, _check_optimizer, _check_schedule,
                    _check_data_and_selection, _check_method, _check_adversarial):
        section(c)
    _check_batch_sizes(c, mesh)
    if c.errors:
        raise ConfigError("invalid config: " + "; ".join(c.errors))


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
    scale = COMPLEMENT_SCALES[norm](num_classes)
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
    """Madry et al.'s inner maximisation: PGD, BatchNorm in inference.

    PGD maximises cross-entropy unless ``adv.loss`` names another objective
    of ``gce_jax.attacks.OBJECTIVES``. With ``mix > 0`` the rows
    :func:`natural_rows` picks stay natural. The attack sees the model with
    ``train=False``, so running statistics cannot change during it, and its
    output is a constant for the outer gradient (Danskin). ``eps_scale``
    shrinks the radius and the step together (eps warm-up). ``example_offset``
    is the index of ``x[0]`` in the global batch: the random starts and the
    natural rows are keyed by it (see :func:`gce_jax.attacks.pgd`), so a step
    gives the same result on any number of devices.
    """
    from gce_jax.attacks import pgd

    attack = functools.partial(
            pgd, logits_fn(model, variables), key=key, eps=adv.eps * eps_scale,
            steps=adv.steps, step_size=adv.step_size * eps_scale,
            random_start=adv.get("random_start", True),
            loss=adv.get("loss", ADVERSARIAL_OBJECTIVE))
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


# A training step is an input transform (what the model is trained on)
# followed by an update (how the parameters move), both per device:
#
#   InputTransform: (state, x, y) -> x           natural_inputs, adversarial_transform
#   Update:         (state, x, y) -> (state, UpdateOutput)
#                                                standard_update, complement_update
#
# make_input_transform and make_update pick them from the config and
# train_step composes them; neither piece knows about the other.

class UpdateOutput(NamedTuple):
    """What an update reports to the metrics (losses already averaged over devices)."""

    loss: jax.Array       # the primary objective's global-batch mean
    comp_loss: jax.Array  # COT's complement objective; 0 without one
    grad_norm: jax.Array  # norm of the primary objective's gradient
    logits: jax.Array     # this shard's logits of the primary pass (train accuracy)
    ok: jax.Array         # every loss and gradient of the step is finite


InputTransform = Callable[[TrainState, jax.Array, jax.Array], jax.Array]
Update = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, UpdateOutput]]


def natural_inputs(state: TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
    """The identity transform: train on the batch as it is."""
    del state, y
    return x


def adversarial_transform(state: TrainState, x: jax.Array, y: jax.Array, *, model: nn.Module,
                          adv: Any, warmup_steps: int = 0) -> jax.Array:
    """This shard's PGD inputs for the step (:func:`adversarial_inputs`).

    The key is ``fold_in(state.key, state.step)`` and the radius follows the
    eps warm-up. Random starts and natural rows are keyed by the example's
    index in the global batch, so they do not depend on the device count.
    """
    step_key = jax.random.fold_in(state.key, state.step)
    offset = jax.lax.axis_index(AXIS) * x.shape[0]
    return adversarial_inputs(model, state.variables, x, y, key=step_key, adv=adv,
                              eps_scale=adversarial_eps_scale(state.step, warmup_steps),
                              example_offset=offset)


def standard_update(state: TrainState, x: jax.Array, y: jax.Array, *, model: nn.Module,
                    tx: optax.GradientTransformation, loss_fn: Callable
                    ) -> tuple[TrainState, UpdateOutput]:
    """One optimizer step on the global-batch mean of ``loss_fn`` (``state.opt_state``)."""
    loss, grads, logits, stats = _loss_and_grads(model, loss_fn, state.params,
                                                 state.batch_stats, x, y)
    params, opt_state = _apply_update(tx, grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    out = UpdateOutput(loss=loss, comp_loss=jnp.zeros((), jnp.float32), grad_norm=grad_norm,
                       logits=logits, ok=ok)
    return state.replace(params=params, batch_stats=stats, opt_state=opt_state), out


def complement_update(state: TrainState, x: jax.Array, y: jax.Array, *, primary: Update,
                      model: nn.Module, tx_comp: optax.GradientTransformation,
                      comp_loss_fn: Callable) -> tuple[TrainState, UpdateOutput]:
    """COT: the ``primary`` update (cross-entropy), then a complement-entropy step.

    The second step is a new forward pass at the primary update's parameters
    and BatchNorm statistics (both passes update the statistics), with its own
    optimizer state ``state.comp_opt_state``.
    """
    state, out = primary(state, x, y)
    comp_loss, comp_grads, _, stats = _loss_and_grads(model, comp_loss_fn, state.params,
                                                      state.batch_stats, x, y)
    params, comp_opt_state = _apply_update(tx_comp, comp_grads, state.comp_opt_state,
                                           state.params)
    comp_ok = jnp.isfinite(comp_loss) & jnp.isfinite(optax.tree.norm(comp_grads))
    state = state.replace(params=params, batch_stats=stats, comp_opt_state=comp_opt_state)
    return state, out._replace(comp_loss=comp_loss, ok=out.ok & comp_ok)


def accumulate_metrics(metrics: dict, out: UpdateOutput, y: jax.Array, step: jax.Array) -> dict:
    """Adds one step's numbers to the epoch's accumulators (``step``: the state's step)."""
    correct = jax.lax.psum(jnp.sum(jnp.argmax(out.logits, -1) == y, dtype=jnp.int32), AXIS)
    count = jax.lax.psum(jnp.asarray(y.shape[0], jnp.int32), AXIS)
    return {
        "loss_sum": metrics["loss_sum"] + out.loss.astype(jnp.float32),
        "comp_loss_sum": metrics["comp_loss_sum"] + out.comp_loss.astype(jnp.float32),
        "grad_norm_sum": metrics["grad_norm_sum"] + out.grad_norm.astype(jnp.float32),
        "correct": metrics["correct"] + correct,
        "count": metrics["count"] + count,
        "steps": metrics["steps"] + 1,
        "first_bad_step": jnp.where((metrics["first_bad_step"] < 0) & ~out.ok,
                                    step, metrics["first_bad_step"]),
    }


def train_step(state: TrainState, metrics: dict, batch: dict, *, transform: InputTransform,
               update: Update) -> tuple[TrainState, dict]:
    """One optimisation step on this device's shard (call under shard_map)."""
    y = batch["label"]
    x = transform(state, batch["image"], y)
    new_state, out = update(state, x, y)
    return new_state.replace(step=state.step + 1), accumulate_metrics(metrics, out, y,
                                                                      state.step)


def make_input_transform(config: ml_collections.ConfigDict, model: nn.Module, *,
                         steps_per_epoch: int | None = None) -> InputTransform:
    """Natural inputs, or PGD inputs when ``training.adversarial.enabled``.

    ``steps_per_epoch`` converts ``training.adversarial.eps_warmup_epochs``
    into steps.
    """
    adv = _adversarial_cfg(config)
    if adv is None:
        return natural_inputs
    warmup_epochs = adv.get("eps_warmup_epochs", 0)
    if warmup_epochs and not steps_per_epoch:
        raise ConfigError("training.adversarial.eps_warmup_epochs needs steps_per_epoch")
    return functools.partial(adversarial_transform, model=model, adv=adv,
                             warmup_steps=int(round(warmup_epochs * (steps_per_epoch or 0))))


def make_update(config: ml_collections.ConfigDict, model: nn.Module,
                tx: optax.GradientTransformation, num_classes: int, *,
                tx_comp: optax.GradientTransformation | None = None) -> Update:
    """The configured method's update: standard, or COT (``tx_comp`` given)."""
    if (config.training.get("method", "standard") == "cot") != (tx_comp is not None):
        raise ConfigError("training.method='cot' needs tx_comp (and only COT takes it)")
    update = functools.partial(standard_update, model=model, tx=tx,
                               loss_fn=create_objective(config))
    if tx_comp is None:
        return update
    return functools.partial(complement_update, primary=update, model=model, tx_comp=tx_comp,
                             comp_loss_fn=create_complement_objective(config, num_classes))


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: Mesh, num_classes: int, *,
                    tx_comp: optax.GradientTransformation | None = None,
                    steps_per_epoch: int | None = None
                    ) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """Jitted data-parallel ``(state, metrics, batch) -> (state, metrics)``.

    State and metrics are donated (updated in place); the batch must be
    sharded over ``'batch'`` (``parallel.shard_batch``).
    """
    update = make_update(config, model, tx, num_classes, tx_comp=tx_comp)
    transform = make_input_transform(config, model, steps_per_epoch=steps_per_epoch)
    step = functools.partial(train_step, transform=transform, update=update)
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

# Keys of an epoch record that measure (or set) speed, not the model: they
# differ between two otherwise identical runs.
SPEED_KEYS = ("epoch_time_s", "first_step_s", "images_per_s", "data_wait_s", "wall_time_s",
              "prefetch")


class _Logger:
    """``metrics.jsonl`` + TensorBoard; a no-op on processes other than 0.

    The durable record of the epochs is the history in each checkpoint; this
    file mirrors it. :meth:`sync` rewrites the file to exactly that history
    when a run resumes (restoring a line a kill prevented, dropping lines of
    epochs whose checkpoint was lost), and gives TensorBoard, which is written
    before each line, the scalars of every restored line. Nothing is opened
    until something has to be written.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._workdir = workdir
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None

    def _scalars(self, record: dict) -> None:
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2
        if self._tb is None:
            # Not tensorboardX's SummaryWriter: it hands events to a background
            # thread, and its flush() does not wait for them, so a kill right
            # after an epoch's line could lose that epoch's scalars for good.
            from tensorboardX.event_file_writer import EventsWriter
            tb = os.path.join(self._workdir, "tb")
            os.makedirs(tb, exist_ok=True)
            # The pid keeps a resumed run (same second, same host) off the
            # killed run's file, which the writer would truncate.
            self._tb = EventsWriter(os.path.join(tb, "events"), f".{os.getpid()}")
        now = time.time()
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.write_event(event_pb2.Event(
                    wall_time=now, step=record["epoch"], summary=summary.scalar(k, v)))
        self._tb.flush()

    def sync(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        want = "".join(json.dumps(r) + "\n" for r in history)
        try:
            with open(self._path) as f:
                have = f.read()
        except FileNotFoundError:
            have = ""
        if have == want:
            return
        logged = set()
        for line in have.splitlines():
            try:
                logged.add(json.loads(line).get("epoch"))
            except (ValueError, AttributeError):
                pass  # a line cut short by a kill
        for record in history:
            if record["epoch"] not in logged:
                self._scalars(record)
        with _writing(self._path):
            atomic_write(self._path, want)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._scalars(record)
        with _writing(self._path):
            append_line(self._path, json.dumps(record))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Names the file in an OSError (a failed write() does not)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e


def _epoch_line(record: dict, epochs: int) -> str:
    """The one line printed per epoch."""
    def f(key: str, fmt: str = ".4f") -> str:
        v = record.get(key)
        return f"{key} {'n/a' if v is None else format(v, fmt)}"
    return (f"epoch {record['epoch']}/{epochs}: {f('train_loss')} {f('train_acc')} "
            f"{f('val_acc')} {f('test_acc')} {f('lr', '.3g')} "
            f"{record.get('epoch_time_s', 0.0):.1f}s")


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


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """``config`` as the JSON dict a run's config.json holds."""
    return json.loads(config.to_json_best_effort())


CONFIG_FILE = "config.json"
HISTORY_KEY = "config_history"
# Fields a resume may change: they leave the epochs already trained as they
# were, so the change is recorded (config.json's "config_history"), not
# refused. "resolved" holds what the run found: data shapes and hardware.
RECORDED_ON_RESUME = ("name", "epochs", "selection", "eval_batch_size", "eval_test_every_epoch",
                      "data.data_dir", "checkpoint.keep", "eval", "resolved.device_count",
                      "resolved.process_count")
# Fields that only change how a run is shown: neither refused nor recorded.
IGNORED_ON_RESUME = ("progress_bar", "log_every_steps", "data.prefetch")
_USER_CHANGEABLE = tuple(f if f != "eval" else "eval.*" for f in
                         RECORDED_ON_RESUME + IGNORED_ON_RESUME if not f.startswith("resolved."))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _under(key: str, fields: tuple[str, ...]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def resume_changes(old: dict, new: dict, completed: int, workdir: str = "") -> dict:
    """``{field: [old, new]}`` that resuming ``old``'s run with ``new`` records.

    ``old`` is the run's ``config.json``, ``new`` this invocation's config
    (both JSON dicts; ``new['resolved']`` is compared when present) and
    ``completed`` the number of epochs already trained. Raises ConfigError
    naming every field whose change would make the record wrong for the
    epochs already trained (seed, learning rate, batch size, loss, data, ...).
    Fields that appear on one side only come from a code change (the config
    schema is fixed for the user) and are recorded.
    """
    a = _flatten({k: v for k, v in old.items() if k != HISTORY_KEY})
    b = _flatten({k: v for k, v in new.items() if k != HISTORY_KEY})
    keys = a.keys() | b.keys()
    if "resolved" not in new:
        keys = {k for k in keys if not k.startswith("resolved.")}
    refused, recorded = [], {}
    for k in sorted(keys):
        if (k in a) == (k in b) and a.get(k) == b.get(k) or _under(k, IGNORED_ON_RESUME):
            continue
        if k not in a or k not in b or _under(k, RECORDED_ON_RESUME):
            recorded[k] = [a.get(k), b.get(k)]
        else:
            refused.append(f"{k} {a[k]!r} -> {b[k]!r}")
    if "epochs" in recorded:
        if isinstance(b.get("epochs"), int) and b["epochs"] < completed:
            refused.append(f"epochs {a.get('epochs')!r} -> {b['epochs']!r} (it has already "
                           f"completed {completed})")
        elif b.get("lr_schedule.name") == "cosine":
            refused.append(f"epochs {a.get('epochs')!r} -> {b.get('epochs')!r} (the cosine "
                           "schedule is set by the number of epochs)")
    if refused:
        raise ConfigError(
            f"{workdir or 'the workdir'} holds {completed} epoch(s) of a run with another "
            f"config: {'; '.join(refused)}. Resume with the run's values, or use a new "
            f"--workdir (a resume may change only {', '.join(_USER_CHANGEABLE)})")
    return recorded


def read_run_config(workdir: str) -> dict | None:
    """The run's ``config.json`` as a dict (None if absent); ConfigError if damaged."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged (truncated or not JSON: {e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object)")
    return cfg


def _check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} exists and is not a directory")


def _check_writable(workdir: str) -> None:
    """Fails with one line before training if ``workdir`` cannot be written."""
    import tempfile
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: "
                          f"{e.strerror or ckpt_lib.one_line(e)}") from None


def best_epoch(history: list[dict]) -> int | None:
    """The epoch with the highest ``val_acc`` (the first on ties); None without one."""
    best, best_acc = None, None
    for record in history:
        acc = record.get("val_acc")
        if acc is not None and (best_acc is None or acc > best_acc):
            best, best_acc = record["epoch"], acc
    return best


def _record_of(history: list[dict], epoch: int) -> dict:
    return next(r for r in history if r["epoch"] == epoch)


def _meta(history: list[dict]) -> dict:
    """A checkpoint's JSON: its epoch's numbers, the selection and the whole history."""
    last, best = history[-1], best_epoch(history)
    return {"epoch": last["epoch"], "val_acc": last.get("val_acc"),
            "test_acc": last.get("test_acc"), "best_epoch": best,
            "best_val_acc": None if best is None else _record_of(history, best)["val_acc"],
            "history": [dict(r) for r in history]}


def _history(meta: dict, workdir: str, epoch: int) -> list[dict]:
    """The epoch records up to ``epoch``; checkpoints made before the history
    was stored in them fall back to ``metrics.jsonl``."""
    if "history" in meta:
        return [dict(r) for r in meta["history"]]
    records: dict[int, dict] = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= epoch:
                    records[r["epoch"]] = r
    except FileNotFoundError:
        pass
    records.setdefault(epoch, {"epoch": epoch, "val_acc": meta.get("val_acc"),
                               "test_acc": meta.get("test_acc")})
    return [records[e] for e in sorted(records)]


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _sync_best(store: ckpt_lib.CheckpointStore, history: list[dict], epoch: int, state: Any,
               meta: dict, abstract: Any) -> None:
    """Makes ``checkpoints_best`` hold the best epoch of ``history`` (and nothing newer).

    A kill between the two saves of an epoch leaves the best-validation copy
    one improvement behind the history; a checkpoint set aside leaves copies
    of epochs that will be trained again.
    """
    best = best_epoch(history)
    saved = store.epochs("best_val")
    for e in saved:
        if e > epoch or (best in saved and e != best):
            store.delete(e, "best_val")
    if best is None or best in saved:
        return
    if best == epoch:
        store.save(epoch, state, meta, which="best_val")
    elif best in store.epochs("last"):
        best_state, best_meta = store.restore(abstract, epoch=best)
        store.save(best, best_state, best_meta, which="best_val")
    else:
        _warn(f"the best-validation checkpoint (epoch {best}) is gone; selection='best_val' "
              "will use the next epoch that beats it")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Run:
    """One invocation's fixed parts: where it writes, its data and its compiled step."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    store: ckpt_lib.CheckpointStore
    datasets: Datasets
    num_classes: int
    steps_per_epoch: int
    lr_fn: optax.Schedule
    step_fn: Callable
    eval_model: nn.Module  # inference form (no BatchNorm axis)
    abstract: Any  # the state's structure, for restores
    is_main: bool  # process 0: the one that writes logs and config.json


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       datasets: Datasets | None = None,
                       mesh: Mesh | None = None) -> dict:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates.

    Each epoch ends with one checkpoint commit that holds the state and the
    history of every epoch's record, which is what a resume trusts:
    ``metrics.jsonl`` and the best-validation copy are brought in line with
    it, so a run killed at any point resumes to the uninterrupted run's
    parameters, selection and metrics (bit for bit on CPU, timings aside). An
    unreadable newest checkpoint is set aside and the run resumes from the
    newest readable one. A finished run with an unchanged config writes
    nothing, so it can be re-opened in a read-only workdir.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: checkpoints, ``metrics.jsonl``, ``tb/`` and ``config.json``.
      datasets: pre-loaded ``Datasets`` (tests); default ``load_datasets(config)``.
      mesh: data-parallel mesh; default all devices.

    Returns:
      The selected model's numbers (``config.selection``: last epoch or best
      validation accuracy): its epoch's record (``train_loss``, ``val_acc``,
      ...), ``test_acc``, ``selected_epoch``, plus ``epochs_completed``,
      ``best_val_acc`` and the last epoch's record as ``last_epoch``.

    Raises:
      ConfigError: bad config or workdir, or a resume with a changed config,
        before anything is written to ``workdir``.
      TrainingError: non-finite loss/gradient; the last good checkpoint stays.
      CheckpointError: a checkpoint could not be written (disk full, ...).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    validate_config(config, mesh)
    _check_workdir(workdir)
    store = ckpt_lib.CheckpointStore(workdir, keep=config.checkpoint.keep)
    trained = store.epochs()
    old_config = _refuse_changed_config(config, workdir, trained)  # before loading data
    run, state = _build_run(config, workdir, mesh, store, datasets)
    run_config, changes = _run_config(run, old_config, trained)
    start_epoch, state, meta, history, skipped = _restore(run, state, trained)
    if start_epoch < config.epochs or skipped:
        _check_writable(workdir)

    # ---- from here on the workdir may be written ----
    _set_aside(run, skipped, start_epoch)
    _write_run_config(run, run_config, old_config, changes, start_epoch)
    logger = _Logger(workdir, run.is_main)
    try:
        _sync_logs(run, logger, history, start_epoch, state, meta)
        state = _train_epochs(run, state, history, logger, start_epoch)
        return _final_metrics(run, state, history)
    finally:
        logger.close()
        store.close()


def _refuse_changed_config(config: ml_collections.ConfigDict, workdir: str,
                           trained: list[int]) -> dict | None:
    """The run's saved config (None for a new run); ConfigError on a refused change."""
    old_config = read_run_config(workdir) if trained else None
    if old_config is not None:
        resume_changes(old_config, config_to_dict(config), trained[-1], workdir)
    return old_config


def _build_run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
               store: ckpt_lib.CheckpointStore, datasets: Datasets | None
               ) -> tuple[_Run, TrainState]:
    """Loads the data and builds the model, optimizers, initial state and step."""
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
    run = _Run(
        config=config, workdir=workdir, mesh=mesh, store=store, datasets=datasets,
        num_classes=num_classes, steps_per_epoch=steps_per_epoch,
        lr_fn=create_learning_rate_fn(config, steps_per_epoch),
        step_fn=make_train_step(config, model, tx, mesh, num_classes, tx_comp=tx_comp,
                                steps_per_epoch=steps_per_epoch),
        eval_model=create_model(config, num_classes, bn_axis_name=None),
        abstract=ckpt_lib.abstract_like(state), is_main=jax.process_index() == 0)
    return run, state


def _run_config(run: _Run, old_config: dict | None, trained: list[int]) -> tuple[dict, dict]:
    """``(config.json's content, the changes a resume records)``."""
    run_config = config_to_dict(run.config)
    # What load_for_eval needs to rebuild the model without the data.
    run_config["resolved"] = {
        "dataset": data_lib.dataset_from_config(run.config).to_dict(),
        "num_classes": run.num_classes,
        "input_shape": list(run.datasets.train.images.shape[1:]),
        "steps_per_epoch": run.steps_per_epoch, "device_count": int(run.mesh.devices.size),
        "process_count": jax.process_count()}
    changes = {}
    if old_config is not None:
        changes = resume_changes(old_config, run_config, trained[-1], run.workdir)
    return run_config, changes


def _restore(run: _Run, state: TrainState, trained: list[int]
             ) -> tuple[int, TrainState, dict | None, list[dict], list]:
    """``(start_epoch, state, meta, history, skipped)`` from the newest readable checkpoint."""
    if not trained:
        return 0, state, None, [], []
    start_epoch, state, meta, skipped = run.store.restore_newest_intact(run.abstract)
    return start_epoch, state, meta, _history(meta, run.workdir, start_epoch), skipped


def _set_aside(run: _Run, skipped: list, start_epoch: int) -> None:
    """Moves unreadable checkpoints out of the way, saying so."""
    if skipped:
        moved = [run.store.set_aside(e) for e, _ in skipped]
        _warn(f"{skipped[0][1]}; resuming from epoch {start_epoch}, the newest readable "
              f"checkpoint (set aside: {', '.join(moved)})")


def _write_run_config(run: _Run, run_config: dict, old_config: dict | None, changes: dict,
                      start_epoch: int) -> None:
    """Writes ``config.json`` for a new run or a resume that changed something."""
    if not run.is_main or (old_config is not None and not changes):
        return
    if old_config is not None:
        run_config[HISTORY_KEY] = list(old_config.get(HISTORY_KEY, [])) + [
            {"resumed_at_epoch": start_epoch, "changes": changes}]
    path = os.path.join(run.workdir, CONFIG_FILE)
    with _writing(path):
        atomic_write(path, json.dumps(run_config, indent=2))


def _sync_logs(run: _Run, logger: _Logger, history: list[dict], start_epoch: int,
               state: TrainState, meta: dict | None) -> None:
    """Brings ``metrics.jsonl``, TensorBoard and the best copy in line with the history."""
    logger.sync(history)
    if history:
        _sync_best(run.store, history, start_epoch, state, meta, run.abstract)
    if run.is_main and start_epoch and start_epoch < run.config.epochs:
        print(f"resuming {run.workdir} at epoch {start_epoch}/{run.config.epochs}", flush=True)


def _train_epochs(run: _Run, state: TrainState, history: list[dict], logger: _Logger,
                  start_epoch: int) -> TrainState:
    """Trains, evaluates and commits each remaining epoch; appends to ``history``."""
    config = run.config
    # wall_time_s adds up the training time of every resume.
    wall_before = (history[-1].get("wall_time_s") or 0.0) if history else 0.0
    run_start = time.time()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        # Called through the module: tests/test_resume_kill.py wraps it.
        state, record = _train_one_epoch(
            config, state, run.step_fn, run.datasets.train, epoch, run.steps_per_epoch,
            run.mesh, lr=float(run.lr_fn((epoch - 1) * run.steps_per_epoch)),
            show=run.is_main and config.get("progress_bar", True))
        record.update(_evaluate_epoch(run, state))
        record["wall_time_s"] = wall_before + time.time() - run_start
        history.append(record)
        _commit_epoch(run, epoch, state, history, logger)
    return state


def _evaluate_epoch(run: _Run, state: TrainState) -> dict:
    """The epoch's ``val_acc`` and ``test_acc`` (None where not measured)."""
    variables, bs, ds = state.variables, run.config.eval_batch_size, run.datasets
    return {
        "val_acc": (None if ds.val is None else
                    evaluate_accuracy(run.eval_model, variables, ds.val, bs, mesh=run.mesh)),
        "test_acc": (evaluate_accuracy(run.eval_model, variables, ds.test, bs, mesh=run.mesh)
                     if run.config.get("eval_test_every_epoch", True) else None)}


def _commit_epoch(run: _Run, epoch: int, state: TrainState, history: list[dict],
                  logger: _Logger) -> None:
    """Checkpoint 'last', then the best-validation copy, then TensorBoard + metrics.jsonl.

    The commit of 'last' is the epoch's durable record; the best copy and
    the log follow it and are repaired from it on resume (the order
    tests/test_resume_kill.py kills the process at).
    """
    meta = _meta(history)
    run.store.save(epoch, state, meta)
    if meta["best_epoch"] == epoch:
        run.store.save(epoch, state, meta, which="best_val")
    logger.write(history[-1])
    if run.is_main:
        print(_epoch_line(history[-1], run.config.epochs), flush=True)


class _StepTimes(NamedTuple):
    steps: int
    first_step_s: float  # dispatch to result of the first step (compilation included)
    data_wait_s: float  # host time blocked on the input pipeline


def _train_one_epoch(config: ml_collections.ConfigDict, state: TrainState, step_fn: Callable,
                     train_ds: Any, epoch: int, steps_per_epoch: int, mesh: Mesh, *,
                     lr: float, show: bool) -> tuple[TrainState, dict]:
    """Runs one epoch and returns ``(state, log record)``.

    Raises TrainingError on a non-finite loss; the (donated, possibly NaN)
    state is then dropped, never saved.
    """
    from tqdm import tqdm

    depth = prefetch_depth(config)
    batches = _device_batches(config, train_ds, epoch, mesh, depth)
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
               disable=not show, leave=False, dynamic_ncols=True)
    t0 = time.time()
    try:
        metrics = parallel.replicate(init_train_metrics(), mesh)
        state, m, times = _run_steps(config, state, metrics, step_fn, batches, bar, epoch, t0)
    finally:
        batches.close()  # stops the prefetch thread on errors too
        bar.close()
    elapsed = time.time() - t0
    _check_finite(m, epoch)
    record = _epoch_record(epoch, m, times, lr=lr, elapsed=elapsed, depth=depth)
    if state.comp_opt_state is None:
        record.pop("train_complement_loss")
    return state, record


def _device_batches(config: ml_collections.ConfigDict, train_ds: Any, epoch: int, mesh: Mesh,
                    depth: int) -> Iterator[dict]:
    """Epoch ``epoch``'s sharded batches, ``depth`` of them prepared ahead in a thread."""
    # Each host prepares (gathers, augments) only its own rows of the global batch.
    rows = parallel.process_slice(config.batch_size)
    batches = (parallel.shard_batch(b, mesh, process_local=True)
               for b in train_batches(train_ds, config, epoch, rows=rows))
    return parallel.prefetch(batches, size=depth) if depth > 0 else batches


def _run_steps(config: ml_collections.ConfigDict, state: TrainState, metrics: dict,
               step_fn: Callable, batches: Iterator[dict], bar: Any, epoch: int,
               t0: float) -> tuple[TrainState, dict, _StepTimes]:
    """Steps through ``batches``; returns the state, the fetched metrics and the timings."""
    log_every = max(1, int(config.get("log_every_steps", 100)))
    # Steps are dispatched asynchronously, so the data wait bounds how long
    # the device could have starved.
    data_wait, first_step, i = 0.0, 0.0, 0
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - t_wait
        if batch is None:
            break
        i += 1
        state, metrics = step_fn(state, metrics, batch)
        if i == 1:
            # One sync, so the first step (which compiles in the first epoch
            # of a process) is timed apart from the steady state.
            jax.block_until_ready(metrics)
            first_step = time.time() - t0
        bar.update(1)
        # Fetching is a host-device sync: only every log_every steps.
        if i % log_every == 0:
            m = jax.device_get(metrics)
            _check_finite(m, epoch)
            s = _summarise(m)
            bar.set_postfix(loss=f"{s['train_loss']:.4f}", acc=f"{s['train_acc']:.3f}")
    return state, jax.device_get(metrics), _StepTimes(i, first_step, data_wait)


def _epoch_record(epoch: int, m: dict, times: _StepTimes, *, lr: float, elapsed: float,
                  depth: int) -> dict:
    """The epoch's log record from its fetched metrics and timings."""
    i = times.steps
    # Steady-state throughput: the first step (compilation included) is
    # reported as first_step_s and left out, assuming equal batches.
    images = int(m["count"]) * (i - 1) / max(i, 1)
    return {"epoch": epoch, **_summarise(m), "lr": lr, "epoch_time_s": elapsed,
            "first_step_s": times.first_step_s,
            "images_per_s": images / max(elapsed - times.first_step_s, 1e-9) if i > 1
            else int(m["count"]) / max(elapsed, 1e-9),
            "data_wait_s": times.data_wait_s, "prefetch": depth}


def _final_metrics(run: _Run, state: TrainState, history: list[dict]) -> dict:
    """The selected epoch's numbers; the last epoch's apart, under ``last_epoch``."""
    config, store = run.config, run.store
    last = history[-1]
    best = best_epoch(history)
    selected = best if config.selection == "best_val" and best is not None else last["epoch"]
    record = _record_of(history, selected)
    test_acc = record.get("test_acc")
    if test_acc is None:
        if selected != last["epoch"]:
            which = "best_val" if selected in store.epochs("best_val") else "last"
            state, _ = store.restore(run.abstract, which=which, epoch=selected)
        test_acc = evaluate_accuracy(run.eval_model, state.variables, run.datasets.test,
                                     config.eval_batch_size, mesh=run.mesh)
    out = {k: v for k, v in record.items() if k not in SPEED_KEYS and k != "epoch"}
    out.update(selection=config.selection, selected_epoch=selected, test_acc=test_acc,
               epochs_completed=last["epoch"],
               best_val_acc=None if best is None else _record_of(history, best)["val_acc"],
               last_epoch=dict(last))
    return out


# --------------------------------------------------------------------------
# Evaluation entry point
# --------------------------------------------------------------------------

def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in ``workdir/config.json``.

    Raises FileNotFoundError if there is none and ConfigError if it is damaged.
    """
    cfg = read_run_config(workdir)
    if cfg is None:
        raise FileNotFoundError(f"{os.path.join(workdir, CONFIG_FILE)} does not exist; is "
                                f"{workdir!r} a training run directory?")
    return ml_collections.ConfigDict(cfg)


def selected_checkpoint(workdir: str, selection: str) -> tuple[int, str]:
    """``(epoch, 'last' | 'best_val')``: where ``selection``'s checkpoint lies; writes nothing.

    ``'best_val'`` is the best epoch of the history in the newest readable
    checkpoint, not whatever ``checkpoints_best`` holds: a run killed between
    its two saves has the new best only in ``checkpoints``.
    """
    store = ckpt_lib.CheckpointStore(workdir, keep=1, read_only=True)
    if selection == "last":
        epoch = store.latest_epoch("last")
        if epoch is None:
            raise FileNotFoundError(f"no 'last' checkpoint in "
                                    f"{ckpt_lib.checkpoint_dir(workdir, 'last')}")
        return epoch, "last"
    if selection != "best_val":
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    meta = None
    for epoch in reversed(store.epochs("last")):
        try:
            meta = store.read_meta(epoch)
            break
        except ckpt_lib.CheckpointError:
            continue
    if meta is not None and "history" in meta:
        best = best_epoch(meta["history"])
        if best is None:
            raise FileNotFoundError(f"{workdir!r} has no validation accuracy to select on "
                                    "(data.val_size=0); use selection 'last'")
        for which in ("best_val", "last"):
            if best in store.epochs(which):
                return best, which
        raise FileNotFoundError(f"the best-validation checkpoint (epoch {best}) of "
                                f"{workdir!r} is missing")
    epoch = store.latest_epoch("best_val")  # checkpoints written before the history
    if epoch is None:
        raise FileNotFoundError(f"no 'best_val' checkpoint in "
                                f"{ckpt_lib.checkpoint_dir(workdir, 'best_val')}")
    return epoch, "best_val"


def load_for_eval(workdir: str, selection: str | None = None
                  ) -> tuple[nn.Module, dict, ml_collections.ConfigDict]:
    """Restores ``(model, variables, config)`` of a finished or running run.

    ``selection`` (default: the run's ``config.selection``) is ``'last'`` (latest
    epoch) or ``'best_val'`` (best validation accuracy, see
    :func:`selected_checkpoint`). The model is built in inference form (no
    BatchNorm axis) and the variables live on one device. Writes nothing.
    """
    config = load_config(workdir)
    epoch, which = selected_checkpoint(workdir, selection or config.selection)
    store = ckpt_lib.CheckpointStore(workdir, keep=config.checkpoint.keep, read_only=True)
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
    state, _ = store.restore(abstract, which=which, epoch=epoch)
    return model, state.variables, config
