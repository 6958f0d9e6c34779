"""Worker process for :class:`benchmarks._harness.WorkerCase`.

Protocol (one JSON object per line on stdin; replies are stdout lines that
start with ``@@``, so stray prints from libraries cannot confuse the parent):

* ``{"factory": "module:function", "kwargs": {...}}`` builds the case and
  compiles it -> ``{"compile_s", "items_per_unit", "info"}``
* ``{"n": N}`` runs N units -> ``{"wall", "cpu"}`` (seconds, whole chunk)

The process exits when stdin closes.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback


def _reply(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    from benchmarks._harness import build_case

    case = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
            if "factory" in msg:
                # Imports and backend start-up are not compilation.
                importlib.import_module(msg["factory"].partition(":")[0])
                import jax
                jax.devices()
                t0 = time.perf_counter()
                case = build_case(msg["factory"], msg.get("kwargs", {}))
                case.setup()
                # Construction (init, tracing) + first call (compile) together,
                # as the parent's in-process cases count it.
                compile_s = time.perf_counter() - t0
                _reply({"compile_s": compile_s, "items_per_unit": case.items_per_unit,
                        "info": getattr(case, "info", {})})
            else:
                wall, cpu = case.timed(int(msg["n"]))
                _reply({"wall": wall, "cpu": cpu})
        except Exception as e:  # noqa: BLE001 - reported to the parent
            _reply({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"})
    if case is not None:
        case.close()


if __name__ == "__main__":
    main()
