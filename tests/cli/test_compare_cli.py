"""``mbn-compare`` end to end on a fake sweep dir: output streams, files and exit codes."""

from __future__ import annotations

import csv
import json
import io
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

# The fake sweep generator is shared with tests/compare (it is not a package, so put its dir on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compare"))
from fake_sweep import BATCH_SIZES, NORMS, make_fake_sweep, write_fake_run  # noqa: E402

from mbn.cli.compare import main  # noqa: E402
from mbn.results import RESULTS_FILENAME  # noqa: E402


@pytest.fixture
def sweep(tmp_path):
    return make_fake_sweep(tmp_path / "sweeps" / "fake")


def cell(sweep, norm, m, metric="final_test_acc1"):
    values = sweep.completed_values(norm, m, metric)
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"


def test_default_table_on_stdout_problems_on_stderr(sweep, capsys):
    assert main([str(sweep.root)]) == 0
    out, err = capsys.readouterr()
    for norm in NORMS:
        for m in BATCH_SIZES:
            assert cell(sweep, norm, m) in out
    assert "3 of 26 runs are not in the table" in err
    for status in ("failed", "diverged", "running"):
        key = next(k for k, s in sweep.statuses.items() if s == status)
        assert any(line.split()[0] == status and str(sweep.run_dirs[key]) in line for line in err.splitlines())
    assert "missing seeds: norm=bn, m=8: n=2 of 3; seed=1 (no run found)" in err


