"""Timing harness shared by the benchmarks: interleaved, same-run references.

Every figure a benchmark prints sits next to a reference measured in the same
run, because the machines this runs on are shared and noisy:

* a *case* is something that runs ``n`` units of work (training steps, attack
  calls, loss evaluations) and blocks until they are done;
* :func:`measure` warms every case up (compilation is timed separately and
  never mixed into the steady-state figures), then runs them in *interleaved*
  rounds (the order rotates each round), so slow phases of the machine hit
  every case alike; figures are medians over rounds;
* a case can live in a *worker process* (:class:`WorkerCase`): different
  ``XLA_FLAGS``/device counts, or PyTorch, interleaved with in-process cases
  through a line-based JSON protocol (``python -m benchmarks._worker``).

Both wall time and process CPU time are recorded: on a contended machine the
CPU time is the steadier measure of work done, the wall time is what a user
waits for.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from gce_jax.provenance import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

class Case:
    """A named unit of work. Subclasses set ``name`` and implement ``_run``.

    ``items_per_unit`` converts per-unit times into throughput (images per
    training step, images per attack call, ...).
    """

    name: str = "case"
    items_per_unit: int = 1
    compile_s: float = float("nan")

    def setup(self) -> float:
        """Compiles and warms up; returns the seconds that took."""
        t0 = time.perf_counter()
        self._setup()
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def timed(self, n: int) -> tuple[float, float]:
        """Runs ``n`` units; returns (wall seconds, process CPU seconds)."""
        t0, c0 = time.perf_counter(), time.process_time()
        self._run(n)
        return time.perf_counter() - t0, time.process_time() - c0

    def close(self) -> None:
        pass

    def _setup(self) -> None:
        self._run(1)

    def _run(self, n: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class FnCase(Case):
    """``run(n)`` given as a function (it must block until its work is done)."""

    def __init__(self, name: str, run: Callable[[int], None], *, items_per_unit: int = 1,
                 setup: Callable[[], None] | None = None,
                 close: Callable[[], None] | None = None):
        self.name, self.items_per_unit = name, items_per_unit
        self._run_fn, self._setup_fn, self._close_fn = run, setup, close

    def close(self) -> None:
        if self._close_fn is not None:
            self._close_fn()

    def _setup(self) -> None:
        if self._setup_fn is not None:
            self._setup_fn()
        self._run_fn(1)

    def _run(self, n: int) -> None:
        self._run_fn(n)


class StepCase(Case):
    """Repeated ``state = step(state, *args)``; ``state`` is carried across calls.

    ``step`` returns the new state (any pytree); the case blocks on it at the
    end of each timed chunk, not after every step, as a training loop would.
    """

    def __init__(self, name: str, step: Callable, state: Any, args: Sequence[Any] = (), *,
                 items_per_unit: int = 1, next_args: Callable[[], Sequence[Any]] | None = None):
        self.name, self.items_per_unit = name, items_per_unit
        self._step, self._state, self._args, self._next_args = step, state, tuple(args), next_args

    @property
    def state(self) -> Any:
        """The state after the last step run (e.g. to check what the timed steps did)."""
        return self._state

    def _run(self, n: int) -> None:
        import jax

        state = self._state
        for _ in range(n):
            args = self._next_args() if self._next_args is not None else self._args
            state = self._step(state, *args)
        jax.block_until_ready(state)
        self._state = state


class WorkerCase(Case):
    """A case built by ``factory(**kwargs)`` in a separate Python process.

    ``factory`` is ``"module:function"``; the function returns a :class:`Case`.
    ``env`` is added to the worker's environment (e.g. ``XLA_FLAGS``).
    """

    def __init__(self, name: str, factory: str, kwargs: dict | None = None, *,
                 env: dict[str, str] | None = None, items_per_unit: int = 1,
                 timeout_s: float = 900.0):
        self.name, self.items_per_unit = name, items_per_unit
        self._factory, self._kwargs, self._env = factory, dict(kwargs or {}), dict(env or {})
        self._timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self.info: dict = {}

    def _request(self, msg: dict) -> dict:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        while True:
            line = self._proc.stdout.readline()
            if not line:
                err = self._proc.stderr.read() if self._proc.stderr else ""
                raise RuntimeError(f"worker for {self.name!r} exited:\n{err[-3000:]}")
            if line.startswith("@@"):  # protocol lines; anything else is chatter
                reply = json.loads(line[2:])
                if "error" in reply:
                    raise RuntimeError(f"worker for {self.name!r} failed: {reply['error']}")
                return reply

    def setup(self) -> float:
        env = dict(os.environ, **self._env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._worker"], cwd=str(REPO_ROOT), env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reply = self._request({"factory": self._factory, "kwargs": self._kwargs})
        self.compile_s = reply["compile_s"]
        self.items_per_unit = reply.get("items_per_unit", self.items_per_unit)
        self.info = reply.get("info", {})
        return self.compile_s

    def timed(self, n: int) -> tuple[float, float]:
        reply = self._request({"n": n})
        return reply["wall"], reply["cpu"]

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - best effort; never leave it running
                self._proc.kill()
            self._proc = None


def build_case(factory: str, kwargs: dict) -> Case:
    module, _, fn = factory.partition(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    name: str
    compile_s: float
    items_per_unit: int
    wall: list[float]  # seconds per unit, one entry per round
    cpu: list[float]

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)

    @property
    def items_per_s(self) -> float:
        return self.items_per_unit / self.wall_s

    @property
    def spread(self) -> float:
        """Interquartile range over the median (a noise indicator)."""
        if len(self.wall) < 4:
            return float("nan")
        q = statistics.quantiles(self.wall, n=4)
        return (q[2] - q[0]) / self.wall_s


def measure(cases: Sequence[Case], *, rounds: int, units: int | dict[str, int],
            log: Callable[[str], None] | None = None) -> dict[str, Result]:
    """Sets every case up, then times ``rounds`` interleaved rounds.

    ``units`` is the number of units per timed chunk (per case if a dict).
    Cases are always closed, also on errors.
    """
    try:
        for c in cases:
            c.setup()
            if log:
                log(f"  compiled {c.name} in {c.compile_s:.1f} s")
        samples = {c.name: ([], []) for c in cases}
        for r in range(rounds):
            order = list(cases[r % len(cases):]) + list(cases[:r % len(cases)])
            for c in order:
                n = units[c.name] if isinstance(units, dict) else units
                wall, cpu = c.timed(n)
                samples[c.name][0].append(wall / n)
                samples[c.name][1].append(cpu / n)
        return {c.name: Result(c.name, c.compile_s, c.items_per_unit, *samples[c.name])
                for c in cases}
    finally:
        for c in cases:
            c.close()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    if s != s:  # nan
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def table(results: Iterable[Result], reference: str, *, unit: str = "step",
          items: str = "img", extra: Callable[[Result], dict[str, str]] | None = None,
          title: str | None = None, compile_label: str = "compile") -> str:
    """Markdown table; every row's ratio is against ``reference`` (same run).

    The compile column is the first call (compilation + one unit), timed
    before the steady-state rounds and never included in them.
    """
    results = list(results)
    ref = next(r for r in results if r.name == reference)
    extra_cols = list(extra(results[0]).keys()) if extra else []
    head = ["case", f"wall / {unit}", f"{items}/s", "ratio (wall)", "ratio (CPU)",
            "IQR/median", compile_label, *extra_cols]
    lines = []
    if title:
        lines.append(f"**{title}** (ratios vs `{reference}`, same run)\n")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in results:
        row = [f"`{r.name}`", fmt_time(r.wall_s), f"{r.items_per_s:,.0f}",
               f"{r.wall_s / ref.wall_s:.2f}", f"{r.cpu_s / ref.cpu_s:.2f}",
               f"{r.spread:.2f}", fmt_time(r.compile_s)]
        if extra:
            row += list(extra(r).values())
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def hardware_line() -> str:
    """CPU model, core count, load and library versions, on one line."""
    import jax

    model = cpu_model()
    try:
        load = "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "load avg n/a"
    versions = [f"jax {jax.__version__}"]
    for mod in ("flax", "optax"):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:  # noqa: BLE001
            pass
    try:
        import torch  # noqa: F401

        versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except Exception:  # noqa: BLE001
        versions.append("torch not installed")
    dev = jax.devices()[0]
    return (f"{model}, {os.cpu_count()} logical CPUs, {load}; backend {jax.default_backend()} "
            f"({dev.device_kind}, {jax.device_count()} device(s)); " + ", ".join(versions)
            + f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "skip"
        return False
    return True


def say(msg: str = "") -> None:
    print(msg, flush=True)


def size_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, ``--quick`` and ``--smoke``."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    return p
