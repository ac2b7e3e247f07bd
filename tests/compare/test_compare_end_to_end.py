"""Real tiny ``mbn-train -m`` sweeps, then ``mbn-compare`` on their dirs: the tables hold what the runs wrote."""

from __future__ import annotations

import csv
import io
import statistics
from html.parser import HTMLParser

import pytest
from cli_runner import mbn_train as train_main
from scipy import stats as scipy_stats

from mbn.cli.compare import main as compare_main
from mbn.results import iter_results, read_results


def test_real_sweep_then_compare(tiny, run_env, tmp_path, capsys):
    assert train_main(["-m", *tiny(), "norm=bn,mbn", "data.batch_size=4,8", "sweep_name=e2e"]) == 0
    sweep_dir = run_env / "sweeps" / "e2e"
    runs = [read_results(p) for p in iter_results(sweep_dir)]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"}
    expected = {(r["norm"], r["batch_size"]): 100 * r["metrics"]["final_test_acc1"] for r in runs}
    capsys.readouterr()

    out_dir = tmp_path / "compare"
    assert compare_main([str(sweep_dir), "--format", "csv", "--decimals", "4", "--out", str(out_dir)]) == 0
    cells = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    measured = {(c["norm.name"], int(c["data.batch_size"])): c for c in cells}
    assert set(measured) == set(expected)
    for key, acc in expected.items():
        assert float(measured[key]["mean_pct"]) == round(acc, 4), key
        assert measured[key]["n"] == "1"

    html = (out_dir / "report.html").read_text()
    HTMLParser().feed(html)
    assert "<table" in html and "mbn" in html
    for plot in ["final_test_acc1_vs_m", "test_acc1_vs_epoch_m4", "mbn_lam_tau_vs_epoch"]:
        for suffix in (".png", ".svg"):
            assert (out_dir / f"{plot}{suffix}").stat().st_size > 0


def test_real_three_seed_sweep_compared_with_the_bn_baseline(tiny, run_env, tmp_path, capsys):
    # Each cell's 3 seeds as one stacked model (4 processes' worth of set-up, not 12): each member's record
    # is its unstacked run's (tests/sweeps/test_stacked_sweeps.py), which is what mbn-compare reads.
    assert train_main(["-m", *tiny(), "norm=bn,mbn", "data.batch_size=4,8", "seed=0,1,2", "stack=3", "sweep_name=seeds"]) == 0
    sweep_dir = run_env / "sweeps" / "seeds"
    runs = [read_results(p) for p in iter_results(sweep_dir)]
    assert len(runs) == 12 and {r["status"] for r in runs} == {"completed"}
    acc = {(r["norm"], r["batch_size"], r["seed"]): r["metrics"]["final_test_acc1"] for r in runs}
    capsys.readouterr()

    out_dir = tmp_path / "compare"
    assert compare_main([str(sweep_dir), "--baseline", "bn", "--interval", "ci95", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "difference to bn (final_test_acc1, row − bn):" in out and out.count("paired t (n=3)") == 2

    rows = {int(r["data.batch_size"]): r for r in csv.DictReader(io.StringIO((out_dir / "differences.csv").read_text()))}
    assert set(rows) == {4, 8}
    for m, row in rows.items():
        mbn, bn = [acc[("mbn", m, s)] for s in range(3)], [acc[("bn", m, s)] for s in range(3)]
        differences = [a - b for a, b in zip(mbn, bn)]
        assert row["test"] == "paired t" and row["n"] == row["n_baseline"] == "3"
        assert float(row["diff_pct"]) == pytest.approx(100 * statistics.fmean(differences), rel=1e-5, abs=1e-9)
        reference = scipy_stats.ttest_rel(mbn, bn)
        if statistics.pstdev(differences) > 0:  # scipy gives NaN for identical differences; ours is exact then
            assert float(row["p"]) == pytest.approx(reference.pvalue, rel=1e-4)
            ci = reference.confidence_interval()
            assert float(row["diff_ci_low_pct"]) == pytest.approx(100 * ci.low, rel=1e-4, abs=1e-6)
            assert float(row["diff_ci_high_pct"]) == pytest.approx(100 * ci.high, rel=1e-4, abs=1e-6)
        assert 0.0 <= float(row["p"]) <= float(row["p_holm"]) <= 1.0
    html = (out_dir / "report.html").read_text()
    HTMLParser().feed(html)
    assert '<section id="differences">' in html
    for suffix in (".png", ".svg"):
        assert (out_dir / f"final_test_acc1_difference_to_bn_vs_m{suffix}").stat().st_size > 0
