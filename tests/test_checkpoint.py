"""CheckpointStore: round trip, keep-N, best kept apart, read-only probing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gce_jax import checkpoint as ckpt


def state(v: float):
    return {"params": {"w": jnp.full((3,), v)}, "step": jnp.asarray(int(v), jnp.int32),
            "empty": {}, "none": None, "key": jax.random.PRNGKey(int(v))}


def test_round_trip_keep_n_and_best(tmp_path):
    wd = str(tmp_path)
    store = ckpt.CheckpointStore(wd, keep=2)
    for epoch in (1, 2, 3):
        store.save(epoch, state(epoch), {"epoch": epoch, "val_acc": 0.1 * epoch},
                   best=epoch == 2)
    assert store.latest_epoch() == 3 and store.latest_epoch("best_val") == 2
    restored, meta = store.restore(ckpt.abstract_like(state(0)))
    assert meta == {"epoch": 3, "val_acc": pytest.approx(0.3)}
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3,), 3.0))
    np.testing.assert_array_equal(restored["key"], jax.random.PRNGKey(3))
    assert restored["none"] is None and restored["empty"] == {}
    best, meta = store.restore(ckpt.abstract_like(state(0)), which="best_val")
    assert meta["epoch"] == 2 and float(best["params"]["w"][0]) == 2.0
    store.close()
    # Keep-N prunes the oldest; the best survives in its own directory.
    assert sorted(os.listdir(ckpt.checkpoint_dir(wd, "last"))) == ["2", "3"]
    assert ckpt.latest_epoch_on_disk(wd) == 3
    assert ckpt.latest_epoch_on_disk(wd, "best_val") == 2
    assert not any("tmp" in d for d in os.listdir(ckpt.checkpoint_dir(wd, "last")))


def test_probing_writes_nothing_and_missing_checkpoint_is_clear(tmp_path):
    wd = str(tmp_path / "nothing")
    assert ckpt.latest_epoch_on_disk(wd) is None
    assert not os.path.exists(wd)
    with pytest.raises(ValueError, match="best_val"):
        ckpt.checkpoint_dir(wd, "best_test")
    store = ckpt.CheckpointStore(str(tmp_path / "empty"), keep=1)
    with pytest.raises(FileNotFoundError, match="no 'last' checkpoint"):
        store.restore(ckpt.abstract_like(state(0)))
    store.close()
