import json

import numpy as np
import pytest
from scipy import stats

from experiments.theory import theorem2


def test_loss_derivatives_match_finite_differences():
    z = np.linspace(-5, 5, 11)
    h = 1e-5
    np.testing.assert_allclose(theorem2.loss_d1(z), (theorem2.loss(z + h) - theorem2.loss(z - h)) / (2 * h), atol=1e-8)
    np.testing.assert_allclose(theorem2.loss_d2(z), (theorem2.loss_d1(z + h) - theorem2.loss_d1(z - h)) / (2 * h),
                               atol=1e-8)


def test_inverse_sqrt_moments_are_exact_and_infinite_where_they_diverge():
    rng = np.random.default_rng(0)
    for m in (5, 8, 32):
        u = 1.0 / np.sqrt(rng.chisquare(m - 1, 2_000_000) / m)
        first, second = theorem2.inverse_sqrt_moments(m)
        assert first == pytest.approx(u.mean(), rel=2e-3)
        assert second == pytest.approx(m / (m - 3))
    assert theorem2.inverse_sqrt_moments(2) == (np.inf, np.inf)
    first, second = theorem2.inverse_sqrt_moments(3)
    assert np.isfinite(first) and second == np.inf
    with pytest.raises(ValueError, match="m must be >= 2"):
        theorem2.inverse_sqrt_moments(1)


def test_quadrature_agrees_with_monte_carlo():
    xs = np.array([-1.0, 0.5])
    mean, se = theorem2.monte_carlo(xs, 8, 400_000, np.random.default_rng(0))
    for x, mc, err in zip(xs, mean, se):
        assert abs(theorem2.quadrature(float(x), 8) - mc) < 4 * err
    with pytest.raises(ValueError, match="m must be >= 3"):
        theorem2.quadrature(0.0, 2)


def test_in_batch_m2_normalizes_to_plus_minus_one():
    # With m = 2, BN maps x to sign(x - other) exactly: E[l] = P(other < x) l(1) + P(other > x) l(-1).
    xs = np.array([-1.0, 0.0, 1.5])
    mean, se = theorem2.monte_carlo(xs, 2, 200_000, np.random.default_rng(0), in_batch=True)
    p = stats.norm.cdf(xs)
    expected = p * theorem2.loss(1.0) + (1 - p) * theorem2.loss(-1.0)
    assert np.all(np.abs(mean - expected) < 4 * se + 1e-12)


def test_second_order_expansion_error_shrinks_like_1_over_m_squared():
    xs = np.array(theorem2.TABLE_X)
    rel = {}
    for m in (16, 64):
        terms = theorem2.expansion_terms(xs, m)
        exact = np.array([theorem2.quadrature(float(x), m) for x in xs])
        second = terms["R_add"] + terms["R_mul"]
        remainder = exact - theorem2.loss(xs) - second
        rel[m] = np.abs(remainder) / (np.abs(terms["R_add"]) + np.abs(terms["R_mul"]))
    assert np.all(rel[64] < 0.1)
    assert np.all(rel[64] < rel[16])
    # The expansion's exact moments diverge at m <= 3 (E[1/xi_sigma] = inf), except at x = 0.
    terms = theorem2.expansion_terms(np.array([-1.0, 0.0]), 3)
    assert terms["R_mul"][0] == np.inf and terms["R_mul"][1] == 0.0


@pytest.mark.slow
def test_command_quick(tmp_path):
    out = tmp_path / "theorem2"
    result = theorem2.main(["--out", str(out), "--quick"])
    for name in ("theorem2.csv", "summary.json", "theorem2.png"):
        assert (out / name).is_file(), name
    assert (out / "theorem2.png").stat().st_size < 200_000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["samples"] == 50_000
    rows = [r for r in result["rows"] if r["x"] == -1.0 and r["m"] >= 3]
    gaps = [r["gap"] for r in sorted(rows, key=lambda r: r["m"])]
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:]))  # the regularization grows as m shrinks
    assert all(r["quadrature"] == np.inf for r in result["rows"] if r["m"] == 2)
