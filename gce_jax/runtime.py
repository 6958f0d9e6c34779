"""XLA:CPU settings the experiment commands start with.

On jaxlib 0.10, XLA:CPU hands convolutions to YNNPACK by default. For the CIFAR
ResNets' training step on a 2-core AVX-512 Xeon (2026-12-03) that is the slow
choice: YNNPACK's weight-gradient convolution ran at 26-51 GFLOP/s against
45-115 for XLA's own (Eigen) convolution, and the whole ResNet-20 step took
0.64-0.74x the default's time without it (``python -m benchmarks.flags
--only resnet``; figures in ``benchmarks/RESULTS.md``). The computation is the
same HLO; only the convolution kernel library changes, so results agree to
float32 rounding (``tests/test_runtime.py`` compares input and parameter
gradients of a trained ResNet-20 on real CIFAR-10 images in both settings).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so
:func:`configure_xla_cpu` must run before the first JAX computation. The
commands in ``experiments/`` and ``benchmarks/`` call it from their
``__main__`` blocks; importing :mod:`gce_jax` changes nothing. A flag the user
already put in ``XLA_FLAGS`` wins, and ``GCE_JAX_XLA_CPU_DEFAULTS=0`` turns the
whole thing off. The flags are ``xla_cpu_*`` ones, which GPU and TPU backends
ignore.
"""

from __future__ import annotations

import os

# Each flag's name must be known to every jaxlib this applies to: XLA aborts
# the process on an unknown flag in XLA_FLAGS.
CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
TESTED_JAXLIB_PREFIXES: tuple[str, ...] = ("0.10.",)
OPT_OUT_VARIABLE = "GCE_JAX_XLA_CPU_DEFAULTS"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").partition("=")[0]


def strip_cpu_flags(xla_flags: str) -> str:
    """``xla_flags`` without any flag whose name :data:`CPU_FLAGS` sets: XLA's
    defaults for those, e.g. to compare both settings in other processes."""
    own = {_flag_name(f) for f in CPU_FLAGS}
    return " ".join(f for f in xla_flags.split() if _flag_name(f) not in own)


def configure_xla_cpu(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS`` and returns the flags it added.

    Adds nothing (returns ``()``) when JAX's backends have already started
    (too late to take effect), when the installed jaxlib is not one the flags
    were tested on, when ``GCE_JAX_XLA_CPU_DEFAULTS=0``, or for a flag whose
    name ``XLA_FLAGS`` already sets.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_VARIABLE, "1") == "0" or _backends_started():
        return ()
    import jaxlib.version
    if not jaxlib.version.__version__.startswith(TESTED_JAXLIB_PREFIXES):
        return ()
    current = env.get("XLA_FLAGS", "")
    present = {_flag_name(f) for f in current.split()}
    added = tuple(f for f in CPU_FLAGS if _flag_name(f) not in present)
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
