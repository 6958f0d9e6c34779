"""Data parallelism: a 4-device shard_map step equals the 1-device step.

conftest.py gives the process 4 CPU devices; the 1-device runs use an explicit
1-device mesh, so both go through the same shard_map code. Both are also
compared with a plain jitted update (no mesh at all), which pins down the
gradient reduction: neither local, nor double-reduced (x4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from gce_jax import parallel, train
from gce_jax.models import get_model
from gce_jax.models.resnet import CifarResNet

B = 16  # global batch: 4 examples per device on 4 devices


def config_for(model: str = "lenet5", loss: str = "xe"):
    c = default.get_config()
    c.model, c.dataset, c.loss = model, "digits", loss
    c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.1
    c.optimizer.momentum, c.optimizer.weight_decay = 0.9, 1e-4
    c.batch_size = B
    return c


def make_models(name: str):
    """(data-parallel model, plain model); 'resnet8' is the smallest BN ResNet."""
    if name == "resnet8":
        return (CifarResNet(depth=8, num_classes=10, bn_axis_name="batch"),
                CifarResNet(depth=8, num_classes=10))
    return (get_model(name, num_classes=10, bn_axis_name="batch"),
            get_model(name, num_classes=10))


def random_batch(shape, k=10, seed=0, n=B):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, *shape), dtype=np.float32),
            "label": rng.integers(0, k, n).astype(np.int32)}


def run_step(config, model, tx, state, batch, n_devices, *, tx_comp=None):
    """One jitted data-parallel step of ``state`` (a host pytree) on ``n_devices``."""
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    step = train.make_train_step(config, model, tx, mesh, 10, tx_comp=tx_comp)
    metrics = parallel.replicate(train.init_train_metrics(), mesh)
    new_state, metrics = step(parallel.replicate(state, mesh), metrics,
                              parallel.shard_batch(batch, mesh))
    return jax.device_get(new_state), jax.device_get(metrics)


def assert_trees_close(a, b, atol=1e-5):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@jax.jit
def _noop(x):
    return x


def plain_update(model, tx, loss_fn, params, stats, opt_state, x, y):
    """Reference update on the whole batch: no mesh, BatchNorm over all of x."""
    def objective(p):
        v = {"params": p, "batch_stats": stats} if stats else {"params": p}
        if stats:
            logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
            return jnp.mean(loss_fn(logits, y)), upd["batch_stats"]
        return jnp.mean(loss_fn(model.apply(v, x, train=True), y)), stats

    (loss, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss


@pytest.mark.parametrize("name,shape,loss", [("resnet8", (8, 8, 3), "gce"),
                                             ("lenet5", (28, 28, 1), "xe")])
def test_four_device_step_equals_single_device_step(name, shape, loss):
    assert len(jax.devices()) >= 4, "conftest.py should provide 4 CPU devices"
    config = config_for(loss=loss)
    model, plain_model = make_models(name)
    tx = train.create_optimizer(config, steps_per_epoch=10)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    state0 = jax.device_get(train.create_train_state(config, model, tx, shape, mesh1))
    batch = random_batch(shape)

    s1, m1 = run_step(config, model, tx, state0, batch, 1)
    s4, m4 = run_step(config, model, tx, state0, batch, 4)
    assert_trees_close(s4.params, s1.params)
    assert_trees_close(s4.batch_stats, s1.batch_stats)
    assert_trees_close(s4.opt_state, s1.opt_state)
    np.testing.assert_allclose(m4["loss_sum"], m1["loss_sum"], rtol=1e-5)
    assert int(m4["count"]) == int(m1["count"]) == B
    assert int(m4["correct"]) == int(m1["correct"])
    assert int(s4.step) == int(s1.step) == 1

    ref = jax.jit(plain_update, static_argnums=(0, 1, 2))
    params, stats, _, loss_value = ref(plain_model, tx, train.create_objective(config),
                                       state0.params, state0.batch_stats, state0.opt_state,
                                       batch["image"], batch["label"])
    assert_trees_close(s4.params, params)
    assert_trees_close(s4.batch_stats, stats)
    np.testing.assert_allclose(m4["loss_sum"], loss_value, rtol=1e-5)
    # Not vacuous: the step moved the parameters (and BN statistics) a lot
    # more than the tolerance.
    assert max_abs_diff(s4.params, state0.params) > 1e-3
    if name == "resnet8":
        assert max_abs_diff(s4.batch_stats, state0.batch_stats) > 1e-3


def test_state_replicated_and_batch_sharded():
    config = config_for()
    mesh = parallel.make_mesh(jax.devices()[:4])
    batch = parallel.shard_batch(random_batch((28, 28, 1)), mesh)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("batch")
    assert len(batch["image"].addressable_shards) == 4
    assert batch["image"].addressable_shards[0].data.shape[0] == B // 4
    state = parallel.replicate({"w": np.ones((3,), np.float32)}, mesh)
    assert state["w"].sharding.is_fully_replicated
    assert len(state["w"].sharding.device_set) == 4


def test_batch_not_divisible_by_devices_is_a_config_error():
    config = config_for()
    config.batch_size = 6
    with pytest.raises(train.ConfigError, match="multiple of the device count"):
        train.validate_config(config, parallel.make_mesh(jax.devices()[:4]))
    train.validate_config(config, parallel.make_mesh(jax.devices()[:2]))  # 6 = 2 x 3


def test_prefetch_keeps_order_and_reraises():
    assert list(parallel.prefetch(iter(range(10)), size=2)) == list(range(10))

    def bad():
        yield 1
        raise RuntimeError("boom")

    it = parallel.prefetch(bad())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_process_local_batch_is_placed_like_the_global_one(monkeypatch):
    # Two simulated hosts of 2 devices each cannot run in one process, but the
    # placement contract can be checked: with one process, process-local rows
    # are the whole batch and give the same sharded array as the global path.
    mesh = parallel.make_mesh(jax.devices()[:4])
    batch = random_batch((28, 28, 1))
    a = parallel.shard_batch(batch, mesh)
    b = parallel.shard_batch(batch, mesh, process_local=True)
    for k in batch:
        assert b[k].shape == a[k].shape and b[k].sharding == a[k].sharding
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]))
    # As host 1 of 2, this process owns rows 8:16 of a 16-example batch and
    # declares the global shape from its 8 local rows.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert parallel.process_slice(16) == slice(8, 16)
    seen = {}
    monkeypatch.setattr(jax, "make_array_from_process_local_data",
                        lambda sharding, local, shape: seen.setdefault("args", (local.shape, shape)))
    parallel.shard_batch({"label": np.arange(8)}, mesh, process_local=True)
    assert seen["args"] == ((8,), (16,))
