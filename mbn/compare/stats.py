"""Statistics over seeds: intervals of a cell's mean, tests of a difference, Holm adjustment, seeds needed.

Pure functions of small samples (one value per seed), in the metric's own units. Every interval and
test needs at least :data:`MIN_SEEDS` values per sample; below that the functions return None rather
than invent a spread.

- :func:`t_interval`: the t-based confidence interval of a mean.
- :func:`bootstrap_interval`: the percentile bootstrap interval of a mean, with a fixed seed
  (:data:`BOOTSTRAP_SEED`) so the same values always give the same interval.
- :func:`paired_t_test` / :func:`welch_t_test`: mean difference, its t interval and a two-sided p-value.
- :func:`holm_adjust`: Holm-Bonferroni adjusted p-values.
- :func:`probability_of_improvement`: P(X > Y) over all pairs of runs, ties counting 1/2 (rliable's definition).
- :func:`seeds_needed`: the smallest per-group n of a t-test with the wanted power, from the noncentral t.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

MIN_SEEDS = 2
CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_RESAMPLES = 10_000
# Fixed so that a report recomputed from the same runs shows the same bootstrap intervals.
BOOTSTRAP_SEED = 0
# Above this many seeds per cell the answer is "more than anyone will run"; it also bounds the search.
MAX_SEEDS = 100_000

PAIRED, WELCH = "paired t", "Welch t"

# What a table cell shows around its mean: the sample std (the paper's convention), the 95% t interval
# or the 95% percentile-bootstrap interval.
STD, CI95, BOOTSTRAP = "std", "ci95", "bootstrap"
INTERVALS = (STD, CI95, BOOTSTRAP)


@dataclass(frozen=True)
class Interval:
    """A confidence interval ``[low, high]`` around an estimate (same units as the data)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class DifferenceTest:
    """A two-sided t-test of ``mean(x) - mean(y)``.

    Attributes:
        method: :data:`PAIRED` (x[i] and y[i] come from the same seed) or :data:`WELCH` (unpaired,
            unequal variances).
        difference: the mean difference with its confidence interval.
        p_value: two-sided p-value of "no difference".
        df: degrees of freedom of the t distribution (Welch-Satterthwaite for Welch).
        spread: standard deviation the effect is measured against: of the paired differences, or the
            root mean square of the two sample stds (unpaired).
        n_x: number of values in x (pairs for a paired test).
        n_y: number of values in y.
    """

    method: str
    difference: Interval
    p_value: float
    df: float
    spread: float
    n_x: int
    n_y: int


def spread_interval(values: Sequence[float], kind: str = STD) -> Interval | None:
    """The interval a table cell shows around its mean (one of :data:`INTERVALS`).

    Args:
        values: one value per seed.
        kind: ``std`` (mean ± sample std), ``ci95`` (:func:`t_interval`) or ``bootstrap``
            (:func:`bootstrap_interval`).

    Returns:
        The interval, or None for fewer than :data:`MIN_SEEDS` values.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == STD:
        if len(values) < MIN_SEEDS:
            return None
        mean, std = statistics.fmean(values), statistics.stdev(values)
        return Interval(mean, mean - std, mean + std)
    if kind == CI95:
        return t_interval(values)
    if kind == BOOTSTRAP:
        return bootstrap_interval(values)
    raise ValueError(f"interval must be one of {INTERVALS}, got {kind!r}")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean ± t(n-1) quantile x s / sqrt(n), with s the sample std (ddof=1).

    Args:
        values: one value per seed.
        confidence: coverage of the interval.

    Returns:
        The interval, or None for fewer than :data:`MIN_SEEDS` values.
    """
    if len(values) < MIN_SEEDS:
        return None
    mean = statistics.fmean(values)
    half = _t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval | None:
    """Percentile bootstrap interval of the mean: the quantiles of the means of resamples with replacement.

    Args:
        values: one value per seed.
        confidence: coverage of the interval.
        resamples: number of bootstrap resamples.
        seed: seed of ``numpy.random.default_rng``; fixed by default so the interval is reproducible.

    Returns:
        The interval around the sample mean, or None for fewer than :data:`MIN_SEEDS` values.
    """
    if len(values) < MIN_SEEDS:
        return None
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(data.mean()), float(low), float(high))


