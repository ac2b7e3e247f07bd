"""A real tiny ``mbn-train -m`` sweep, then ``mbn-compare`` on its dir: the table holds what the runs wrote."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

from mbn.cli.compare import main as compare_main
from mbn.cli.train import main as train_main
from mbn.results import iter_results, read_results


def test_real_sweep_then_compare(tiny, run_env, tmp_path, capsys):
    assert train_main(["-m", *tiny(), "norm=bn,mbn", "data.batch_size=4,8", "sweep_name=e2e"]) == 0
    sweep_dir = run_env / "sweeps" / "e2e"
    runs = [read_results(p) for p in iter_results(sweep_dir)]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"}
    expected = {(r["norm"], r["batch_size"]): 100 * r["metrics"]["best_val_acc1"] for r in runs}
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
    for plot in ["best_val_acc1_vs_m", "val_acc1_vs_epoch_m4", "mbn_lam_tau_vs_epoch"]:
        for suffix in (".png", ".svg"):
            assert (out_dir / f"{plot}{suffix}").stat().st_size > 0
