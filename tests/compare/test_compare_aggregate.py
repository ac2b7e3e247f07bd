"""The grid: cell statistics recomputed here with the statistics module from the fixture's numbers."""

from __future__ import annotations

import json
import statistics

import pytest

from fake_sweep import BATCH_SIZES, NORMS, write_fake_run
from mbn.compare.aggregate import GridSpec, build_grid, default_rows, exclusion_reasons
from mbn.compare.collect import collect_runs
from mbn.compare.problems import grid_notes, run_problems
from mbn.compare.table import caption


@pytest.mark.parametrize("metric", ["final_test_acc1", "final_val_acc1"])
def test_cells_are_mean_and_sample_std_over_completed_seeds(fake_sweep, metric):
    grid = build_grid(collect_runs([fake_sweep.root]), GridSpec(metric=metric))
    assert grid.row_keys == [(n,) for n in NORMS]
    assert grid.col_keys == list(BATCH_SIZES)
    for norm in NORMS:
        for m in BATCH_SIZES:
            values = fake_sweep.completed_values(norm, m, metric)
            cell = grid.cell((norm,), m)
            assert cell.n == len(values)
            assert cell.mean == pytest.approx(statistics.mean(values), abs=1e-12)
            assert cell.std == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_best_per_column_and_incomplete_cells(fake_sweep):
    grid = build_grid(collect_runs([fake_sweep.root]), GridSpec())
    for m in BATCH_SIZES:
        means = {norm: statistics.mean(fake_sweep.completed_values(norm, m)) for norm in NORMS}
        best = max(means, key=means.get)
        assert [norm for norm in NORMS if grid.cell((norm,), m).best] == [best]
    assert grid.max_n == 3
    incomplete = {(row[0], col) for (row, col), cell in grid.cells.items() if grid.is_incomplete(cell)}
    assert incomplete == {("bn", 2), ("bn", 8), ("gn", 32), ("mbn", 32)}
    assert grid.cell(("bn",), 8).missing_over == [1]
    assert grid.cell(("gn",), 32).missing_over == [1]


def test_every_run_is_in_a_cell_or_has_a_reason(fake_sweep):
    runset = collect_runs([fake_sweep.root])
    spec = GridSpec()
    grid = build_grid(runset, spec)
    reasons = exclusion_reasons(runset, spec)
    in_cells = sorted(i for cell in grid.cells.values() for i in cell.run_ids)
    assert in_cells == sorted(reasons.index[reasons.isna()])
    assert sorted(reasons.dropna()) == ["diverged", "failed", "running"]


