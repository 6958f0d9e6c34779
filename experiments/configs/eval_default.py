"""Evaluation settings: every field ``experiments.evaluation_api.evaluate_checkpoint`` reads.

One field per flag of ``python -m experiments.evaluate`` (same name; the two
negated flags are ``diagnostics`` and ``progress``). ``None`` means "the
run's own value" (its ``config.eval`` / ``config.selection``) or the paper's
default; ``evaluate_checkpoint`` resolves it and records what it used::

    from experiments.configs import eval_default
    from experiments.evaluation_api import evaluate_checkpoint
    cfg = eval_default.get_config()
    cfg.attacks, cfg.eps, cfg.n = ("fgsm", "pgd:margin"), (0.1, 0.3), 1000
    report = evaluate_checkpoint("runs/mnist_lenet5_gce", cfg)
"""

from __future__ import annotations

import ml_collections

DEFAULT_ATTACKS = ("fgsm", "bim", "pgd", "mim")  # the paper's Eqs. 4-7


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Attack names of gce_jax.attacks.ATTACKS, optionally name:loss (pgd:margin):
    # a tuple, or one comma-separated string (as on the command line).
    c.attacks = ml_collections.FieldReference(DEFAULT_ATTACKS, field_type=object)
    # L_inf budgets (a tuple, or a comma-separated string); None: config.eval.pgd_eps.
    c.eps = ml_collections.FieldReference(None, field_type=object)
    c.n = 10000  # test examples (a seeded random subset when fewer than the split)
    c.seed = 0  # subset selection and attack randomness
    c.reference_workdir = None  # XE run of the same architecture (transfer check)
    c.selection = None  # 'last' | 'best_val'; None: the run's config.selection
    c.batch_size = 500  # examples per attack call
    c.devices = None  # local devices per attack batch; None: all
    c.pgd_steps = None  # None: config.eval.pgd_steps
    c.pgd_step_size = None  # None: config.eval.pgd_step_size
    c.diagnostics = True  # the gradient-masking checks
    c.diag_eps = None  # eps of checks 2-6; None: grid eps nearest half clean accuracy
    # BIM/PGD/MIM freeze an example once it is misclassified, and a batch stops
    # once all are: robust accuracy can only drop (the first adversarial point
    # is kept), and a model broken in a few steps costs a few steps. Off: the
    # paper's fixed-step attacks.
    c.early_stop = False
    c.restarts = 5  # PGD restarts of the convergence check
    c.apgd_steps = 100  # APGD iterations, also AutoAttack's (AutoAttack: 100)
    c.square_queries = 5000  # Square queries, also AutoAttack's (AutoAttack: 5000)
    c.cw_binary_steps = None  # C&W-L2 binary steps; None: the paper's 9
    c.cw_steps = None  # C&W-L2 Adam steps per binary step; None: the paper's 1000
    # Where and how, not what: left out of the config hash (reuse ignores them).
    c.out = None  # output directory; None: results/<run_name>
    c.run_name = None  # name in the report; None: basename of the workdir
    c.progress = True  # tqdm bars
    return c
