"""REDUCED CPU budget: CIFAR-10 + ResNet-20 for a few epochs.

Not a paper setting -- a smoke-scale run whose numbers must be labelled
"reduced" wherever reported. Variants ``:xe`` / ``:gce`` (default), and
``:cot`` / ``:adv_xe`` / ``:adv_gce`` with the paper's method settings but
the reduced budget (adversarial training uses 3 inner steps here).

Budget: ResNet-20, 10 epochs, batch 128, SGD momentum 0.9, wd 1e-4,
lr 0.1 with /10 at epochs 5 and 8 (the He et al. schedule shape, compressed).
"""

from __future__ import annotations

from experiments.configs import cifar10_resnet56

VARIANTS = cifar10_resnet56.VARIANTS


def get_config(variant: str = "gce"):
    c = cifar10_resnet56.get_config(variant)
    c.name = f"cifar10_reduced_{variant}"
    c.model = "resnet20"
    c.epochs = 10
    c.lr_schedule.boundaries_epochs = (5, 8)
    c.checkpoint.keep = 2
    if variant.startswith("adv"):
        c.training.adversarial.steps = 3
        c.training.adversarial.step_size = 2.5 * c.training.adversarial.eps / 3
    return c
