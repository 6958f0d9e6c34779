"""experiments.training_record: a published model's training record, read from its folder."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import training_record

FOLDER = Path(__file__).resolve().parents[1] / "weights" / "cifar10_cpu_resnet20_xe_e12_s0"


def test_the_record_is_the_folders(tmp_path, capsys):
    out = tmp_path / "r" / "training"
    argv = ["--weights", str(FOLDER), "--out", str(out), "--budget", "CPU budget",
            "--conditions", "quiet", "--target_acc", "0.88", "--target_min", "60"]
    assert training_record.main(argv) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    metrics = [json.loads(l) for l in (FOLDER / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((FOLDER / "manifest.json").read_text())
    assert rec["epochs"] == metrics and rec["command"] == manifest["command"]
    chosen = next(m for m in metrics if m["epoch"] == manifest["selected_epoch"])
    assert rec["test_acc"] == chosen["test_acc"] and rec["seed"] == 0
    assert abs(rec["sum_epoch_time_min"] * 60 - sum(m["epoch_time_s"] for m in metrics)) < 1e-6
    assert rec["target"]["reached"] is False  # 83.6% < 88%
    md = out.with_suffix(".md").read_text()
    assert f"**test {100 * chosen['test_acc']:.2f}%**" in md and "**not reached**" in md
    assert md.count("\n| ") == len(metrics) + 1  # header + one row per epoch
    # A second run refuses to overwrite: one line, the files unchanged.
    before = out.with_suffix(".md").read_bytes()
    assert training_record.main(argv) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert out.with_suffix(".md").read_bytes() == before


def test_not_a_published_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r" / "training"
    assert training_record.main(["--weights", str(tmp_path), "--out", str(out), "--budget",
                                 "b", "--conditions", "c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "r").exists()
