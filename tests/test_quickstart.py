"""The README's main command, at a tiny budget."""

import numpy as np

from experiments import quickstart


def test_quickstart_trains_both_models_and_reports_every_column(tmp_path):
    rows, n, dataset = quickstart.run_quickstart(
        data_dir=None, epochs=3, workdir=str(tmp_path), n_eval=64, eps_values=[0.05, 0.3], seed=0)
    assert dataset == "digits" and n == 64
    assert set(rows) == {"XE", "GCE (alpha=1/3)"}
    for row in rows.values():
        assert row["clean"] > 50.0  # both learn something in 3 epochs
        # A stronger attack never leaves more examples correct than the clean set.
        assert row["PGD40-xe 0.3"] <= row["PGD40-xe 0.05"] <= row["clean"]
        assert row["PGD40-xe 0.3"] <= row["FGSM-xe 0.3"] + 1e-9
        assert all(0.0 <= v <= 100.0 for v in row.values())
    table = quickstart.format_table(rows)
    assert table.count("\n") == 3 and "PGD40-margin 0.05" in table
    assert (tmp_path / "quickstart_digits_gce" / "metrics.jsonl").exists()


def test_quickstart_config_uses_the_paper_recipe():
    c = quickstart.quickstart_config("gce", data_dir=None, epochs=None, seed=3)
    assert (c.loss, c.model, c.optimizer.name, c.batch_size) == ("gce", "lenet5", "adam", 64)
    assert np.isclose(c.alpha, 1 / 3) and c.data.resize == (28, 28) and c.seed == 3
    assert c.selection != "test"
