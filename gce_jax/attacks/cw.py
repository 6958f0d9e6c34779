r"""Carlini & Wagner L2 attack (S&P 2017), paper Eqs. (8)-(10).

Change of variables :math:`x' = \tfrac12(\tanh w + 1) \in [0,1]`, starting
from :math:`w_0 = \operatorname{artanh}((2x - 1)\cdot 0.999999)`, and per example

.. math::
    \min_w \|x' - x\|_2^2 + c\, f(x'),\qquad
    f = \max(\max_{i\ne t} Z_i - Z_t + \kappa, 0)\ \text{(targeted)},\quad
    f = \max(Z_y - \max_{i\ne y} Z_i + \kappa, 0)\ \text{(untargeted)}

on the logits ``Z``, by Adam (lr 1e-2, written out in ``jnp``). An iterate
counts as a success when the class adjusted by kappa (``confidence``) is the
target (``argmax(Z - kappa e_t) = t``; untargeted ``argmax(Z + kappa e_y) != y``).

Outer loop: ``binary_steps`` rounds of binary search over ``c``, per
example. Each round resets ``w`` to ``w_0`` and the Adam state, and runs at
most ``steps`` steps; an example stops early (mask) when, at a check every
``steps // 10`` steps, its loss exceeds 0.9999 x its loss at the previous
check. After the round: if the example succeeded, ``upper = min(upper, c)``
and ``c = (lower + upper) / 2``; otherwise ``lower = max(lower, c)`` and ``c``
is bisected if an upper bound exists, else multiplied by 10.

Returns per example the successful iterate with the smallest L2 distance over
all rounds, or ``x`` itself if no iterate succeeded.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, check_inputs,
                                     check_scalar, finish, given_or_drawn_targets, num_classes,
                                     run_chunked, working_precision)

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
_NO_BOUND = 1e10


def _cw_core(fn: LogitsFn, x: Array, labels: Array, confidence: Array, lr: Array,
             initial_const: Array, *, targeted: bool, binary_steps: int,
             steps: int, abort_early: bool) -> Array:
    # Long on purpose: the binary-search loop and the Adam loop are closures
    # over the same constants, so each lax loop carries only its state arrays.
    bsz = x.shape[0]
    axes = tuple(range(1, x.ndim))
    bshape = (-1,) + (1,) * (x.ndim - 1)
    w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)
    check_every = max(steps // 10, 1)

    def to_x(w):
        return (jnp.tanh(w) + 1.0) / 2.0

    def objective(w, c):
        xa = to_x(w)
        logits = fn(xa).astype(jnp.float32)
        is_l = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
        z_l = jnp.sum(jnp.where(is_l, logits, 0.0), axis=-1)
        z_other = jnp.max(jnp.where(is_l, -jnp.inf, logits), axis=-1)
        f = (z_other - z_l) if targeted else (z_l - z_other)
        f = jnp.maximum(f + confidence, 0.0)
        l2 = jnp.sum((xa - x) ** 2, axis=axes)
        loss = l2 + c * f
        # Sum, not mean: each example's gradient (and its Adam step) is its own.
        return jnp.sum(loss), (loss, l2, logits, xa)

    def succeeded(logits):
        shift = confidence * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        if targeted:
            return jnp.argmax(logits - shift, axis=-1) == labels
        return jnp.argmax(logits + shift, axis=-1) != labels

    def search_round(_, outer):
        lower, upper, c, o_l2, o_adv = outer

        def cond(s):
            return (s["it"] < steps) & ~jnp.all(s["stopped"])

        def body(s):
            (_, (loss, l2, logits, xa)), g = jax.value_and_grad(
                objective, has_aux=True)(s["w"], c)
            live = ~s["stopped"]
            ok = succeeded(logits) & live
            better = ok & (l2 < s["best_l2"])
            best_l2 = jnp.where(better, l2, s["best_l2"])
            hit = s["hit"] | ok
            better_all = ok & (l2 < s["o_l2"])
            o_l2_new = jnp.where(better_all, l2, s["o_l2"])
            o_adv_new = jnp.where(better_all.reshape(bshape), xa, s["o_adv"])

            stopped = s["stopped"]
            prev = s["prev"]
            if abort_early:
                at_check = (s["it"] % check_every) == 0
                stopped = stopped | (at_check & (loss > 0.9999 * prev))
                prev = jnp.where(at_check, loss, prev)
            move = (~stopped).reshape(bshape)

            t = (s["it"] + 1).astype(jnp.float32)
            m = _BETA1 * s["m"] + (1 - _BETA1) * g
            v = _BETA2 * s["v"] + (1 - _BETA2) * g * g
            m_hat = m / (1 - _BETA1 ** t)
            v_hat = v / (1 - _BETA2 ** t)
            w = s["w"] - lr * m_hat / (jnp.sqrt(v_hat) + _ADAM_EPS)
            return dict(it=s["it"] + 1,
                        w=jnp.where(move, w, s["w"]),
                        m=jnp.where(move, m, s["m"]),
                        v=jnp.where(move, v, s["v"]),
                        stopped=stopped, prev=prev, best_l2=best_l2, hit=hit,
                        o_l2=o_l2_new, o_adv=o_adv_new)

        init = dict(it=0, w=w0, m=jnp.zeros_like(w0), v=jnp.zeros_like(w0),
                    stopped=jnp.zeros((bsz,), bool),
                    prev=jnp.full((bsz,), jnp.inf, jnp.float32),
                    best_l2=jnp.full((bsz,), jnp.inf, jnp.float32),
                    hit=jnp.zeros((bsz,), bool), o_l2=o_l2, o_adv=o_adv)
        s = jax.lax.while_loop(cond, body, init)

        hit = s["hit"]
        upper = jnp.where(hit, jnp.minimum(upper, c), upper)
        lower = jnp.where(hit, lower, jnp.maximum(lower, c))
        bounded = upper < _NO_BOUND / 10
        c = jnp.where(bounded, (lower + upper) / 2.0, c * 10.0)
        return lower, upper, c, s["o_l2"], s["o_adv"]

    outer = (jnp.zeros((bsz,), jnp.float32), jnp.full((bsz,), _NO_BOUND, jnp.float32),
             jnp.full((bsz,), initial_const, jnp.float32),
             jnp.full((bsz,), jnp.inf, jnp.float32), x)
    *_, o_adv = jax.lax.fori_loop(0, binary_steps, search_round, outer)
    return o_adv


@functools.partial(jax.jit, static_argnames=(
    "targeted", "binary_steps", "steps", "abort_early", "batch_chunk"))
def _cw_jit(fn, x, labels, confidence, lr, initial_const, *, targeted,
            binary_steps, steps, abort_early, batch_chunk):
    # Adam's state and the while_loop carries are float32 whatever the input.
    x_in, x = x, working_precision(x)
    core = functools.partial(
        _cw_core, fn, confidence=jnp.float32(confidence), lr=jnp.asarray(lr, x.dtype),
        initial_const=jnp.float32(initial_const), targeted=targeted,
        binary_steps=binary_steps, steps=steps,
        abort_early=abort_early)
    return finish(run_chunked(core, batch_chunk, x, labels), x_in)


def carlini_wagner_l2(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array | None = None,
                      targets: Any = None, targeted: bool = True, confidence: float = 0.0,
                      binary_steps: int = 9, steps: int = 1000,
                      initial_const: float = 1e-3, learning_rate: float = 1e-2,
                      abort_early: bool = True,
                      batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """C&W-L2 (algorithm in the module docstring); loss is always the C&W margin.

    Paper defaults: targeted "average case" (a target drawn uniformly among
    the wrong classes), 9 binary search steps, 1000 iterations, initial
    ``c = 1e-3``, ``confidence = 0``, Adam lr ``1e-2``.

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, ...]`` in [0, 1]; y: ``[B]`` true labels.
        key: draws the targets when ``targeted`` and ``targets`` is None
            (``draw_targets(key, y, K)``).
        targets: ``[B]`` target classes (targeted only).
        targeted: False attacks ``y`` untargeted.
        binary_steps: rounds of binary search over ``c``.
        steps: maximum Adam steps per round.
        initial_const: initial ``c``.
        learning_rate: Adam step size.
        confidence: kappa, the required logit margin (paper: 0).
        abort_early: per-example early stop when the loss stops decreasing.
        batch_chunk: process at most this many examples at once.
        example_offset: index of ``x[0]`` in a larger batch, for the target
            draws (see ``pgd``).

    Returns:
        ``[B, ...]`` smallest-L2 successful inputs, ``x`` where none was found.
    """
    fn = as_partial(logits_fn)
    x, y = check_inputs(x, y, logits_fn=fn)
    check_scalar("confidence", confidence)
    check_scalar("initial_const", initial_const, positive=True)
    check_scalar("learning_rate", learning_rate, positive=True)
    if targeted:
        labels = given_or_drawn_targets(targets, key, y, num_classes(fn, x), example_offset,
                                        attack="a targeted C&W attack")
    else:
        if targets is not None:
            raise ValueError("targets given but targeted=False")
        labels = y
    if binary_steps < 1 or steps < 1:
        raise ValueError("binary_steps and steps must be >= 1")
    return _cw_jit(fn, x, labels, confidence, learning_rate, initial_const,
                   targeted=bool(targeted),
                   binary_steps=int(binary_steps),
                   steps=int(steps), abort_early=bool(abort_early),
                   batch_chunk=batch_chunk)
