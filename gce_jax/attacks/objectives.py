r"""Attack objectives: per-example functions an untargeted attack *maximises*.

Every objective is ``fn(logits, labels) -> [B]`` on logits (never softmax
outputs), and larger means "more adversarial" for the label ``labels``:

* ``xe``: cross-entropy :math:`\log\sum_j e^{z_j} - z_y` (``gce_jax.losses``).
* ``margin``: the C&W margin :math:`\max_{i\ne y} z_i - z_y`; > 0 iff
  misclassified. Does not saturate when :math:`p_y \to 1`.
* ``dlr``: difference of logits ratio (Croce & Hein 2020),
  :math:`-(z_y - \max_{i\ne y} z_i) / (z_{\pi_1} - z_{\pi_3} + 10^{-12})` with
  :math:`\pi` the logits sorted in decreasing order. Invariant to shifting and
  scaling the logits; needs K >= 3.
* ``gce``: the training loss of the paper, guided complement entropy with
  alpha = 1/3, normalised by log(K-1) (``gce_jax.losses``). Training minimises
  it, so the attack maximises the same value. A GCE-trained model is
  near-saturated on it; do not report robustness against this loss alone.

A targeted attack maximises :func:`targeted_objective`: the targeted DLR of
Croce & Hein for ``dlr``, and minus the objective at the target label for the
others. :func:`top_other_classes` picks the targets of APGD-T and FAB-T.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gce_jax.losses import cross_entropy, guided_complement_entropy

Array = jax.Array
Objective = Callable[[Array, Array], Array]

GCE_ALPHA = 1.0 / 3.0


def _label_logit_and_best_other(logits: Array, labels: Array) -> tuple[Array, Array]:
    z = logits.astype(jnp.float32)
    is_label = labels[:, None] == jnp.arange(z.shape[-1])
    z_y = jnp.sum(jnp.where(is_label, z, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(is_label, -jnp.inf, z), axis=-1)
    return z_y, z_other


def xe(logits: Array, labels: Array) -> Array:
    """Cross-entropy of the label (maximise to attack)."""
    return cross_entropy(logits.astype(jnp.float32), labels)


def margin(logits: Array, labels: Array) -> Array:
    r""":math:`\max_{i\ne y} z_i - z_y` (maximise to attack; > 0 = misclassified)."""
    z_y, z_other = _label_logit_and_best_other(logits, labels)
    return z_other - z_y


def dlr(logits: Array, labels: Array) -> Array:
    r""":math:`-(z_y - \max_{i\ne y} z_i) / (z_{\pi_1} - z_{\pi_3} + 10^{-12})`."""
    if logits.shape[-1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    z_y, z_other = _label_logit_and_best_other(logits, labels)
    top3 = jax.lax.top_k(logits.astype(jnp.float32), 3)[0]
    return (z_other - z_y) / (top3[:, 0] - top3[:, 2] + 1e-12)


def dlr_targeted(logits: Array, labels: Array, targets: Array) -> Array:
    r"""Targeted DLR (Croce & Hein 2020), maximised to move ``labels`` -> ``targets``.

    .. math:: -\frac{z_y - z_t}{z_{\pi_1} - (z_{\pi_3} + z_{\pi_4}) / 2 + 10^{-12}}

    with :math:`\pi` the logits sorted in decreasing order. Needs K >= 4.
    """
    if logits.shape[-1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[-1]}")
    z = logits.astype(jnp.float32)
    z_y = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    z_t = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    top4 = jax.lax.top_k(z, 4)[0]
    return -(z_y - z_t) / (top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3]) + 1e-12)


def gce(logits: Array, labels: Array) -> Array:
    """Normalised GCE with alpha = 1/3 (the paper's training loss; maximise to attack)."""
    return guided_complement_entropy(logits.astype(jnp.float32), labels,
                                     alpha=GCE_ALPHA, normalize=True)


OBJECTIVES: dict[str, Objective] = {"xe": xe, "margin": margin, "dlr": dlr, "gce": gce}


def get_objective(name: str) -> Objective:
    """The objective called ``name`` (``xe | margin | dlr | gce``)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown attack loss {name!r}; expected one of "
                         f"{sorted(OBJECTIVES)}") from None


def signed_objective(name: str, targeted: bool) -> Objective:
    """Objective to *maximise* given one label per example.

    Untargeted: the objective itself. Targeted (``labels`` are the targets):
    minus the objective at the target. The targeted DLR also needs the true
    label, so ``dlr`` is refused here; ``apgd(..., targeted=True)`` uses it.
    """
    obj = get_objective(name)
    if not targeted:
        return obj
    if name == "dlr":
        raise ValueError("the targeted DLR loss needs the true label as well as the target; "
                         "use apgd(..., targeted=True), or loss='margin' for a targeted attack "
                         "given only target labels")
    return lambda logits, labels: -obj(logits, labels)


TargetedObjective = Callable[[Array, Array, Array], Array]


def targeted_objective(name: str) -> TargetedObjective:
    """``fn(logits, labels, targets) -> [B]`` to maximise towards ``targets``.

    ``dlr``: :func:`dlr_targeted`; any other objective: minus its value at the
    target (for ``xe``, AutoAttack's targeted cross-entropy).
    """
    if name == "dlr":
        return dlr_targeted
    obj = get_objective(name)
    return lambda logits, labels, targets: -obj(logits, targets)


# AutoAttack's APGD-T and FAB-T: the 9 most likely wrong classes.
N_TARGET_CLASSES = 9


def n_target_count(n_target_classes: int, num_classes: int) -> int:
    """Targets per example: ``n_target_classes``, capped at the ``K - 1`` wrong classes."""
    if n_target_classes < 1:
        raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
    return min(int(n_target_classes), num_classes - 1)


def target_matrix(targets: Array, batch: int, num_classes: int | None = None) -> Array:
    """Given targets ``[B]`` or ``[B, T]`` as an int32 ``[B, T]`` matrix (checked).

    Concrete targets must lie in ``[0, num_classes)`` when it is given.
    """
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer class ids, got dtype {targets.dtype}")
    targets = targets[:, None] if targets.ndim == 1 else targets
    if targets.ndim != 2 or targets.shape[0] != batch or targets.shape[1] < 1:
        raise ValueError(f"targets must have shape [B] or [B, T] with B = {batch}, "
                         f"got {targets.shape}")
    if num_classes is not None and not isinstance(targets, jax.core.Tracer):
        t = np.asarray(targets)
        if t.size and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"targets must lie in [0, {num_classes - 1}], got values in "
                             f"[{t.min()}, {t.max()}]")
    return targets.astype(jnp.int32)


def top_other_classes(logits: Array, labels: Array, k: int) -> Array:
    """``[B, k]``: the ``k`` classes other than the label with the largest logits, largest first.

    The targets of APGD-T and FAB-T (AutoAttack: the 2nd to 10th largest clean
    logits of a correctly classified example).
    """
    z = logits.astype(jnp.float32)
    if not 1 <= k < z.shape[-1]:
        raise ValueError(f"need 1 <= k < K = {z.shape[-1]} target classes, got {k}")
    is_label = labels[:, None] == jnp.arange(z.shape[-1])
    return jax.lax.top_k(jnp.where(is_label, -jnp.inf, z), k)[1].astype(jnp.int32)
