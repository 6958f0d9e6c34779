"""What the experiment commands share: one-line errors and quiet logs.

A user error (bad flag, bad config, missing file, full disk, ...) prints one
line, ``error: <what is wrong>``, on stderr and exits with status 2; ``--debug``
re-raises it with its traceback instead. Anything else is a bug and keeps
its traceback. Third-party INFO logs (orbax writes hundreds per run, absl,
tfds) are off unless ``--verbosity 0`` (absl's scale: -1 warnings, 0 info,
1 debug) asks for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

# Python loggers of libraries that log through the standard logging module.
THIRD_PARTY_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "tensorflow_datasets", "etils")


def error_line(error: BaseException) -> str:
    """One line for ``error``: its message, or the last line of an embedded traceback."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    if not lines:
        return type(error).__name__
    if any(l.startswith("Traceback") for l in lines):
        return lines[-1]  # e.g. a config file's exception, wrapped by absl
    return lines[0]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or a bad environment, not a bug."""
    from absl import flags

    from gce_jax.checkpoint import CheckpointError
    from gce_jax.data import DataError
    from gce_jax.robustness import EvaluationError
    from gce_jax.train import ConfigError, TrainingError
    from gce_jax.weights import WeightsError
    return (flags.Error, ConfigError, TrainingError, DataError, EvaluationError,
            CheckpointError, WeightsError, OSError, UserError)


class UserError(Exception):
    """Bad command-line input found by a command itself."""


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_reporting_errors(fn: Callable[[], int], *, debug: bool) -> int:
    """Runs ``fn`` (returns an exit status); a user error becomes one line on stderr
    and status 2."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- filtered just below
        from gce_jax.train import TrainingError
        if debug or not isinstance(e, user_errors()):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, TrainingError) else 2


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs a failed save's traceback from its writer thread, then raises
    it; the command reports the raised error, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno >= logging.CRITICAL


_DROP_ORBAX_ERRORS = _DropOrbaxErrors()


def set_log_verbosity(verbosity: int) -> None:
    """absl-style verbosity for absl (orbax's logger) and the other library loggers."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(verbosity)
    level = absl_logging.converter.absl_to_standard(verbosity)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    absl_logger = logging.getLogger("absl")
    if verbosity < 0:
        absl_logger.addFilter(_DROP_ORBAX_ERRORS)
    else:
        absl_logger.removeFilter(_DROP_ORBAX_ERRORS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and the shared ``--debug``/``--verbosity`` flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the traceback of an error instead of one line")
        self.add_argument("--verbosity", type=int, default=-1,
                          help="library log level: -1 warnings (default), 0 info, 1 debug")

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def wants_debug(argv: Sequence[str]) -> bool:
    """``--debug`` in ``argv``, read before parsing (parsing itself can fail)."""
    return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)
