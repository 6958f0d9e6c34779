"""Figures 2 and 3 computed from the library's losses."""

import numpy as np

from experiments import figures


def test_profile_along_diagonal_is_minus_pg_to_the_alpha():
    # With a flat complement the normalised complement term is exactly -1,
    # so Eq. 3 reduces to -p_g^alpha: an independent closed form.
    p = np.linspace(0.05, 0.99, 30)
    for alpha in (1.0, 1 / 3, 0.1):
        np.testing.assert_allclose(figures.gce_profile(p, alpha), -p**alpha, rtol=1e-4, atol=1e-5)


def test_complement_entropy_has_a_flat_valley_and_gce_does_not(tmp_path):
    out = figures.figure2(str(tmp_path), resolution=61)
    panels = out["panels"]
    assert panels["Complement Entropy"]["diagonal_loss_range"] < 1e-5
    assert panels["GCE, alpha=1/3"]["diagonal_loss_range"] > 0.1
    # GCE's low-loss region lies where class 0 is predicted; COT's does not.
    assert panels["GCE, alpha=1"]["low_loss_fraction_predicting_class0"] == 1.0
    assert panels["Complement Entropy"]["low_loss_fraction_predicting_class0"] < 0.6
    assert (tmp_path / "fig2_landscapes.png").stat().st_size > 10_000


def test_figure3_writes_png(tmp_path):
    out = figures.figure3(str(tmp_path))
    assert (tmp_path / "fig3_profile.png").exists()
    assert out["curves"]["0.1"]["loss_at_pg_0.1"] < out["curves"]["1"]["loss_at_pg_0.1"]
