r"""FAB, L_inf (Croce & Hein, ICML 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), untargeted and FAB-T.

A minimum-norm attack. At the iterate :math:`x^{(k)}` the decision boundary
between the label :math:`y` and a class :math:`s` is linearised,

.. math:: \pi_s = \{z : f_s(x^{(k)}) + \nabla f_s(x^{(k)})^\top (z - x^{(k)}) = 0\},
          \quad f_s = z_s - z_y,

with :math:`s` the class whose hyperplane is nearest in L_inf,
:math:`|f_s| / \|\nabla f_s\|_1` (FAB-T: the target). Both the iterate and
the clean input :math:`x_0` are projected onto :math:`\pi_s \cap [0,1]^d`
(:func:`linf_hyperplane_projection`), giving steps :math:`\delta^{(k)}` and
:math:`\delta_0^{(k)}`, and

.. math::
    x^{(k+1)} = \mathrm{clip}_{[0,1]}\big((1-\alpha)(x^{(k)} + \eta\,\delta^{(k)})
                + \alpha\,(x_0 + \eta\,\delta_0^{(k)})\big),\quad
    \alpha = \min\Big(\frac{\|\delta^{(k)}\|_\infty}{\|\delta^{(k)}\|_\infty
             + \|\delta_0^{(k)}\|_\infty}, \alpha_{max}\Big)

(``eta`` extrapolates past the boundary; the bias towards :math:`x_0` keeps
the point close to it). When :math:`x^{(k+1)}` is misclassified it is kept
if nearer than the best so far, and the iterate steps back towards the clean
input: :math:`x^{(k+1)} \leftarrow x_0 + \beta (x^{(k+1)} - x_0)`. Defaults
(AutoAttack's): 100 iterations, :math:`\alpha_{max} = 0.1, \eta = 1.05,
\beta = 0.9`.

Restart ``r > 0`` starts from a uniform point at L_inf radius
:math:`\min(d_{best}, \epsilon)/2` around :math:`x_0`. FAB-T runs once per
target (the ``n_target_classes`` most likely wrong classes by clean logit,
AutoAttack: 9) and restart; runs ``q = j * n_restarts + r`` use
``fold_in(key_i, q)``. An example with an adversarial point within ``eps``
is left alone by later runs, which stop once every example has one
(AutoAttack's rule for a fixed-eps evaluation).

Then ``final_search_steps`` steps of the paper's final search refine each
adversarial point on the segment to :math:`x_0`: the linear interpolation
of :math:`z_y - z_l` between a correctly classified end and a misclassified
one (:math:`l` its class) gives the next point, which replaces the end with
its outcome, so the misclassified end only moves towards :math:`x_0`.

Returned point: the nearest misclassified point found (the clean input if
none), projected onto the eps-ball and [0, 1]. With ``eps >= 1`` nothing is
clipped: the L_inf distance of the result is FAB's estimate of the minimal
adversarial distance.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, budget, check_inputs,
                                     example_keys, finish, linf_project, num_classes,
                                     run_chunked_with_targets, working_precision)
from gce_jax.attacks.objectives import (N_TARGET_CLASSES, n_target_count, target_matrix,
                                        top_other_classes)


# Bisection steps for the projection's radius: float32 brackets in [0, 1]
# stop shrinking after ~24 halvings; the final step is an exact linear solve.
_BISECTION_STEPS = 26


def linf_hyperplane_projection(t: Array, w: Array, b: Array) -> Array:
    r"""The smallest-L_inf step onto a hyperplane inside the box, per row.

    For rows ``t, w`` (``[B, d]``, ``t`` in [0, 1]) and ``b`` (``[B]``):

    .. math:: \delta = \arg\min \|\delta\|_\infty \ \text{s.t.}\
              w^\top (t + \delta) = b,\ t + \delta \in [0, 1]^d.

    With :math:`c = b - w^\top t` the progress reachable within radius
    :math:`\lambda` is :math:`g(\lambda) = \sum_i |w_i| \min(\lambda, r_i)`
    (:math:`r_i` the room coordinate ``i`` has towards the box face in the
    direction :math:`\mathrm{sign}(c\,w_i)`), piecewise linear and increasing,
    and :math:`\delta_i = \mathrm{sign}(c\,w_i) \min(\lambda^*, r_i)` with
    :math:`g(\lambda^*) = |c|`. :math:`\lambda^*` is bracketed by bisection
    (elementwise work only: a sort of the :math:`r_i` costs more than the
    model's gradient on XLA:CPU), then solved on the bracket's linear piece.
    If the hyperplane misses the box the step goes to the box corner nearest
    to it.
    """
    c = b - jnp.sum(w * t, axis=1)
    ws = w * jnp.where(c >= 0, 1.0, -1.0)[:, None]  # now ws . delta = |c| is needed
    c = jnp.abs(c)[:, None]
    room = jnp.where(ws > 0, 1.0 - t, jnp.where(ws < 0, t, 0.0))
    a = jnp.abs(ws)

    def progress(lam):
        return jnp.sum(a * jnp.minimum(room, lam), axis=1, keepdims=True)

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        short = progress(mid) < c
        return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

    top = jnp.max(room, axis=1, keepdims=True)
    bracket = (jnp.zeros_like(top), top)
    for i in range(_BISECTION_STEPS):  # unrolled: XLA:CPU runs a nested loop slowly
        bracket = halve(i, bracket)
    lo, hi = bracket
    # On [lo, hi] (no breakpoint inside, up to float precision) g is linear:
    # g(lam) = sum_{r_i <= lo} a_i r_i + lam * sum_{r_i > lo} a_i.
    free = room > lo
    slope = jnp.sum(jnp.where(free, a, 0.0), axis=1, keepdims=True)
    fixed = jnp.sum(jnp.where(free, 0.0, a * room), axis=1, keepdims=True)
    lam = jnp.clip((c - fixed) / jnp.maximum(slope, 1e-30), lo, hi)
    lam = jnp.where(progress(top) >= c, lam, jnp.inf)
    return jnp.sign(ws) * jnp.minimum(lam, room)


def _linf(v: Array) -> Array:
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def _fab_core(fn: LogitsFn, x: Array, y: Array, keys: Array, targets: Array | None,
              eps: Array, alpha_max: Array, eta: Array, beta: Array, *, steps: int,
              n_restarts: int, targeted: bool, n_targets: int,
              final_search_steps: int) -> Array:
    # Long on purpose: the restart/target loops, the step body and the final
    # search are closures over the same constants, so each lax loop carries
    # only its state arrays.
    b = x.shape[0]
    bshape = (-1,) + (1,) * (x.ndim - 1)
    x0 = x.reshape(b, -1)

    def where_b(mask, u, v):
        return jnp.where(mask.reshape(bshape), u, v)

    def predict(v):
        return jnp.argmax(fn(v), axis=-1)

    clean_logits = fn(x)
    if targeted and targets is None:
        targets = top_other_classes(clean_logits, y, n_targets)

    def boundary(x1, t):
        """(f_s, grad f_s) of the class s whose linearised boundary is nearest."""
        if targeted:
            def diff(v):
                z = fn(v)
                f = (jnp.take_along_axis(z, t[:, None], 1)
                     - jnp.take_along_axis(z, y[:, None], 1))[:, 0]
                return jnp.sum(f), f
            (_, f), g = jax.value_and_grad(diff, has_aux=True)(x1)
            return f, g.reshape(b, -1)
        z, pullback = jax.vjp(fn, x1)
        k = z.shape[-1]
        # One backward pass per class, in a loop: each class's gradient is
        # then a materialised buffer (see ``body`` below on XLA:CPU fusion).
        jac = jax.lax.map(lambda ct: pullback(ct)[0],
                          jnp.broadcast_to(jnp.eye(k, dtype=z.dtype)[:, None, :], (k, b, k)))
        jac = jnp.moveaxis(jac.reshape(k, b, -1), 0, 1)  # [B, K, d]
        f_all = z - jnp.take_along_axis(z, y[:, None], 1)
        g_all = jac - jnp.take_along_axis(jac, y[:, None, None], 1)
        dist = jnp.abs(f_all) / (jnp.sum(jnp.abs(g_all), axis=-1) + 1e-12)
        dist = jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, dist)
        s = jnp.argmin(dist, axis=1)
        return (jnp.take_along_axis(f_all, s[:, None], 1)[:, 0],
                jnp.take_along_axis(g_all, s[:, None, None], 1)[:, 0])

    def one_run(q, carry):
        best, best_dist = carry
        # Examples already broken within eps keep their point (AutoAttack runs
        # later restarts and targets only on the rest): no batch dependence.
        open_ = best_dist > eps
        t = (None if targets is None
             else jax.lax.dynamic_index_in_dim(targets, q // n_restarts, 1, keepdims=False))
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, q), x.shape[1:],
                                                  x.dtype, -1.0, 1.0))(keys)
        radius = 0.5 * jnp.minimum(best_dist, eps).reshape(bshape)
        start = jnp.clip(x + radius * u / jnp.maximum(_linf(u), 1e-12).reshape(bshape), 0.0, 1.0)
        x1 = jnp.where(q % n_restarts > 0, start, x)

        # The boundary of the next iterate is computed at the end of each
        # iteration and carried: a loop-carried gradient is a buffer, whereas
        # within one iteration XLA:CPU re-fuses a lazily summed input gradient
        # (LeNet-5's col2im) into each of the projections' many consumers.
        def body(_, c):
            x1, f, w, best, best_dist = c
            x1f = x1.reshape(b, -1)
            h = jnp.sum(w * x1f, axis=1) - f  # hyperplane w . z = h
            d1 = linf_hyperplane_projection(x1f, w, h)
            d0 = linf_hyperplane_projection(x0, w, h)
            a1 = jnp.maximum(jnp.max(jnp.abs(d1), axis=1), 1e-8)
            a0 = jnp.maximum(jnp.max(jnp.abs(d0), axis=1), 1e-8)
            alpha = jnp.clip(a1 / (a1 + a0), 0.0, alpha_max)[:, None]
            x_new = jnp.clip((1 - alpha) * (x1f + eta * d1) + alpha * (x0 + eta * d0), 0.0, 1.0)
            x_new = x_new.reshape(x.shape)
            fooled = predict(x_new) != y
            dist = _linf(x_new - x)
            better = fooled & (dist < best_dist) & open_
            best = where_b(better, x_new, best)
            best_dist = jnp.where(better, dist, best_dist)
            x_next = where_b(fooled, x + beta * (x_new - x), x_new)
            return (x_next, *boundary(x_next, t), best, best_dist)

        *_, best, best_dist = jax.lax.fori_loop(0, steps, body,
                                                (x1, *boundary(x1, t), best, best_dist))
        return best, best_dist

    n_runs = n_targets * n_restarts

    def cond(c):
        q, (_, best_dist) = c
        return (q < n_runs) & ~jnp.all(best_dist <= eps)

    def run(c):
        q, carry = c
        return q + 1, one_run(q, carry)

    # A misclassified input is its own nearest adversarial point.
    best_dist = jnp.where(jnp.argmax(clean_logits, -1) != y, 0.0, jnp.inf).astype(x.dtype)
    _, (best, best_dist) = jax.lax.while_loop(cond, run, (0, (x, best_dist)))
    found = jnp.isfinite(best_dist)
    if final_search_steps:
        best = _final_search(fn, x, y, clean_logits, best, found, final_search_steps)
    return linf_project(where_b(found, best, x), x, eps)


def _final_search(fn: LogitsFn, x: Array, y: Array, clean_logits: Array, adv: Array,
                  found: Array, steps: int) -> Array:
    """Regula falsi on the segment [x, adv] (see the module docstring)."""
    bshape = (-1,) + (1,) * (x.ndim - 1)

    def margin(z, label):  # z_y - z_label: > 0 on the correct side
        return (jnp.take_along_axis(z, y[:, None], 1)
                - jnp.take_along_axis(z, label[:, None], 1))[:, 0]

    def body(_, c):
        lo, z_lo, hi, z_hi = c
        label = jnp.argmax(z_hi, axis=-1)
        m_lo, m_hi = margin(z_lo, label), -margin(z_hi, label)
        s = m_lo / (m_lo + m_hi + 1e-10)
        s = jnp.where((s >= 0) & (s <= 1), s, 1.0).reshape(bshape)
        mid = lo + s * (hi - lo)
        z_mid = fn(mid)
        correct = (jnp.argmax(z_mid, axis=-1) == y) | ~found
        keep = correct.reshape(bshape)
        return (jnp.where(keep, mid, lo), jnp.where(correct[:, None], z_mid, z_lo),
                jnp.where(keep, hi, mid), jnp.where(correct[:, None], z_hi, z_mid))

    _, _, hi, _ = jax.lax.fori_loop(0, steps, body, (x, clean_logits, adv, fn(adv)))
    return hi


@functools.partial(jax.jit, static_argnames=(
    "steps", "n_restarts", "targeted", "n_targets", "final_search_steps", "batch_chunk"))
def _fab_jit(fn, x, y, key, eps, alpha_max, eta, beta, example_offset, targets, *, steps,
             n_restarts, targeted, n_targets, final_search_steps, batch_chunk):
    keys = example_keys(key, x.shape[0], example_offset)
    x_in, x = x, working_precision(x)
    scalars = [budget(eps, x.dtype)] + [jnp.asarray(v, x.dtype) for v in (alpha_max, eta, beta)]
    core = functools.partial(_fab_core, fn, eps=scalars[0], alpha_max=scalars[1],
                             eta=scalars[2], beta=scalars[3], steps=steps,
                             n_restarts=n_restarts, targeted=targeted, n_targets=n_targets,
                             final_search_steps=final_search_steps)
    return finish(run_chunked_with_targets(core, batch_chunk, x, y, keys, targets), x_in)


def fab(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
        steps: int = 100, n_restarts: int = 1, targeted: bool = False,
        n_target_classes: int = N_TARGET_CLASSES, targets: Any = None,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
        final_search_steps: int = 3, batch_chunk: int | None = None,
        example_offset: Any = 0) -> Array:
    """FAB L_inf (FAB-T with ``targeted=True``); algorithm in the module docstring.

    Defaults follow AutoAttack (100 iterations, 1 restart, alpha_max 0.1,
    eta 1.05, beta 0.9; FAB-T: 9 targets) plus the paper's final search
    (``final_search_steps``, one forward pass each; 0 = AutoAttack's code).
    Untargeted FAB needs the Jacobian of all K logits per iteration (K
    backward passes); FAB-T one gradient. Every iteration adds one forward
    pass to test the new point.

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, ...]`` in [0, 1]; y: ``[B]`` true labels.
        key: PRNG key for the random restarts (run ``q`` of example ``i``
            uses ``fold_in(fold_in(key, example_offset + i), q)``).
        eps: L_inf budget of the result (and the restarts' radius).
        n_target_classes: FAB-T's targets per example, capped at ``K - 1``.
        targets: optional ``[B]`` or ``[B, T]`` targets for FAB-T.
        batch_chunk: process at most this many examples at once.
        example_offset: index of ``x[0]`` in a larger batch (see ``pgd``).
    """
    x, y = check_inputs(x, y, logits_fn=logits_fn, eps=eps)
    if steps < 1 or n_restarts < 1 or final_search_steps < 0:
        raise ValueError(f"steps and n_restarts must be >= 1 and final_search_steps >= 0, "
                         f"got {steps}, {n_restarts}, {final_search_steps}")
    fn = as_partial(logits_fn)
    k = num_classes(fn, x)
    if k < 2:
        raise ValueError(f"FAB needs at least 2 classes, got {k}")
    n_targets = 1
    if targets is not None:
        if not targeted:
            raise ValueError("targets need targeted=True")
        targets = target_matrix(targets, x.shape[0], k)
        n_targets = targets.shape[1]
    elif targeted:
        n_targets = n_target_count(n_target_classes, k)
    return _fab_jit(fn, x, y, key, eps, alpha_max, eta, beta,
                    jnp.asarray(example_offset, jnp.int32), targets, steps=int(steps),
                    n_restarts=int(n_restarts), targeted=bool(targeted), n_targets=n_targets,
                    final_search_steps=int(final_search_steps), batch_chunk=batch_chunk)
