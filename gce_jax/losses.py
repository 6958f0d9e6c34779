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
``q_j = p_j / (1 - p_g)`` is a softmax over the logits with the ground-truth
column removed, so it is exact even when ``p_g`` rounds to 1, and no ``-inf``
mask ever enters a product (which would give NaN gradients).
"""

from __future__ import annotations

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
        # (see _label_mask), which the training loop reports as a NaN loss.
        lab = np.asarray(labels)
        k = logits.shape[-1]
        if lab.size and (lab.min() < 0 or lab.max() >= k):
            raise ValueError(
                    f"labels must lie in [0, {k - 1}] for {k} classes; got values in "
                    f"[{lab.min()}, {lab.max()}]")
    return logits, labels


def _label_mask(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Returns (is_label one-hot bool mask, nan-if-label-out-of-range offset)."""
    k = logits.shape[-1]
    is_label = labels[..., None] == jnp.arange(k)
    valid = (labels >= 0) & (labels < k)
    return is_label, jnp.where(valid, 0.0, jnp.nan)


def _compute_dtype(logits: Array) -> jnp.dtype:
    # Half precision is upcast: exp/log over K classes in bf16 loses the
    # complement distribution entirely. float64 (under x64) stays float64.
    return jnp.promote_types(logits.dtype, jnp.float32)


def _complement_stats(logits: Array, labels: Array):
    """Shared single pass over the logits.

    Returns ``(z_g, lse_c, neg_ent, valid_nan)`` with ``z_g`` the label logit,
    ``lse_c = log sum_{j!=g} exp(z_j)`` and ``neg_ent = sum_{j!=g} q_j log q_j``.
    """
    z = logits.astype(_compute_dtype(logits))
    is_label, valid_nan = _label_mask(z, labels)
    z_g, lse_c, neg_ent = _complement_core(z, is_label)
    return z_g, lse_c, neg_ent, valid_nan


def _complement_forward(z: Array, is_label: Array):
    """``(z_g, lse_c, neg_ent)`` and the intermediates the derivative reuses."""
    not_label = ~is_label
    z_g = jnp.sum(jnp.where(is_label, z, 0.0), axis=-1)
    # Max over the complement only: when p_g -> 1 the complement logits are far
    # below z_g, and shifting by the global max would underflow all of them.
    m_c = jnp.max(jnp.where(not_label, z, -jnp.inf), axis=-1, keepdims=True)
    # The inner where keeps exp() of the (possibly huge) label logit out of
    # the computation entirely (e and shifted are exact zeros there).
    shifted = jnp.where(not_label, z - m_c, 0.0)
    e = jnp.where(not_label, jnp.exp(shifted), 0.0)
    s = jnp.sum(e, axis=-1)  # >= 1: the complement argmax contributes exp(0).
    log_s = jnp.log(s)
    neg_ent = jnp.sum(e * shifted, axis=-1) / s - log_s
    lse_c = m_c[..., 0] + log_s
    return (z_g, lse_c, neg_ent), (e, shifted, s, log_s)


@jax.custom_jvp
def _complement_core(z: Array, is_label: Array):
    return _complement_forward(z, is_label)[0]


@_complement_core.defjvp
def _complement_core_jvp(primals, tangents):
    # Closed-form derivatives, for speed only (the values are unchanged). With
    # q_j = e_j / s = exp(z_j - lse_c) and log q_j = shifted_j - log s (j != g):
    #   d z_g     = dz_g
    #   d lse_c   = sum_j q_j dz_j
    #   d neg_ent = sum_j q_j (log q_j - neg_ent) dz_j
    # Reverse mode turns this into one elementwise pass over e and shifted
    # (already in memory from the forward pass); autodiff through the
    # max/where/exp/log chain took about 1.4x as long (benchmarks/losses.py).
    # The rule is plain jnp code, so higher-order derivatives still work.
    z, is_label = primals
    dz, _ = tangents
    (z_g, lse_c, neg_ent), (e, shifted, s, log_s) = _complement_forward(z, is_label)
    d_zg = jnp.sum(jnp.where(is_label, dz, 0.0), axis=-1)
    inv_s = 1.0 / s
    d_lse = jnp.sum(e * dz, axis=-1) * inv_s
    d_ent = jnp.sum(e * (shifted - (log_s + neg_ent)[..., None]) * dz, axis=-1) * inv_s
    return (z_g, lse_c, neg_ent), (d_zg, d_lse, d_ent)


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
    is_label, valid_nan = _label_mask(z, labels)
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
    _, _, neg_ent, valid_nan = _complement_stats(logits, labels)
    loss = neg_ent / (math.log(k - 1) if normalize else 1.0) + valid_nan
    return loss.astype(logits.dtype)


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
    which shares the single pass over the logits with the complement term.

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
    z_g, lse_c, neg_ent, valid_nan = _complement_stats(logits, labels)
    log_p_g = jax.nn.log_sigmoid(z_g - lse_c)
    guide = jnp.exp(alpha * log_p_g)
    loss = guide * neg_ent / (math.log(k - 1) if normalize else 1.0) + valid_nan
    return loss.astype(logits.dtype)


def _check_num_classes(k: int, normalize: bool) -> None:
    if k < 2:
        raise ValueError(f"complement losses need at least 2 classes, got K={k}")
    if normalize and k < 3:
        raise ValueError(
                "normalize=True divides by log(K-1), which is 0 for K=2 classes; "
                "use normalize=False or cross_entropy for binary problems")


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
    raise ValueError(f"unknown loss {name!r}; expected 'xe', 'gce' or 'complement'")
