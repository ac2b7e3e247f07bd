"""Figures: axes carry the data and labels; files are real PNG/SVG."""

from __future__ import annotations

import statistics
import xml.etree.ElementTree as ET

import pytest

from fake_sweep import BATCH_SIZES, NORMS, lam_schedule, tau_value, write_fake_run
from mbn.compare.aggregate import GridSpec, build_grid
from mbn.compare.collect import collect_runs
from mbn.compare.differences import compute_differences
from mbn.compare.plots import plot_curves, plot_differences, plot_mbn_schedule, plot_metric_vs_batch_size, row_styles, save_figure
from mbn.compare.stats import spread_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runset(fake_sweep):
    return collect_runs([fake_sweep.root])


@pytest.fixture
def grid(runset):
    return build_grid(runset, GridSpec())


def test_accuracy_vs_batch_size_has_log2_axis_lines_and_labels(fake_sweep, grid):
    fig = plot_metric_vs_batch_size(grid)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == list(BATCH_SIZES)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(m) for m in BATCH_SIZES]
    assert "batch size" in ax.get_xlabel() and "log2" in ax.get_xlabel()
    assert ax.get_ylabel() == "final_test_acc1 (%)" and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(NORMS)
    bn_line = ax.get_lines()[0]
    assert list(bn_line.get_xdata()) == list(BATCH_SIZES)
    expected = [100 * statistics.mean(fake_sweep.completed_values("bn", m)) for m in BATCH_SIZES]
    assert list(bn_line.get_ydata()) == pytest.approx(expected)


def test_curves_at_the_chosen_batch_size(fake_sweep, runset, grid):
    fig = plot_curves(runset, grid, 8)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "test_acc1 (%)" and "m=8" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bn (n=2)", "gn (n=3)", "mbn (n=3)"]
    mbn_line = ax.get_lines()[2]
    last_epoch = [100 * fake_sweep.results[("mbn", 8, s)]["history"][-1]["test_acc1"] for s in (0, 1, 2)]
    assert mbn_line.get_ydata()[-1] == pytest.approx(statistics.mean(last_epoch))
    assert plot_curves(runset, grid, 8, metric="no_such_key") is None
    assert plot_curves(runset, grid, 3) is None


def test_mbn_schedule_plots_lam_and_tau_per_batch_size(runset, grid):
    fig = plot_mbn_schedule(runset, grid)
    lam_ax, tau_ax = fig.axes
    assert [t.get_text() for t in lam_ax.get_legend().get_texts()] == [f"m={m}" for m in BATCH_SIZES]
    lam_m2 = lam_ax.get_lines()[0]
    assert list(lam_m2.get_ydata()) == pytest.approx([lam_schedule(e, 2) for e in (1, 2, 3, 4)], abs=1e-6)
    assert tau_ax.get_lines()[1].get_ydata()[0] == pytest.approx(tau_value(8), abs=1e-6)
    assert "λ" in lam_ax.get_ylabel() and "τ" in tau_ax.get_ylabel() and lam_ax.get_xlabel() == "epoch"


def test_no_mbn_run_no_schedule_plot(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    runset = collect_runs([tmp_path])
    assert plot_mbn_schedule(runset, build_grid(runset, GridSpec())) is None


def test_saved_png_and_svg_are_valid_files(grid, tmp_path):
    encoded = save_figure(plot_metric_vs_batch_size(grid), tmp_path / "plots", "acc")
    png, svg = tmp_path / "plots" / "acc.png", tmp_path / "plots" / "acc.svg"
    assert png.read_bytes() == encoded["png"] and svg.read_bytes() == encoded["svg"]
    assert encoded["png"].startswith(PNG_MAGIC) and len(encoded["png"]) > 5000
    root = ET.fromstring(encoded["svg"])
    assert root.tag.endswith("svg")
    assert "final_test_acc1" in svg.read_text()


def error_bar_ends(container):
    """(low, high) of each error bar of an ``ax.errorbar`` container, in plot order."""
    return [(segment[0][1], segment[1][1]) for segment in container.lines[2][0].get_segments()]


@pytest.mark.parametrize("interval, title", [("std", "mean ± std over seed"),
                                             ("ci95", "95% t confidence interval of the mean over seed"),
                                             ("bootstrap", "95% percentile-bootstrap interval")])
def test_error_bars_follow_the_interval_and_the_title_names_it(fake_sweep, grid, interval, title):
    ax = plot_metric_vs_batch_size(grid, interval).axes[0]
    assert title in ax.get_title()
    gn_bars = error_bar_ends(ax.containers[1])
    for m, (low, high) in zip(BATCH_SIZES, gn_bars):
        expected = spread_interval(fake_sweep.completed_values("gn", m), interval)
        assert (low, high) == pytest.approx((100 * expected.low, 100 * expected.high))
    if interval == "std":
        values = fake_sweep.completed_values("gn", 2)
        assert gn_bars[0][1] - gn_bars[0][0] == pytest.approx(2 * 100 * statistics.stdev(values))


def test_differences_plot_has_one_line_per_row_intervals_and_zero(fake_sweep, grid):
    table = compute_differences(grid, "bn")
    ax = plot_differences(table).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gn", "mbn"]
    assert "difference to bn" in ax.get_ylabel() and "points" in ax.get_ylabel()
    assert "95% t CI" in ax.get_title() and ax.get_xscale() == "log"
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())  # the zero line
    mbn = ax.containers[1]
    bn_means = [statistics.mean(fake_sweep.completed_values("bn", m)) for m in BATCH_SIZES]
    mbn_means = [statistics.mean(fake_sweep.completed_values("mbn", m)) for m in BATCH_SIZES]
    expected = [100 * (a - b) for a, b in zip(mbn_means, bn_means)]
    assert list(mbn.lines[0].get_ydata()) == pytest.approx(expected)
    assert list(mbn.lines[0].get_xdata()) == pytest.approx(list(BATCH_SIZES), rel=0.05)  # nudged sideways
    for m, (low, high) in zip(BATCH_SIZES, error_bar_ends(mbn)):
        test = table.differences[(("mbn",), m)].test
        assert (low, high) == pytest.approx((100 * test.difference.low, 100 * test.difference.high))


