"""Table rendering: the numbers in every format match statistics computed here from the fixture."""

from __future__ import annotations

import csv
import io
import statistics

import pytest
from scipy import stats as scipy_stats

from fake_sweep import BATCH_SIZES, NORMS, write_fake_run
from mbn.compare.aggregate import GridSpec, build_grid
from mbn.compare.collect import collect_runs
from mbn.compare.stats import INTERVALS, bootstrap_interval
from mbn.compare.table import format_table


@pytest.fixture
def grid(fake_sweep):
    return build_grid(collect_runs([fake_sweep.root]), GridSpec())


def expected_cell(fake_sweep, norm, m):
    values = fake_sweep.completed_values(norm, m)
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"


def best_norm(fake_sweep, m):
    return max(NORMS, key=lambda norm: statistics.mean(fake_sweep.completed_values(norm, m)))


def test_text_table(fake_sweep, grid):
    text = format_table(grid, "text")
    lines = text.splitlines()
    assert lines[1].split() == ["norm", "m=2", "m=8", "m=32"]
    for norm in NORMS:
        line = next(line for line in lines if line.startswith(norm + " "))
        for m in BATCH_SIZES:
            cell = expected_cell(fake_sweep, norm, m)
            assert cell in line
            rest = line.split(cell, 1)[1]
            assert rest.startswith("*") == (best_norm(fake_sweep, m) == norm)
    bn_line = next(line for line in lines if line.startswith("bn "))
    assert bn_line.count("†") == 2  # m=2 (failed seed) and m=8 (missing seed)


def test_markdown_table(fake_sweep, grid):
    text = format_table(grid, "markdown")
    lines = text.splitlines()
    assert lines[0] == "| norm | m=2 | m=8 | m=32 |"
    assert lines[1] == "|:---|---:|---:|---:|"
    for m in BATCH_SIZES:
        norm = best_norm(fake_sweep, m)
        assert f"**{expected_cell(fake_sweep, norm, m)}**" in text
    gn_line = next(line for line in lines if line.startswith("| gn |"))
    assert gn_line.rstrip(" |").endswith("†")  # gn m=32 lost its diverged seed


def test_latex_table(fake_sweep, grid):
    text = format_table(grid, "latex")
    assert "\\begin{tabular}{lccc}" in text and "\\toprule" in text and "\\bottomrule" in text
    m = 8
    cell = expected_cell(fake_sweep, best_norm(fake_sweep, m), m).replace("±", "$\\pm$")
    assert f"\\textbf{{{cell}}}" in text
    assert "$^\\dagger$" in text
    assert text.count("\\\\") == 1 + len(NORMS)


def test_csv_parses_back_to_the_numbers(fake_sweep, grid):
    rows = list(csv.DictReader(io.StringIO(format_table(grid, "csv"))))
    assert len(rows) == len(NORMS) * len(BATCH_SIZES)
    for row in rows:
        values = fake_sweep.completed_values(row["norm.name"], int(row["data.batch_size"]))
        assert row["metric"] == "final_test_acc1"
        assert float(row["mean_pct"]) == pytest.approx(100 * statistics.mean(values), rel=1e-5)
        assert float(row["std_pct"]) == pytest.approx(100 * statistics.stdev(values), rel=1e-5)
        assert int(row["n"]) == len(values)
        assert row["best"] == str(best_norm(fake_sweep, int(row["data.batch_size"])) == row["norm.name"])
        assert row["incomplete"] == str(len(values) < 3)
    bn8 = next(r for r in rows if r["norm.name"] == "bn" and r["data.batch_size"] == "8")
    assert bn8["seed"] == "0;2" and bn8["missing_seed"] == "1"


def test_single_run_cell_shows_no_std(tmp_path):
    results = write_fake_run(tmp_path / "a", "bn", 2, 0)
    grid = build_grid(collect_runs([tmp_path]), GridSpec())
    text = format_table(grid, "text")
    assert f"{100 * results['metrics']['final_test_acc1']:.2f} (1)*" in text
    assert "± " not in text.splitlines()[-1]


def test_unknown_format_is_rejected(grid):
    with pytest.raises(ValueError, match="'xml'"):
        format_table(grid, "xml")


def t_half_width_pct(values):
    return 100 * scipy_stats.t.ppf(0.975, len(values) - 1) * scipy_stats.sem(values)


def test_ci95_cells_are_mean_plus_minus_the_t_half_width(fake_sweep, grid):
    text = format_table(grid, "text", interval="ci95")
    assert "mean ± half-width of the 95% t confidence interval of the mean over seed" in text.splitlines()[0]
    for norm in NORMS:
        for m in BATCH_SIZES:
            values = fake_sweep.completed_values(norm, m)
            mean = 100 * statistics.mean(values)
            assert f"{mean:.2f} ± {t_half_width_pct(values):.2f} ({len(values)})" in text


def test_bootstrap_cells_show_both_ends_and_are_reproducible(fake_sweep, grid):
    text = format_table(grid, "markdown", interval="bootstrap")
    assert text == format_table(grid, "markdown", interval="bootstrap")
    assert "95% percentile-bootstrap interval of the mean over seed (10000 resamples, numpy seed 0)" in text
    values = fake_sweep.completed_values("gn", 8)
    interval = bootstrap_interval(values)
    assert f"{100 * statistics.mean(values):.2f} [{100 * interval.low:.2f}, {100 * interval.high:.2f}] (3)" in text


def test_csv_with_an_interval_has_its_ends(fake_sweep, grid):
    rows = list(csv.DictReader(io.StringIO(format_table(grid, "csv", interval="ci95"))))
    for row in rows:
        values = fake_sweep.completed_values(row["norm.name"], int(row["data.batch_size"]))
        assert row["interval"] == "ci95"
        assert float(row["low_pct"]) == pytest.approx(100 * statistics.mean(values) - t_half_width_pct(values), rel=1e-5)
        assert float(row["high_pct"]) == pytest.approx(100 * statistics.mean(values) + t_half_width_pct(values), rel=1e-5)
    assert "low_pct" not in format_table(grid, "csv").splitlines()[0]


@pytest.mark.parametrize("interval", INTERVALS)
def test_single_seed_cells_say_intervals_need_two_seeds(tmp_path, interval):
    single = write_fake_run(tmp_path / "a", "bn", 2, 0)["metrics"]["final_test_acc1"]
    write_fake_run(tmp_path / "b", "bn", 8, 0)
    write_fake_run(tmp_path / "c", "bn", 8, 1)
    text = format_table(build_grid(collect_runs([tmp_path]), GridSpec()), "text", interval=interval)
    assert "cells with n=1 show no interval (intervals need >= 2 seeds)" in text.splitlines()[0]
    m2, m8 = text.splitlines()[-1].split("(1)")
    assert m2.split() == ["bn", f"{100 * single:.2f}"]  # the mean alone
    assert ("[" if interval == "bootstrap" else "±") in m8 and m8.rstrip(" *†").endswith("(2)")


def test_unknown_interval_is_rejected(grid):
    with pytest.raises(ValueError, match="'sem'"):
        format_table(grid, "text", interval="sem")
