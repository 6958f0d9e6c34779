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
* :func:`inference_logits_fn` (= ``gce_jax.models.logits_fn``) builds
  ``Partial(_InferenceApply(model), variables)``:
  the function part compares equal for equal modules and the variables are
  traced leaves, so new weights (every step of adversarial training, or a new
  checkpoint) reuse the compiled attack, and the weights are not baked into the
  executable as constants.

Scalars such as ``eps`` and step sizes are traced too (changing them does not
recompile); iteration counts, loss names and chunk sizes are static.

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
from jax.tree_util import Partial

from gce_jax.models import logits_fn as models_logits_fn

Array = jax.Array
LogitsFn = Callable[[Array], Array]


# The model closure lives with the models; attacks re-export it under the name
# their docs use.
inference_logits_fn = models_logits_fn


def as_partial(logits_fn: LogitsFn) -> Partial:
    """Wraps any callable as a jit-passable ``Partial`` (see module docstring)."""
    if isinstance(logits_fn, Partial):
        return logits_fn
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
    return Partial(logits_fn)


def check_inputs(x: Any, y: Any) -> tuple[Array, Array]:
    """Converts to jnp arrays and checks the shapes the attacks rely on."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [B, ...] with B >= 1, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point in [0, 1], got dtype {x.dtype}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [B] = {x.shape[:1]}, got {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"y must be integer class ids, got dtype {y.dtype}")
    return x, y.astype(jnp.int32)


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


def finish(x_adv: Array, x: Array) -> Array:
    """Attack results are data, never part of a differentiated graph."""
    return jax.lax.stop_gradient(x_adv.astype(x.dtype))
