"""FAB L_inf: the box-constrained hyperplane projection and the attack's
distances on linear models, where the minimal distance is known (closed form,
or a linear program solved by scipy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog
from test_autoattack import D, K_LIN, linear_model, linf, predict

from gce_jax import attacks as A
from gce_jax.attacks.fab import linf_hyperplane_projection


def min_linf_lp(x, a, c):
    """Smallest L_inf distance from ``x`` to {z in [0,1]^d : a.z >= c} (an LP)."""
    d = len(x)
    # Variables (delta, s): minimise s; |delta_i| <= s; a.(x + delta) >= c; box.
    res = linprog(np.r_[np.zeros(d), 1.0],
                  A_ub=np.block([[np.eye(d), -np.ones((d, 1))],
                                 [-np.eye(d), -np.ones((d, 1))],
                                 [-a[None], np.zeros((1, 1))]]),
                  b_ub=np.r_[np.zeros(2 * d), a @ x - c],
                  bounds=[(-x[i], 1 - x[i]) for i in range(d)] + [(0, None)])
    return res.fun if res.status == 0 else np.inf


# --------------------------------------------------------------- projection
def test_linf_hyperplane_projection_solves_the_linear_program():
    rng = np.random.RandomState(1)
    n, d = 40, 7
    t = rng.uniform(0, 1, (n, d)).astype(np.float32)
    t[:5, :2] = 0.0  # on the box faces
    t[5:10, :2] = 1.0
    w = rng.randn(n, d).astype(np.float32)
    w[::4, :3] = 0.0  # coordinates the hyperplane ignores
    b = (np.sum(w * t, 1) + 2.0 * rng.randn(n)).astype(np.float32)
    delta = np.asarray(linf_hyperplane_projection(jnp.asarray(t), jnp.asarray(w),
                                                  jnp.asarray(b)))
    assert np.all(t + delta >= -1e-6) and np.all(t + delta <= 1 + 1e-6)
    np.testing.assert_array_equal(delta[w == 0], 0.0)
    n_infeasible = 0
    for i in range(n):
        res = linprog(np.r_[np.zeros(d), 1.0],
                      A_ub=np.block([[np.eye(d), -np.ones((d, 1))],
                                     [-np.eye(d), -np.ones((d, 1))]]),
                      b_ub=np.zeros(2 * d), A_eq=np.r_[w[i], 0.0][None],
                      b_eq=[b[i] - w[i] @ t[i]],
                      bounds=[(-t[i, j], 1 - t[i, j]) for j in range(d)] + [(0, None)])
        if res.status == 0:
            assert np.abs(delta[i]).max() == pytest.approx(res.fun, rel=1e-4, abs=1e-6)
            assert w[i] @ (t[i] + delta[i]) == pytest.approx(b[i], rel=1e-4, abs=1e-4)
        else:  # the hyperplane misses the box: the nearest corner towards it
            n_infeasible += 1
            side = np.sign(b[i] - w[i] @ t[i]) * np.sign(w[i])
            np.testing.assert_allclose(t[i] + delta[i],
                                       np.where(side > 0, 1.0, np.where(side < 0, 0.0, t[i])),
                                       atol=1e-6)
    assert 0 < n_infeasible < n // 2


# ---------------------------------------------------------------------- FAB
def test_fab_distance_matches_the_closed_form_on_a_linear_model():
    """Linear logits z = W^T x + b, x far from the box faces: the minimal
    L_inf distance is min_j (z_y - z_j) / ||w_y - w_j||_1 (Hölder)."""
    fn, w, b = linear_model(0, scale=0.5)
    x = np.random.RandomState(1).uniform(0.45, 0.55, (9, D)).astype(np.float32)
    z = x @ w + b
    y = z.argmax(1).astype(np.int32)
    d_star = np.array([min((z[i, y[i]] - z[i, j]) / np.abs(w[:, y[i]] - w[:, j]).sum()
                           for j in range(K_LIN) if j != y[i]) for i in range(len(x))])
    assert d_star.max() < 0.4  # the box is not active: the closed form holds
    for targeted in (False, True):  # FAB-T with every wrong class as a target
        out = A.fab(fn, x, y, key=jax.random.key(0), eps=1.0, targeted=targeted,
                    n_target_classes=K_LIN - 1)
        dist = linf(out, x)
        assert np.all(predict(fn, out) != y)
        # No adversarial point is nearer than the boundary; FAB gets within 1%.
        assert np.all(dist >= d_star * (1 - 1e-4)), (dist, d_star)
        assert np.all(dist <= d_star * 1.01), dist / d_star

    # Fixed eps: the result is in the ball, and an example is broken iff its
    # boundary is within eps (allowing FAB's 1%).
    eps = float(np.median(d_star))
    out = A.fab(fn, x, y, key=jax.random.key(0), eps=eps, targeted=True,
                n_target_classes=K_LIN - 1)
    assert linf(out, x).max() <= eps + 1e-6
    fooled = predict(fn, out) != y
    np.testing.assert_array_equal(fooled[d_star > eps], False)
    np.testing.assert_array_equal(fooled[d_star < eps / 1.01], True)


def test_fab_distance_matches_the_linear_program_when_the_box_is_active():
    """Two classes, points near the box faces: the box constraint decides the
    distance; the LP over box and half-space is the known answer."""
    fn, w, b = linear_model(2, k=2, scale=0.5)
    rng = np.random.RandomState(3)
    x = np.where(rng.rand(7, D) < 0.5, rng.uniform(0, 0.05, (7, D)),
                 rng.uniform(0.95, 1, (7, D))).astype(np.float32)
    y = (x @ w + b).argmax(1).astype(np.int32)
    a = w[:, 1 - y].T - w[:, y].T  # misclassified iff a . z >= c
    c = b[y] - b[1 - y]
    want = np.array([min_linf_lp(x[i].astype(np.float64), a[i], c[i])
                     for i in range(len(x))])
    reachable = np.isfinite(want)
    assert reachable.sum() >= 3
    unconstrained = (x @ w + b)[np.arange(7), y] - (x @ w + b)[np.arange(7), 1 - y]
    unconstrained = unconstrained / np.abs(a).sum(1)
    assert np.any(want[reachable] > unconstrained[reachable] * 1.05)  # the box matters
    out = A.fab(fn, x, y, key=jax.random.key(1), eps=1.0)
    dist = linf(out, x)
    fooled = predict(fn, out) != y
    np.testing.assert_array_equal(fooled, reachable)
    assert np.all(dist[reachable] >= want[reachable] * (1 - 1e-4))
    assert np.all(dist[reachable] <= want[reachable] * 1.01), dist / want
