"""Every benchmark runs end to end in its tiny ``--smoke`` mode.

No timing is asserted (the numbers are meaningless at these sizes and on a
shared machine); only that each benchmark finishes and prints its markdown
table rows with same-run ratios. Each runs in a fresh process, as a user
would run it (several start worker processes with their own XLA_FLAGS).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["losses", "training", "pgd", "parallel", "flags", "convolutions", "accelerator"]


def _run(args: list[str], timeout: int = 900) -> str:
    env = dict(os.environ)
    # The test session's 4 simulated devices must not leak into the workers'
    # own device-count settings (benchmarks.parallel sets them per worker).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "device_count" not in f)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _ratio_rows(out: str) -> list[list[str]]:
    lines = [l for l in out.splitlines() if l.startswith("|")]
    header = next(l for l in lines if "ratio" in l)
    ratio_col = [c.strip() for c in header.strip("|").split("|")].index("ratio (wall)")
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines
            if not l.startswith("|---") and "ratio" not in l]
    for r in rows:
        if len(r) > ratio_col:
            float(r[ratio_col])  # a number, not a placeholder
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name):
    out = _run([f"benchmarks.{name}", "--smoke"])
    assert "hardware:" in out
    assert "same run" in out
    assert len(_ratio_rows(out)) >= 2
    if name == "parallel":  # its correctness checks, printed per row
        assert "DIFFERENT" not in out and out.count("same") >= 6, out


@pytest.mark.slow
def test_profile_smoke():
    out = _run(["benchmarks.profile", "--smoke"])
    assert "ms of op time per step" in out
    assert sum(l.startswith("| ") and "%" in l for l in out.splitlines()) >= 4


@pytest.mark.slow
def test_run_all_smoke_one_section():
    out = _run(["benchmarks.run_all", "--smoke", "--only", "losses"])
    assert out.startswith("# gce_jax benchmark results")
    assert "Command: `python -m benchmarks.run_all --smoke --only losses`" in out
    assert "## losses" in out and "FAILED" not in out
    assert len(_ratio_rows(out)) >= 2


def test_torch_is_optional():
    # The PyTorch reference must be importable lazily: the benchmark modules
    # import without torch, and torch is not a project requirement.
    text = (ROOT / "requirements.txt").read_text()
    assert not any(l.split("==")[0].strip().lower() == "torch" for l in text.splitlines())
    for mod in ("benchmarks.torch_ref", "benchmarks.training", "benchmarks.pgd"):
        src = (ROOT / (mod.replace(".", "/") + ".py")).read_text()
        top = [l for l in src.splitlines() if l.startswith(("import ", "from "))]
        assert not any("torch" in l.split()[1] for l in top), (mod, top)
