"""Robustness evaluation: attack specs, the evaluator, gradient-masking diagnostics, the report.

Four modules, imported in one direction only (a module never imports one
after it, not even inside a function; ``tests/test_imports.py`` checks it)::

    specs  ->  evaluator  ->  diagnostics  ->  report

* :mod:`~gce_jax.robustness.specs`: :class:`AttackSpec`, :func:`paper_spec`
  (settings from ``gce_jax.attacks.defaults``), :func:`parse_attack_name`,
  :func:`resolved_settings`, :class:`EvaluationError`.
* :mod:`~gce_jax.robustness.evaluator`: :class:`Evaluator` runs a spec over
  a data set and returns an :class:`AttackResult` (a per-example robust mask
  and a JSON record); :func:`best_robust` is the per-example worst case.
* :mod:`~gce_jax.robustness.diagnostics`: the gradient-masking checks, each
  its own function returning a :class:`Check`, and :func:`run_diagnostics`.
* :mod:`~gce_jax.robustness.report`: ``robustness.json`` / ``robustness.md``.

Nothing here knows about checkpoints or the CLI; ``experiments/evaluate.py``
wires a trained model to this package.
"""

from gce_jax.robustness.diagnostics import (AUTOATTACK_COMPONENTS, CHECK_NAMES, CHECK_STEPS,
                                            FAIL, INFO, MIN_CORRECT_EXAMPLES, PASS, SKIPPED,
                                            THRESHOLDS, VERDICT_INCONCLUSIVE, VERDICT_MASKING,
                                            VERDICT_OK, ZERO_ACC_MAX, Check, Diagnostics,
                                            DiagnosticsConfig, autoattack_coverage,
                                            check_attack_budget, check_autoattack,
                                            check_black_box, check_convergence, check_curve,
                                            check_iterative, check_loss_sensitivity,
                                            check_transfer, check_worst_case,
                                            check_zero_gradients, choose_eps, extend_eps_grid,
                                            paired_excess, run_diagnostics, saturate,
                                            select_eps, verdict, zero_gradient_mask)
from gce_jax.robustness.evaluator import (RECORD_KEYS, AttackResult, EnsembleTally, Evaluator,
                                          best_robust, check_bounds, progress_name,
                                          to_float_images)
from gce_jax.robustness.report import (REPORT_KEYS, SCHEMA_VERSION, build_report,
                                       diagnostics_markdown, markdown_table, record_cells,
                                       report_to_json, report_to_markdown, success_cell,
                                       write_report)
from gce_jax.robustness.specs import (ATTACK_LOSSES, ATTACK_NORMS, BLACK_BOX_ATTACKS,
                                      DEFAULT_LOSS, DEFAULT_OBJECTIVE, ENSEMBLE_ATTACKS,
                                      EPS_FREE_ATTACKS, FIXED_OBJECTIVE, AttackSpec,
                                      EvaluationError, draws_targets, paper_spec,
                                      parse_attack_name, resolved_settings, to_jsonable)

__all__ = [
    "ATTACK_LOSSES", "ATTACK_NORMS", "AUTOATTACK_COMPONENTS", "BLACK_BOX_ATTACKS",
    "CHECK_NAMES", "CHECK_STEPS", "DEFAULT_LOSS", "DEFAULT_OBJECTIVE", "ENSEMBLE_ATTACKS",
    "EPS_FREE_ATTACKS", "FAIL", "FIXED_OBJECTIVE", "INFO", "MIN_CORRECT_EXAMPLES", "PASS",
    "RECORD_KEYS", "REPORT_KEYS", "SCHEMA_VERSION", "SKIPPED", "THRESHOLDS",
    "VERDICT_INCONCLUSIVE", "VERDICT_MASKING", "VERDICT_OK", "ZERO_ACC_MAX",
    "AttackResult", "AttackSpec", "Check", "Diagnostics", "DiagnosticsConfig",
    "EnsembleTally", "EvaluationError", "Evaluator", "autoattack_coverage", "best_robust",
    "build_report", "check_attack_budget", "check_autoattack", "check_black_box",
    "check_bounds", "check_convergence", "check_curve", "check_iterative",
    "check_loss_sensitivity", "check_transfer", "check_worst_case", "check_zero_gradients",
    "choose_eps", "diagnostics_markdown", "draws_targets", "extend_eps_grid",
    "markdown_table", "paired_excess", "paper_spec", "parse_attack_name", "progress_name",
    "record_cells", "report_to_json", "report_to_markdown", "resolved_settings",
    "run_diagnostics", "saturate", "select_eps", "success_cell", "to_float_images",
    "to_jsonable", "verdict", "write_report", "zero_gradient_mask",
]
