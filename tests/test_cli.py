"""What the commands show the user: one-line errors that damage nothing, quiet
logs, one line per epoch, read-only re-runs, a full disk, progress-bar names
and file modes.

``experiments.train`` runs in subprocesses (absl owns its process); evaluate
and reproduce are called in-process through their ``main``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train import tree_digest as digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
CONFIG = "experiments/configs/mnist_lenet5.py"
# One epoch of LeNet-5 on the bundled digits (resized to MNIST's 28x28).
TINY = ["--config.dataset=digits", "--config.data.resize=(28, 28)", "--config.data.val_size=200",
        "--config.epochs=1", "--config.batch_size=256", "--config.eval_batch_size=400",
        "--config.progress_bar=False"]


def train_cmd(workdir: str, *extra: str, variant: str = "xe") -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", f"{CONFIG}:{variant}",
            "--workdir", workdir, *TINY, *extra]


def run(cmd, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True,
                          timeout=600, **kw)


def lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


def assert_one_error_line(stderr: str, *needles: str) -> None:
    err = lines(stderr)
    assert len(err) == 1 and err[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for n in needles:
        assert n in err[0], (n, err[0])


def read_only(cmd: list[str], path: str) -> list[str]:
    """``cmd`` with ``path`` read-only: chmod for a user, a read-only bind mount
    in a private mount namespace for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                p = os.path.join(root, name)
                os.chmod(p, os.stat(p).st_mode & ~0o222)
        os.chmod(path, os.stat(path).st_mode & ~0o222)
        return cmd
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    wrap = ["unshare", "-m", "sh", "-c", script, "sh", path]
    if shutil.which("unshare") is None or subprocess.run(wrap + ["true"]).returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a directory read-only")
    return wrap + cmd


# ------------------------------------------------------------ experiments.train
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("cli") / "run")
    out = run(train_cmd(wd))
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, out


def test_train_logs_one_line_per_epoch_and_no_library_info(finished_run):
    wd, out = finished_run
    # absl/orbax INFO lines look like "I1202 17:29:24.885 ...": none by default
    # (the issue counted ~700), and no "Given directory is read only".
    assert not [l for l in out.stderr.splitlines() if l[:1] in "IW" and l[1:5].isdigit()], \
        out.stderr[:2000]
    assert "read only" not in out.stderr
    epoch_lines = [l for l in out.stdout.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 1
    for word in ("epoch 1/1:", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "s"):
        assert word in epoch_lines[0]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    # The summary is the selected epoch's; the last epoch's numbers are apart.
    assert result["epochs_completed"] == 1 and result["selected_epoch"] == 1
    assert result["last_epoch"]["epoch"] == 1 and "epoch" not in result
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        (line,) = [json.loads(l) for l in f]
    assert result["train_loss"] == line["train_loss"] and result["val_acc"] == line["val_acc"]


def test_finished_run_reruns_in_a_read_only_workdir(finished_run):
    wd, first = finished_run
    before = digest(wd)
    out = run(read_only(train_cmd(wd, "--verbosity=0"), wd))
    assert out.returncode == 0, out.stderr[-3000:]
    assert digest(wd) == before  # config.json included: nothing rewritten
    a, b = (json.loads(o.stdout[o.stdout.index("{"):]) for o in (first, out))
    assert a["test_acc"] == b["test_acc"] and a["selected_epoch"] == b["selected_epoch"]
    # --verbosity brings the library INFO logs back; still no read-only warning.
    assert any(l.startswith("I") and l[1:5].isdigit() for l in out.stderr.splitlines())
    assert "Given directory is read only" not in out.stderr


def test_read_only_workdir_with_epochs_to_train_is_one_line(finished_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(finished_run[0], wd)
    before = digest(wd)
    out = run(read_only(train_cmd(wd, "--config.epochs=2"), wd))
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "is not writable")
    assert digest(wd) == before


def test_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    # RLIMIT_FSIZE makes large writes fail (EFBIG) as a full disk would (ENOSPC):
    # config.json fits, the first checkpoint does not.
    # A shim sets the limit and execs the command (both survive exec; a
    # preexec_fn would fork this multithreaded JAX process).
    shim = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    wd = str(tmp_path / "run")
    # Without the tests' persistent XLA cache (conftest.py), whose writes would
    # fail under the limit too: a user's run has no such cache.
    env = {k: v for k, v in ENV.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    out = run([sys.executable, "-c", shim, *train_cmd(wd)], env=env)
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "could not write the checkpoint of epoch 1",
                          "File too large")
    assert os.listdir(os.path.join(wd, "checkpoints")) == []  # no temporary step left


@pytest.mark.parametrize("variant,extra,needles", [
    ("nope", [], ["unknown variant 'nope'"]),
    ("xe", ["--config.optimizer.learning_rate=-1"], ["optimizer.learning_rate=-1"]),
    # Issue 18: both passed validation and the run failed later with a NaN.
    ("xe", ["--config.optimizer.learning_rate=inf", "--config.optimizer.b1=1.5"],
     ["optimizer.learning_rate=inf", "optimizer.b1=1.5"]),
    ("xe", ["--config.foo=1"], ["--config.foo", "no such config field"]),
    ("xe", ["--config.optimizer.foo=1"], ["--config.optimizer.foo"]),
    ("xe", ["--config.epochs=abc"], ["--config.epochs"]),
    ("xe", ["surplus"], ["unexpected arguments"]),
])
def test_train_user_errors_are_one_line_and_write_nothing(tmp_path, variant, extra, needles):
    wd = str(tmp_path / "run")
    out = run(train_cmd(wd, *extra, variant=variant))
    assert out.returncode == 2
    assert_one_error_line(out.stderr, *needles)
    assert not os.path.exists(wd)


def test_train_missing_config_file_and_workdir_that_is_a_file(tmp_path):
    out = run([sys.executable, "-m", "experiments.train", "--config", "nope/missing.py",
               "--workdir", str(tmp_path / "run")])
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "--config", "no such file", "nope/missing.py")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = run(train_cmd(str(afile)))
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "is not a directory")
    assert afile.read_text() == "keep me"


