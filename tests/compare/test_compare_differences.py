"""Differences to a baseline row on small hand-made grids: pairing, tests, Holm, P(improvement), seeds needed."""

from __future__ import annotations

import csv
import io
import statistics

import pytest
from scipy import stats as scipy_stats

from mbn.compare.aggregate import Grid, GridSpec, build_grid
from mbn.compare.collect import runset_from_records
from mbn.compare.differences import UnknownBaseline, compute_differences, format_differences, resolve_baselines
from mbn.compare.stats import PAIRED, WELCH, seeds_needed, t_test_power


def grid_of(cells: dict[tuple, dict[int, float]], metric: str = "final_test_acc1",
            rows: tuple[str, ...] = ("norm.name",)) -> Grid:
    """A grid from ``{(norm, m) or (norm, model, m): {seed: value}}``, one in-memory results record per run."""
    records = []
    for key, by_seed in cells.items():
        norm, *model, m = key
        for seed, value in by_seed.items():
            config = {"norm": {"name": norm}, "data": {"batch_size": m}, "seed": seed,
                      "model": {"name": model[0] if model else "resnet18"}}
            records.append((f"mem/{'-'.join(map(str, key))}-{seed}/results.json",
                            {"status": "completed", "config": config, "metrics": {metric: value}}))
    return build_grid(runset_from_records(records), GridSpec(rows=rows, metric=metric))


BN = {0: 0.80, 1: 0.70, 2: 0.75}
MBN = {2: 0.78, 0: 0.82, 1: 0.71}  # other insertion order: pairing must go by seed


def test_same_seeds_are_paired_by_seed():
    table = compute_differences(grid_of({("bn", 2): BN, ("mbn", 2): MBN}), "bn")
    difference = table.differences[(("mbn",), 2)]
    row, base = [MBN[s] for s in (0, 1, 2)], [BN[s] for s in (0, 1, 2)]
    reference = scipy_stats.ttest_rel(row, base)
    assert difference.test.method == PAIRED and difference.unpaired_reason == ""
    assert difference.mean_difference == pytest.approx(statistics.fmean(row) - statistics.fmean(base))
    assert difference.test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    ci = reference.confidence_interval()
    assert (difference.test.difference.low, difference.test.difference.high) == pytest.approx((ci.low, ci.high))
    assert difference.test.spread == pytest.approx(statistics.stdev([a - b for a, b in zip(row, base)]))
    assert difference.p_holm == pytest.approx(reference.pvalue)  # one column: nothing to adjust
    # all 9 pairs: 0.82 beats 3, 0.78 beats 2 (0.70, 0.75), 0.71 beats 1 (0.70)
    assert difference.prob_improvement == pytest.approx(6 / 9)
    assert "paired t (n=3)" in format_differences(table)


def test_mismatched_seeds_fall_back_to_welch_and_say_so():
    mbn = {0: 0.82, 1: 0.71, 3: 0.78}
    table = compute_differences(grid_of({("bn", 2): BN, ("mbn", 2): mbn}), "bn")
    difference = table.differences[(("mbn",), 2)]
    reference = scipy_stats.ttest_ind(list(mbn.values()), list(BN.values()), equal_var=False)
    assert difference.test.method == WELCH
    assert difference.test.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert difference.unpaired_reason == "seeds differ (mbn: 0, 1, 3; bn: 0, 1, 2)"
    text = format_differences(table)
    assert "Welch t (n=3, 3)" in text
    assert "mbn, m=2: Welch (unpaired), seeds differ (mbn: 0, 1, 3; bn: 0, 1, 2)" in text
    row = next(csv.DictReader(io.StringIO(format_differences(table, "csv"))))
    assert row["test"] == "Welch t" and row["unpaired_reason"].startswith("seeds differ")


def test_a_seed_with_two_runs_is_not_paired():
    runs = [("bn", 0, 0.80), ("bn", 1, 0.70), ("mbn", 0, 0.82), ("mbn", 0, 0.79), ("mbn", 1, 0.71)]
    records = [(f"mem/{i}/results.json", {"status": "completed", "metrics": {"final_test_acc1": v},
                                          "config": {"norm": {"name": n}, "data": {"batch_size": 2}, "seed": s}})
               for i, (n, s, v) in enumerate(runs)]
    grid = build_grid(runset_from_records(records), GridSpec())
    difference = compute_differences(grid, "bn").differences[(("mbn",), 2)]
    # n counts seeds: seed 0's two runs (of no common config hash) are one value, their mean.
    assert difference.test.method == WELCH and difference.test.n_x == 2
    assert difference.unpaired_reason == "seed 0 has several runs in the row cell"


