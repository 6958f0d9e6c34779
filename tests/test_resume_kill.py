"""A run killed (SIGKILL) at any point of an epoch resumes to the uninterrupted run.

Each case runs training in a child process that kills itself at one point
between "epoch trained" and "epoch logged" (the points are chosen by wrapping
the functions that mark them), resumes it here, and compares parameters, the
selected checkpoint, ``metrics.jsonl`` (timings aside) and TensorBoard with
one uninterrupted run. Also: an unreadable newest checkpoint is set aside and
the run resumes from the newest readable one.

Run as a script, this file is the child: ``python test_resume_kill.py WORKDIR POINT N``.
"""

import os
import shutil
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_train import DATA, one_device, read_jsonl, tiny_config, tree_digest

from gce_jax import checkpoint as ckpt_lib
from gce_jax import train

EPOCHS = 3
HERE = os.path.dirname(os.path.abspath(__file__))


def config():
    # Epoch 2 raises the best validation accuracy (asserted below), so a kill
    # between its two checkpoint saves is a real case.
    return tiny_config(epochs=EPOCHS)


# ------------------------------------------------------------------- the child
def _kill_at(obj, name: str, n: int, when=lambda *a, **k: True, before: bool = False):
    """Wraps ``obj.name`` to SIGKILL this process around its n-th matching call."""
    original = getattr(obj, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if before and calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if not before and calls[0] == n and when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(obj, name, wrapper)


def _child(workdir: str, point: str, n: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    def which(expected):
        return lambda self, epoch, state, meta, which="last": which == expected

    if point == "epoch_trained":  # the epoch ran; nothing of it is written
        _kill_at(train, "_train_one_epoch", n)
    elif point == "last_mid_save":  # orbax wrote epoch n's step but did not commit it
        def step_n(self, *args, **kwargs):
            final = self.get_final()
            return final.parent.name == ckpt_lib.LAST_DIR and final.name == str(n)
        _kill_at(atomicity.AtomicRenameTemporaryPath, "finalize", 1, when=step_n, before=True)
    elif point == "last_saved":  # before the best-validation copy
        _kill_at(ckpt_lib.CheckpointStore, "save", n, when=which("last"))
    elif point == "best_saved":  # before TensorBoard and metrics.jsonl
        _kill_at(ckpt_lib.CheckpointStore, "save", n, when=which("best_val"))
    elif point == "tensorboard_written":  # before the metrics.jsonl line
        _kill_at(train._Logger, "_scalars", n)
    elif point == "line_written":  # the epoch is complete
        _kill_at(train, "append_line", n)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    train.train_and_evaluate(config(), workdir, datasets=DATA, mesh=one_device())
    raise SystemExit("the kill point was never reached")


# ------------------------------------------------------------------- helpers
def run_child(workdir: str, point: str, n: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.run([sys.executable, __file__, workdir, point, str(n)], cwd=HERE,
                          env=env, capture_output=True, text=True, timeout=600)


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in train.SPEED_KEYS} for r in records]


def tensorboard_scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of ``tag`` over every event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    tb = os.path.join(workdir, "tb")
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = v.simple_value
    return out


def assert_leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    result = train.train_and_evaluate(config(), wd, datasets=DATA, mesh=one_device())
    lines = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert train.best_epoch(lines[:1]) == 1 and train.best_epoch(lines[:2]) == 2
    return wd, result


def assert_same_as_reference(wd, result, reference):
    ref_wd, ref_result = reference
    assert without_timings(read_jsonl(os.path.join(wd, "metrics.jsonl"))) == \
        without_timings(read_jsonl(os.path.join(ref_wd, "metrics.jsonl")))
    drop = lambda r: {k: v for k, v in r.items() if k != "last_epoch"}
    assert drop(result) == drop(ref_result)
    for selection in ("last", "best_val"):
        assert_leaves_equal(train.load_for_eval(wd, selection)[1],
                            train.load_for_eval(ref_wd, selection)[1])
    for d in (ckpt_lib.LAST_DIR, ckpt_lib.BEST_DIR):
        assert sorted(os.listdir(os.path.join(wd, d))) == \
            sorted(os.listdir(os.path.join(ref_wd, d)))
    ref_tb = tensorboard_scalars(ref_wd, "train_loss")
    assert sorted(ref_tb) == [1, 2, 3]
    assert tensorboard_scalars(wd, "train_loss") == ref_tb


# ------------------------------------------------------------------- tests
# (point, n): the n-th time the point is reached; all but the last lie in epoch 2.
KILL_POINTS = [("epoch_trained", 2), ("last_mid_save", 2), ("last_saved", 2),
               ("best_saved", 2), ("tensorboard_written", 2), ("line_written", 2),
               ("line_written", 3)]


@pytest.mark.parametrize("point,n", KILL_POINTS, ids=[f"{p}-{n}" for p, n in KILL_POINTS])
def test_killed_run_resumes_to_the_uninterrupted_run(point, n, tmp_path, reference):
    wd = str(tmp_path / "run")
    out = run_child(wd, point, n)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    if point == "last_saved":
        # The case of issue 18: the history already names epoch 2 the best,
        # but checkpoints_best still holds epoch 1. Selection must follow the
        # history even before the run is resumed.
        assert ckpt_lib.latest_epoch_on_disk(wd, "best_val") == 1
        _, best, _ = train.load_for_eval(wd, "best_val")
        assert_leaves_equal(best, train.load_for_eval(reference[0], "best_val")[1])
    result = train.train_and_evaluate(config(), wd, datasets=DATA, mesh=one_device())
    assert_same_as_reference(wd, result, reference)


def test_summary_is_the_selected_epochs_with_the_last_one_apart(reference):
    # Issue 18: the summary mixed the last epoch's loss with the selected
    # epoch's accuracies.
    wd, result = reference
    lines = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert (result["selected_epoch"], result["epochs_completed"]) == (2, 3)
    for key in ("train_loss", "train_acc", "grad_norm", "val_acc", "test_acc"):
        assert result[key] == lines[1][key], key
    assert result["train_loss"] != lines[2]["train_loss"]
    assert result["last_epoch"] == lines[2]
    assert result["best_val_acc"] == lines[1]["val_acc"]


def _corrupt(step_dir: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                size = max(os.path.getsize(fh.name), 16)
                fh.write(b"\x00garbage" * (size // 8))


def test_unreadable_newest_checkpoint_is_set_aside_and_run_resumes(tmp_path, reference,
                                                                   capfd):
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    _corrupt(os.path.join(wd, ckpt_lib.LAST_DIR, str(EPOCHS)))
    capfd.readouterr()
    result = train.train_and_evaluate(config(), wd, datasets=DATA, mesh=one_device())
    err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(err) == 1, err
    assert f"{ckpt_lib.LAST_DIR}{os.sep}{EPOCHS} is unreadable" in err[0]
    assert f"resuming from epoch {EPOCHS - 1}" in err[0]
    assert os.listdir(os.path.join(wd, ckpt_lib.UNREADABLE_DIR)) == [f"checkpoints_{EPOCHS}"]
    assert_same_as_reference(wd, result, reference)


def test_no_readable_checkpoint_raises_and_moves_nothing(tmp_path, reference):
    # Every checkpoint failing points at a changed model, not a bad disk:
    # nothing may be set aside or retrained.
    wd = str(tmp_path / "run")
    shutil.copytree(reference[0], wd)
    for e in ckpt_lib.finalized_epochs(os.path.join(wd, ckpt_lib.LAST_DIR)):
        _corrupt(os.path.join(wd, ckpt_lib.LAST_DIR, str(e)))
    before = tree_digest(wd)
    with pytest.raises(ckpt_lib.CheckpointError, match="unreadable") as info:
        train.train_and_evaluate(config(), wd, datasets=DATA, mesh=one_device())
    assert "\n" not in str(info.value)
    assert tree_digest(wd) == before


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
