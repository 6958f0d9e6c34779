"""CIFAR-100 + ResNet-56 (paper Tables 2 and 4). Variants ``:xe`` / ``:gce`` (default).

Same He et al. schedule as ``cifar10_resnet56``. No public reference code
exists for this setting; values follow the paper's text.
"""

from __future__ import annotations

from experiments.configs import default
from experiments.configs.cifar10_resnet56 import resnet_cifar

VARIANTS = ("xe", "gce")


def get_config(variant: str = "gce"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c = resnet_cifar(default.get_config(), dataset="cifar100")
    c.name = f"cifar100_resnet56_{variant}"
    c.loss = variant
    c.alpha = 1.0 / 3.0
    c.eval.pgd_eps = (0.04, 0.12, 0.2)
    c.eval.pgd_steps = 40
    c.eval.pgd_step_size = 0.01
    return c
