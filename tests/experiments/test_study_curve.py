"""The fair curve study's tuning rule (experiments/batch_size_study/curve.py) and its seeds' commands:
the protocol of EXPERIMENTS.md ("The paper's figure, fairly") applied to hand-made grid records."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from experiments.batch_size_study import curve
from experiments.batch_size_study import run as study
from mbn.results import write_results


def record(sweep: Path, norm: str, m: int, factor: float, val_acc1: float | None, seed: int = 0, status: str = "completed",
           dir_suffix: str = "") -> None:
    name = f"data.batch_size={m},norm={norm},optim.base_lr={curve.base_lr_of(factor):g}" + (f",seed={seed}" if seed else "") + dir_suffix
    config = {"norm": {"name": norm}, "data": {"batch_size": m}, "optim": {"base_lr": curve.base_lr_of(factor)}, "seed": seed}
    write_results(sweep / name, {"status": status, "config": config, "metrics": {"final_val_acc1": val_acc1}})


def test_an_inner_best_factor_is_chosen_and_ties_go_to_the_linear_scaling_rule():
    assert curve.tune({0.3: 0.50, 1.0: 0.61, 3.0: 0.64, 10.0: 0.40}) == curve.Tuned(3.0)
    assert curve.tune({0.3: 0.50, 1.0: 0.64, 3.0: 0.64, 10.0: 0.40}) == curve.Tuned(1.0)


def test_a_best_factor_at_an_edge_extends_the_grid_once_and_then_takes_the_best_of_it():
    assert curve.tune({0.3: 0.70, 1.0: 0.61, 3.0: 0.64, 10.0: 0.40}) == curve.Tuned(None, extension=0.1)
    assert curve.tune({0.3: 0.50, 1.0: 0.61, 3.0: 0.64, 10.0: 0.66}) == curve.Tuned(None, extension=30.0)
    # Extended once: its best is taken, at the new edge too (no second extension).
    assert curve.tune({0.1: 0.72, 0.3: 0.70, 1.0: 0.61, 3.0: 0.64, 10.0: 0.40}) == curve.Tuned(0.1)
    assert curve.tune({0.1: 0.69, 0.3: 0.70, 1.0: 0.61, 3.0: 0.64, 10.0: 0.40}) == curve.Tuned(0.3)
    assert curve.tune({0.3: 0.5, 3.0: 0.6}) == curve.Tuned(None, missing=(1.0, 10.0))


@pytest.mark.parametrize("factor_2, factor_32, expected", [
    (1.0, 1.0, {4: 1.0, 8: 1.0, 16: 1.0}),
    # log-linear from 0.3 to 3: 0.53 (nearer 0.3 in log), 0.95 -> 1, 1.69 (nearer 1 than 3 in log: 0.52 < 0.57)
    (0.3, 3.0, {4: 0.3, 8: 1.0, 16: 1.0}),
    (10.0, 0.3, {4: 3.0, 8: 1.0, 16: 1.0}),  # m = 8: exactly between 1 and 3 in log: 1
])
def test_the_factor_between_the_tuned_batch_sizes_is_log_interpolated_and_snapped(factor_2, factor_32, expected):
    for m, factor in expected.items():
        assert curve.interpolated_factor(factor_2, factor_32, m) == factor, m
    values = sorted({*curve.GRID, *curve.EXTENSION.values()})
    for m in (4, 8, 16):  # the snap is the nearest value in log
        t = (math.log2(m) - 1) / 4
        target = (1 - t) * math.log(factor_2) + t * math.log(factor_32)
        chosen = curve.interpolated_factor(factor_2, factor_32, m)
        assert all(abs(math.log(chosen) - target) <= abs(math.log(v) - target) + 1e-9 for v in values)


def test_grid_records_give_every_norms_factors_and_mbn_takes_bns_at_32(tmp_path):
    sweep = tmp_path / "study_curve"
    accuracies = {0.3: 0.55, 1.0: 0.60, 3.0: 0.62, 10.0: 0.30}
    for norm in curve.NORMS:
        for m in curve.TUNED_BATCH_SIZES:
            if (norm, m) != ("mbn", 32):
                for factor, value in accuracies.items():
                    record(sweep, norm, m, factor, value + (0.1 if (norm, m, factor) == ("gn", 2, 1.0) else 0.0))
    # Not grid evidence: another seed, a failed run, a batch size that is not tuned.
    record(sweep, "bn", 2, 10.0, 0.99, seed=1)
    record(sweep, "bn", 32, 10.0, 0.99, status="failed", dir_suffix=",trainer.num_threads=2")
    record(sweep, "bn", 8, 10.0, 0.99)
    scores = curve.grid_scores(sweep)
    assert scores[("bn", 2)] == accuracies and ("bn", 8) not in scores
    factors, pending = curve.choose_factors(scores)
    assert pending and all(line.split()[0] in curve.PEERS for line in pending)  # the peers' grids have not run
    assert set(factors) == set(curve.NORMS)
    assert factors["bn"] == {2: 3.0, 4: 3.0, 8: 3.0, 16: 3.0, 32: 3.0}
    assert factors["gn"] == {2: 1.0, 4: 1.0, 8: 1.0, 16: 3.0, 32: 3.0}  # m = 8 a tie in log: 1
    assert factors["mbn"][32] == factors["bn"][32]


def test_a_diverged_grid_run_scores_below_every_completed_one_and_is_shown_as_diverged(tmp_path, capsys):
    sweep = tmp_path / "study_curve"
    for factor, value in {0.3: 0.58, 1.0: 0.56}.items():
        record(sweep, "evonorm_s0", 32, factor, value)
    for factor in (3.0, 10.0):  # a non-finite loss: the record is final and has no validation accuracy
        record(sweep, "evonorm_s0", 32, factor, None, status="diverged")
    scores = curve.grid_scores(sweep)[("evonorm_s0", 32)]
    assert scores[3.0] == scores[10.0] == curve.DIVERGED_SCORE < min(scores[0.3], scores[1.0])
    assert curve.tune(scores) == curve.Tuned(None, extension=0.1)  # the best, 0.3, is at the grid's lower edge
    assert curve.tune({**scores, 0.1: 0.57}) == curve.Tuned(0.3)
    write = tmp_path / "factors.json"
    curve.main([str(sweep), "--write", str(write)])
    assert "| evonorm_s0 | 32 | 58.00 | 56.00 | diverged | diverged |" in capsys.readouterr().out
    assert not write.exists()  # no norm's grids are complete


def test_a_grid_that_diverged_at_every_factor_is_extended_down_and_then_has_no_factor(tmp_path, capsys):
    every = {f: curve.DIVERGED_SCORE for f in curve.GRID}
    assert curve.tune(every) == curve.Tuned(None, extension=0.1)  # not factor 1, the tie-break among failures
    assert curve.tune({**every, 0.1: 0.31}) == curve.Tuned(0.1)
    assert curve.tune({**every, 0.1: curve.DIVERGED_SCORE}) == curve.Tuned(None, diverged=True)
    sweep = tmp_path / "study_curve"
    for factor in (*curve.GRID, 0.1):
        record(sweep, "frn", 2, factor, None, status="diverged")
    assert curve.main([str(sweep)]) == 1
    assert "still to run: frn at m=2: every factor diverged, the extension too: no factor, no seeds to run" in capsys.readouterr().out


def test_an_incomplete_grid_or_an_edge_says_what_to_run_and_writes_nothing(tmp_path, capsys):
    sweep = tmp_path / "study_curve"
    for factor, value in {0.3: 0.70, 1.0: 0.61, 3.0: 0.64, 10.0: 0.40}.items():
        record(sweep, "bn", 2, factor, value)
    out_file = tmp_path / "factors.json"
    assert curve.main([str(sweep), "--write", str(out_file)]) == 1
    out = capsys.readouterr().out
    assert "still to run: bn at m=2: best at the grid's edge, extend with factor 0.1 (optim.base_lr=0.01)" in out
    assert "still to run: gn at m=2: no completed run yet at factor(s) 0.3, 1, 3, 10" in out
    assert "| bn | 2 | 70.00 | 61.00 | 64.00 | 40.00 |" in out
    assert not out_file.exists()


def test_chosen_factors_are_written_once_complete_and_give_the_protocols_74_seed_runs(tmp_path, capsys):
    sweep = tmp_path / "study_curve"
    for norm in curve.NORMS:
        for m in curve.TUNED_BATCH_SIZES:
            if (norm, m) != ("mbn", 32):
                for factor, value in {0.3: 0.50, 1.0: 0.64, 3.0: 0.61, 10.0: 0.40}.items():
                    record(sweep, norm, m, factor, value if norm != "brn" or m != 32 else {3.0: 0.7}.get(factor, value))
    out_file = tmp_path / "factors.json"
    assert curve.main([str(sweep), "--write", str(out_file)]) == 1  # the peers' grids are still to run
    factors = curve.read_factors(out_file)
    assert set(factors) == set(curve.NORMS)
    assert factors["bn"] == dict.fromkeys(curve.CURVE_BATCH_SIZES, 1.0)
    assert factors["brn"] == {2: 1.0, 4: 1.0, 8: 1.0, 16: 3.0, 32: 3.0}
    assert json.loads(out_file.read_text())["grid_scores"]["brn@32"]["3"] == 0.7
    sweeps = curve.seed_sweeps(factors)
    runs = [(norm, sweep[1], sweep[2], seed) for sweep in sweeps for norm in sweep[0].removeprefix("norm=").split(",")
            for seed in sweep[3].removeprefix("seed=").split(",")]
    assert len(runs) == len(set(runs)) == 74
    # One command per cell (one pack below m = 32), by m, then norm.
    assert len(sweeps) == len(curve.NORMS) * len(curve.CURVE_BATCH_SIZES)
    assert sweeps[:2] == (("norm=bn", "data.batch_size=2", "optim.base_lr=0.1", "seed=0,1,2,3,4", "stack=5"),
                          ("norm=gn", "data.batch_size=2", "optim.base_lr=0.1", "seed=0,1,2,3,4", "stack=5"))
    assert ("norm=brn_epochs", "data.batch_size=16", "optim.base_lr=0.3", "seed=0,1,2", "stack=3") in sweeps
    assert ("norm=mbn", "data.batch_size=32", "optim.base_lr=0.1", "seed=0") in sweeps  # one run, unstacked at m = 32
    # The seeds' study: the runner prints these commands, one process each when several run at once.
    study_ = study.curve_study(factors)
    assert [c[3:] for c in study_.train_commands()] == [list(s) for s in sweeps]


def test_the_curve_study_refuses_to_start_before_its_factors_are_chosen(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "read_factors", lambda: None)
    assert study.main(["--study", "curve", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "factors are not chosen yet" in err[0] and "--study curve_grid" in err[0]
    monkeypatch.setattr(study, "read_factors", lambda: {norm: dict.fromkeys(curve.CURVE_BATCH_SIZES, 1.0) for norm in curve.NORMS})
    assert study.main(["--study", "curve", "--dry-run", "--jobs", "2", "--no-compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("mbn-train -m experiment=study_curve norm=bn data.batch_size=2 optim.base_lr=0.1 "
                        "seed=0,1,2,3,4 stack=5 hydra.launcher.n_jobs=1")
    # Its tables read the selected runs: differences to BN (the main table) and to MBN.
    assert study.main(["--study", "curve", "--dry-run", "--out", "o"]) == 0
    compares = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mbn-compare")]
    assert compares[0].startswith("mbn-compare o/compare/study_curve/selected --out o/compare/study_curve ") and compares[0].endswith("--baseline bn")
    assert compares[-1] == ("mbn-compare o/compare/study_curve/selected --format markdown --rows norm --cols data.batch_size "
                            "--metric final_test_acc1 --interval ci95 --baseline mbn > o/compare/study_curve/differences_to_mbn.md")


def test_commands_run_several_at_once_with_their_logs_and_codes_in_order(tmp_path):
    marker = tmp_path / "started"
    # The first waits until the second has started: they can only both finish when they run at once.
    first = [sys.executable, "-c", f"import pathlib, time\nwhile not pathlib.Path({str(marker)!r}).exists(): time.sleep(0.05)\nprint('first')"]
    second = [sys.executable, "-c", f"import pathlib, sys\npathlib.Path({str(marker)!r}).touch()\nprint('second')\nsys.exit(3)"]
    codes = study.run_commands([(first, None), (second, None)], jobs=2, log_dir=tmp_path / "logs")
    assert codes == [0, 3]
    assert (tmp_path / "logs" / "command-1.log").read_text().strip() == "first"
    assert (tmp_path / "logs" / "command-2.log").read_text().strip() == "second"


def test_the_curve_tables_read_only_the_runs_at_the_chosen_factors(tmp_path):
    sweep = tmp_path / "study_curve"
    for factor in curve.GRID:
        record(sweep, "bn", 2, factor, 0.5)
    for seed in (1, 2):
        record(sweep, "bn", 2, 3.0, 0.5, seed=seed)
        record(sweep, "bn", 2, 1.0, 0.5, seed=seed)  # not the chosen factor
    target = tmp_path / "selected"
    write_results(target / "stale", {"status": "completed", "config": {}})
    copied = curve.select_runs(sweep, target, curve.at_chosen_factor({"bn": {2: 3.0}}))
    assert sorted(p.parent.name for p in copied) == ["data.batch_size=2,norm=bn,optim.base_lr=0.3",
                                                     "data.batch_size=2,norm=bn,optim.base_lr=0.3,seed=1",
                                                     "data.batch_size=2,norm=bn,optim.base_lr=0.3,seed=2"]
    assert sorted(p.parent.name for p in target.rglob("results.json")) == sorted(p.parent.name for p in copied)


def test_the_grid_tables_read_only_the_grids_runs_not_the_seeds_beside_them(tmp_path, capsys):
    sweep = tmp_path / "study_curve"
    for m in curve.TUNED_BATCH_SIZES:
        for factor in curve.GRID:
            record(sweep, "bn", m, factor, 0.5)
    record(sweep, "gn", 32, 0.1, 0.5)  # the grid's extension
    for seed in (1, 2):
        record(sweep, "bn", 2, 3.0, 0.5, seed=seed)
    record(sweep, "bn", 4, 3.0, 0.5)  # seed 0 of an interpolated m: a seed run, not a grid's
    copied = curve.select_runs(sweep, tmp_path / "selected", curve.is_grid_run)
    assert len(copied) == 2 * len(curve.GRID) + 1
    assert not any("seed=" in p.parent.name or "batch_size=4" in p.parent.name for p in copied)
    # Both grid studies read this selection; the curve study reads the chosen factors'.
    assert study.STUDIES["curve_grid"].selection is curve.is_grid_run and study.STUDIES["peers_grid"].selection is curve.is_grid_run
    assert study.main(["--study", "curve_grid", "--dry-run", "--out", "o"]) == 0
    compares = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mbn-compare")]
    assert compares and all(line.startswith("mbn-compare o/compare/study_curve_grid/selected ") for line in compares)


def test_a_peer_is_tuned_alike_and_runs_at_the_tuned_batch_sizes_only(tmp_path):
    sweep = tmp_path / "study_curve"
    for m in curve.TUNED_BATCH_SIZES:
        for factor, value in {0.3: 0.50, 1.0: 0.55, 3.0: 0.61, 10.0: 0.40}.items():
            record(sweep, "cbn", m, factor, value)
    factors, pending = curve.choose_factors(curve.grid_scores(sweep))
    assert factors == {"cbn": {2: 3.0, 32: 3.0}}
    assert not any(line.startswith("cbn") for line in pending)
    assert curve.seed_sweeps(factors) == (
        ("norm=cbn", "data.batch_size=2", "optim.base_lr=0.3", "seed=0,1,2,3,4", "stack=5"),
        ("norm=cbn", "data.batch_size=32", "optim.base_lr=0.3", "seed=0,1,2"),
    )


def test_publish_copies_the_differences_to_every_baseline(tmp_path):
    compare_dir, sweep = tmp_path / "compare", tmp_path / "study_curve"
    record(sweep, "mbn", 2, 1.0, 0.6)
    record(sweep, "mbn", 4, 1.0, 0.6, status="interrupted")
    compare_dir.mkdir()
    for name in ("table.md", "differences_to_mbn.md", "final_test_acc1_vs_m.png"):
        (compare_dir / name).write_text(name)
    (compare_dir / "runs.csv").write_text("norm.name,data.batch_size,seed,final_test_acc1\nmbn,2,0,0.6\nbn,2,0,0.5\n")
    target = tmp_path / "published"
    study.publish(compare_dir, sweep, target)
    assert sorted(p.name for p in target.iterdir()) == ["differences_to_mbn.md", "final_test_acc1_vs_m.png", "runs", "runs.csv", "table.md"]
    assert (target / "differences_to_mbn.md").read_text() == "differences_to_mbn.md"
    # Only finished runs are published; the records go to records_dir when given (the grids' tables
    # are published beside the curve's, their records in the curve's one runs/).
    assert [p.parent.name for p in (target / "runs").glob("*/results.json")] == ["data.batch_size=2,norm=mbn,optim.base_lr=0.1"]
    study.publish(compare_dir, sweep, tmp_path / "grid", records_dir=tmp_path / "records")
    assert not (tmp_path / "grid" / "runs").exists()
    assert [p.parent.name for p in (tmp_path / "records").glob("*/results.json")] == ["data.batch_size=2,norm=mbn,optim.base_lr=0.1"]


def test_a_grid_with_its_best_at_an_edge_asks_for_its_extension_once(tmp_path):
    sweep = tmp_path / "study_curve"
    cells = [("cbn", 2), ("cbn", 32), ("brn", 2)]
    assert curve.grid_extensions(sweep, cells) == ()  # no grid has run
    for factor, value in {0.3: 0.66, 1.0: 0.61, 3.0: 0.60, 10.0: 0.40}.items():
        record(sweep, "cbn", 2, factor, value)  # best at the lower edge
        record(sweep, "cbn", 32, factor, 0.5 + (factor == 1.0) / 10)  # inner best
        record(sweep, "brn", 2, factor, 0.4 + factor / 100)  # best at the upper edge
    assert curve.grid_extensions(sweep, cells) == (("norm=cbn", "data.batch_size=2", "optim.base_lr=0.01"),
                                                   ("norm=brn_epochs", "data.batch_size=2", "optim.base_lr=3"))
    assert curve.grid_extensions(sweep, [("cbn", 32)]) == ()
    record(sweep, "cbn", 2, 0.1, 0.30)
    assert curve.grid_extensions(sweep, cells) == (("norm=brn_epochs", "data.batch_size=2", "optim.base_lr=3"),)


def test_the_grid_study_runs_the_extensions_its_grids_ask_for_after_them(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweeps" / "study_curve"
    started: list[list[str]] = []

    def fake_run_commands(commands, jobs=1, log_dir=None):
        # The grids "train": the CBN grid at m = 2 has its best at the lower edge, every other grid inside.
        for command, _ in commands:
            started.append(command)
            overrides = dict(o.split("=", 1) for o in command[3:] if "=" in o)
            norm = curve.NORM_NAMES[overrides["norm"]]
            m = int(overrides["data.batch_size"])
            for factor in [curve.factor_of(float(lr)) for lr in overrides["optim.base_lr"].split(",")]:
                edge = (norm, m) == ("cbn", 2)
                record(sweep, norm, m, factor, (0.7 - factor / 100) if edge else 0.6 - abs(math.log(factor)) / 10)
        return [0] * len(commands)

    monkeypatch.setattr(study, "run_commands", fake_run_commands)
    argv = ["--study", "peers_grid", "--out", str(tmp_path), "--no-compare", "--no-restore", "--jobs", "2"]
    assert study.main(argv) == 0
    grids = study.STUDIES["peers_grid"].train_commands(["output_root=" + str(tmp_path), "hydra.launcher.n_jobs=1"])
    assert started[:-1] == grids
    assert started[-1] == ["mbn-train", "-m", "experiment=study_curve", "norm=cbn", "data.batch_size=2", "optim.base_lr=0.01",
                           "output_root=" + str(tmp_path), "hydra.launcher.n_jobs=1"]
    # Its record in, the grids ask for nothing more: a rerun starts the grids' commands only (each skips its finished runs).
    started.clear()
    assert study.main(argv) == 0
    assert started == grids
    assert study.main([*argv, "--dry-run"]) == 0
    assert "none so far" in capsys.readouterr().out


def test_no_train_compares_and_publishes_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweeps" / "study_curve"
    record(sweep, "cbn", 2, 3.0, 0.6)  # a finished grid run at the chosen factor
    record(sweep, "cbn", 2, 3.0, 0.5, seed=1, status="interrupted")  # a seed pack part-way
    started: list[list[str]] = []

    def fake_run_commands(commands, jobs=1, log_dir=None):
        started.extend(command for command, _ in commands)
        return [0] * len(commands)

    monkeypatch.setattr(study, "run_commands", fake_run_commands)
    monkeypatch.setattr(study, "read_factors", lambda: {"cbn": {2: 3.0}})
    compare_dir = tmp_path / "compare"
    assert study.main(["--study", "curve", "--no-train", "--no-restore", "--out", str(tmp_path), "--compare-dir", str(compare_dir)]) == 0
    assert started and all(command[0] == "mbn-compare" for command in started)
    assert sorted(p.parent.name for p in (compare_dir / "selected").rglob("results.json")) == [
        "data.batch_size=2,norm=cbn,optim.base_lr=0.3", "data.batch_size=2,norm=cbn,optim.base_lr=0.3,seed=1"]
    started.clear()
    assert study.main(["--study", "peers_grid", "--no-train", "--dry-run", "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "mbn-train" not in shown and "mbn-compare" in shown and not started
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--study", "curve", "--no-train", "--no-compare"])
    assert exit_info.value.code == 2
