"""Per-example classification losses: cross-entropy, complement entropy and GCE.

All functions follow optax's convention ``fn(logits, labels, *, ...) -> loss``:
``logits`` has shape ``[..., K]``, ``labels`` integer class ids of shape ``[...]``,
and the result has shape ``[...]`` (one value per example). The caller reduces.

Sign convention: every function returns a value whose *minimisation* is the
training objective. The paper writes Eqs. (1)-(3) as entropies (to be
maximised); the returned values here are those expressions with the sign
flipped, exactly as in the authors' code.

Numerics: everything is computed from logits in at least float32 (bfloat16/
float16 inputs are upcast, the result is cast back). The complement distribution
``q_j = p_j / (1 - p_g)`` is computed relative to the largest *complement*
logit, never via ``1 - p_g``, so it is exact even when ``p_g`` rounds to 1, and
no ``-inf`` mask ever enters a product (which would give NaN gradients).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


def _validate(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Static checks (shape/dtype always; label range when labels are concrete)."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a trailing class axis, got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    labels_dtype = labels.dtype
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        raise TypeError(
                f"labels must be integer class ids, got dtype {labels_dtype}; "
                "pass integer labels, not one-hot vectors or floats")
    labels_shape = tuple(labels.shape)
    if labels_shape != tuple(logits.shape[:-1]):
        raise ValueError(
                f"labels shape {labels_shape} must equal logits.shape[:-1] = "
                f"{tuple(logits.shape[:-1])}")
    if not isinstance(labels, jax.core.Tracer):
        # Under jit the values are unknown; out-of-range labels then give NaN
        # (see _out_of_range_nan), which the training loop reports as a NaN loss.
        lab = np.asarray(labels)
        k = logits.shape[-1]
        if lab.size and (lab.min() < 0 or lab.max() >= k):
            raise ValueError(
                    f"labels must lie in [0, {k - 1}] for {k} classes; got values in "
                    f"[{lab.min()}, {lab.max()}]")
    return logits, labels


def _out_of_range_nan(labels: Array, k: int) -> Array:
    """0 for a label in ``[0, k)``, NaN otherwise (added to the loss under jit)."""
    return jnp.where((labels >= 0) & (labels < k), 0.0, jnp.nan)


def _compute_dtype(logits: Array) -> jnp.dtype:
    # Half precision is upcast: exp/log over K classes in bf16 loses the
    # complement distribution entirely. float64 (under x64) stays float64.
    return jnp.promote_types(logits.dtype, jnp.float32)


# At most this many classes, the complement losses run with the classes on the
# leading axis. XLA:CPU vectorises along the contiguous axis, and a [B, 10]
# array gives it rows of 10: class-major, the same work was 1.2-1.3x optax's
# cross-entropy at K=10, B=1024 instead of 1.6x; from K=24 on it was slower
# (benchmarks/RESULTS.md, "Loss B").
_CLASS_MAJOR_MAX_K = 16


def _complement_forward(z: Array, labels: Array, alpha: float, scale: float, axis: int):
    """Loss ``scale * p_g^alpha * sum_{j!=g} q_j log q_j`` and what its derivative reuses.

    ``z`` is 2-D with the classes on ``axis`` (0 or 1), ``labels`` 1-D.

    One masked pass, one max, one ``exp`` and two plain sums. The masked pass
    writes ``zc``: the logits shifted by a complement logit ``r`` (class 0,
    or class 1 where the label is 0), with the label's entry set far below any
    logit. So the ``exp`` needs no label compare (one in that fusion made
    XLA:CPU's exp about 1.7x slower, benchmarks/RESULTS.md) and gives exactly
    0 for the label, and both sums read plain arrays. The entropy sum is
    ``sum(e * zc) - m_c * s`` with ``m_c = max(zc)``: the shift by ``r`` keeps
    ``|zc|`` at the spread of the complement logits, not their magnitude, so
    the subtraction loses no more than a few ulps of that spread.
    """
    k = z.shape[axis]
    row = lambda v: jnp.expand_dims(v, axis)  # noqa: E731 - per-example -> broadcastable
    classes = jnp.expand_dims(jnp.arange(k), 1 - axis)
    is_label = row(labels) == classes
    safe = jnp.clip(labels, 0, k - 1)
    ref = jnp.where(safe == 0, jax.lax.index_in_dim(z, 1, axis, keepdims=False),
                    jax.lax.index_in_dim(z, 0, axis, keepdims=False))
    # Finite, not -inf: e * zc must be 0 * finite = 0 at the label.
    far_below = -0.25 * jnp.finfo(z.dtype).max
    zc = jnp.where(is_label, far_below, z - row(ref))
    u_g = jnp.take_along_axis(z, row(safe), axis=axis).squeeze(axis) - ref
    # Max over the complement only: when p_g -> 1 the complement logits are far
    # below z_g, and shifting by the global max would underflow all of them.
    m_c = jnp.max(zc, axis=axis)
    e = jnp.exp(zc - row(m_c))  # exactly 0 at the label; the complement max gives 1
    s = jnp.sum(e, axis=axis)  # sum_{j!=g} exp(z_j - max_c z), >= 1
    t = jnp.sum(e * zc, axis=axis) - m_c * s  # sum_{j!=g} e_j (z_j - max_c z)
    log_s = jnp.log(s)
    neg_ent = t / s - log_s  # sum_{j!=g} q_j log q_j, in [-log(K-1), 0]
    u = u_g - m_c - log_s  # log p_g - log(1 - p_g)
    guide = jnp.exp(alpha * jax.nn.log_sigmoid(u)) if alpha else jnp.ones_like(u)
    loss = scale * guide * neg_ent
    return loss, (is_label, e, ref, m_c, s, log_s, neg_ent, u, guide)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _complement_loss(z: Array, labels: Array, alpha: float, scale: float, axis: int) -> Array:
    return _complement_forward(z, labels, alpha, scale, axis)[0]


@_complement_loss.defjvp
def _complement_loss_jvp(alpha, scale, axis, primals, tangents):
    # Closed-form derivative, for speed only (values unchanged): reverse mode
    # then needs one elementwise pass over e and z, where autodiff through
    # the max/where/exp chain took about 1.4x as long (measured on an
    # earlier formulation, benchmarks/RESULTS.md).
    # With q_j = e_j / s, log q_j = (z_j - m_c) - log s, H = sum q log q and
    # 1 - p_g = sigmoid(-u):
    #   dL/dz_j = scale p_g^a q_j (log q_j - H - a (1 - p_g) H)   (j != g)
    #   dL/dz_g = scale p_g^a a (1 - p_g) H
    # The rule is plain jnp code, so higher-order derivatives still work.
    z, labels = primals
    dz, _ = tangents
    row = lambda v: jnp.expand_dims(v, axis)  # noqa: E731
    loss, (is_label, e, ref, m_c, s, log_s, neg_ent, u, guide) = _complement_forward(
            z, labels, alpha, scale, axis)
    one_m_pg = jax.nn.sigmoid(-u)
    a = row(scale * guide / s)
    b = row(m_c + log_s + neg_ent * (1.0 + alpha * one_m_pg))
    g_label = row(scale * guide * alpha * one_m_pg * neg_ent)
    # z - ref is recomputed rather than zc kept: the same rounding as in the
    # forward, and one [B, K] array fewer to keep and read (about 0.03 of
    # optax's time at K=100, B=1024 in three paired runs).
    coef = jnp.where(is_label, g_label, a * e * ((z - row(ref)) - b))
    return loss, jnp.sum(coef * dz, axis=axis)


def _complement_objective(logits: Array, labels: Array, alpha: float, scale: float) -> Array:
    z = logits.astype(_compute_dtype(logits))
    k = z.shape[-1]
    z2, y2 = z.reshape(-1, k), labels.reshape(-1)
    if k <= _CLASS_MAJOR_MAX_K:
        z2, axis = z2.T, 0
    else:
        axis = 1
    loss = (_complement_loss(z2, y2, float(alpha), float(scale), axis)
            + _out_of_range_nan(y2, k))
    return loss.reshape(labels.shape).astype(logits.dtype)


def cross_entropy(logits: Array, labels: Array) -> Array:
    r"""Softmax cross-entropy with integer labels, per example.

    .. math::
        \ell(z, g) = -\log \hat y_g = \log \sum_{j=1}^{K} e^{z_j} - z_g

    Range ``[0, inf)``; minimise it.

    Args:
        logits: ``[..., K]`` unnormalised scores.
        labels: ``[...]`` integer class ids in ``[0, K)``.

    Returns:
        ``[...]`` loss, in the dtype of ``logits``.
    """
    logits, labels = _validate(logits, labels)
    z = logits.astype(_compute_dtype(logits))
    is_label = labels[..., None] == jnp.arange(z.shape[-1])
    valid_nan = _out_of_range_nan(labels, z.shape[-1])
    z_g = jnp.sum(jnp.where(is_label, z, 0.0), axis=-1)
    loss = jax.nn.logsumexp(z, axis=-1) - z_g + valid_nan
    return loss.astype(logits.dtype)


def complement_entropy(logits: Array, labels: Array, *,
                                              normalize: bool = False) -> Array:
    r"""Complement entropy (paper Eq. 1), sign flipped so that it is minimised.

    With the complement distribution :math:`q_j = \hat y_j / (1-\hat y_g)`,

    .. math::
        \ell_{C}(z, g) = \frac{1}{Z} \sum_{j \ne g} q_j \log q_j,
        \qquad Z = \log(K-1) \text{ if normalize else } 1.

    Minimising it maximises the entropy of the incorrect classes ("flattens"
    them). Range ``[-log(K-1), 0]``, or ``[-1, 0]`` when normalised. The COT
    reference code divides the batch mean by K instead; use ``normalize`` or
    scale it yourself to match a given schedule.

    Args:
        logits: ``[..., K]``, ``K >= 2`` (``K >= 3`` when ``normalize``).
        labels: ``[...]`` integer class ids.
        normalize: divide by ``log(K-1)``.

    Returns:
        ``[...]`` loss, in the dtype of ``logits``.
    """
    logits, labels = _validate(logits, labels)
    k = logits.shape[-1]
    _check_num_classes(k, normalize)
    return _complement_objective(logits, labels, 0.0,
                                 1.0 / math.log(k - 1) if normalize else 1.0)


def guided_complement_entropy(logits: Array, labels: Array, *, alpha: float,
                                                            normalize: bool = True) -> Array:
    r"""Guided complement entropy (paper Eq. 2; Eq. 3 when ``normalize``).

    .. math::
        \ell_{GCE}(z, g) = \hat y_g^{\alpha} \cdot \frac{1}{\log(K-1)}
            \sum_{j \ne g} q_j \log q_j, \qquad q_j = \frac{\hat y_j}{1 - \hat y_g}

    The guiding factor :math:`\hat y_g^\alpha` is not detached (as in the
    authors' code). Minimise it; range ``[-1, 0]`` normalised, else
    ``[-log(K-1), 0]``; the optimum ``-1`` is reached as ``p_g -> 1`` with a
    flat complement. With ``alpha = 0`` it equals the normalised complement
    entropy. The authors' code divides by log K; this project follows the
    paper's log(K-1).

    ``log p_g`` is computed as ``log_sigmoid(z_g - logsumexp_{j != g} z_j)``,
    which shares the single pass over the logits with the complement term;
    value and derivative come from one fused rule (``custom_jvp``).

    Args:
        logits: ``[..., K]``; ``K >= 3`` when ``normalize`` (log(K-1) = 0 at K=2).
        labels: ``[...]`` integer class ids.
        alpha: exponent of the guiding factor (paper: 1/3).
        normalize: divide by ``log(K-1)`` (Eq. 3, the paper's "GCE").

    Returns:
        ``[...]`` loss, in the dtype of ``logits``.
    """
    logits, labels = _validate(logits, labels)
    k = logits.shape[-1]
    _check_num_classes(k, normalize)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return _complement_objective(logits, labels, alpha,
                                 1.0 / math.log(k - 1) if normalize else 1.0)


def _check_num_classes(k: int, normalize: bool) -> None:
    if k < 2:
        raise ValueError(f"complement losses need at least 2 classes, got K={k}")
    if normalize and k < 3:
        raise ValueError(
                "normalize=True divides by log(K-1), which is 0 for K=2 classes; "
                "use normalize=False or cross_entropy for binary problems")


# The training losses ``get_loss`` knows, by config name (train.validate_config
# checks ``config.loss`` against this).
LOSS_NAMES = ("xe", "gce", "complement")


def get_loss(name: str, *, alpha: float = 1.0 / 3.0,
                          normalize: bool = True) -> LossFn:
    """Returns a per-example ``loss(logits, labels)`` by config name.

    Names: ``'xe'`` (cross-entropy), ``'gce'`` (guided complement entropy with
    ``alpha`` and ``normalize``), ``'complement'`` (complement entropy with
    ``normalize``).
    """
    if name == "xe":
        return cross_entropy
    if name == "gce":
        return lambda logits, labels: guided_complement_entropy(
                logits, labels, alpha=alpha, normalize=normalize)
    if name == "complement":
        return lambda logits, labels: complement_entropy(
                logits, labels, normalize=normalize)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSS_NAMES}")