def test_no_difference_no_differences_plot(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    write_fake_run(tmp_path / "b", "mbn", 8, 0)
    grid = build_grid(collect_runs([tmp_path]), GridSpec())
    assert plot_differences(compute_differences(grid, "bn")) is None


def row_segments(ax, color):
    """(x data, linestyle) of the lines joining one row's points, told apart from error bars by having two points."""
    return [(list(line.get_xdata()), line.get_linestyle()) for line in ax.get_lines()
            if line.get_color() == color and len(line.get_xdata()) == 2 and line.get_linestyle() != "None"]


def test_a_row_is_dotted_across_the_columns_where_it_has_no_run(tmp_path):
    # BN at every m, FRN at m = 2 and 8 only (a peer of the curve study: its two ends, nothing between).
    for m in (2, 4, 8):
        write_fake_run(tmp_path / f"bn{m}", "bn", m, 0)
    for m in (2, 8):
        write_fake_run(tmp_path / f"frn{m}", "frn", m, 0)
    grid = build_grid(collect_runs([tmp_path]), GridSpec())
    fig = plot_metric_vs_batch_size(grid)
    ax = fig.axes[0]
    bn_color, frn_color = ax.containers[0].lines[0].get_color(), ax.containers[1].lines[0].get_color()
    assert row_segments(ax, bn_color) == [([2, 4], "-"), ([4, 8], "-")]
    assert row_segments(ax, frn_color) == [([2, 8], ":")]
    fig.draw_without_rendering()  # the legend sits right of the axes, over no point
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bn", "frn"]
    differences = plot_differences(compute_differences(grid, "bn")).axes[0]
    assert [style for _, style in row_segments(differences, frn_color)] == [":"]


def test_rows_of_two_keys_share_the_first_keys_color_and_differ_in_shape(tmp_path):
    # The grids' table: rows (norm, model); a norm keeps its color, the second key its marker and line.
    for norm in ("bn", "mbn"):
        for model in ("resnet18", "vgg11"):
            for m in (2, 8):
                write_fake_run(tmp_path / f"{norm}-{model}-{m}", norm, m, 0, model=model)
    grid = build_grid(collect_runs([tmp_path]), GridSpec(rows=("norm.name", "model.name")))
    styles = row_styles(grid)
    assert styles[("bn", "resnet18")].color == styles[("bn", "vgg11")].color != styles[("mbn", "resnet18")].color
    shape = {row: (style.marker, style.linestyle) for row, style in styles.items()}
    assert shape[("bn", "resnet18")] == shape[("mbn", "resnet18")] != shape[("bn", "vgg11")] == shape[("mbn", "vgg11")]
    ax = plot_metric_vs_batch_size(grid).axes[0]
    drawn = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines() if len(line.get_xdata()) == 2}
    assert {(style.color, style.linestyle) for style in styles.values()} <= drawn
    legend = ax.get_legend()  # its entries show each row's marker and line style, as drawn
    entries = {text.get_text(): (handle.get_marker(), handle.get_linestyle())
               for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert entries == {" / ".join(row): shape[row] for row in grid.row_keys}
    # One key: a color per row, as many as the palette has before a shape repeats one.
    single = build_grid(collect_runs([tmp_path]), GridSpec())
    assert len({style.color for style in row_styles(single).values()}) == len(single.row_keys) == 2
