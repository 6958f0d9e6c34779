"""The targets of ``python -m experiments.reproduce``, one module per kind.

* :mod:`~experiments.targets.common`: runs (``make_run``, ``train_run``),
  evaluations with reuse (``evaluate_run``) and output files (``header``,
  ``write_outputs``);
* :mod:`~experiments.targets.table_md`: the tables' markdown, from reports;
* :mod:`~experiments.targets.tables`: Tables 2-6;
* :mod:`~experiments.targets.figures`: Figures 1-4.

``experiments/reproduce.py`` is the CLI and the registry (``TARGETS``).
"""