def paired_t_test(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE) -> DifferenceTest | None:
    """Paired t-test of ``x - y`` (x[i] and y[i] measured with the same seed).

    Args:
        x: values of one row, in seed order.
        y: values of the baseline, in the same seed order.
        confidence: coverage of the interval of the mean difference.

    Returns:
        The test, or None for fewer than :data:`MIN_SEEDS` pairs.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    if len(x) != len(y):
        raise ValueError(f"paired samples must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < MIN_SEEDS:
        return None
    differences = [a - b for a, b in zip(x, y)]
    spread = statistics.stdev(differences)
    return _t_test(PAIRED, statistics.fmean(differences), spread / math.sqrt(n), n - 1, spread, n, n, confidence)


def welch_t_test(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE) -> DifferenceTest | None:
    """Welch's unpaired t-test of ``mean(x) - mean(y)`` (no equal-variance assumption).

    Args:
        x: values of one row.
        y: values of the baseline.
        confidence: coverage of the interval of the mean difference.

    Returns:
        The test, or None when either sample has fewer than :data:`MIN_SEEDS` values.
    """
    if len(x) < MIN_SEEDS or len(y) < MIN_SEEDS:
        return None
    var_x, var_y = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    se = math.sqrt(var_x + var_y)
    if se > 0:
        df = se ** 4 / (var_x ** 2 / (len(x) - 1) + var_y ** 2 / (len(y) - 1))
    else:  # both samples constant: no spread to estimate df from; the difference is exact either way
        df = float(len(x) + len(y) - 2)
    spread = math.sqrt((statistics.variance(x) + statistics.variance(y)) / 2.0)
    return _t_test(WELCH, statistics.fmean(x) - statistics.fmean(y), se, df, spread, len(x), len(y), confidence)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given), controlling the family-wise error rate.

    The i-th smallest of k p-values is multiplied by k - i + 1, the results made non-decreasing in
    that order and capped at 1; rejecting where the adjusted p < alpha is Holm's step-down procedure.

    Args:
        p_values: the raw p-values of one family of tests.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def probability_of_improvement(x: Sequence[float], y: Sequence[float], higher_is_better: bool = True) -> float | None:
    """P(a run of x is better than a run of y): the fraction of all (x_i, y_j) pairs where x_i wins, ties 1/2.

    This is the Mann-Whitney U statistic over len(x) * len(y), the definition of the rliable library; it
    uses every pair, so paired and unpaired cells get the same statistic.

    Args:
        x: values of one row.
        y: values of the baseline.
        higher_is_better: False for loss-like metrics (then a lower value wins).

    Returns:
        A number in [0, 1], or None when either sample is empty.
    """
    if not x or not y:
        return None
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1.0 if sign * (a - b) > 0 else 0.5 if a == b else 0.0 for a in x for b in y)
    return wins / (len(x) * len(y))


def t_test_power(n: int, effect_size: float, paired: bool, alpha: float = ALPHA) -> float:
    """Power of the two-sided t-test at level ``alpha`` with n per group, exact from the noncentral t.

    Args:
        n: seeds per group (pairs, for a paired test); at least 2.
        effect_size: true difference / standard deviation (of the paired differences when paired, of
            each group otherwise), Cohen's d.
        paired: paired (one-sample) test on n differences, else the two-sample test with n per group.
        alpha: significance level.
    """
    df = n - 1 if paired else 2 * n - 2
    noncentrality = effect_size * math.sqrt(n if paired else n / 2.0)
    critical = scipy_stats.t.ppf(1.0 - alpha / 2.0, df)
    upper = float(scipy_stats.nct.sf(critical, df, noncentrality))
    # A significant result in the wrong direction: scipy returns NaN when it is far below 1e-16 (large
    # noncentrality), where it adds nothing to the power.
    lower = float(scipy_stats.nct.cdf(-critical, df, noncentrality))
    return upper + (0.0 if math.isnan(lower) else lower)


def seeds_needed(difference: float, spread: float, paired: bool, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = MAX_SEEDS) -> int | None:
    """Smallest number of seeds per cell for which a t-test detects ``difference`` with ``power``.

    Args:
        difference: the difference to detect (same units as ``spread``), > 0.
        spread: the std the difference is measured against (see :attr:`DifferenceTest.spread`).
        paired: whether the cells would be compared by seed (paired test) or unpaired.
        alpha: two-sided significance level.
        power: wanted probability of a significant result when the difference is real.
        max_seeds: search limit.

    Returns:
        n >= 2, or None when even ``max_seeds`` seeds are not enough.

    Raises:
        ValueError: ``difference`` is not positive or ``spread`` is negative.
    """
    if difference <= 0 or spread < 0:
        raise ValueError(f"need difference > 0 and spread >= 0, got {difference} and {spread}")
    if spread == 0:  # no seed-to-seed variation: the smallest test already separates any difference
        return MIN_SEEDS
    effect_size = difference / spread
    # Power grows with n: double n until it suffices, then bisect between the last two.
    low, high = MIN_SEEDS - 1, MIN_SEEDS
    while t_test_power(high, effect_size, paired, alpha) < power:
        if high >= max_seeds:
            return None
        low, high = high, min(2 * high, max_seeds)
    while high - low > 1:
        middle = (low + high) // 2
        if t_test_power(middle, effect_size, paired, alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def _t_test(method: str, difference: float, se: float, df: float, spread: float, n_x: int, n_y: int,
            confidence: float) -> DifferenceTest:
    half = _t_quantile(confidence, df) * se
    if se > 0:
        p_value = float(2.0 * scipy_stats.t.sf(abs(difference) / se, df))
    else:  # every seed gives the same difference: it is exact, significant unless it is zero
        p_value = 1.0 if difference == 0 else 0.0
    return DifferenceTest(method=method, difference=Interval(difference, difference - half, difference + half),
                          p_value=p_value, df=df, spread=spread, n_x=n_x, n_y=n_y)


def _t_quantile(confidence: float, df: float) -> float:
    return float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df))
