"""The paper's figures: loss landscapes (Figs. 2, 3) and t-SNE (Figs. 1, 4).

Landscapes are computed with the library's own losses, evaluated at logits
``log p`` so that ``softmax(logits) == p`` exactly; nothing is re-derived here.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gce_jax import losses  # noqa: E402

FIG2_PANELS = (("Complement Entropy", None), ("GCE, alpha=1", 1.0),
               ("GCE, alpha=1/3", 1 / 3), ("GCE, alpha=1/10", 0.1))
FIG3_ALPHAS = (1.0, 1 / 2, 1 / 3, 1 / 5, 1 / 10)
# "Low loss" = within this much of the minimum (the losses span [-1, 0]).
LOW_LOSS_BAND = 0.05


def simplex_grid(resolution: int = 201, floor: float = 1e-4):
    """Points (X=p1, Y=p2) of the 3-class simplex with p0 = 1 - X - Y > 0.

    Returns ``(X, Y, probs, inside)``; ``probs`` is ``[R, R, 3]``, clipped to
    ``floor`` so that ``log p`` is finite, ``inside`` masks the simplex.
    """
    ticks = np.linspace(0.0, 1.0, resolution)
    x, y = np.meshgrid(ticks, ticks, indexing="xy")
    p0 = 1.0 - x - y
    inside = p0 > 0
    probs = np.stack([p0, x, y], axis=-1).clip(floor, 1.0)
    probs = probs / probs.sum(-1, keepdims=True)
    return x, y, probs, inside


def landscape(probs: np.ndarray, alpha: float | None) -> np.ndarray:
    """Loss (class 0 is the label) at every grid point.

    ``alpha=None`` is the normalised complement entropy (Eq. 1 / log(K-1)),
    otherwise normalised GCE (Eq. 3). Values in [-1, 0]; lower is better.
    """
    logits = jnp.log(jnp.asarray(probs, jnp.float32)).reshape(-1, 3)
    labels = jnp.zeros(logits.shape[0], jnp.int32)
    if alpha is None:
        vals = losses.complement_entropy(logits, labels, normalize=True)
    else:
        vals = losses.guided_complement_entropy(logits, labels, alpha=alpha)
    return np.asarray(vals).reshape(probs.shape[:-1])


def gce_profile(p_g: np.ndarray, alpha: float) -> np.ndarray:
    """GCE along X = Y (flat complement), as a function of p_g (Fig. 3)."""
    p_g = np.asarray(p_g, np.float64)
    rest = (1.0 - p_g) / 2.0
    probs = np.stack([p_g, rest, rest], axis=-1)
    return landscape(probs, alpha)


def figure2(out_dir: str, resolution: int = 201) -> dict:
    """Heat maps of Fig. 2 with the class-0-predicted region shaded."""
    x, y, probs, inside = simplex_grid(resolution)
    predicted_0 = (probs[..., 0] > probs[..., 1]) & (probs[..., 0] > probs[..., 2]) & inside
    fig, axes = plt.subplots(1, len(FIG2_PANELS), figsize=(4.2 * len(FIG2_PANELS), 3.8))
    summary = {}
    for ax, (title, alpha) in zip(axes, FIG2_PANELS):
        vals = np.where(inside, landscape(probs, alpha), np.nan)
        im = ax.pcolormesh(x, y, vals, cmap="viridis", shading="auto")
        ax.contourf(x, y, predicted_0.astype(float), levels=[0.5, 1.5], colors="gray", alpha=0.35)
        ax.set(title=title, xlabel="p(class 1)", ylabel="p(class 2)", aspect="equal")
        fig.colorbar(im, ax=ax, fraction=0.046)
        # Where the minimum lies and whether it is inside the shaded region:
        # the paper's point is that (a) and (d) put it outside.
        low = inside & (vals <= np.nanmin(vals) + LOW_LOSS_BAND)
        summary[title] = {
            "min_loss": float(np.nanmin(vals)),
            "low_loss_area_fraction": float(low.sum() / inside.sum()),
            "low_loss_fraction_predicting_class0": float((low & predicted_0).sum() / low.sum()),
            # A flat valley along X = Y is the complement entropy's flaw.
            "diagonal_loss_range": float(np.ptp(gce_profile(np.linspace(0.34, 0.999, 50), alpha)))}
    fig.tight_layout()
    path = os.path.join(out_dir, "fig2_landscapes.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"png": path, "panels": summary, "resolution": resolution}


def figure3(out_dir: str, alphas: Sequence[float] = FIG3_ALPHAS) -> dict:
    """GCE profile along X = Y for several alpha (Fig. 3)."""
    p_g = np.linspace(1e-3, 1.0 - 1e-6, 400)
    fig, ax = plt.subplots(figsize=(5, 3.8))
    curves = {}
    for alpha in alphas:
        vals = gce_profile(p_g, alpha)
        ax.plot(p_g, vals, label=f"alpha={alpha:.3g}")
        curves[f"{alpha:.4g}"] = {"loss_at_pg_0.1": float(np.interp(0.1, p_g, vals)),
                                  "loss_at_pg_0.999999": float(vals[-1])}
    ax.set(xlabel="p(ground truth)", ylabel="normalised GCE", title="GCE along X = Y")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "fig3_profile.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"png": path, "curves": curves}


def tsne_figure(features: dict[str, np.ndarray], labels: np.ndarray, out_path: str,
                seed: int = 0, title: str = "") -> dict:
    """Side-by-side t-SNE of penultimate features (Figs. 1 and 4).

    Also reports a silhouette score in the embedding and in feature space, so
    "more distinct clusters" is a measured number, not only a picture.
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    fig, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 4.8))
    axes = np.atleast_1d(axes)
    scores = {}
    for ax, (name, feats) in zip(axes, features.items()):
        emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(
            np.asarray(feats, np.float64))
        ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=3)
        ax.set(title=f"{title} {name}".strip(), xticks=[], yticks=[])
        scores[name] = {"silhouette_tsne": float(silhouette_score(emb, labels)),
                        "silhouette_features": float(silhouette_score(feats, labels))}
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return {"png": out_path, "scores": scores, "n": int(len(labels)), "seed": seed}

