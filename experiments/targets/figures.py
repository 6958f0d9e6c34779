"""Figures 1-4: t-SNE of penultimate features (fig1, fig4) and the loss landscapes (fig2, fig3)."""

from __future__ import annotations

import os

import numpy as np

from experiments import figures
from experiments.targets.common import header, train_cell, write_outputs


def tsne_target(target: str, args) -> None:
    import jax
    from gce_jax import data as data_lib
    from experiments.evaluation_api import load_model
    variants = ("xe", "gce") if target == "fig1" else ("adv_xe", "adv_gce")
    payload = {}
    for ds in args.datasets:
        feats, labels = {}, None
        for variant in variants:
            workdir = train_cell(args, ds, variant, args.seeds[ds][0])["workdir"]
            model, variables, config = load_model(workdir)
            test = data_lib.load_config_split(config, "test")
            idx = np.random.default_rng(args.eval_seed).permutation(len(test))[:args.n_tsne]
            x = test.images[idx].astype(np.float32) / 255.0
            apply = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True)[1])
            feats[variant.upper()] = np.concatenate(
                [np.asarray(apply(variables, x[i:i + 500])) for i in range(0, len(x), 500)])
            labels = test.labels[idx]
        os.makedirs(args.out_dir, exist_ok=True)
        payload[ds] = figures.tsne_figure(feats, labels, os.path.join(args.out_dir, f"{target}_{ds}.png"),
                                          seed=args.eval_seed, title=ds)
    lines = ["| data set | model | silhouette (t-SNE) | silhouette (features) |", "|---|---|---|---|"]
    for ds, p in payload.items():
        for m, s in p["scores"].items():
            lines.append(f"| {ds} | {m} | {s['silhouette_tsne']:.3f} | {s['silhouette_features']:.3f} |")
    write_outputs(args.out_dir, target, payload, header(
        f"{target}: t-SNE of penultimate features", args,
        f"\n{args.n_tsne} random test images; silhouette score by true class (higher = more "
        "separated clusters), the measurable version of the paper's visual claim.\n") + "\n".join(lines))


def fig2(args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    out = figures.figure2(args.out_dir)
    lines = ["| panel | min loss | low-loss area (fraction of simplex) | low-loss area predicting class 0 | loss range along X=Y |",
             "|---|---|---|---|---|"]
    for k, v in out["panels"].items():
        lines.append(f"| {k} | {v['min_loss']:.4f} | {v['low_loss_area_fraction']:.4f} | "
                     f"{v['low_loss_fraction_predicting_class0']:.3f} | {v['diagonal_loss_range']:.3f} |")
    write_outputs(args.out_dir, "fig2", out, header(
        "Figure 2: loss landscapes on the 3-class simplex", args,
        f"\n![fig2](fig2_landscapes.png)\n\nLow loss = within {figures.LOW_LOSS_BAND} of the "
        "minimum. Class 0 is the label; shaded = class 0 predicted.\n") + "\n".join(lines) + "\n")


def fig3(args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    out = figures.figure3(args.out_dir)
    lines = ["| α | GCE at p_g=0.1 | GCE at p_g→1 |", "|---|---|---|"]
    for k, v in out["curves"].items():
        lines.append(f"| {k} | {v['loss_at_pg_0.1']:.4f} | {v['loss_at_pg_0.999999']:.4f} |")
    write_outputs(args.out_dir, "fig3", out, header(
        "Figure 3: GCE along X = Y", args, "\n![fig3](fig3_profile.png)\n") + "\n".join(lines) + "\n")
