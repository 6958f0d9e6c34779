"""CIFAR-10 + ResNet-56 (paper Sec. 5.1 / Tables 2, 3, 5, 6).

Variants (config string)::

    experiments/configs/cifar10_resnet56.py:gce      # GCE alpha 1/3 (default)
    experiments/configs/cifar10_resnet56.py:xe       # cross-entropy baseline
    experiments/configs/cifar10_resnet56.py:cot      # COT (Table 5)
    experiments/configs/cifar10_resnet56.py:adv_xe   # PGD adversarial training, XE (Table 6)
    experiments/configs/cifar10_resnet56.py:adv_gce  # PGD adversarial training, GCE (Table 6)

He et al. (2016) CIFAR schedule as the paper states it: SGD momentum 0.9,
weight decay 1e-4, lr 0.1 divided by 10 at epochs 100 and 150, 200 epochs,
batch 128, random crop + flip. Selection on a 5,000-image validation split.
The offline JPEG copy: ``--config.data.data_dir=../shared/data/cifar10-jpeg.tar.gz``.
"""

from __future__ import annotations

from experiments.configs import default

VARIANTS = ("xe", "gce", "cot", "adv_xe", "adv_gce")


def resnet_cifar(c, *, dataset: str, model: str = "resnet56"):
    """The paper's ResNet/CIFAR training settings, applied in place."""
    c.dataset = dataset
    c.model = model
    c.data.val_size = 5000
    c.data.augment = True
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.lr_schedule.name = "piecewise"
    c.lr_schedule.boundaries_epochs = (100, 150)
    c.lr_schedule.decay_factor = 0.1
    c.epochs = 200
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.selection = "best_val"
    return c


def get_config(variant: str = "gce"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    c = resnet_cifar(default.get_config(), dataset="cifar10")
    c.name = f"cifar10_resnet56_{variant}"
    c.loss = "xe" if variant in ("xe", "cot", "adv_xe") else "gce"
    c.alpha = 1.0 / 3.0
    if variant == "cot":
        # COT reference: XE step then complement-entropy step, two SGD states,
        # complement loss = batch mean / K.
        c.training.method = "cot"
        c.training.cot.complement_normalization = "num_classes"
    if variant.startswith("adv"):
        # Madry et al. CIFAR-10: eps 8/255, 10 inner steps of 2/255, random start.
        c.training.adversarial.enabled = True
        c.training.adversarial.eps = 8.0 / 255.0
        c.training.adversarial.steps = 10
        c.training.adversarial.step_size = 2.0 / 255.0
        c.training.adversarial.random_start = True
        c.training.adversarial.mix = 0.0
    # Table 6 attacks CIFAR-10 with 40 PGD iterations at eps 0.04 and 0.08;
    # Table 3 uses 0.04, 0.12, 0.2 for natural training.
    c.eval.pgd_eps = (0.04, 0.08) if variant.startswith("adv") else (0.04, 0.12, 0.2)
    c.eval.pgd_steps = 40
    c.eval.pgd_step_size = 0.01
    c.eval.pgd_random_start = True
    return c