def test_single_seed_has_no_std_and_loss_metric_prefers_lower(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    write_fake_run(tmp_path / "b", "mbn", 2, 0)
    runset = collect_runs([tmp_path])
    grid = build_grid(runset, GridSpec(metric="final_val_loss"))
    cells = [grid.cell((n,), 2) for n in ("bn", "mbn")]
    assert all(c.n == 1 and c.std is None for c in cells)
    assert grid.lower_is_better
    assert [c.best for c in cells] == [c.mean == min(x.mean for x in cells) for c in cells]


def test_empty_cell_when_all_its_runs_failed(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    write_fake_run(tmp_path / "b", "bn", 4, 0, status="failed")
    grid = build_grid(collect_runs([tmp_path]), GridSpec())
    assert grid.col_keys == [2, 4]
    assert grid.cell(("bn",), 4).n == 0 and not grid.cell(("bn",), 4).best


def test_completed_run_without_metric_or_key_is_excluded_with_reason(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    path = tmp_path / "a" / "results.json"
    data = json.loads(path.read_text())
    data["metrics"]["final_test_acc1"] = None
    path.write_text(json.dumps(data))
    runset = collect_runs([tmp_path])
    reasons = exclusion_reasons(runset, GridSpec())
    assert reasons.iloc[0].startswith("metric final_test_acc1 missing")


def test_runs_of_different_configs_with_one_seed_are_one_value_of_that_seed(tmp_path):
    """n counts seeds: the two configs' values of seed 0 are averaged (exact: the mean of two floats
    computed the same way), seed 1 is its own value."""
    a = write_fake_run(tmp_path / "a", "bn", 2, 0)
    b = write_fake_run(tmp_path / "b", "bn", 2, 0, dataset="other")
    c = write_fake_run(tmp_path / "c", "bn", 2, 1)
    grid = build_grid(collect_runs([tmp_path]), GridSpec())
    cell = grid.cell(("bn",), 2)
    assert cell.n == 2 and cell.duplicated_over == [0] and sorted(cell.run_over) == [0, 0, 1]
    values = dict(zip(cell.over_values, cell.values))
    metric = "final_test_acc1"
    assert values == {0: statistics.fmean([a["metrics"][metric], b["metrics"][metric]]), 1: c["metrics"][metric]}


def test_runs_of_one_config_hash_count_once_the_newest_completed_is_used(tmp_path):
    old = write_fake_run(tmp_path / "old", "bn", 2, 0)
    new = write_fake_run(tmp_path / "new", "bn", 2, 0)
    failed = write_fake_run(tmp_path / "failed", "bn", 2, 0, status="failed")
    assert old["config_hash"] == new["config_hash"] == failed["config_hash"]
    for name, finished in (("old", "2026-01-01T00:00:00+00:00"), ("new", "2026-02-01T00:00:00+00:00"),
                           ("failed", "2026-03-01T00:00:00+00:00")):
        path = tmp_path / name / "results.json"
        record = json.loads(path.read_text())
        record["finished_at"] = finished
        record["metrics"]["final_test_acc1"] = {"old": 0.1, "new": 0.5, "failed": None}[name]
        path.write_text(json.dumps(record))
    runset = collect_runs([tmp_path])
    grid = build_grid(runset, GridSpec())
    cell = grid.cell(("bn",), 2)
    assert cell.n == 1 and cell.values == [0.5] and not cell.duplicated_over
    reasons = exclusion_reasons(runset, GridSpec()).dropna()
    assert sorted(runset.runs.loc[reasons.index, "run_dir"]) == sorted(str(tmp_path / d) for d in ("old", "failed"))
    assert set(reasons) == {"duplicate"}


def test_default_rows_add_model_and_dataset_only_when_they_vary(tmp_path):
    write_fake_run(tmp_path / "a", "bn", 2, 0)
    write_fake_run(tmp_path / "b", "bn", 2, 1)
    assert default_rows(collect_runs([tmp_path])) == ("norm.name",)
    write_fake_run(tmp_path / "c", "bn", 2, 0, model="vgg11")
    runset = collect_runs([tmp_path])
    assert default_rows(runset) == ("norm.name", "model.name")
    grid = build_grid(runset, GridSpec(rows=default_rows(runset)))
    assert grid.row_keys == [("bn", "resnet18"), ("bn", "vgg11")]
    assert grid.cell(("bn", "resnet18"), 2).n == 2


def test_a_design_with_more_seeds_at_some_batch_sizes_is_complete_per_column(tmp_path):
    # The fair curve study's design: 5 seeds at m = 2, 3 at m = 32. A cell is compared with its column.
    for norm in ("bn", "mbn"):
        for seed in range(5):
            write_fake_run(tmp_path / f"{norm}-2-{seed}", norm, 2, seed)
        for seed in range(3 if norm == "bn" else 2):
            write_fake_run(tmp_path / f"{norm}-32-{seed}", norm, 32, seed)
    runset = collect_runs([tmp_path])
    grid = build_grid(runset, GridSpec())
    assert grid.expected_over == {2: [0, 1, 2, 3, 4], 32: [0, 1, 2]}
    assert (grid.column_max_n(2), grid.column_max_n(32), grid.max_n) == (5, 3, 5)
    incomplete = {(row[0], col) for (row, col), cell in grid.cells.items() if grid.is_incomplete(cell)}
    assert incomplete == {("mbn", 32)}
    assert grid.cell(("mbn",), 32).missing_over == [2]
    assert grid.cell(("bn",), 32).missing_over == []
    notes = grid_notes(grid, runset)
    assert [(note.kind, note.cell, note.detail) for note in notes] == [
        ("missing seeds", "norm=mbn, m=32", "n=2 of 3; seed=2 (no run found)")]
    footnote = caption(grid)
    assert "† = fewer runs than the fullest cell of its column (n=5 at m=2, n=3 at m=32)" in footnote


def test_cells_no_run_belongs_to_are_one_not_run_note_per_row_and_a_failed_cell_is_missing(tmp_path):
    # The peers' design: bn at every m, evonorm_s0 at m = 2 and 32 only, frn's m = 8 cell tried and failed.
    for m in (2, 8, 32):
        write_fake_run(tmp_path / f"bn-{m}", "bn", m, 0)
    for m in (2, 32):
        write_fake_run(tmp_path / f"s0-{m}", "evonorm_s0", m, 0)
    write_fake_run(tmp_path / "frn-2", "frn", 2, 0)
    write_fake_run(tmp_path / "frn-8", "frn", 8, 0, status="failed")
    runset = collect_runs([tmp_path])
    grid = build_grid(runset, GridSpec())
    notes = grid_notes(grid, runset, run_problems(runset, grid.spec))
    assert [(note.kind, note.cell, note.detail) for note in notes] == [
        ("not run", "norm=evonorm_s0", "m=8 (no run of any status)"),
        ("missing cell", "norm=frn, m=8", "no usable run; seed=0 (failed)"),
        ("not run", "norm=frn", "m=32 (no run of any status)"),
    ]