def test_holm_adjusts_over_the_columns_of_each_row_only():
    cells = {("bn", 2): BN, ("bn", 8): BN, ("bn", 32): BN,
             ("gn", 2): {0: 0.84, 1: 0.73, 2: 0.79}, ("gn", 8): {0: 0.81, 1: 0.72, 2: 0.745},
             ("gn", 32): {0: 0.80, 1: 0.705, 2: 0.76},
             ("mbn", 2): {0: 0.90, 1: 0.79, 2: 0.86}, ("mbn", 8): {0: 0.9, 1: 0.6, 2: 0.8},
             ("mbn", 32): {0: 0.81, 1: 0.70, 2: 0.76}}
    table = compute_differences(grid_of(cells), "bn")
    for norm in ("gn", "mbn"):
        raw = [table.differences[((norm,), m)].test.p_value for m in (2, 8, 32)]
        # Holm by hand: the smallest p times 3, the next times 2 (at least the previous), the largest times 1
        order = sorted(range(3), key=raw.__getitem__)
        expected = [0.0] * 3
        running = 0.0
        for factor, index in zip((3, 2, 1), order):
            running = max(running, min(1.0, factor * raw[index]))
            expected[index] = running
        assert [table.differences[((norm,), m)].p_holm for m in (2, 8, 32)] == pytest.approx(expected)
    assert "Holm-Bonferroni adjusted over the tested columns of each row (at most 3)" in format_differences(table)


def test_seeds_needed_from_the_observed_spread_where_not_significant():
    bn = {0: 0.800, 1: 0.700, 2: 0.750, 3: 0.760}
    mbn = {0: 0.810, 1: 0.690, 2: 0.775, 3: 0.750}
    grid = grid_of({("bn", 2): bn, ("mbn", 2): mbn})
    table = compute_differences(grid, "bn", detect=1.0)
    difference = table.differences[(("mbn",), 2)]
    spread = statistics.stdev([mbn[s] - bn[s] for s in range(4)])
    n = difference.seeds_needed
    assert n == seeds_needed(0.01, spread, paired=True)  # 1 point = 0.01 in the stored fraction
    assert t_test_power(n, 0.01 / spread, True) >= 0.8 > t_test_power(n - 1, 0.01 / spread, True)
    assert not difference.significant
    assert table.verdict(difference) == f"not significant; detecting 1.00 points needs {n} seeds per cell"
    assert f"needs {n} seeds per cell" in format_differences(table)
    wider = compute_differences(grid, "bn", detect=4.0).differences[(("mbn",), 2)]
    assert wider.seeds_needed < n


def test_significant_difference_says_so():
    table = compute_differences(grid_of({("bn", 2): BN, ("mbn", 2): {s: v + 0.1 + 0.001 * s for s, v in BN.items()}}),
                                "bn")
    difference = table.differences[(("mbn",), 2)]
    assert difference.significant and table.verdict(difference) == "significant"


def test_one_seed_per_cell_gives_the_difference_but_invents_no_interval():
    table = compute_differences(grid_of({("bn", 2): {0: 0.70}, ("mbn", 2): {0: 0.75}}), "bn")
    difference = table.differences[(("mbn",), 2)]
    assert difference.mean_difference == pytest.approx(0.05)
    assert difference.test is None and difference.p_holm is None and difference.prob_improvement is None
    text = format_differences(table)
    assert "+5.00" in text and "intervals need >= 2 seeds per cell" in text
    assert "Intervals, p-values and P need >= 2 seeds per cell" in text
    row = next(csv.DictReader(io.StringIO(format_differences(table, "csv"))))
    assert row["diff_pct"] == "5" and row["diff_ci_low_pct"] == "" and row["p"] == ""


def test_empty_cell_has_no_difference():
    table = compute_differences(grid_of({("bn", 2): BN, ("bn", 8): BN, ("mbn", 2): MBN}), "bn")
    difference = table.differences[(("mbn",), 8)]
    assert difference.mean_difference is None and table.verdict(difference) == "no usable run in mbn"
    # Shown as one note, not a row of dashes; the CSV keeps every (row, column).
    text = format_differences(table)
    assert "mbn: nothing to compare at m = 8 (no usable run in mbn)" in text
    assert [line.split()[:2] for line in text.splitlines() if line.startswith("mbn ")] == [["mbn", "2"]]
    markdown = format_differences(table, "markdown")
    assert "| mbn | 8 |" not in markdown and "- mbn: nothing to compare at m = 8" in markdown
    assert [row["data.batch_size"] for row in csv.DictReader(io.StringIO(format_differences(table, "csv")))] == ["2", "8"]


