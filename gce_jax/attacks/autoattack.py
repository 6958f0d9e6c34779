"""AutoAttack, standard version (Croce & Hein, ICML 2020), L_inf.

Four attacks in sequence, each only on the examples that are still robust
(clean-correct and not yet misclassified):

===  ==========  ==================================================  ==============
 #   component   attack call                                          objective
===  ==========  ==================================================  ==============
 0   apgd-ce     ``apgd(steps=100, n_restarts=1, loss='xe')``         cross-entropy
 1   apgd-t      ``apgd(targeted=True, n_target_classes=9)``          targeted DLR
 2   fab-t       ``fab(targeted=True, n_target_classes=9)``           linearised boundary
 3   square      ``square(n_queries=5000, p_init=0.8)``               margin
===  ==========  ==================================================  ==============

Component ``c`` is called with ``key = fold_in(key, c)`` and each example's
own index (``example_offset``), so an example's outcome under a component
is the same as in a stand-alone call of that component with that key, on
any batch or subset. The components run from a host-side loop: each one is
a jit-compiled call on the survivors (padded to a power of two, so few
shapes compile) and is skipped once nothing is left. A survivor batch keeps
the input's sharding (the evaluator splits batches over devices).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gce_jax.attacks._common import Array, LogitsFn, as_partial, check_inputs, num_classes
from gce_jax.attacks.apgd import apgd
from gce_jax.attacks.fab import fab
from gce_jax.attacks.objectives import N_TARGET_CLASSES
from gce_jax.attacks.square import square

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
# Values of ``AutoAttackResult.broken_by`` besides a component index.
ROBUST = -1
CLEAN_MISCLASSIFIED = -2


class AutoAttackResult(NamedTuple):
    """Outcome of :func:`autoattack`.

    Attributes:
      x_adv: ``[B, ...]``: the first component's misclassified point where one
        broke the example, else the clean input.
      broken_by: int32 ``[B]``: index into ``components`` of the component
        that first misclassified the example; ``ROBUST`` (-1) if none did,
        ``CLEAN_MISCLASSIFIED`` (-2) if the clean input already was.
      components: the component names, in the order they ran.
      seconds: wall time of each component (0 where it was skipped).
    """

    x_adv: Array
    broken_by: np.ndarray
    components: tuple[str, ...]
    seconds: tuple[float, ...]


def autoattack_components(*, eps: float, steps: int = 100, n_queries: int = 5000,
                          n_target_classes: int = N_TARGET_CLASSES,
                          batch_chunk: int | None = None
                          ) -> list[tuple[str, Callable[..., Array], dict[str, Any]]]:
    """``(name, attack, kwargs)`` of the standard version, in order (see module doc).

    Calling ``attack(fn, x, y, key=fold_in(key, c), example_offset=..., **kwargs)``
    reproduces component ``c`` of ``autoattack(..., key=key)``.
    """
    common = dict(eps=eps, batch_chunk=batch_chunk)
    return [
        ("apgd-ce", apgd, dict(steps=steps, n_restarts=1, loss="xe", **common)),
        ("apgd-t", apgd, dict(steps=steps, n_restarts=1, loss="dlr", targeted=True,
                              n_target_classes=n_target_classes, **common)),
        ("fab-t", fab, dict(steps=steps, n_restarts=1, targeted=True,
                            n_target_classes=n_target_classes, final_search_steps=0,
                            **common)),
        ("square", square, dict(n_queries=n_queries, p_init=0.8, loss="margin", **common)),
    ]


@jax.jit
def _predict(fn, x):
    return jnp.argmax(fn(x), axis=-1)


def _bucket(n: int, full: int, multiple: int) -> int:
    """Padded size for ``n`` survivors: a power of two >= 8, at most ``full``,
    divisible by ``multiple``."""
    size = min(max(1 << max(n - 1, 0).bit_length(), 8), full)
    return -(-size // multiple) * multiple


def _batch_sharding(x: Any) -> NamedSharding | None:
    """The batch-axis sharding of a multi-device input (``None``: one device)."""
    s = getattr(x, "sharding", None)
    if not isinstance(s, NamedSharding) or s.mesh.size < 2 or not s.spec or s.spec[0] is None:
        return None
    return NamedSharding(s.mesh, P(s.spec[0]))


def _example_indices(example_offset: Any, b: int) -> np.ndarray:
    """One global example index per row, from a scalar offset or given indices."""
    offsets = np.asarray(example_offset, np.int64)
    offsets = offsets + np.arange(b) if offsets.ndim == 0 else offsets
    if offsets.shape != (b,):
        raise ValueError(f"example_offset must be a scalar or have shape ({b},), "
                         f"got shape {offsets.shape}")
    return offsets


def autoattack(logits_fn: LogitsFn, x: Any, y: Any, *, key: Array, eps: float,
               version: str = "standard", steps: int = 100, n_queries: int = 5000,
               n_target_classes: int = N_TARGET_CLASSES, batch_chunk: int | None = None,
               example_offset: Any = 0) -> AutoAttackResult:
    """AutoAttack ``'standard'``, L_inf: APGD-CE, APGD-T, FAB-T, Square on the survivors.

    Defaults are AutoAttack's: 100 iterations for APGD-CE, APGD-T and FAB-T,
    9 target classes (``K - 1`` if fewer), Square with 5000 queries. Needs
    K >= 4 (APGD-T's targeted DLR). Not itself jit-compiled: a host loop
    over jitted components (module docstring).

    Args:
        logits_fn: inference-mode ``x -> logits``.
        x: ``[B, H, W(, C)]`` images in [0, 1] (Square needs images); y: ``[B]`` labels.
        key: PRNG key; component ``c`` uses ``fold_in(key, c)``.
        eps: L_inf budget.
        version: only ``'standard'``.
        steps: iterations of APGD-CE, APGD-T (per target) and FAB-T (per target).
        n_queries: Square's query budget.
        n_target_classes: targets of APGD-T and FAB-T.
        batch_chunk: passed to every component.
        example_offset: index of ``x[0]`` in a larger batch, or one index per
            example (see ``pgd``); random draws are keyed by it.

    Returns:
        :class:`AutoAttackResult` (``x_adv``, ``broken_by``, ...).
    """
    if version != "standard":
        raise ValueError(f"only AutoAttack version 'standard' is implemented, got {version!r}")
    sharding = _batch_sharding(x)
    x, y = check_inputs(x, y, logits_fn=logits_fn, eps=eps)
    if x.ndim not in (3, 4):
        raise ValueError(f"autoattack needs images [B, H, W(, C)] (Square), got shape {x.shape}")
    fn = as_partial(logits_fn)
    k = num_classes(fn, x)
    if k < 4:
        raise ValueError(f"autoattack needs at least 4 classes (APGD-T's targeted DLR), got {k}; "
                         "run its components (apgd, fab, square) directly")
    b = x.shape[0]
    offsets = _example_indices(example_offset, b)
    components = autoattack_components(eps=eps, steps=steps, n_queries=n_queries,
                                       n_target_classes=n_target_classes,
                                       batch_chunk=batch_chunk)
    # Survivor batches keep a multi-device input's sharding; one example per
    # device at least, so the split stays valid.
    put = jnp.asarray if sharding is None else functools.partial(jax.device_put, device=sharding)
    multiple = 1 if sharding is None else sharding.mesh.size

    x_host, y_host = np.asarray(x), np.asarray(y)
    broken = np.where(np.asarray(_predict(fn, x)) == y_host, ROBUST, CLEAN_MISCLASSIFIED)
    x_adv = x_host.copy()
    seconds = []
    for c, (_, attack, kwargs) in enumerate(components):
        todo = np.flatnonzero(broken == ROBUST)
        if todo.size == 0:
            seconds.append(0.0)
            continue
        start = time.perf_counter()
        rows = np.resize(todo, _bucket(todo.size, max(b, multiple), multiple))
        xs, ys = put(x_host[rows]), put(y_host[rows])
        adv = attack(fn, xs, ys, key=jax.random.fold_in(key, c),
                     example_offset=put(offsets[rows].astype(np.int32)), **kwargs)
        fooled = np.asarray(_predict(fn, adv))[: todo.size] != y_host[todo]
        hit = todo[fooled]
        broken[hit] = c
        x_adv[hit] = np.asarray(adv)[: todo.size][fooled]
        seconds.append(time.perf_counter() - start)
    return AutoAttackResult(jnp.asarray(x_adv), broken.astype(np.int32),
                            tuple(name for name, _, _ in components), tuple(seconds))
