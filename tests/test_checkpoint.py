"""CheckpointStore: round trip, keep-N, best kept apart, finalized steps only,
fallback past an unreadable checkpoint, reads that write nothing."""

import errno
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gce_jax import checkpoint as ckpt


def state(v: float):
    return {"params": {"w": jnp.full((3,), v)}, "step": jnp.asarray(int(v), jnp.int32),
            "empty": {}, "none": None, "key": jax.random.PRNGKey(int(v))}


def save_epochs(wd, epochs, best=(), keep=2):
    store = ckpt.CheckpointStore(wd, keep=keep)
    for epoch in epochs:
        meta = {"epoch": epoch, "val_acc": 0.1 * epoch}
        store.save(epoch, state(epoch), meta)
        if epoch in best:
            store.save(epoch, state(epoch), meta, which="best_val")
    store.close()


def test_round_trip_keep_n_and_best(tmp_path):
    wd = str(tmp_path)
    save_epochs(wd, (1, 2, 3), best=(1, 2))
    store = ckpt.CheckpointStore(wd, keep=2, read_only=True)
    assert store.latest_epoch() == 3 and store.epochs("best_val") == [2]
    restored, meta = store.restore(ckpt.abstract_like(state(0)))
    assert meta == {"epoch": 3, "val_acc": pytest.approx(0.3)}
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3,), 3.0))
    np.testing.assert_array_equal(restored["key"], jax.random.PRNGKey(3))
    assert restored["none"] is None and restored["empty"] == {}
    best, meta = store.restore(ckpt.abstract_like(state(0)), which="best_val")
    assert meta["epoch"] == 2 and float(best["params"]["w"][0]) == 2.0
    assert store.read_meta(2) == {"epoch": 2, "val_acc": pytest.approx(0.2)}
    # Keep-N prunes the oldest; the best survives in its own directory.
    assert sorted(os.listdir(ckpt.checkpoint_dir(wd, "last"))) == ["2", "3"]
    assert ckpt.latest_epoch_on_disk(wd) == 3
    assert ckpt.latest_epoch_on_disk(wd, "best_val") == 2
    assert not any("tmp" in d for d in os.listdir(ckpt.checkpoint_dir(wd, "last")))


def test_probing_writes_nothing_and_missing_checkpoint_is_clear(tmp_path):
    wd = str(tmp_path / "nothing")
    assert ckpt.latest_epoch_on_disk(wd) is None
    with pytest.raises(ValueError, match="best_val"):
        ckpt.checkpoint_dir(wd, "best_test")
    store = ckpt.CheckpointStore(wd, keep=1)
    with pytest.raises(FileNotFoundError, match="no 'last' checkpoint"):
        store.restore(ckpt.abstract_like(state(0)))
    with pytest.raises(FileNotFoundError, match="of epoch 4"):
        store.restore(ckpt.abstract_like(state(0)), epoch=4)
    store.close()
    assert not os.path.exists(wd)  # nothing is created before the first save
    with pytest.raises(ckpt.CheckpointError, match="read-only"):
        ckpt.CheckpointStore(wd, keep=1, read_only=True).save(1, state(1), {})
    assert not os.path.exists(wd)


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    wd = str(tmp_path)
    save_epochs(wd, (1, 2))
    last = ckpt.checkpoint_dir(wd, "last")
    # What a kill during orbax's save of epoch 3 leaves: an uncommitted step.
    shutil.copytree(os.path.join(last, "2"), os.path.join(last, "3.orbax-checkpoint-tmp"))
    assert ckpt.finalized_epochs(last) == [1, 2]
    save_epochs(wd, (3,))
    assert sorted(os.listdir(last)) == ["2", "3"]


def _garble(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


def test_restore_falls_back_past_unreadable_checkpoints_and_sets_them_aside(tmp_path):
    wd = str(tmp_path)
    save_epochs(wd, (1, 2, 3), keep=3)
    _garble(os.path.join(ckpt.checkpoint_dir(wd, "last"), "3"))
    store = ckpt.CheckpointStore(wd, keep=3)
    epoch, restored, meta, skipped = store.restore_newest_intact(ckpt.abstract_like(state(0)))
    assert epoch == 2 and meta["epoch"] == 2 and float(restored["params"]["w"][0]) == 2.0
    ((bad, reason),) = skipped
    assert bad == 3 and "is unreadable" in reason and "\n" not in reason
    dest = store.set_aside(3)
    assert dest == os.path.join(wd, ckpt.UNREADABLE_DIR, "checkpoints_3")
    assert store.epochs() == [1, 2] and os.path.isdir(dest)
    store.save(3, state(3), {"epoch": 3})  # the epoch can be saved again
    assert store.epochs() == [1, 2, 3]
    store.close()


def test_when_nothing_is_readable_the_newest_error_is_raised(tmp_path):
    wd = str(tmp_path)
    save_epochs(wd, (1, 2))
    for e in (1, 2):
        _garble(os.path.join(ckpt.checkpoint_dir(wd, "last"), str(e)))
    store = ckpt.CheckpointStore(wd, keep=2, read_only=True)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints.2 is unreadable"):
        store.restore_newest_intact(ckpt.abstract_like(state(0)))


def test_best_keeps_only_the_newest_save(tmp_path):
    wd = str(tmp_path)
    save_epochs(wd, (1, 2, 3), best=(1, 3), keep=1)
    assert os.listdir(ckpt.checkpoint_dir(wd, "best_val")) == ["3"]


def test_one_line_prefers_the_os_reason():
    assert ckpt.one_line(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device"
    tensorstore = ("OUT_OF_RANGE: Error writing \"key/0\" in OCDBT database ...: Failed to "
                   "write 5 bytes to file 7: File too large [os_error_code='27']\ntraceback...")
    assert ckpt.one_line(ValueError(tensorstore)) == "File too large (errno 27)"
    assert ckpt.one_line(ValueError("first\nsecond")) == "ValueError: first"
