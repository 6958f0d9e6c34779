"""gce_jax.runtime: which XLA:CPU flags the commands add, and when they add none.

That the flags give the same gradients is tested in ``test_fast_paths.py``
(``FAST_SETTINGS``); that the commands start with them, here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gce_jax import runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(runtime, "_backends_started", lambda: False)


def test_adds_the_flags_after_the_users_own(fresh):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert runtime.configure_xla_cpu(env) == runtime.CPU_FLAGS
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                        *runtime.CPU_FLAGS]
    assert runtime.configure_xla_cpu(env) == ()  # idempotent
    assert env["XLA_FLAGS"].split().count(runtime.CPU_FLAGS[0]) == 1


def test_a_flag_the_user_set_wins(fresh):
    name = runtime.CPU_FLAGS[0].partition("=")[0]
    env = {"XLA_FLAGS": f"{name}=individual_dot"}
    assert runtime.configure_xla_cpu(env) == ()
    assert env["XLA_FLAGS"] == f"{name}=individual_dot"


def test_opt_out_and_untested_jaxlib_add_nothing(fresh, monkeypatch):
    env = {runtime.OPT_OUT_VARIABLE: "0"}
    assert runtime.configure_xla_cpu(env) == () and "XLA_FLAGS" not in env
    monkeypatch.setattr(runtime, "TESTED_JAXLIB_PREFIXES", ("0.0.",))
    env = {}
    assert runtime.configure_xla_cpu(env) == () and "XLA_FLAGS" not in env


def test_too_late_once_a_backend_started():
    import jax
    jax.devices()  # this process has started its backend
    env = {}
    assert runtime.configure_xla_cpu(env) == () and env == {}


def test_the_commands_start_with_the_flags(tmp_path):
    # The trainer records XLA_FLAGS in the run's provenance; --help exits
    # before any JAX work, so read it from a real process instead.
    code = ("import os, runpy, sys; sys.argv = ['train', '--helpshort'];\n"
            "try: runpy.run_module('experiments.train', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", runtime.OPT_OUT_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert f"XLA_FLAGS={' '.join(runtime.CPU_FLAGS)}" in out.splitlines()
    env[runtime.OPT_OUT_VARIABLE] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "XLA_FLAGS=" in out.splitlines()


def test_hardware_info_records_the_flags():
    from gce_jax.provenance import hardware_info
    assert hardware_info()["xla_flags"] == os.environ.get("XLA_FLAGS", "")


def test_strip_cpu_flags_leaves_the_others():
    others = "--xla_force_host_platform_device_count=4 --xla_cpu_use_onednn=true"
    assert runtime.strip_cpu_flags(" ".join([others, *runtime.CPU_FLAGS])) == others
    assert runtime.strip_cpu_flags("") == ""