def test_train_debug_shows_the_traceback(tmp_path):
    out = run(train_cmd(str(tmp_path / "run"), "--debug", variant="nope"))
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert "unknown variant 'nope'" in out.stderr


def test_resume_with_another_seed_is_refused_in_one_line(finished_run, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(finished_run[0], wd)
    before = digest(wd)
    out = run(train_cmd(wd, "--config.seed=7"))
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "seed 0 -> 7")
    assert digest(wd) == before


# ------------------------------------------------------------ experiments.evaluate
@pytest.fixture
def fake_run(tmp_path):
    """Looks like a run directory (no loadable checkpoint: nothing may get that far)."""
    wd = tmp_path / "fake_run"
    (wd / "checkpoints" / "1").mkdir(parents=True)
    (wd / "config.json").write_text("{}")
    return wd


def evaluate_main(capsys, *argv):
    from experiments import evaluate
    rc = evaluate.main(["--no_progress", *argv])
    return rc, capsys.readouterr().err


def test_evaluate_out_that_is_a_file_is_rejected_before_any_attack(fake_run, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    rc, err = evaluate_main(capsys, "--workdir", str(fake_run), "--out", str(out))
    assert rc == 2
    assert_one_error_line(err, "--out", "is not a directory")
    assert out.read_text() == "keep me"
    rc, err = evaluate_main(capsys, "--workdir", str(fake_run), "--out", str(out / "sub"))
    assert rc == 2
    assert_one_error_line(err, "--out", "is not a directory")


def test_evaluate_unwritable_out_is_rejected_before_any_attack(fake_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    cmd = [sys.executable, "-m", "experiments.evaluate", "--workdir", str(fake_run),
           "--out", str(locked / "results"), "--no_progress"]
    out = run(read_only(cmd, str(locked)))
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "--out", "not writable")
    assert not (locked / "results").exists()


def test_evaluate_eps_beyond_the_image_range_is_rejected(fake_run, tmp_path, capsys):
    rc, err = evaluate_main(capsys, "--workdir", str(fake_run), "--out", str(tmp_path / "o"),
                            "--eps", "0.1", "2")
    assert rc == 2
    assert_one_error_line(err, "--eps must be <= 1", "[2.0]")
    assert not (tmp_path / "o").exists()


def test_evaluate_truncated_config_json_is_named(fake_run, tmp_path, capsys):
    path = fake_run / "config.json"
    path.write_text('{"model": "lenet5", "datas')
    rc, err = evaluate_main(capsys, "--workdir", str(fake_run), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert_one_error_line(err, str(path), "damaged")
    assert path.read_text() == '{"model": "lenet5", "datas'


def test_evaluate_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main(capsys, "--n", "x")
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--n", "invalid int value")


# ------------------------------------------------------------ experiments.reproduce
def test_reproduce_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from experiments import reproduce
    # argparse's own errors (it printed usage lines too).
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--target", "table9"])
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--target", "table9")
    afile = tmp_path / "runs"
    afile.write_text("")
    assert reproduce.main(["--target", "table2", "--datasets", "mnist",
                           "--runs_dir", str(afile), "--results_dir", str(tmp_path / "r")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--runs_dir", "is not a directory")
    # An error deep inside a target (here the data set is missing) is one line too.
    # --weights_dir '' makes it train: published seed-0 MNIST models need no data for Table 2.
    argv = ["--target", "table2", "--datasets", "mnist", "--data_root", str(tmp_path / "none"),
            "--weights_dir", "", "--runs_dir", str(tmp_path / "runs2"),
            "--results_dir", str(tmp_path / "r")]
    assert reproduce.main(argv) == 2
    assert_one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs2").exists() and not (tmp_path / "r").exists()


# ------------------------------------------------------------ evaluation output
def test_progress_bars_are_named_by_attack_loss_and_eps():
    from gce_jax import robustness as R
    names = {R.progress_name(R.paper_spec("pgd", eps, loss=loss))
             for eps in (0.1, 0.3) for loss in ("xe", "margin")}
    assert names == {"pgd-xe eps=0.1", "pgd-xe eps=0.3", "pgd-margin eps=0.1",
                     "pgd-margin eps=0.3"}
    assert R.progress_name(R.AttackSpec("pgd", 0.1, "xe", label="pgd-xe (2x steps)"),
                           "xe_run") == "pgd-xe eps=0.1 (2x steps) [xe_run]"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_result_files_honour_the_umask(tmp_path, umask):
    from gce_jax.provenance import atomic_write
    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "robustness.json"), "{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "robustness.json").st_mode & 0o777 == 0o666 & ~umask
