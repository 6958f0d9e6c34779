r"""First-order attacks sharing one iterative core: FGSM, BIM, PGD, MIM, L2 PGD.

All of them are instances of :func:`_iterative` ::

    x_0 = x                                   (BIM, MIM, FGSM)
    x_0 = clip_[0,1](x + U(B_eps))            (PGD: uniform in the eps-ball)
    g_t = grad_x L(f(x_t), y)                 (per example; L maximised)
    m_t = mu m_{t-1} + g_t / ||g_t||_1        (MIM only, each example its own norm)
    x_{t+1} = Proj_{B_eps(x) ∩ [0,1]^n}(x_t + a * d_t)

with ``d_t = sign(g_t)`` (or ``sign(m_t)``) for L_inf and ``g_t / ||g_t||_2``
for L2. The projection is always around the *clean* input ``x``, never the
previous iterate, and the box clip comes after it (which keeps the point in
the ball, since ``x`` is in the box).

FGSM is one step of size eps from ``x``; BIM is ``r`` steps of ``eps / r``;
PGD adds the random start; MIM adds momentum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gce_jax.attacks._common import (Array, LogitsFn, as_partial, budget, check_inputs,
                                     example_keys, finish, l2_project, linf_project,
                                     per_example_sum, run_chunked, uniform_start,
                                     working_precision)
from gce_jax.attacks.defaults import ATTACK_DEFAULTS, STEP_SCALE, derived_step_size
from gce_jax.attacks.objectives import signed_objective

_BIM, _PGD, _MIM, _PGD_L2 = (ATTACK_DEFAULTS[a] for a in ("bim", "pgd", "mim", "pgd_l2"))


def _iterative_core(fn: LogitsFn, x: Array, y: Array, keys: Array, eps: Array,
                    step_size: Array, mu: Array, *, steps: int, norm: str,
                    random_start: bool, use_momentum: bool, loss: str,
                    targeted: bool, early_stop: bool) -> Array:
    objective = signed_objective(loss, targeted)
    project = linf_project if norm == "linf" else l2_project

    def objective_and_grad(x_adv):
        def total(xa):
            logits = fn(xa)
            # Summing per-example objectives gives each example its own
            # gradient (the model is in inference mode: no cross-talk).
            return jnp.sum(objective(logits, y)), logits
        (_, logits), g = jax.value_and_grad(total, has_aux=True)(x_adv)
        return g, logits

    def step(state):
        x_adv, m = state
        g, logits = objective_and_grad(x_adv)
        if use_momentum:
            l1 = per_example_sum(jnp.abs(g))
            m = mu * m + g / jnp.maximum(l1, jnp.finfo(g.dtype).tiny)
            direction_src = m
        else:
            direction_src = g
        if norm == "linf":
            direction = jnp.sign(direction_src)
        else:
            l2 = jnp.sqrt(per_example_sum(direction_src * direction_src))
            direction = direction_src / jnp.maximum(l2, 1e-12)
        x_new = project(x_adv + step_size * direction, x, eps)
        if not early_stop:
            return (x_new, m), None
        pred = jnp.argmax(logits, axis=-1)
        fooled = (pred == y) if targeted else (pred != y)
        keep = fooled.reshape((-1,) + (1,) * (x.ndim - 1))
        return (jnp.where(keep, x_adv, x_new), m), jnp.all(fooled)

    x_init = uniform_start(keys, x, eps, norm) if random_start else x
    state = (x_init, jnp.zeros_like(x))
    if not early_stop:
        x_adv, _ = jax.lax.fori_loop(0, steps, lambda _, s: step(s)[0], state)
        return x_adv

    # Once every example is fooled, each further step leaves every example
    # where it is, so stopping there gives the same result as all ``steps``.
    def body(carry):
        i, state, _ = carry
        state, done = step(state)
        return i + 1, state, done

    _, (x_adv, _), _ = jax.lax.while_loop(
        lambda c: (c[0] < steps) & ~c[2], body, (jnp.int32(0), state, jnp.bool_(False)))
    return x_adv


@functools.partial(jax.jit, static_argnames=(
    "steps", "norm", "random_start", "use_momentum", "loss", "targeted",
    "early_stop", "batch_chunk"))
def _iterative_jit(fn, x, y, key, eps, step_size, mu, example_offset, *, steps, norm,
                   random_start, use_momentum, loss, targeted, early_stop, batch_chunk):
    keys = example_keys(key, x.shape[0], example_offset)
    x_in, x = x, working_precision(x)
    eps = budget(eps, x.dtype)
    step_size = jnp.asarray(step_size, x.dtype)
    mu = jnp.asarray(mu, x.dtype)
    core = functools.partial(
        _iterative_core, fn, eps=eps, step_size=step_size, mu=mu, steps=steps,
        norm=norm, random_start=random_start, use_momentum=use_momentum,
        loss=loss, targeted=targeted, early_stop=early_stop)
    x_adv = run_chunked(lambda xb, yb, kb: core(xb, yb, kb), batch_chunk, x, y, keys)
    return finish(x_adv, x_in)


def _iterative(logits_fn: LogitsFn, x: Any, y: Any, key: Array | None, *, eps: float,
               step_size: float | None, steps: int, step_scale: float = 1.0,
               norm: str = "linf",
               random_start: bool = False, momentum: float | None = None,
               loss: str = "xe", targeted: bool = False, early_stop: bool = False,
               batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    """The single iterative core behind fgsm/bim/pgd/mim/pgd_l2 (see module doc).

    ``step_size=None`` is the derived default ``step_scale * eps / steps``; a
    given step size must be > 0.
    """
    fn = as_partial(logits_fn)
    x, y = check_inputs(x, y, logits_fn=fn, eps=eps, step_size=step_size)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if step_size is None:
        # steps=0 is a valid call (PGD: the random start only) that never steps.
        step_size = derived_step_size(step_scale, eps, steps) if steps else 0.0
    if key is None:
        if random_start:
            raise ValueError("a random start needs an explicit PRNG key")
        key = jax.random.key(0)  # unused: the attack is deterministic
    signed_objective(loss, targeted)  # fail fast on unknown loss names
    return _iterative_jit(
        fn, x, y, key, eps, step_size,
        0.0 if momentum is None else momentum, jnp.asarray(example_offset, jnp.int32),
        steps=int(steps), norm=norm,
        random_start=bool(random_start), use_momentum=momentum is not None,
        loss=loss, targeted=bool(targeted), early_stop=bool(early_stop),
        batch_chunk=batch_chunk)


def fgsm(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array | None = None,
         eps: float, loss: str = "xe", targeted: bool = False,
         batch_chunk: int | None = None) -> Array:
    r"""Fast Gradient Sign Method (Goodfellow et al. 2015), paper Eq. (4).

    .. math:: x^* = \mathrm{clip}_{[0,1]}(x + \epsilon\,\mathrm{sign}(\nabla_x L(x, y)))

    Args:
        logits_fn: ``x -> logits`` in inference mode (see ``gce_jax.models.logits_fn``).
        x: ``[B, ...]`` inputs in [0, 1].
        y: ``[B]`` integer labels (the target labels when ``targeted``).
        key: unused (deterministic); accepted for a uniform attack signature.
        eps: L_inf budget.
        loss: objective name in ``gce_jax.attacks.objectives`` (default ``'xe'``).
        targeted: descend the objective of ``y`` instead of ascending it.
        batch_chunk: process at most this many examples at once.

    Returns:
        ``[B, ...]`` adversarial inputs (gradient-stopped).
    """
    return _iterative(logits_fn, x, y, key, eps=eps, step_size=None, steps=1,
                      loss=loss, targeted=targeted, batch_chunk=batch_chunk)


def bim(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array | None = None,
        eps: float, steps: int = _BIM["steps"], step_size: float | None = None,
        loss: str = "xe", targeted: bool = False, early_stop: bool = False,
        batch_chunk: int | None = None) -> Array:
    r"""Basic Iterative Method (Kurakin et al. 2017), paper Eq. (5).

    .. math:: x^*_0 = x,\quad x^*_i = \mathrm{clip}_{x,\epsilon}(x^*_{i-1}
              + \tfrac{\epsilon}{r}\,\mathrm{sign}(\nabla L(x^*_{i-1}, y)))

    Paper defaults: ``r = steps = 10``, step ``eps / steps``, no random start.
    ``early_stop`` freezes each example once it is misclassified, and the
    batch stops once all are (the same adversarial images as running every
    step with the freeze); off by default to match the paper. Other arguments as in
    :func:`fgsm`.
    """
    return _iterative(logits_fn, x, y, key, eps=eps, step_size=step_size,
                      step_scale=STEP_SCALE["bim"], steps=steps, loss=loss, targeted=targeted,
                      early_stop=early_stop, batch_chunk=batch_chunk)


def pgd(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
        steps: int = _PGD["steps"], step_size: float = _PGD["step_size"],
        random_start: bool = _PGD["random_start"],
        loss: str = "xe", targeted: bool = False, early_stop: bool = False,
        batch_chunk: int | None = None, example_offset: Any = 0) -> Array:
    r"""L_inf Projected Gradient Descent (Madry et al. 2018): BIM from a random start.

    .. math:: x^*_0 \sim \mathcal U(\{x' : \|x'-x\|_\infty \le \epsilon\}) \cap [0,1]^n,
              \quad x^*_{t+1} = \Pi_{x,\epsilon}(x^*_t + a\,\mathrm{sign}(\nabla L))

    Paper / reference-code defaults: 40 steps, ``step_size = 0.01``, uniform
    random start, untargeted. ``key`` draws the start per example: example
    ``i`` uses ``fold_in(key, example_offset + i)``. Pass the index of ``x[0]``
    in a larger batch as ``example_offset`` (it may be traced, e.g. from
    ``axis_index`` under ``shard_map``), and a shard draws the same starts as
    the whole batch; an ``[N]`` array gives each example its own index.
    """
    return _iterative(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps,
                      random_start=random_start, loss=loss, targeted=targeted,
                      early_stop=early_stop, batch_chunk=batch_chunk,
                      example_offset=example_offset)


def mim(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array | None = None,
        eps: float, steps: int = _MIM["steps"], decay: float = _MIM["decay"],
        step_size: float | None = None, loss: str = "xe", targeted: bool = False,
        early_stop: bool = False, batch_chunk: int | None = None) -> Array:
    r"""Momentum Iterative Method (Dong et al. 2018), paper Eqs. (6)-(7).

    .. math::
        g_t = \mu g_{t-1} + \frac{\nabla L(x^*_{t-1}, y)}{\|\nabla L(x^*_{t-1}, y)\|_1},
        \quad x^*_t = \mathrm{clip}_{x,\epsilon}(x^*_{t-1}
                      + \tfrac{\epsilon}{r}\mathrm{sign}(g_t))

    The L1 norm is taken per example. Paper defaults: 40 steps, ``decay``
    (mu) 1.0, step ``eps / steps``, start at ``x``.
    """
    return _iterative(logits_fn, x, y, key, eps=eps, step_size=step_size,
                      step_scale=STEP_SCALE["mim"], steps=steps, momentum=decay, loss=loss,
                      targeted=targeted,
                      early_stop=early_stop, batch_chunk=batch_chunk)


def pgd_l2(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
           steps: int = _PGD_L2["steps"], step_size: float | None = None,
           random_start: bool = True, loss: str = "xe", targeted: bool = False,
           early_stop: bool = False, batch_chunk: int | None = None,
           example_offset: Any = 0) -> Array:
    r"""L2 PGD: normalised-gradient steps, projection onto the L2 ball around x.

    .. math:: x^*_{t+1} = \Pi_{\|x'-x\|_2\le\epsilon,\,[0,1]}\big(x^*_t + a\,
              \nabla L / \|\nabla L\|_2\big)

    The start is uniform in the L2 ball (direction isotropic, radius
    ``eps * U^(1/d)``), clipped to [0,1]. Default ``step_size = 2.5 eps / steps``.
    ``example_offset`` as in :func:`pgd`.
    """
    return _iterative(logits_fn, x, y, key, eps=eps, step_size=step_size,
                      step_scale=STEP_SCALE["pgd_l2"], steps=steps, norm="l2",
                      random_start=random_start, loss=loss,
                      targeted=targeted, early_stop=early_stop,
                      batch_chunk=batch_chunk, example_offset=example_offset)
