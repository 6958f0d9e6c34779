"""Tiny ImageNet (64x64, 200 classes) + ResNet-50 (paper Tables 2 and 4).

Variants ``:xe`` / ``:gce`` (default). The paper trains ResNet-50 "following
the standard settings" of He et al.: SGD momentum 0.9, weight decay 1e-4, lr
0.1 /10 at epochs 100 and 150, 200 epochs, batch 128. The official test labels
are not public, so the official ``val`` split is the test set and model
selection uses 10,000 images held out of the 100,000 training images.
"""

from __future__ import annotations

from experiments.configs import default
from experiments.configs.cifar10_resnet56 import resnet_cifar

VARIANTS = ("xe", "gce")


def get_config(variant: str = "gce"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c = resnet_cifar(default.get_config(), dataset="tiny_imagenet", model="resnet50")
    c.name = f"tiny_imagenet_resnet50_{variant}"
    c.loss = variant
    c.alpha = 1.0 / 3.0
    c.data.val_size = 10000
    c.data.test_split = "val"
    c.eval_batch_size = 500
    c.eval.pgd_eps = (0.04, 0.12, 0.2)
    c.eval.pgd_steps = 40
    c.eval.pgd_step_size = 0.01
    return c
