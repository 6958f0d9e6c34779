r"""Auto-PGD, L_inf (Croce & Hein, ICML 2020), untargeted, with restarts.

Iteration (projection :math:`P` onto the eps-ball around x and [0,1]):

.. math::
    z^{(k+1)} &= P\big(x^{(k)} + \eta^{(k)} \operatorname{sign}\nabla f(x^{(k)})\big) \\
    x^{(k+1)} &= P\big(x^{(k)} + \alpha (z^{(k+1)} - x^{(k)})
                 + (1-\alpha)(x^{(k)} - x^{(k-1)})\big)

with :math:`\alpha = 0.75` (1 on the first step), :math:`\eta^{(0)} = 2\epsilon`.
Each example tracks the point with the highest objective seen,
:math:`(x_{max}, f_{max})`. At the checkpoints :math:`w_j = \lceil p_j N \rceil`,
:math:`p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)`,
the step is halved and the iterate restarts from :math:`x_{max}` if

1. fewer than :math:`\rho (w_j - w_{j-1})` of the steps since the last
   checkpoint increased the objective (:math:`\rho = 0.75`), or
2. the step was not halved at the last checkpoint and :math:`f_{max}` did not
   increase since then.

Every quantity (step size, counters, best points) is per example; the
checkpoint decisions are masks. Each restart starts from an independent
uniform point in the ball; restarts stop early once every example is
misclassified.

Returned point per example: the last misclassified iterate found (any restart)
if there is one, else the highest-objective point over all restarts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, budget, check_inputs,
                                     example_keys, finish, linf_project, run_chunked,
                                     working_precision)
from gce_jax.attacks.gradient import _random_start
from gce_jax.attacks.objectives import get_objective


def apgd_checkpoints(steps: int) -> list[int]:
    """Iteration counts ``w_j`` (j >= 1, ``0 < w_j < steps``) where APGD may halve its step."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        p.append(nxt)
    # The small offset keeps float error (0.22 + 0.19 = 0.41000000000000003)
    # from pushing ceil() one iteration late.
    ws = sorted({math.ceil(pj * steps - 1e-9) for pj in p[1:]})
    return [w for w in ws if 0 < w < steps]


