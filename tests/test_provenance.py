"""gce_jax.provenance: atomic files, JSON, portable paths, git and hardware records."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gce_jax import provenance as prov

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_whole_files_with_the_users_umask(tmp_path):
    path = tmp_path / "sub" / "report.md"
    prov.atomic_write(path, "first\n")
    old = os.umask(0o027)
    try:
        prov.atomic_write(path, b"second\n")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"second\n"
    # Not mkstemp's 0600: a plain open's mode under the umask in force.
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(path.parent)) == ["report.md"]  # no temporary left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    prov.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with prov.atomic_open(path) as f:
            f.write('{"a": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]
    with pytest.raises(TypeError):  # not JSON: nothing written, old file kept
        prov.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="mode"):
        with prov.atomic_open(path, "a"):
            pass


def test_write_json_format(tmp_path):
    prov.write_json(tmp_path / "x.json", {"b": [1, 2], "a": None}, sort_keys=True)
    text = (tmp_path / "x.json").read_text()
    assert text == json.dumps({"a": None, "b": [1, 2]}, indent=2) + "\n"


def test_portable_path_never_records_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prov.portable_path("runs/../runs/x") == "runs/x"  # relative stays relative
    assert prov.portable_path("../shared/data/mnist") == "../shared/data/mnist"
    assert prov.portable_path(REPO / "runs" / "x") == "runs/x"  # inside the repository
    assert prov.portable_path(tmp_path / "out" / "r") == "out/r"  # inside the working dir
    assert prov.portable_path(Path.home() / "data" / "mnist").startswith("~/")
    monkeypatch.chdir(REPO)
    outside = Path("/") / "srv" / "cluster7" / "runs" / "mnist_s0"
    if not str(outside).startswith(str(Path.home())):
        assert prov.portable_path(outside) == ".../runs/mnist_s0"
        assert prov.portable_path(outside, tail=1) == ".../mnist_s0"


def test_git_and_hardware_records():
    g = prov.git_info()
    assert set(g) == {"commit", "dirty"}
    if (REPO / ".git").exists() and g["commit"] is not None:
        assert len(g["commit"]) == 40 and isinstance(g["dirty"], bool)
    h = prov.hardware_info()
    assert {"platform", "devices", "device_kind", "num_devices", "cpu", "cpu_count",
            "python", "jax"} <= set(h)
    assert h["num_devices"] == len(h["devices"]) >= 1 and h["cpu"]
    line = prov.hardware_line()
    assert ("CPU only" in line) == (h["platform"] == "cpu")
    assert prov.now_iso().endswith("+00:00")
