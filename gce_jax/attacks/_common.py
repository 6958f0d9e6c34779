"""Plumbing shared by all attacks: model-function handling, keys, chunking.

How ``logits_fn`` reaches the compiled code (why nothing recompiles)
-------------------------------------------------------------------
Every public attack is a thin Python wrapper over a ``jax.jit``-compiled core.
The wrapper turns ``logits_fn`` into a :class:`jax.tree_util.Partial` and passes
it as an ordinary (non-static) argument:

* a ``Partial``'s *function* is part of its tree structure, which is what jit's
  cache is keyed on (by ``==``/``hash``); its *bound arguments* are pytree
  leaves, traced like any other array argument;
* a plain callable ``f`` becomes ``Partial(f)``: the cache is keyed on ``f``
  itself, so calling an attack again with the *same* function object reuses the
  compiled code (a fresh ``lambda`` per call recompiles -- keep the closure);
* ``gce_jax.models.logits_fn(model, variables)`` builds
  ``Partial(_InferenceApply(model), variables)``:
  the function part compares equal for equal modules and the variables are
  traced leaves, so new weights (every step of adversarial training, or a new
  checkpoint) reuse the compiled attack, and the weights are not baked into the
  executable as constants.

Scalars such as ``eps`` and step sizes are traced too (changing them does not
recompile); iteration counts, loss names and chunk sizes are static.

Input checks, and what jit cannot check
---------------------------------------
:func:`check_inputs` is the one validator every attack calls before any
compute. On concrete values it raises ``ValueError`` for labels outside
``[0, K)``, pixels that are NaN, infinite or outside [0, 1] (e.g. images in
[0, 255]), an ``eps`` that is negative, NaN or infinite -- Python, numpy and
jax scalars alike -- and a step size that is not finite and > 0. Shapes and
dtypes are checked always.

Under an enclosing ``jax.jit`` the values are tracers and cannot be checked
without a device round trip, so they pass unchecked, with these effects:

* an ``eps`` that is negative, NaN or infinite becomes NaN inside the attack
  (:func:`budget`): the output is NaN, never a perturbation in the wrong
  direction (the evaluator rejects non-finite outputs);
* NaN pixels give NaN outputs for those examples;
* pixels outside [0, 1] are clipped into the box by the projections, so the
  output may lie farther than ``eps`` from such an ``x``;
* an out-of-range label one-hot encodes to all zeros: the attack optimises a
  meaningless objective (the output still respects the ball and the box);
* a negative step size descends the objective (still inside the ball).

Precision
---------
Attacks compute in at least float32 (:func:`working_precision`): bfloat16 or
float16 inputs are upcast inside the compiled attack, and :func:`finish`
rounds the float32 result back to the input dtype *towards the clean input*,
so no coordinate ends farther from ``x`` than in float32. The eps-balls and
[0, 1] therefore hold exactly in the input dtype; the only change is the
rounding of each coordinate to that dtype.

Per-example randomness
----------------------
The key is folded with each example's index in the batch (``fold_in(key, i)``),
so example ``i`` gets the same noise whatever the batch size or chunking; with a
per-example-independent model, ``attack(x)[i]`` depends only on ``x[i]``,
``y[i]``, ``i`` and the key.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def as_partial(logits_fn: LogitsFn) -> Partial:
    """Wraps any callable as a jit-passable ``Partial`` (see module docstring)."""
    if isinstance(logits_fn, Partial):
        return logits_fn
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
    return Partial(logits_fn)


def _is_traced(v: Any) -> bool:
    return isinstance(v, jax.core.Tracer)


def check_scalar(name: str, value: Any, *, positive: bool = False) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is finite and >= 0
    (> 0 when ``positive``). Python, numpy and jax scalars are all checked (a
    negative ``np.float32`` is as wrong as a negative float); ``None`` and
    traced values pass (see the module docstring).
    """
    if value is None or _is_traced(value):
        return
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bad = ~np.isfinite(v) | ((v <= 0) if positive else (v < 0))
    if np.any(bad):
        shown = f"{v.item():g}" if v.ndim == 0 else str(value)
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, "
                         f"got {shown}")