def test_lower_is_better_metric_counts_a_lower_run_as_improvement():
    table = compute_differences(grid_of({("bn", 2): {0: 1.2, 1: 1.3}, ("mbn", 2): {0: 0.9, 1: 1.0}},
                                        metric="final_val_loss"), "bn")
    difference = table.differences[(("mbn",), 2)]
    assert difference.prob_improvement == 1.0
    assert difference.mean_difference == pytest.approx(-0.3)
    text = format_differences(table)
    assert "P(<bn)" in text and "-0.30" in text and "in final_val_loss units" in text
    assert "diff" in next(csv.DictReader(io.StringIO(format_differences(table, "csv"))))


MULTI = {("bn", "resnet18", 2): BN, ("mbn", "resnet18", 2): MBN, ("bn", "vgg11", 2): BN,
         ("mbn", "vgg11", 2): MBN, ("gn", "vgg11", 2): MBN, ("gn", "resnet50", 2): MBN}


def test_baseline_value_of_one_key_pairs_rows_with_the_same_other_keys():
    grid = grid_of(MULTI, rows=("norm.name", "model.name"))
    assert resolve_baselines(grid, "bn") == {
        ("mbn", "resnet18"): ("bn", "resnet18"), ("gn", "vgg11"): ("bn", "vgg11"), ("mbn", "vgg11"): ("bn", "vgg11"),
    }
    text = format_differences(compute_differences(grid, "bn"))
    assert "not compared (no bn row with the same other keys): gn / resnet50" in text


@pytest.mark.parametrize("label", ["bn / vgg11", "bn/vgg11", "bn,vgg11"])
def test_baseline_full_row_label_is_the_baseline_of_every_row(label):
    grid = grid_of(MULTI, rows=("norm.name", "model.name"))
    baselines = resolve_baselines(grid, label)
    assert set(baselines.values()) == {("bn", "vgg11")} and len(baselines) == len(grid.row_keys) - 1
    assert compute_differences(grid, label).baseline_label == "bn / vgg11"


def test_unknown_or_ambiguous_baseline_is_one_clear_error():
    grid = grid_of({("bn", 2): BN, ("mbn", 2): MBN})
    with pytest.raises(UnknownBaseline, match=r"^--baseline 'BN' matches no row; rows: bn, mbn$"):
        resolve_baselines(grid, "BN")
    ambiguous = grid_of({("bn", "bn", 2): BN, ("mbn", "resnet18", 2): MBN}, rows=("norm.name", "model.name"))
    with pytest.raises(UnknownBaseline, match="several row keys"):
        resolve_baselines(ambiguous, "bn")
    with pytest.raises(ValueError, match="detect"):
        compute_differences(grid, "bn", detect=0.0)


def test_every_format_carries_the_numbers():
    table = compute_differences(grid_of({("bn", 2): BN, ("mbn", 2): MBN, ("bn", 8): BN,
                                         ("mbn", 8): {0: 0.9, 1: 0.8, 2: 0.85}}), "bn")
    diff8 = f"{100 * (statistics.fmean([0.9, 0.8, 0.85]) - statistics.fmean(BN.values())):+.2f}"
    markdown = format_differences(table, "markdown")
    assert "| norm | m | diff | 95% CI | p | p (Holm) | P(>bn) | test | verdict |" in markdown
    assert f"| mbn | 8 | {diff8} |" in markdown
    latex = format_differences(table, "latex")
    assert "\\begin{tabular}" in latex and "95\\% CI" in latex and diff8 in latex
    html = format_differences(table, "html")
    assert '<table class="results differences">' in html and diff8 in html
    rows = list(csv.DictReader(io.StringIO(format_differences(table, "csv"))))
    assert [(r["norm.name"], r["data.batch_size"]) for r in rows] == [("mbn", "2"), ("mbn", "8")]
    assert float(rows[1]["diff_pct"]) == pytest.approx(float(diff8), abs=0.005)
    with pytest.raises(ValueError, match="'xml'"):
        format_differences(table, "xml")