def test_explicit_layout_and_other_metric(sweep, capsys):
    assert main([str(sweep.root), "--rows", "norm", "--cols", "data.batch_size", "--over", "seed",
                 "--metric", "final_val_acc1", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| norm | m=2 | m=8 | m=32 |")
    assert cell(sweep, "mbn", 8, "final_val_acc1") in out


def test_csv_stdout_is_pure_csv(sweep, capsys):
    assert main([str(sweep.root), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 9
    gn2 = next(r for r in rows if r["norm.name"] == "gn" and r["data.batch_size"] == "2")
    assert float(gn2["mean_pct"]) == pytest.approx(100 * statistics.mean(sweep.completed_values("gn", 2)), rel=1e-5)


def test_out_dir_gets_everything(sweep, tmp_path, capsys):
    out_dir = tmp_path / "compare"
    assert main([str(sweep.root), "--out", str(out_dir), "--curve-batch-size", "8"]) == 0
    names = {p.name for p in out_dir.iterdir()}
    assert {"table.txt", "table.md", "table.csv", "table.tex", "runs.csv", "report.html",
            "test_acc1_vs_epoch_m8.png", "test_acc1_vs_epoch_m8.svg"} <= names
    assert f"open {out_dir}/report.html" in capsys.readouterr().err
    assert cell(sweep, "bn", 32) in (out_dir / "table.txt").read_text()


def test_partial_sweep_with_only_running_runs(tmp_path, capsys):
    write_fake_run(tmp_path / "a", "bn", 2, 0, status="running")
    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "no usable run yet" in err and "running" in err


@pytest.mark.parametrize("argv, message", [
    ([], "give at least one SWEEP_DIR or --wandb"),
    (["{root}", "--rows", "normalization"], "--rows: unknown key 'normalization'"),
    (["{root}", "--cols", "batch"], "--cols: unknown key 'batch'"),
    (["{root}", "--metric", "best_acc"], "--metric: unknown metric 'best_acc'"),
    (["{root}", "--curve-batch-size", "3"], "--curve-batch-size 3 is not among the data.batch_size values [2, 8, 32]"),
    (["{root}", "--curve-batch-size", "0.5"], "--curve-batch-size 0.5 is not among the data.batch_size values [2, 8, 32]"),
    (["{root}", "--rows", "seed"], "must be different keys"),
    (["{root}/nope"], "no such sweep or run dir"),
    (["{root}", "--wandb", "justaproject"], "--wandb must be ENTITY/PROJECT, got 'justaproject'"),
    (["{root}", "--wandb-group", "demo"], "--wandb-group needs --wandb"),
    (["{root}", "--baseline", "batchnorm"], "--baseline 'batchnorm' matches no row; rows: bn, gn, mbn"),
    (["{root}", "--baseline", "bn", "--detect", "0"], "--detect must be > 0 (points), got 0.0"),
])
def test_bad_arguments_exit_2_with_a_message(sweep, capsys, argv, message):
    argv = [a.format(root=sweep.root) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbn-compare: error:") and message in err


def test_no_runs_found_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found in" in capsys.readouterr().err


def test_only_unreadable_runs_exit_2_and_are_listed(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / RESULTS_FILENAME).write_text("{")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "JSONDecodeError" in err and "no readable runs" in err


def test_bad_choice_is_argparse_exit_2(sweep):
    with pytest.raises(SystemExit) as exc:
        main([str(sweep.root), "--format", "xml"])
    assert exc.value.code == 2


def test_unreachable_wandb_exits_1_with_hint(sweep, capsys, monkeypatch):
    import wandb

    class OfflineApi:
        def __init__(self, **kwargs):
            raise wandb.errors.CommError("Failed to verify credentials: connection refused")

    monkeypatch.setattr(wandb, "Api", OfflineApi)
    assert main([str(sweep.root), "--wandb", "ent/proj"]) == 1
    err = capsys.readouterr().err
    assert "could not read W&B runs of 'ent/proj'" in err and "connection refused" in err and "WANDB_API_KEY" in err


def test_wandb_runs_join_local_runs(sweep, capsys, monkeypatch):
    import wandb

    class Run:
        id, name, group, tags, state = "w1", "w1", "demo", [], "finished"
        url = "https://wandb.example/ent/proj/runs/w1"
        config = {"norm": {"name": "gn"}, "data": {"batch_size": 4}, "seed": 0}
        summary = {"final_test_acc1": 0.7}

        def history(self, samples=500, pandas=True, **kwargs):
            return []

    class Api:
        def __init__(self, **kwargs):
            pass

        def runs(self, path, filters=None, **kwargs):
            assert (path, filters) == ("ent/proj", {"group": "demo"})
            return [Run()]

    monkeypatch.setattr(wandb, "Api", Api)
    assert main([str(sweep.root), "--wandb", "ent/proj", "--wandb-group", "demo", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    gn4 = next(r for r in rows if r["norm.name"] == "gn" and r["data.batch_size"] == "4")
    assert float(gn4["mean_pct"]) == pytest.approx(70.0) and gn4["n"] == "1"
    assert "reading W&B run 1/1" in err


def test_console_script_exit_codes(sweep, tmp_path):
    script = Path(sys.executable).with_name("mbn-compare")
    ok = subprocess.run([str(script), str(sweep.root), "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("norm.name,data.batch_size,metric,")
    bad = subprocess.run([str(script), str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such sweep or run dir" in bad.stderr and "Traceback" not in bad.stderr


def test_baseline_prints_the_difference_table_after_the_table(sweep, capsys):
    assert main([str(sweep.root), "--baseline", "bn", "--interval", "ci95", "--detect", "2"]) == 0
    out = capsys.readouterr().out
    table, differences = out.split("\ndifference to bn (final_test_acc1, row − bn):\n")
    assert "95% t confidence interval" in table.splitlines()[0]
    gn, bn = sweep.completed_values("gn", 8), sweep.completed_values("bn", 8)
    welch = scipy_stats.ttest_ind(gn, bn, equal_var=False)
    ci = welch.confidence_interval()
    line = next(line for line in differences.splitlines() if line.split()[:2] == ["gn", "8"])
    assert f"{100 * (statistics.mean(gn) - statistics.mean(bn)):+.2f}" in line
    assert f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" in line and f"{welch.pvalue:.3f}" in line
    assert "Welch t (n=3, 2)" in line
    assert "gn, m=8: Welch (unpaired), seeds differ (gn: 0, 1, 2; bn: 0, 2)" in differences
    assert "to detect 2.00 points with 80% power" in differences


def test_baseline_csv_on_stdout_is_one_csv(sweep, capsys):
    assert main([str(sweep.root), "--baseline", "bn", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 9
    mbn2 = next(r for r in rows if r["norm.name"] == "mbn" and r["data.batch_size"] == "2")
    expected = 100 * (statistics.mean(sweep.completed_values("mbn", 2)) - statistics.mean(sweep.completed_values("bn", 2)))
    assert float(mbn2["diff_pct"]) == pytest.approx(expected, rel=1e-5) and mbn2["baseline"] == "bn"


def test_without_baseline_no_difference_table(sweep, tmp_path, capsys):
    out_dir = tmp_path / "compare"
    assert main([str(sweep.root), "--out", str(out_dir)]) == 0
    assert "difference to" not in capsys.readouterr().out
    assert not (out_dir / "differences.csv").exists()


def test_help_lists_the_statistics_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--baseline ROW", "--interval {std,ci95,bootstrap}", "--detect POINTS", "Holm"):
        assert option in out


def test_an_out_that_is_a_file_or_not_writable_exits_2_before_any_work(sweep, tmp_path, capsys):
    existing = tmp_path / "table.txt"
    existing.write_text("keep me")
    for out_dir, message in ((existing, f"--out {existing} is a file, not a directory"),
                             (existing / "sub", f"--out {existing / 'sub'}: cannot write there: Not a directory")):
        assert main([str(sweep.root), "--out", str(out_dir)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"mbn-compare: error: {message}\n"  # no table, no traceback
    assert existing.read_text() == "keep me"


def test_a_read_only_out_dir_exits_2_before_any_work(sweep, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root ignores file permissions unless it drops CAP_DAC_OVERRIDE
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only dir cannot be simulated")
        prefix = [shutil.which("setpriv"), "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "mbn.cli.compare", str(sweep.root), "--out", str(read_only)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"mbn-compare: error: --out {read_only}: cannot write there: Permission denied\n"
    assert list(read_only.iterdir()) == []


def test_a_corrupt_results_json_is_listed_once_under_its_seed(sweep, capsys):
    # bn m=8 seed=1 is the fake sweep's missing run: here its dir exists, its record cut short.
    run_dir = sweep.root / "norm=bn,data.batch_size=8,seed=1"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(  # as Hydra saves the job's config
        "norm:\n  name: bn\ndata:\n  name: cifar10_archive\n  batch_size: 8\nseed: 1\noutput_root: ${oc.env:X,outputs}\n")
    (run_dir / RESULTS_FILENAME).write_text('{"schema_version": 1, "status": "comp')
    assert main([str(sweep.root)]) == 0
    err = capsys.readouterr().err
    assert "missing seeds: norm=bn, m=8: n=2 of 3; seed=1 (unreadable)" in err
    assert "no run found" not in err
    assert sum(f"[{run_dir}]" in line for line in err.splitlines()) == 1


def test_a_metric_of_the_wrong_type_is_invalid_and_nan_is_shown_as_nan(tmp_path, capsys):
    for seed, value in ((0, 0.8), (1, "0.9"), (2, float("nan"))):
        run_dir = tmp_path / f"seed={seed}"
        write_fake_run(run_dir, "bn", 2, seed)
        path = run_dir / RESULTS_FILENAME
        record = json.loads(path.read_text())
        record["metrics"]["final_test_acc1"] = value
        path.write_text(json.dumps(record))  # NaN is written as the NaN literal Python's json reads back
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "80.00 (1)" in out and "90.00" not in out
    lines = err.splitlines()
    assert any(line.strip().startswith("invalid: metric final_test_acc1 is '0.9' (a str, not a number)")
               and f"[{tmp_path / 'seed=1'}]" in line for line in lines), err
    assert any(line.strip().startswith("invalid: metric final_test_acc1 is nan") and f"[{tmp_path / 'seed=2'}]" in line
               for line in lines), err
    assert "None" not in err


def test_a_val_metric_over_schema_1_records_reads_their_published_numbers_with_a_note(tmp_path, capsys):
    published = Path(__file__).resolve().parents[2] / "experiments" / "batch_size_study" / "results" / "runs"
    shutil.copytree(published / "data.batch_size=2,norm=bn,seed=0", tmp_path / "v1")
    write_fake_run(tmp_path / "v2", "bn", 8, 0)
    v1 = json.loads((tmp_path / "v1" / RESULTS_FILENAME).read_text())
    assert main([str(tmp_path), "--metric", "final_val_acc1", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert f"{100 * v1['metrics']['final_val_acc1']:.2f}" in out
    assert "mbn-compare: note: 1 run(s) are schema 1 records (no validation split)" in err
    assert main([str(tmp_path), "--format", "csv"]) == 0  # the default, final_test_acc1: every schema has it
    out, err = capsys.readouterr()
    assert f"{100 * v1['metrics']['final_test_acc1']:.2f}" in out and "schema 1" not in err


def test_a_curve_column_that_is_no_number_is_refused_by_the_parser(sweep, capsys):
    # Argparse's own exit 2, its one error line after the usage.
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep.root), "--curve-batch-size", "two"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "mbn-compare: error: argument --curve-batch-size: not a number: 'two'"
