"""The numbers printed in the paper (Chen et al., ICCV 2019), for side-by-side tables.

These are the paper's claims, transcribed from its Tables 2-6; they are never
used as our results. Keys: (dataset, attack, param) -> {model: value}. The
paper's attack budgets (eps grids, JSMA's gamma) are here too: the evaluation
CLI uses them as its defaults. Attack settings (steps, step sizes) are the
attacks' own defaults, in ``gce_jax.attacks.defaults``.
"""

from __future__ import annotations

# Table 2: clean error rate (%).
TABLE2_ERROR = {
    "mnist": {"xe": 0.8, "gce_1/2": 0.61, "gce_1/3": 0.67, "gce_1/4": 0.64, "gce_1/5": 0.68},
    "cifar10": {"xe": 7.99, "gce_1/2": 9.18, "gce_1/3": 7.18, "gce_1/4": 6.93, "gce_1/5": 6.91},
    "cifar100": {"xe": 31.9, "gce_1/2": 40.59, "gce_1/3": 31.75, "gce_1/4": 31.8, "gce_1/5": 31.48},
    "tiny_imagenet": {"xe": 39.54, "gce_1/2": 43.36, "gce_1/3": 38.56, "gce_1/4": 38.69,
                      "gce_1/5": 38.26},
}

# Table 3: accuracy (%) under white-box attacks, XE vs GCE (alpha = 1/3).
TABLE3_ACC = {
    "mnist": {
        ("fgsm", 0.1): (78.32, 87.66), ("fgsm", 0.2): (38.88, 62.74), ("fgsm", 0.3): (14.99, 47.21),
        ("bim", 0.1): (53.14, 61.92), ("bim", 0.2): (2.15, 34.49), ("bim", 0.3): (0.01, 33.45),
        ("pgd", 0.1): (46.85, 51.85), ("pgd", 0.2): (1.58, 9.55), ("pgd", 0.3): (0.0, 2.22),
        ("mim", 0.1): (48.28, 61.18), ("mim", 0.2): (2.29, 39.81), ("mim", 0.3): (0.01, 38.78),
        ("jsma", 0.25): (1.53, 26.24), ("jsma", 0.5): (0.1, 17.26),
        ("cw", 0.0): (0.0, 25.6),
    },
    "cifar10": {
        ("fgsm", 0.04): (14.76, 41.22), ("fgsm", 0.12): (9.58, 14.82), ("fgsm", 0.2): (8.78, 11.81),
        ("bim", 0.04): (0.25, 19.59), ("bim", 0.12): (0.0, 3.03), ("bim", 0.2): (0.0, 1.97),
        ("pgd", 0.04): (0.0, 5.91), ("pgd", 0.12): (0.0, 1.89), ("pgd", 0.2): (0.0, 1.66),
        ("mim", 0.04): (0.0, 15.44), ("mim", 0.12): (0.0, 13.1), ("mim", 0.2): (0.0, 12.69),
        ("jsma", 0.07): (1.09, 18.72), ("jsma", 0.14): (0.14, 10.94),
        ("cw", 0.0): (0.0, 0.8),
    },
}

# Table 4: PGD accuracy (%) on CIFAR-100 and Tiny ImageNet, XE vs GCE.
TABLE4_ACC = {
    "cifar100": {("pgd", 0.04): (0.04, 2.94), ("pgd", 0.12): (0.0, 0.46), ("pgd", 0.2): (0.0, 0.19)},
    "tiny_imagenet": {("pgd", 0.04): (0.0, 9.52), ("pgd", 0.12): (0.0, 4.27),
                      ("pgd", 0.2): (0.0, 1.11)},
}

# Table 5: accuracy (%), XE vs COT vs GCE.
TABLE5_ACC = {
    "mnist": {("fgsm", 0.2): (38.88, 51.8, 62.74), ("bim", 0.2): (2.15, 4.35, 34.49),
              ("mim", 0.2): (2.29, 4.26, 39.81), ("jsma", 0.25): (1.53, 11.13, 26.24),
              ("cw", 0.0): (0.0, 11.9, 25.6)},
    "cifar10": {("fgsm", 0.04): (14.76, 33.62, 41.22), ("bim", 0.04): (0.25, 7.49, 19.59),
                ("mim", 0.04): (0.0, 0.0, 15.44), ("jsma", 0.07): (1.09, 8.25, 18.72),
                ("cw", 0.0): (0.0, 0.0, 0.8)},
}

# Table 6: PGD accuracy (%) after PGD adversarial training, XE vs GCE outer loss.
TABLE6_ACC = {
    "mnist": {("pgd", 0.3): (83.67, 83.85)},
    "cifar10": {("pgd", 0.04): (41.50, 41.57), ("pgd", 0.08): (12.93, 13.16)},
}

# Attack budgets of Tables 3-4: the L_inf eps grid per data set family.
PAPER_EPS = {
    "mnist": (0.1, 0.2, 0.3),
    "digits": (0.1, 0.2, 0.3),
    "cifar10": (0.04, 0.12, 0.2),
    "cifar100": (0.04, 0.12, 0.2),
    "tiny_imagenet": (0.04, 0.12, 0.2),
}
# JSMA's gamma (max. fraction of pixels changed), Table 3.
PAPER_JSMA_GAMMA = {
    "mnist": (0.25, 0.5), "digits": (0.25, 0.5), "cifar10": (0.07, 0.14),
    "cifar100": (0.07, 0.14), "tiny_imagenet": (0.07, 0.14),
}


def default_eps(dataset: str | None) -> tuple[float, ...]:
    """The paper's eps grid for a data set (MNIST's for unknown names)."""
    return PAPER_EPS.get(dataset or "", PAPER_EPS["mnist"])


def default_jsma_gammas(dataset: str | None) -> tuple[float, ...]:
    """The paper's JSMA gammas for a data set (``(0.25,)`` for unknown names)."""
    return PAPER_JSMA_GAMMA.get(dataset or "", (0.25,))
