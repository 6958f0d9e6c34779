r"""Auto-PGD, L_inf (Croce & Hein, ICML 2020): APGD-CE/-DLR and targeted APGD-T.

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
uniform point in the ball. An example misclassified by one run keeps that
run's point: later runs do not touch it.

APGD-T (``targeted=True``) runs this iteration once per target class and
restart, maximising the targeted objective (default: the targeted DLR,
``objectives.dlr_targeted``). The targets are the ``n_target_classes``
classes with the largest clean logits other than the label (AutoAttack: 9),
tried in that order. Success is still misclassification: an example is done
once any run misclassifies it. Runs are numbered ``q = j * n_restarts + r``
(target ``j``, restart ``r``; untargeted: ``q = r``) and stop early once every
example is misclassified.

Returned point per example: the last misclassified iterate of the first run
that misclassified it, if any, else the highest-objective point over all runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, budget, check_inputs,
                                     example_keys, finish, linf_project, num_classes,
                                     run_chunked_with_targets, uniform_start, working_precision)
from gce_jax.attacks.objectives import (N_TARGET_CLASSES, get_objective, n_target_count,
                                        target_matrix,
                                        targeted_objective, top_other_classes)


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


def _apgd_core(fn: LogitsFn, x: Array, y: Array, keys: Array, targets: Array | None,
               eps: Array, *, steps: int, n_restarts: int, loss: str, rho: float,
               momentum: float, targeted: bool, n_targets: int) -> Array:
    # Long on purpose: the restart/target loops and the step body are closures
    # over the same constants, so each lax loop carries only its state arrays.
    bshape = (-1,) + (1,) * (x.ndim - 1)
    if targeted:
        targeted_obj = targeted_objective(loss)
        if targets is None:
            targets = top_other_classes(fn(x), y, n_targets)

        def objective(logits, t):
            return targeted_obj(logits, y, t)
    else:
        untargeted_obj = get_objective(loss)

        def objective(logits, t):
            return untargeted_obj(logits, y)

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

    def f_and_grad(xa, t):
        def total(v):
            logits = fn(v)
            f = objective(logits, t)
            return jnp.sum(f), (f, logits)
        (_, (f, logits)), g = jax.value_and_grad(total, has_aux=True)(xa)
        return f, g, jnp.argmax(logits, axis=-1) != y

    def where_b(mask, a, b):
        return jnp.where(mask.reshape(bshape), a, b)

    def one_run(q, carry):
        adv, found, x_top, f_top = carry
        # Examples misclassified by an earlier run keep that run's point, so
        # a result never depends on which other examples share the batch.
        open_ = ~found
        t = (None if targets is None
             else jax.lax.dynamic_index_in_dim(targets, q // n_restarts, 1, keepdims=False))
        rkeys = jax.vmap(lambda k: jax.random.fold_in(k, q))(keys)
        x0 = uniform_start(rkeys, x, eps, "linf")
        f0, g0, fooled0 = f_and_grad(x0, t)
        fooled0 = fooled0 & open_
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
            f_new, g_new, fooled = f_and_grad(x_new, t)
            fooled = fooled & open_
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

    n_runs = n_targets * n_restarts

    def cond(c):
        q, (_, found, _, _) = c
        return (q < n_runs) & ~jnp.all(found)

    def run(c):
        q, carry = c
        return q + 1, one_run(q, carry)

    init = (x, jnp.zeros(y.shape, bool), x, jnp.full(y.shape, -jnp.inf, jnp.float32))
    _, (adv, found, x_top, _) = jax.lax.while_loop(cond, run, (0, init))
    return where_b(found, adv, x_top)


@functools.partial(jax.jit, static_argnames=(
    "steps", "n_restarts", "loss", "rho", "momentum", "targeted", "n_targets", "batch_chunk"))
def _apgd_jit(fn, x, y, key, eps, example_offset, targets, *, steps, n_restarts, loss, rho,
              momentum, targeted, n_targets, batch_chunk):
    keys = example_keys(key, x.shape[0], example_offset)
    x_in, x = x, working_precision(x)
    eps = budget(eps, x.dtype)
    core = functools.partial(_apgd_core, fn, eps=eps, steps=steps,
                             n_restarts=n_restarts, loss=loss, rho=rho,
                             momentum=momentum, targeted=targeted, n_targets=n_targets)
    return finish(run_chunked_with_targets(core, batch_chunk, x, y, keys, targets), x_in)


def apgd(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
         steps: int = 100, n_restarts: int = 1, loss: str | None = None,
         rho: float = 0.75, momentum: float = 0.75, targeted: bool = False,
         n_target_classes: int = N_TARGET_CLASSES, targets: Any = None,
         batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """Auto-PGD L_inf: APGD-CE (default), APGD-DLR (``loss='dlr'``), APGD-T (``targeted=True``).

    Algorithm and returned point: see the module docstring. Defaults follow
    AutoAttack: 100 iterations, 1 restart, rho = alpha = 0.75, initial step
    ``2 eps``; APGD-T tries the 9 most likely wrong classes. ``loss`` is any
    name in ``gce_jax.attacks.objectives``; ``None`` means ``'xe'``
    untargeted and the targeted DLR (``'dlr'``, needs K >= 4) targeted.

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, ...]`` in [0, 1]; y: ``[B]`` true labels (also when targeted).
        key: PRNG key (random starts; run ``q`` of example ``i`` uses
            ``fold_in(fold_in(key, example_offset + i), q)``, see the module doc).
        eps: L_inf budget.
        targeted: APGD-T: one run per target class, each with ``n_restarts``.
        n_target_classes: targets per example, capped at ``K - 1``.
        targets: optional ``[B]`` or ``[B, T]`` target classes (each != y)
            replacing the top-``n_target_classes`` choice; needs ``targeted``.
        batch_chunk: process at most this many examples at once.
        example_offset: index of ``x[0]`` in a larger batch (see ``pgd``).
    """
    x, y = check_inputs(x, y, logits_fn=logits_fn, eps=eps)
    loss = resolved_loss(loss, targeted)
    if steps < 1 or n_restarts < 1:
        raise ValueError(f"steps and n_restarts must be >= 1, got {steps}, {n_restarts}")
    fn = as_partial(logits_fn)
    n_targets = 1
    if targeted:
        k = num_classes(fn, x)
        if loss == "dlr" and k < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {k}")
        if targets is not None:
            targets = target_matrix(targets, x.shape[0], k)
            n_targets = targets.shape[1]
        else:
            n_targets = n_target_count(n_target_classes, k)
    elif targets is not None:
        raise ValueError("targets need targeted=True")
    else:
        get_objective(loss)
    return _apgd_jit(fn, x, y, key, eps, jnp.asarray(example_offset, jnp.int32), targets,
                     steps=int(steps), n_restarts=int(n_restarts), loss=loss, rho=float(rho),
                     momentum=float(momentum), targeted=bool(targeted), n_targets=n_targets,
                     batch_chunk=batch_chunk)


def resolved_loss(loss: str | None, targeted: bool) -> str:
    """APGD's objective: ``loss``, or ``'dlr'`` (targeted) / ``'xe'`` (untargeted) for ``None``."""
    if loss is None:
        return "dlr" if targeted else "xe"
    get_objective(loss)
    return loss
