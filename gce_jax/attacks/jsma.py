r"""Jacobian-based Saliency Map Attack (Papernot et al., EuroS&P 2016), targeted.

Per iteration and example, with target ``t`` and the Jacobian of the *logits*
``z`` with respect to the ``N`` input features:

.. math::
    a = \nabla_x z_t, \qquad b = \sum_{j\ne t} \nabla_x z_j
      = \nabla_x \textstyle\sum_j z_j - a

(two vector-Jacobian products, not ``K``). Over pairs ``p != q`` of features
still in the search domain, pick

.. math::
    (p^*, q^*) = \arg\max_{p,q} \; -(a_p + a_q)(b_p + b_q)
    \quad \text{s.t.}\; a_p + a_q > 0,\; b_p + b_q < 0

(signs reversed for ``theta < 0``), add ``theta`` to both features (clipped to
[0,1]; ``theta = +1`` sets them to 1) and remove both from the domain. An
example stops when it is classified as ``t``, when no pair satisfies the
conditions, when fewer than two features remain, or after the iteration budget.

Search domain: every feature that can still move by a useful amount towards
``theta``'s side, ``x < 1 - margin`` for ``theta > 0`` and ``x > margin`` for
``theta < 0``. The default ``margin = 0.01`` leaves out saturated pixels (MNIST
strokes hold many in [0.99, 1)): moving one of them changes the input by less
than 0.01 yet spends half an iteration. ``margin = 0`` is cleverhans' rule
(``x < 1``); torchattacks uses ``x < 0.99``.

Iteration budget (the paper's): the maximum distortion ``gamma`` is a fraction
of the ``N`` features and each iteration changes two, so the attack runs at
most :func:`max_iterations` ``= floor(gamma N / 2)`` iterations and changes at
most ``gamma N`` features. The floor is what keeps that bound; rounding up
(as torchattacks does: 40 iterations for MNIST at gamma = 0.1 where this
runs 39) can change ``gamma N + 1`` features.

The pair scores are an ``N x N`` matrix per example. They are computed for
``batch_chunk`` examples at a time, and in blocks of rows when even one
example's matrix exceeds the memory budget, keeping a running argmax.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, check_inputs,
                                     check_scalar, finish, given_or_drawn_targets, num_classes,
                                     run_chunked, working_precision)

# Pair scores per step of the chunked search (examples x rows x N). They are
# normally fused into a reduction and never stored; the bound keeps memory
# sane (~128 MB of float32) should a backend materialise them.
PAIR_BUDGET = 1 << 25


def _best_pair(a: Array, b: Array, dom: Array, increase: bool, rows: int):
    """Per example: (has a valid pair, p, q) maximising the saliency score.

    With ``theta > 0`` the score ``relu(a_p + a_q) * relu(-(b_p + b_q))`` equals
    ``-(a_p + a_q)(b_p + b_q)`` on valid pairs and 0 elsewhere (``theta < 0``:
    signs of ``a`` and ``b`` flipped), so a pair exists iff the maximum is > 0.
    Features outside the domain get ``a = -inf``, which makes every pair that
    contains them score 0 without a mask.

    The N x N scores only feed a plain max over ``q`` (a fused, vectorised
    reduction; the matrix is never stored): ``p`` is the argmax of the row
    maxima and ``q`` the argmax of row ``p``, recomputed from the vectors.
    (A flat argmax over N^2 is a much slower variadic reduction on CPU.)
    The diagonal ``p = q`` is excluded by adding ``-inf`` to ``a_q`` there.
    """
    if not increase:
        a, b = -a, -b
    # Materialised (barrier) so that XLA does not re-fuse the masking into the
    # N^2 loop, which costs a large factor on CPU.
    a, b = jax.lax.optimization_barrier((jnp.where(dom, a, -jnp.inf), b))
    bsz, n = a.shape
    col = jnp.arange(n)

    def row_max(ra, rb, row):
        # p == q is excluded through a = -inf on the diagonal; this [rows, N]
        # mask is materialised once for the same reason as above.
        no_diag = jax.lax.optimization_barrier(
            jnp.where(row[:, None] == col[None, :], -jnp.inf, 0.0).astype(a.dtype))
        score = (jax.nn.relu(ra[:, :, None] + (a[:, None, :] + no_diag[None]))
                 * jax.nn.relu(-(rb[:, :, None] + b[:, None, :])))
        return jnp.max(score, axis=2)

    if rows >= n:
        best_in_row = row_max(a, b, col)
    else:
        n_blocks = math.ceil(n / rows)
        pad = n_blocks * rows - n
        a_r = jnp.pad(a, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        b_r = jnp.pad(b, ((0, 0), (0, pad)))

        def block(j):
            start = j * rows
            return row_max(jax.lax.dynamic_slice_in_dim(a_r, start, rows, axis=1),
                           jax.lax.dynamic_slice_in_dim(b_r, start, rows, axis=1),
                           start + jnp.arange(rows))

        blocks = jax.lax.map(block, jnp.arange(n_blocks))  # [blocks, B, rows]
        best_in_row = blocks.transpose(1, 0, 2).reshape(bsz, n_blocks * rows)[:, :n]
    # Only one consumer of best_in_row: a second one (e.g. its max) lets XLA
    # rewrite it as a reduction of the full N^2 scores, which then get stored.
    p = jnp.argmax(best_in_row, axis=1)
    a_p = jnp.take_along_axis(a, p[:, None], axis=1)
    b_p = jnp.take_along_axis(b, p[:, None], axis=1)
    row_p = jnp.where(col[None, :] == p[:, None], 0.0,
                      jax.nn.relu(a_p + a) * jax.nn.relu(-(b_p + b)))
    q = jnp.argmax(row_p, axis=1)
    best = jnp.take_along_axis(row_p, q[:, None], axis=1)[:, 0]
    return best > 0, p, q


def max_iterations(gamma: float, num_features: int) -> int:
    """The iteration budget ``floor(gamma N / 2)`` (two features per iteration)."""
    return int(math.floor(gamma * num_features / 2))


def _jsma_core(fn: LogitsFn, x: Array, t: Array, margin: Array, *, theta: float,
               max_iters: int, rows: int) -> Array:
    bsz = x.shape[0]
    xf = x.reshape(bsz, -1)
    n = xf.shape[1]
    increase = theta > 0
    flat_fn = lambda v: fn(v.reshape(x.shape))

    def cond(state):
        it, _, _, done = state
        return (it < max_iters) & ~jnp.all(done)

    def body(state):
        it, xa, dom, done = state
        logits, vjp = jax.vjp(flat_fn, xa)
        k = logits.shape[-1]
        done = done | (jnp.argmax(logits, axis=-1) == t)
        onehot_t = jax.nn.one_hot(t, k, dtype=logits.dtype)
        (a,) = vjp(onehot_t)
        (total,) = vjp(jnp.ones_like(logits))
        has_pair, p, q = _best_pair(a, total - a, dom, increase, rows)
        active = (~done) & has_pair & (jnp.sum(dom, axis=1) >= 2)
        changed = active[:, None] & ((jnp.arange(n)[None, :] == p[:, None])
                                     | (jnp.arange(n)[None, :] == q[:, None]))
        xa = jnp.where(changed, jnp.clip(xa + theta, 0.0, 1.0), xa)
        dom = dom & ~changed
        done = done | ~active
        return it + 1, xa, dom, done

    dom0 = (xf < 1.0 - margin) if increase else (xf > margin)
    state = (0, xf, dom0, jnp.zeros((bsz,), bool))
    _, xa, _, _ = jax.lax.while_loop(cond, body, state)
    return xa.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=(
    "theta", "max_iters", "rows", "batch_chunk"))
def _jsma_jit(fn, x, t, margin, *, theta, max_iters, rows, batch_chunk):
    x_in, x = x, working_precision(x)
    core = functools.partial(_jsma_core, fn, margin=jnp.asarray(margin, x.dtype),
                             theta=theta, max_iters=max_iters, rows=rows)
    return finish(run_chunked(core, batch_chunk, x, t), x_in)


def jsma(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array | None = None,
         targets: Any = None, theta: float = 1.0, gamma: float = 0.25,
         margin: float = 0.01, batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """Targeted JSMA (algorithm in the module docstring).

    Defaults: ``theta = +1`` (the paper's "perturbation eps = 1"),
    ``gamma = 0.25`` (the paper's MNIST setting: ~200 of 784 pixels).

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, ...]`` in [0, 1]; y: ``[B]`` true labels.
        key: draws ``targets`` when they are not given: uniform among the
            ``K - 1`` wrong classes, per example (see ``draw_targets``).
        targets: ``[B]`` target classes, overriding ``key``.
        theta: change applied to each selected feature (sign = direction).
        gamma: maximum fraction of features changed; the attack runs
            ``max_iterations(gamma, N) = floor(gamma N / 2)`` iterations at most.
        margin: a feature is searched only while it can still move by more
            than ``margin`` towards ``theta``'s side (``x < 1 - margin`` for
            ``theta > 0``, ``x > margin`` for ``theta < 0``); 0 is
            cleverhans' rule.
        batch_chunk: examples per chunk; default from the pair-matrix budget.
        example_offset: index of ``x[0]`` in a larger batch, for the target
            draws (see ``pgd``).

    Returns:
        ``[B, ...]`` adversarial inputs (gradient-stopped).
    """
    fn = as_partial(logits_fn)
    x, y = check_inputs(x, y, logits_fn=fn)
    if theta == 0 or not math.isfinite(theta):
        raise ValueError(f"theta must be finite and non-zero, got {theta}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    check_scalar("margin", margin)
    if not margin < 1.0:
        raise ValueError(f"margin must be < 1 (no feature could move), got {margin}")
    targets = given_or_drawn_targets(targets, key, y, num_classes(fn, x), example_offset,
                                     attack="jsma")
    n = math.prod(x.shape[1:])
    max_iters = max_iterations(gamma, n)
    rows = n if n * n <= PAIR_BUDGET else max(1, PAIR_BUDGET // n)
    if batch_chunk is None:
        batch_chunk = max(1, PAIR_BUDGET // (rows * n))
    return _jsma_jit(fn, x, targets, margin, theta=float(theta), max_iters=max_iters,
                     rows=rows, batch_chunk=batch_chunk)