def _apgd_core(fn: LogitsFn, x: Array, y: Array, keys: Array, eps: Array, *,
               steps: int, n_restarts: int, loss: str, rho: float,
               momentum: float) -> Array:
    objective = get_objective(loss)
    bshape = (-1,) + (1,) * (x.ndim - 1)

    # is_check[w_j] and window[w_j] = w_j - w_{j-1} (the steps condition 1
    # looks back over), indexed by iteration count; static tables.
    checks = apgd_checkpoints(steps)
    is_check_np = np.zeros(steps + 1, bool)
    window_np = np.zeros(steps + 1, np.float32)
    for prev, w in zip([0] + checks[:-1], checks):
        is_check_np[w] = True
        window_np[w] = w - prev
    is_check = jnp.asarray(is_check_np)
    window = jnp.asarray(window_np)

    def f_and_grad(xa):
        def total(v):
            logits = fn(v)
            f = objective(logits, y)
            return jnp.sum(f), (f, logits)
        (_, (f, logits)), g = jax.value_and_grad(total, has_aux=True)(xa)
        return f, g, jnp.argmax(logits, axis=-1) != y

    def where_b(mask, a, b):
        return jnp.where(mask.reshape(bshape), a, b)

    def one_restart(r, carry):
        adv, found, x_top, f_top = carry
        rkeys = jax.vmap(lambda k: jax.random.fold_in(k, r))(keys)
        x0 = _random_start(rkeys, x, eps, "linf")
        f0, g0, fooled0 = f_and_grad(x0)
        adv = where_b(fooled0, x0, adv)
        found = found | fooled0
        eta0 = jnp.full(y.shape, 2.0, x.dtype) * eps
        state = dict(x_cur=x0, x_prev=x0, f_cur=f0, g_cur=g0, x_max=x0, f_max=f0,
                     g_max=g0, eta=eta0, count=jnp.zeros(y.shape, jnp.float32),
                     f_max_last=f0, reduced_last=jnp.zeros(y.shape, bool),
                     adv=adv, found=found)

        def body(i, s):
            a = jnp.where(i == 0, 1.0, momentum).astype(x.dtype)
            eta = s["eta"].reshape(bshape)
            z = linf_project(s["x_cur"] + eta * jnp.sign(s["g_cur"]), x, eps)
            x_new = linf_project(s["x_cur"] + a * (z - s["x_cur"])
                                 + (1 - a) * (s["x_cur"] - s["x_prev"]), x, eps)
            f_new, g_new, fooled = f_and_grad(x_new)
            adv = where_b(fooled, x_new, s["adv"])
            found = s["found"] | fooled
            count = s["count"] + (f_new > s["f_cur"])
            better = f_new > s["f_max"]
            x_max = where_b(better, x_new, s["x_max"])
            g_max = where_b(better, g_new, s["g_max"])
            f_max = jnp.where(better, f_new, s["f_max"])

            # Checkpoint after producing x^(i+1), i.e. at iteration count i+1.
            at_check = is_check[i + 1]
            cond1 = count < rho * window[i + 1]
            cond2 = (~s["reduced_last"]) & (f_max <= s["f_max_last"])
            reduce = at_check & (cond1 | cond2)
            eta_next = jnp.where(reduce, s["eta"] / 2, s["eta"])
            x_next = where_b(reduce, x_max, x_new)
            g_next = where_b(reduce, g_max, g_new)
            f_next = jnp.where(reduce, f_max, f_new)
            return dict(
                x_cur=x_next, x_prev=s["x_cur"], f_cur=f_next, g_cur=g_next,
                x_max=x_max, f_max=f_max, g_max=g_max, eta=eta_next,
                count=jnp.where(at_check, 0.0, count),
                f_max_last=jnp.where(at_check, f_max, s["f_max_last"]),
                reduced_last=jnp.where(at_check, reduce, s["reduced_last"]),
                adv=adv, found=found)

        s = jax.lax.fori_loop(0, steps, body, state)
        improved = s["f_max"] > f_top
        x_top = where_b(improved, s["x_max"], x_top)
        f_top = jnp.where(improved, s["f_max"], f_top)
        return s["adv"], s["found"], x_top, f_top

    def cond(c):
        r, (_, found, _, _) = c
        return (r < n_restarts) & ~jnp.all(found)

    def restart(c):
        r, carry = c
        return r + 1, one_restart(r, carry)

    init = (x, jnp.zeros(y.shape, bool), x, jnp.full(y.shape, -jnp.inf, jnp.float32))
    _, (adv, found, x_top, _) = jax.lax.while_loop(cond, restart, (0, init))
    return where_b(found, adv, x_top)


@functools.partial(jax.jit, static_argnames=(
    "steps", "n_restarts", "loss", "rho", "momentum", "batch_chunk"))
def _apgd_jit(fn, x, y, key, eps, example_offset, *, steps, n_restarts, loss, rho, momentum,
              batch_chunk):
    keys = example_keys(key, x.shape[0], example_offset)
    x_in, x = x, working_precision(x)
    eps = budget(eps, x.dtype)
    core = functools.partial(_apgd_core, fn, eps=eps, steps=steps,
                             n_restarts=n_restarts, loss=loss, rho=rho,
                             momentum=momentum)
    return finish(run_chunked(core, batch_chunk, x, y, keys), x_in)


def apgd(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
         steps: int = 100, n_restarts: int = 1, loss: str = "xe",
         rho: float = 0.75, momentum: float = 0.75,
         batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """Auto-PGD L_inf (APGD-CE with ``loss='xe'``, APGD-DLR with ``loss='dlr'``).

    Algorithm and returned point: see the module docstring. Defaults follow
    AutoAttack: 100 iterations, 1 restart, rho = alpha = 0.75, initial step
    ``2 eps``. ``loss`` is any name in ``gce_jax.attacks.objectives``.

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, ...]`` in [0, 1]; y: ``[B]`` true labels.
        key: PRNG key (random starts; restart ``r`` of example ``i`` uses
            ``fold_in(fold_in(key, example_offset + i), r)``).
        eps: L_inf budget.
        batch_chunk: process at most this many examples at once.
        example_offset: index of ``x[0]`` in a larger batch (see ``pgd``).
    """
    x, y = check_inputs(x, y, logits_fn=logits_fn, eps=eps)
    get_objective(loss)
    if steps < 1 or n_restarts < 1:
        raise ValueError(f"steps and n_restarts must be >= 1, got {steps}, {n_restarts}")
    return _apgd_jit(as_partial(logits_fn), x, y, key, eps,
                     jnp.asarray(example_offset, jnp.int32), steps=int(steps),
                     n_restarts=int(n_restarts), loss=loss, rho=float(rho),
                     momentum=float(momentum), batch_chunk=batch_chunk)
