r"""Square Attack, L_inf (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

Gradient-free random search on the objective (default: the margin
:math:`\max_{i\ne y} z_i - z_y`, maximised), using only forward passes:

1. Start at vertical stripes: :math:`x_0 = \mathrm{clip}_{[0,1]}(x + \epsilon s)`,
   one random sign per (column, channel).
2. At iteration ``i`` pick a square of side
   :math:`s_i = \mathrm{clip}(\mathrm{round}(\sqrt{p_i H W}), 1, H-1)` at a
   uniform position, and set the perturbation inside it to
   :math:`\pm\epsilon` (one random sign per channel); the rest of the current
   best perturbation is kept. If the proposal leaves the square's pixels
   unchanged, the signs are flipped instead (the reference resamples).
3. Accept the proposal for an example iff its objective increases.

:math:`p_i = p_{init} / 2^k` with ``k`` the number of thresholds
(10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000) below
:math:`\lfloor 10^4 i / N \rfloor`, i.e. the schedule of the paper rescaled to
``n_queries = N``. Examples that are misclassified stop being updated (mask);
the loop ends once all are, or after ``n_queries`` forward passes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, budget, check_inputs,
                                     example_keys, finish, run_chunked, working_precision)
from gce_jax.attacks.objectives import get_objective

_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float | Array, i: Array, n_queries: int) -> Array:
    """Fraction of pixels changed at iteration ``i`` (piecewise constant, halving)."""
    it = jnp.floor(i * 10000.0 / n_queries)
    k = sum((it > t).astype(jnp.int32) for t in _P_THRESHOLDS)
    return p_init / (2.0 ** k)


def _square_core(fn: LogitsFn, x: Array, y: Array, keys: Array, eps: Array,
                 p_init: Array, *, n_queries: int, loss: str) -> Array:
    objective = get_objective(loss)
    x4 = x if x.ndim == 4 else x[..., None]  # [B, H, W] -> one channel
    b, h, w, c = x4.shape
    bshape = (-1, 1, 1, 1)

    def evaluate(xa):
        logits = fn(xa.reshape(x.shape))
        return objective(logits, y), jnp.argmax(logits, axis=-1) != y

    stripes = jax.vmap(lambda k: jax.random.rademacher(
        jax.random.fold_in(k, 0), (1, w, c), x.dtype))(keys)
    x_best = jnp.clip(x4 + eps * stripes, 0.0, 1.0)
    f_best, fooled = evaluate(x_best)
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]

    def propose(k, side):
        k_h, k_w, k_s = jax.random.split(k, 3)
        top = jax.random.randint(k_h, (), 0, h - side + 1)
        left = jax.random.randint(k_w, (), 0, w - side + 1)
        signs = jax.random.rademacher(k_s, (c,), x.dtype)
        return top, left, signs

    def body(state):
        i, x_best, f_best, fooled = state
        p = p_schedule(p_init, i, n_queries)
        side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w) - 1).astype(jnp.int32)
        ikeys = jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys)
        top, left, signs = jax.vmap(propose, in_axes=(0, None))(ikeys, side)
        in_sq = ((rows >= top[:, None, None, None]) & (rows < (top + side)[:, None, None, None])
                 & (cols >= left[:, None, None, None])
                 & (cols < (left + side)[:, None, None, None]))
        signs = signs[:, None, None, :]
        delta = x_best - x4

        def candidate(sg):
            return jnp.clip(x4 + jnp.where(in_sq, eps * sg, delta), 0.0, 1.0)

        x_new = candidate(signs)
        same = jnp.all(jnp.where(in_sq, jnp.abs(x_new - x_best) < 1e-7, True),
                       axis=(1, 2, 3))
        x_new = jnp.where(same.reshape(bshape), candidate(-signs), x_new)
        f_new, fooled_new = evaluate(x_new)
        accept = (~fooled) & (f_new > f_best)
        x_best = jnp.where(accept.reshape(bshape), x_new, x_best)
        f_best = jnp.where(accept, f_new, f_best)
        fooled = fooled | (accept & fooled_new)
        return i + 1, x_best, f_best, fooled

    def cond(state):
        i, _, _, fooled = state
        return (i < n_queries - 1) & ~jnp.all(fooled)

    _, x_best, _, _ = jax.lax.while_loop(cond, body, (0, x_best, f_best, fooled))
    return x_best.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("n_queries", "loss", "batch_chunk"))
def _square_jit(fn, x, y, key, eps, p_init, example_offset, *, n_queries, loss, batch_chunk):
    keys = example_keys(key, x.shape[0], example_offset)
    x_in, x = x, working_precision(x)
    eps = budget(eps, x.dtype)
    p_init = jnp.asarray(p_init, jnp.float32)
    core = functools.partial(_square_core, fn, eps=eps, p_init=p_init,
                             n_queries=n_queries, loss=loss)
    return finish(run_chunked(core, batch_chunk, x, y, keys), x_in)


def square(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
           n_queries: int = 5000, p_init: float = 0.8, loss: str = "margin",
           batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """Square Attack L_inf, untargeted (algorithm in the module docstring).

    Defaults follow AutoAttack's L_inf Square: 5000 queries, ``p_init = 0.8``,
    margin loss (``loss`` may be any objective name). Inputs must be images
    ``[B, H, W, C]`` or ``[B, H, W]`` with ``H, W >= 2``.

    Args:
        logits_fn: ``x -> logits`` (only forward passes are used).
        x: images in [0, 1]; y: ``[B]`` true labels.
        key: PRNG key (per example, per iteration via ``fold_in``).
        eps: L_inf budget.
        n_queries: forward passes per example, including the initial one.
        batch_chunk: process at most this many examples at once.
        example_offset: index of ``x[0]`` in a larger batch (see ``pgd``).
    """
    x, y = check_inputs(x, y, logits_fn=logits_fn, eps=eps)
    get_objective(loss)
    if x.ndim not in (3, 4) or min(x.shape[1], x.shape[2]) < 2:
        raise ValueError(f"square needs images [B, H, W(, C)] with H, W >= 2, got {x.shape}")
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    return _square_jit(as_partial(logits_fn), x, y, key, eps, p_init,
                       jnp.asarray(example_offset, jnp.int32),
                       n_queries=int(n_queries), loss=loss, batch_chunk=batch_chunk)
