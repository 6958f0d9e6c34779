"""Test session setup (environment only; nothing here imports jax).

* 4 simulated CPU devices for the data-parallel tests. XLA reads the flag
  once, when the CPU backend starts, so it must be set before any test runs
  jax. Single-device code builds an explicit 1-device mesh and is unaffected.
* A persistent XLA compilation cache: tests compile the same small programs
  many times (every training run builds its own jitted step), and on a busy
  2-core machine compilation dominates test time. It is new for each test
  run (the xdist workers inherit it from the controller) and removed at the
  end: a cache kept between runs outlives an entry that a test cut short
  (the full-disk test limits file sizes), and every later run then warns.
  Set JAX_COMPILATION_CACHE_DIR yourself to keep or share one.
"""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="gce_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
