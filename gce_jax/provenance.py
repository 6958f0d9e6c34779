"""Where a result came from, and writing it safely: atomic files, JSON, git, hardware, time.

Every report, table, cache and benchmark of the project writes through
:func:`atomic_write` / :func:`atomic_open` and describes its origin with
:func:`git_info`, :func:`hardware_info` (or :func:`hardware_line`) and
:func:`now_iso`. Paths that go into a result pass through :func:`portable_path`,
so no result records the absolute layout of the machine it ran on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write",
    "cpu_model",
    "git_info",
    "hardware_info",
    "hardware_line",
    "now_iso",
    "portable_path",
    "repo_root",
    "write_json",
]


# ---------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A file opened for writing whose content appears at ``path`` only on success.

    Writes go to a temporary file in the same directory, which is flushed,
    fsynced and renamed over ``path`` when the block exits normally; on an
    exception it is deleted and ``path`` keeps its old content (or stays
    absent). Readers therefore see the old file or the complete new one, never a
    prefix. The file gets the permissions of a plain ``open`` (the user's
    umask), not ``mkstemp``'s 0600.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends one line and fsyncs it, so that a kill right after cannot lose it."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
    """``obj`` as indented JSON (one trailing newline), written atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


# ---------------------------------------------------------------------- paths
def repo_root() -> Path | None:
    """The checkout holding this package (``None`` when installed elsewhere)."""
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists() or (root / "pyproject.toml").is_file():
        return root
    return None


def portable_path(path: str | os.PathLike, *, tail: int = 2) -> str:
    """``path`` in a form that names no machine: what a result may record.

    A relative path stays as given (normalised). An absolute one becomes
    relative to the repository, else to the working directory, else to the
    home folder (``~/...``); anything else keeps only its last ``tail``
    components (``.../runs/x``).
    """
    p = os.fspath(path)
    if not p:
        return p
    if not os.path.isabs(p):
        return Path(os.path.normpath(p)).as_posix()
    resolved = Path(os.path.normpath(p))
    for anchor, prefix in ((repo_root(), ""), (Path.cwd(), ""), (Path.home(), "~/")):
        if anchor is None:
            continue
        try:
            rel = resolved.relative_to(anchor)
        except ValueError:
            continue
        return prefix + (rel.as_posix() if rel.parts else ".")
    parts = resolved.parts[1:]
    return ".../" + "/".join(parts[-tail:]) if parts else "/"


# ---------------------------------------------------------------------- origin
def git_info(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit hash and whether the working tree had local changes (``None``s
    outside a git checkout)."""
    repo_dir = repo_dir or repo_root() or os.getcwd()

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_info() -> dict[str, Any]:
    """jax devices, backend platform, CPU, host and library versions."""
    import jax

    devices = jax.devices()
    return {
        "platform": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "num_devices": len(devices),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        # Kernel-library choices (gce_jax.runtime) change speed and float rounding.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def hardware_line() -> str:
    """One line for a table header: the accelerators, or the CPU when there are none."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{jax.device_count()} x {dev.device_kind}"
    return f"CPU only, {os.cpu_count()} cores ({cpu_model()})"


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
