"""Figures for evaluation reports (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gce_jax.provenance import atomic_write  # noqa: E402


def plot_accuracy_vs_eps(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                         path: str, **kwargs) -> str:
    """Writes :func:`render_accuracy_vs_eps`'s PNG to ``path`` atomically."""
    atomic_write(path, render_accuracy_vs_eps(curves, **kwargs))
    return path


def render_accuracy_vs_eps(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                           title: str = "Robust accuracy vs eps", xlabel: str = "L_inf eps",
                           zero_line: float | None = None,
                           marks: Sequence[float] = ()) -> bytes:
    """PNG bytes of robust accuracy (%) against eps, one line per curve.

    Args:
      curves: ``label -> (eps values, accuracies in [0, 1])``.
      zero_line: draw this accuracy level (e.g. the "reaches zero" tolerance).
      marks: eps values to mark with vertical lines (e.g. the diagnostics eps).
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    try:
        for label, (eps, acc) in curves.items():
            if len(eps) != len(acc):
                raise ValueError(f"curve {label!r}: {len(eps)} eps values but {len(acc)} accuracies")
            ax.plot(list(eps), [100 * a for a in acc], marker="o", ms=3.5, label=label)
        if zero_line is not None:
            ax.axhline(100 * zero_line, color="grey", lw=0.8, ls=":",
                       label=f"{100 * zero_line:g}% tolerance")
        for m in marks:
            ax.axvline(m, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()
