"""Data-parallel helpers: a 1-D ``'batch'`` mesh, placement of host batches.

The training step is written per device (pmap's programming model) and run
under ``jax.shard_map`` over this mesh: params/optimizer state replicated
(``P()``), the batch sharded along its leading axis (``P('batch')``).

A 1-device mesh is still a mesh: single-device training runs the very same
shard_map program, so there is one code path to test.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'batch'`` over ``devices`` (default: all devices).

    Auto axis types: arrays are placed explicitly by this module, and auto
    mode keeps plain ``jnp`` code outside shard_map free of sharding types.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises ValueError unless the global batch splits evenly over devices."""
    n = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the number of "
            f"devices ({n}) so that every device gets the same number of examples")


def process_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (every process reads the same order)."""
    per = global_batch_size // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, *,
                process_local: bool = False) -> dict[str, jax.Array]:
    """Host batch -> arrays sharded over ``'batch'``.

    By default ``batch`` is the *global* batch, identical on all processes, and
    each process contributes its own rows. With ``process_local=True`` it is
    already this process's rows (``data.batches(..., rows=process_slice(B))``),
    so no host prepares rows it does not own. Both are the multi-host path
    (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharded(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if process_local:
            shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
            out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
        else:
            rows = process_slice(v.shape[0])
            out[k] = jax.make_array_from_process_local_data(sharding, v[rows], v.shape)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on all processes) replicated on ``mesh``."""
    sharding = replicated(mesh)

    def to_host_unless_placed(x):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if x.is_fully_addressable:  # e.g. committed to another device set
                return np.asarray(x)
        return x

    tree = jax.tree.map(to_host_unless_placed, tree)
    # jit with out_shardings is the multi-host-safe way to replicate a value
    # that every process already holds.
    return jax.jit(lambda t: t, out_shardings=sharding)(tree)


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, ``size`` items ahead.

    Host-side batch preparation (decode, augment, device transfer) then
    overlaps with the device step instead of serialising with it. Order and
    values are unchanged; an exception in the producer is re-raised here.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    done = object()
    stop = threading.Event()

    def producer():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put((None, item))
            q.put((None, done))
        except BaseException as e:  # handed to the consumer, not lost
            q.put((e, None))

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue so the thread can exit.
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
