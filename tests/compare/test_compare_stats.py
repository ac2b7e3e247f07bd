"""mbn.compare.stats on small fixed samples: checked against hand computations, t-table values and scipy."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mbn.compare.stats import (
    BOOTSTRAP_SEED, PAIRED, WELCH, bootstrap_interval, holm_adjust, paired_t_test, probability_of_improvement,
    seeds_needed, spread_interval, t_interval, t_test_power, welch_t_test,
)

ROW = [0.812, 0.826, 0.804, 0.831]
BASE = [0.795, 0.801, 0.799, 0.815]


def test_t_interval_is_mean_plus_minus_t_quantile_times_standard_error():
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    # by hand: mean 2.5, s = sqrt(5/3), t(0.975, df=3) = 3.182 (t table)
    half = 3.182 * math.sqrt(5 / 3) / 2
    assert interval.estimate == 2.5
    assert interval.low == pytest.approx(2.5 - half, abs=1e-3) and interval.high == pytest.approx(2.5 + half, abs=1e-3)
    low, high = scipy_stats.t.interval(0.95, df=len(ROW) - 1, loc=np.mean(ROW), scale=scipy_stats.sem(ROW))
    assert (t_interval(ROW).low, t_interval(ROW).high) == pytest.approx((low, high), rel=1e-12)


@pytest.mark.parametrize("kind", ["std", "ci95", "bootstrap"])
def test_no_interval_from_fewer_than_two_values(kind):
    assert spread_interval([0.8], kind) is None and spread_interval([], kind) is None


def test_std_interval_is_mean_plus_minus_sample_std():
    interval = spread_interval(ROW, "std")
    assert interval.high - interval.estimate == pytest.approx(statistics.stdev(ROW), rel=1e-12)
    assert interval.estimate - interval.low == pytest.approx(statistics.stdev(ROW), rel=1e-12)
    with pytest.raises(ValueError, match="'sem'"):
        spread_interval(ROW, "sem")


def test_bootstrap_is_reproducible_and_agrees_with_scipy_percentile_bootstrap():
    first, second = bootstrap_interval(ROW), bootstrap_interval(ROW)
    assert first == second  # fixed seed: the same report twice
    # with 4 values the resampled means are few and the seed rarely shows; with 10 it does
    ten = [0.80 + 0.003 * i ** 1.5 for i in range(10)]
    assert bootstrap_interval(ten, seed=BOOTSTRAP_SEED + 1) != bootstrap_interval(ten)
    assert min(ROW) <= first.low < first.estimate < first.high <= max(ROW)
    assert first.estimate == pytest.approx(statistics.fmean(ROW))
    reference = scipy_stats.bootstrap((np.array(ROW),), np.mean, confidence_level=0.95, n_resamples=10_000,
                                      method="percentile", rng=np.random.default_rng(123)).confidence_interval
    # independent resamples: the ends agree to Monte Carlo error, well below the interval's width
    width = first.high - first.low
    assert first.low == pytest.approx(reference.low, abs=0.05 * width)
    assert first.high == pytest.approx(reference.high, abs=0.05 * width)
    assert bootstrap_interval([0.7, 0.7, 0.7]) == bootstrap_interval([0.7, 0.7, 0.7], seed=5)


def test_paired_test_matches_hand_computation_and_scipy():
    test = paired_t_test(ROW, BASE)
    differences = [a - b for a, b in zip(ROW, BASE)]
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    t_statistic = mean / (sd / math.sqrt(4))
    assert test.method == PAIRED and test.df == 3 and test.n_x == test.n_y == 4
    assert test.difference.estimate == pytest.approx(mean) and test.spread == pytest.approx(sd)
    assert test.p_value == pytest.approx(2 * scipy_stats.t.sf(t_statistic, 3), rel=1e-12)
    reference = scipy_stats.ttest_rel(ROW, BASE)
    assert test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    ci = reference.confidence_interval(0.95)
    assert (test.difference.low, test.difference.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_welch_test_matches_scipy_and_the_satterthwaite_df():
    row, base = ROW[:3], BASE
    test = welch_t_test(row, base)
    reference = scipy_stats.ttest_ind(row, base, equal_var=False)
    assert test.method == WELCH and (test.n_x, test.n_y) == (3, 4)
    assert test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert test.df == pytest.approx(reference.df, rel=1e-9)
    ci = reference.confidence_interval(0.95)
    assert (test.difference.low, test.difference.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    v1, v2 = statistics.variance(row) / 3, statistics.variance(base) / 4
    assert test.df == pytest.approx((v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 3))
    assert test.spread == pytest.approx(math.sqrt((statistics.variance(row) + statistics.variance(base)) / 2))


def test_tests_need_two_values_and_equal_lengths_when_paired():
    assert paired_t_test([0.8], [0.7]) is None
    assert welch_t_test([0.8], [0.7, 0.75]) is None
    with pytest.raises(ValueError, match="same length"):
        paired_t_test([0.8, 0.9], [0.7])


def test_constant_differences_are_exact():
    shifted = paired_t_test([1.5, 2.5, 3.0], [1.0, 2.0, 2.5])  # binary fractions: exact differences
    assert shifted.p_value == 0.0 and shifted.difference.low == shifted.difference.high == 0.5
    same = welch_t_test([0.5, 0.5], [0.5, 0.5])
    assert same.p_value == 1.0 and same.difference.estimate == 0.0


def test_holm_adjustment_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([0.2]) == [0.2] and holm_adjust([]) == []


def test_holm_is_monotone_in_the_raw_p_values_and_never_below_them():
    raw = [0.04, 0.001, 0.3, 0.012, 0.02, 0.9]
    adjusted = holm_adjust(raw)
    order = sorted(range(len(raw)), key=raw.__getitem__)
    assert [adjusted[i] for i in order] == sorted(adjusted)
    assert all(a >= p for a, p in zip(adjusted, raw)) and max(adjusted) <= 1.0
    assert adjusted[1] == pytest.approx(6 * 0.001)


def test_probability_of_improvement_counts_all_pairs_ties_half():
    # pairs (3,2) (3,2) win, (1,2) (1,2) lose, (2,2) (2,2) tie: (2 + 0 + 1) / 6
    assert probability_of_improvement([3.0, 1.0, 2.0], [2.0, 2.0]) == pytest.approx(0.5)
    assert probability_of_improvement([0.9, 0.8], [0.7, 0.85]) == pytest.approx(0.75)
    assert probability_of_improvement([0.9, 0.8], [0.7, 0.85], higher_is_better=False) == pytest.approx(0.25)
    u = scipy_stats.mannwhitneyu(ROW, BASE).statistic
    assert probability_of_improvement(ROW, BASE) == pytest.approx(u / (len(ROW) * len(BASE)))
    assert probability_of_improvement([], BASE) is None


@pytest.mark.parametrize("effect_size, paired, n", [
    (1.0, False, 17), (0.5, False, 64), (0.8, False, 26),  # Cohen (1988), two-sample, two-sided 5%, 80% power
    (0.5, True, 34),  # paired (one-sample) t, as G*Power gives it
])
def test_seeds_needed_matches_power_tables(effect_size, paired, n):
    assert seeds_needed(effect_size, 1.0, paired) == n
    assert t_test_power(n, effect_size, paired) >= 0.8 > t_test_power(n - 1, effect_size, paired)
    assert seeds_needed(2.0 * effect_size, 2.0, paired) == n  # only difference / spread matters


def test_power_of_the_two_sample_test_against_a_simulation():
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 1.0, size=(20_000, 10))
    y = rng.normal(0.0, 1.0, size=(20_000, 10))
    simulated = float(np.mean(scipy_stats.ttest_ind(x, y, axis=1).pvalue < 0.05))
    assert t_test_power(10, 1.0, paired=False) == pytest.approx(simulated, abs=0.01)


def test_seeds_needed_edge_cases():
    assert seeds_needed(1.0, 0.0, paired=True) == 2  # no spread: any difference shows at once
    assert seeds_needed(0.01, 1.0, paired=False, max_seeds=1000) is None
    # large n (no NaN from the noncentral t out there): close to the normal approximation 2 (z_a/2 + z_b)^2 / d^2
    n = seeds_needed(0.05, 1.0, paired=False)
    normal = 2 * (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) ** 2 / 0.05 ** 2
    assert normal <= n <= normal + 2
    assert t_test_power(n, 0.05, False) >= 0.8 > t_test_power(n - 1, 0.05, False)
    with pytest.raises(ValueError):
        seeds_needed(0.0, 1.0, paired=False)