def check_labels(labels: Any, batch: int, num_classes: int | None = None,
                 name: str = "y") -> Array:
    """Integer class ids of shape ``[batch]``, in ``[0, num_classes)`` when concrete."""
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    if num_classes is not None and labels.size and not _is_traced(labels):
        lo, hi = (int(v) for v in jax.device_get((jnp.min(labels), jnp.max(labels))))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} "
                             f"classes; got values in [{lo}, {hi}]")
    return labels.astype(jnp.int32)


def _check_pixels(x: Any) -> None:
    if _is_traced(x) or x.size == 0:
        return
    if isinstance(x, np.ndarray):
        lo, hi = float(np.min(x)), float(np.max(x))
    else:
        lo, hi = (float(v) for v in jax.device_get((jnp.min(x), jnp.max(x))))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("x contains NaN; attack inputs must be finite pixels in [0, 1]")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x must lie in [0, 1] (finite); got values in [{lo:g}, {hi:g}]"
                         + (" -- scale images in [0, 255] by 1/255" if hi > 1.5 else ""))


def check_inputs(x: Any, y: Any, *, logits_fn: LogitsFn | None = None,
                 eps: Any = None, step_size: Any = None) -> tuple[Array, Array]:
    """The one input validator of every attack (rules in the module docstring).

    Converts to jnp arrays (labels to int32) and checks the shapes the attacks
    rely on; on concrete values also pixels in [0, 1], labels in ``[0, K)``
    with ``K`` from ``logits_fn`` (when given), ``eps >= 0`` and
    ``step_size > 0`` (each when given), all finite.
    """
    x_in = x
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [B, ...] with B >= 1, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point in [0, 1], got dtype {x.dtype}")
    k = None if logits_fn is None else num_classes(as_partial(logits_fn), x)
    y = check_labels(y, x.shape[0], k)
    # numpy input is range-checked on the host (no device reduction).
    _check_pixels(x_in if isinstance(x_in, np.ndarray) else x)
    check_scalar("eps", eps)
    check_scalar("step_size", step_size, positive=True)
    return x, y


def working_precision(x: Array) -> Array:
    """``x`` in float32 when its dtype is narrower (bfloat16, float16)."""
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def budget(eps: Any, dtype: Any = jnp.float32) -> Array:
    """``eps`` as a (traced) scalar in ``dtype``; NaN unless finite and >= 0.

    Concrete values were checked by :func:`check_inputs`; a bad traced value
    turns the attack's output into NaN instead of a silent wrong move.
    """
    eps = jnp.asarray(eps, dtype)
    return jnp.where(jnp.isfinite(eps) & (eps >= 0), eps, jnp.nan)


def example_keys(key: Array, batch: int, offset: Any = 0) -> Array:
    """One key per example, independent of batch size and chunking.

    Example ``i`` gets ``fold_in(key, offset + i)``; ``offset`` is the index of
    the first example in a larger batch (a device's shard of a global batch).
    An ``offset`` of shape ``[batch]`` gives every example its own index instead
    (a subset of a batch that is not contiguous).
    """
    offset = jnp.asarray(offset)
    if offset.ndim == 0:
        index = offset + jnp.arange(batch)
    elif offset.shape == (batch,):
        index = offset
    else:
        raise ValueError(f"example_offset must be a scalar or have shape ({batch},), "
                         f"got shape {offset.shape}")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def draw_targets(key: Array, y: Array, num_classes: int, example_offset: Any = 0) -> Array:
    """Targets uniform among the ``K - 1`` wrong classes, one draw per example.

    ``t_i = (y_i + U{1, ..., K-1}) mod K`` with example ``i`` using
    ``fold_in(key, example_offset + i)``: the evaluator can recompute the
    targets an attack used from the same key.
    """
    if num_classes < 2:
        raise ValueError(f"targets need at least 2 classes, got {num_classes}")
    y = jnp.asarray(y, jnp.int32)
    keys = example_keys(key, y.shape[0], example_offset)
    shift = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_classes))(keys)
    return (y + shift) % num_classes


def given_or_drawn_targets(targets: Any, key: Array | None, y: Array, num_classes: int,
                           example_offset: Any = 0, *, attack: str) -> Array:
    """``targets`` range-checked like labels, or, when None, :func:`draw_targets`."""
    if targets is None:
        if key is None:
            raise ValueError(f"{attack} needs targets or a key to draw them")
        return draw_targets(key, y, num_classes, example_offset)
    return check_labels(targets, y.shape[0], num_classes, name="targets")


