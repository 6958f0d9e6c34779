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

A targeted attack *minimises* the objective evaluated at the target label
(the attacks flip the sign themselves).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

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
    """Objective to *maximise*: as is when untargeted, negated when targeted."""
    obj = get_objective(name)
    if not targeted:
        return obj
    return lambda logits, labels: -obj(logits, labels)
