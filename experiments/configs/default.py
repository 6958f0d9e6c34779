"""Base config: every field the training loop reads, with neutral defaults.

Not an experiment by itself; the files next to it start from ``get_config()``
and set the paper's values. Any field can be overridden on the command line::

    python -m experiments.train --config experiments/configs/mnist_lenet5.py:gce \
        --workdir runs/mnist_lenet5_gce --config.seed=1 --config.epochs=5
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    # One flat listing of every field with its comment: longer than a function
    # should be, but split up it would no longer read as the schema.
    c = ml_collections.ConfigDict()
    c.name = "default"

    # Objective: 'xe' | 'gce' | 'complement'. GCE uses alpha and the paper's
    # log(K-1) normalisation (Eq. 3) when loss_normalize.
    c.loss = "xe"
    c.alpha = 1.0 / 3.0
    c.loss_normalize = True

    c.model = "lenet5"  # lenet5 | resnet{20,32,44,56,110} | resnet50
    # A registered data set (gce_jax.data.dataset_names(): mnist | cifar10 |
    # cifar100 | tiny_imagenet | digits, or one added by register_dataset), or
    # your own set's name when data.format describes it below.
    c.dataset = "mnist"
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.source = "auto"  # auto | local | tfds (see gce_jax.data.load_split)
    c.data.val_size = 5000  # held out of train for selection; 0 = no val split
    c.data.test_split = "test"
    c.data.augment = False  # random crop (pad 4) + horizontal flip
    # Batches prepared ahead in a thread: 'auto' (2 on GPU/TPU or > 4 cores,
    # else 0: on 2 CPU cores the thread slowed the step) or an int >= 0.
    c.data.prefetch = ml_collections.FieldReference("auto", field_type=object)
    c.data.resize = ml_collections.FieldReference(None, field_type=tuple)  # (h, w)
    # Your own data set under the name `dataset`, in a known format (one of
    # gce_jax.data.FORMATS: idx | cifar10_pickle | cifar100_pickle | image_folder |
    # tiny_imagenet, or tfds). None = `dataset` is a registered name.
    c.data.format = ml_collections.FieldReference(None, field_type=str)
    c.data.image_shape = ml_collections.FieldReference(None, field_type=tuple)  # (H, W, C)
    c.data.class_names = ml_collections.FieldReference(None, field_type=tuple)
    c.data.num_classes = ml_collections.FieldReference(None, field_type=int)  # if no names
    # Per-channel statistics of [0, 1] pixels for the in-model normalisation
    # (None: the model sees raw pixels).
    c.data.mean = ml_collections.FieldReference(None, field_type=tuple)
    c.data.std = ml_collections.FieldReference(None, field_type=tuple)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.nesterov = False  # sgd
    c.optimizer.b1 = 0.9  # adam
    c.optimizer.b2 = 0.999  # adam
    c.optimizer.eps = 1e-8  # adam
    c.optimizer.weight_decay = 0.0  # L2 added to the gradient (PyTorch style)

    c.lr_schedule = ml_collections.ConfigDict()
    c.lr_schedule.name = "constant"  # constant | piecewise | cosine
    c.lr_schedule.boundaries_epochs = (100, 150)  # piecewise: multiply by decay_factor
    c.lr_schedule.decay_factor = 0.1
    c.lr_schedule.warmup_epochs = 0.0  # cosine: linear warm-up from 0 over these epochs

    c.epochs = 1
    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 1000
    c.seed = 0
    # Model kept for evaluation: 'last' epoch or 'best_val' (validation
    # accuracy). Never the test set (the reference code's selection bias).
    c.selection = "last"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # last N epochs (+ the best-val one)

    c.training = ml_collections.ConfigDict()
    c.training.method = "standard"  # standard | cot
    c.training.cot = ml_collections.ConfigDict()
    # COT's complement step: reference divides the batch mean by K.
    c.training.cot.complement_normalization = "num_classes"  # | log_k_minus_1 | none
    c.training.adversarial = ml_collections.ConfigDict()
    c.training.adversarial.enabled = False  # PGD adversarial training (Madry et al.)
    c.training.adversarial.eps = 0.3
    c.training.adversarial.steps = 40
    c.training.adversarial.step_size = 0.01
    c.training.adversarial.random_start = True
    c.training.adversarial.mix = 0.0  # fraction of natural examples per batch
    # Linear eps (and step) ramp from 0 over this many epochs; 0 = constant radius.
    c.training.adversarial.eps_warmup_epochs = 0.0

    # Read by experiments/evaluate.py, not by training.
    c.eval = ml_collections.ConfigDict()
    c.eval.pgd_eps = (0.3,)
    c.eval.pgd_steps = 40
    c.eval.pgd_step_size = 0.01
    c.eval.pgd_random_start = True

    c.eval_test_every_epoch = True  # logged only; never used for selection
    c.log_every_steps = 100  # device->host metric fetch / NaN check interval
    c.progress_bar = True
    return c