def num_classes(fn: LogitsFn, x: Array) -> int:
    """Number of logits, from an abstract evaluation (no FLOPs)."""
    return int(jax.eval_shape(fn, x[:1]).shape[-1])


def per_example_sum(v: Array) -> Array:
    """Sum over all non-batch axes, keeping them for broadcasting."""
    return jnp.sum(v, axis=tuple(range(1, v.ndim)), keepdims=True)


def linf_project(x_adv: Array, x: Array, eps: Array) -> Array:
    """Projection onto {|x' - x|_inf <= eps} ∩ [0,1], always around the clean x."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def l2_project(x_adv: Array, x: Array, eps: Array) -> Array:
    """Projection onto the L2 ball around the clean x, then onto [0,1].

    Clipping to the box after the ball keeps the point in the ball: x is in the
    box, so clipping moves every coordinate of x' towards x.
    """
    delta = x_adv - x
    norm = jnp.sqrt(per_example_sum(delta * delta))
    scale = jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-12))
    return jnp.clip(x + delta * scale, 0.0, 1.0)


def run_chunked(core: Callable[..., Array], batch_chunk: int | None,
                *batched: Array) -> Array:
    """Applies ``core`` to chunks of at most ``batch_chunk`` examples, in sequence.

    All ``batched`` arrays share the leading batch axis. The batch is padded by
    repeating its first example to a multiple of the chunk size (padding
    results are dropped), so every chunk has the same shape and the chunks run
    as one ``lax.map`` inside the compiled program: peak memory is that of one
    chunk, and no chunk triggers a second compilation.
    """
    b = batched[0].shape[0]
    if batch_chunk is None or batch_chunk >= b:
        return core(*batched)
    if batch_chunk < 1:
        raise ValueError(f"batch_chunk must be >= 1, got {batch_chunk}")
    n = math.ceil(b / batch_chunk)
    pad = n * batch_chunk - b

    def split(a: Array) -> Array:
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0)
        return a.reshape((n, batch_chunk) + a.shape[1:])

    out = jax.lax.map(lambda args: core(*args), tuple(split(a) for a in batched))
    return out.reshape((n * batch_chunk,) + out.shape[2:])[:b]


def run_chunked_with_targets(core: Callable[..., Array], batch_chunk: int | None, x: Array,
                             y: Array, keys: Array, targets: Array | None) -> Array:
    """:func:`run_chunked` of ``core(x, y, keys, targets)``; ``targets`` may be None
    (``core`` then draws its own), which cannot be chunked as an array."""
    if targets is None:
        return run_chunked(lambda xb, yb, kb: core(xb, yb, kb, None), batch_chunk, x, y, keys)
    return run_chunked(core, batch_chunk, x, y, keys, targets)


def finish(x_adv: Array, x: Array) -> Array:
    """The attack's result in ``x``'s dtype, gradient-stopped (results are data).

    A narrower dtype than the computation's is rounded towards ``x``: the
    nearest representable value, or its neighbour on ``x``'s side when the
    nearest lies farther from ``x`` than ``x_adv`` does. ``x`` itself is
    representable, so every coordinate's distance to ``x`` can only shrink.
    """
    out = x_adv.astype(x.dtype)
    if x_adv.dtype != x.dtype:
        wide = x.astype(x_adv.dtype)
        away = jnp.abs(out.astype(x_adv.dtype) - wide) > jnp.abs(x_adv - wide)
        out = jnp.where(away, jnp.nextafter(out, x), out)
    return jax.lax.stop_gradient(out)


def uniform_start(keys: Array, x: Array, eps: Array, norm: str) -> Array:
    """A point uniform in the eps-ball (``norm``: linf | l2) around each example, clipped to [0,1].

    ``keys``: one PRNG key per example (:func:`example_keys`). The random start
    of PGD, L2 PGD and APGD.
    """
    shape = x.shape[1:]
    if norm == "linf":
        u = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
        return jnp.clip(x + eps * u, 0.0, 1.0)
    # Uniform in the L2 ball: isotropic direction, radius eps * U^(1/d).
    d = x[0].size

    def sample(k):
        k_dir, k_rad = jax.random.split(k)
        v = jax.random.normal(k_dir, shape, x.dtype)
        v = v / jnp.maximum(jnp.linalg.norm(v.ravel()), 1e-12)
        return v * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / d)

    delta = jax.vmap(sample)(keys) * eps
    return jnp.clip(x + delta, 0.0, 1.0)
