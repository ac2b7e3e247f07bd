"""report.html: valid, self-contained, and listing the table, plots, problems and config differences."""

from __future__ import annotations

import base64
import csv
import io
import re
import statistics
from html.parser import HTMLParser

import pytest

from fake_sweep import NORMS, make_fake_sweep, write_fake_run
from mbn.compare.aggregate import GridSpec
from mbn.compare.collect import collect_runs
from mbn.compare.comparison import compare, write_outputs
from mbn.compare.report import ReportInput, render_report
from mbn.results import RESULTS_FILENAME

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictHTMLChecker(HTMLParser):
    """Collects structure errors html.parser tolerates: unclosed/mismatched tags, external references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.doctype = False
        self.images: list[str] = []
        self.text: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and not attrs[name].startswith(("data:", "#")):
                self.errors.append(f"external reference <{tag} {name}={attrs[name][:60]!r}>")
        if tag == "img":
            self.images.append(attrs.get("src", ""))
            if not attrs.get("alt"):
                self.errors.append("img without alt")
        if tag in ("script", "link", "iframe"):
            self.errors.append(f"<{tag}> in a self-contained report")
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def check_html(text: str) -> StrictHTMLChecker:
    checker = StrictHTMLChecker()
    checker.feed(text)
    checker.close()
    assert checker.doctype, "missing <!DOCTYPE html>"
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    return checker


@pytest.fixture(scope="module")
def module_sweep(tmp_path_factory):
    return make_fake_sweep(tmp_path_factory.mktemp("sweeps") / "fake")


@pytest.fixture(scope="module")
def written(module_sweep, tmp_path_factory):
    """The full output dir, written once for the tests of this module (rendering plots is the slow part)."""
    comparison = compare(collect_runs([module_sweep.root]), GridSpec())
    out = tmp_path_factory.mktemp("out")
    paths = write_outputs(comparison, out, sources=[str(module_sweep.root)])
    return out, paths


def report_without_plots(root) -> str:
    comparison = compare(collect_runs([root]), GridSpec())
    return render_report(ReportInput(runset=comparison.runset, grid=comparison.grid, problems=comparison.problems,
                                     notes=comparison.notes, sources=[str(root)]))


def test_outputs_written(written):
    out, paths = written
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "table.txt", "table.md", "table.csv", "table.tex", "runs.csv", "report.html",
        "final_test_acc1_vs_m.png", "final_test_acc1_vs_m.svg", "test_acc1_vs_epoch_m2.png", "test_acc1_vs_epoch_m2.svg",
        "mbn_lam_tau_vs_epoch.png", "mbn_lam_tau_vs_epoch.svg",
    ])
    assert all(p.stat().st_size > 0 for p in paths)


def test_report_is_valid_self_contained_html_with_embedded_pngs(written):
    out, _ = written
    checker = check_html((out / "report.html").read_text(encoding="utf-8"))
    assert len(checker.images) == 3
    for src in checker.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_contains_the_table(written, module_sweep):
    out, _ = written
    checker = check_html((out / "report.html").read_text(encoding="utf-8"))
    for norm in NORMS:
        for m in (2, 8, 32):
            values = module_sweep.completed_values(norm, m)
            expected = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"
            assert any(cell.startswith(expected) for cell in checker.cells), expected
    html_text = (out / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r'<td class="best[^"]*"><strong>', html_text)) == 3


def test_report_lists_every_run_outside_the_table(written, module_sweep):
    out, _ = written
    checker = check_html((out / "report.html").read_text(encoding="utf-8"))
    text = " ".join(checker.text)
    assert "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed." in text
    assert "second line of detail" not in text  # first line of the error only
    assert "loss is nan at epoch 2, step 1234" in text
    for key, status in module_sweep.statuses.items():
        if status != "completed":
            assert module_sweep.run_dirs[key].name in text
            assert status in checker.cells
    assert "seed=1 (no run found)" in text  # bn m=8 seed 1 never ran
    assert "seed=2 (failed)" in text


def test_report_config_diff_and_row_settings(fake_sweep):
    odd = fake_sweep.root / "odd"
    write_fake_run(odd, "bn", 2, 2)
    results = (odd / RESULTS_FILENAME).read_text().replace('"base_lr": 0.1', '"base_lr": 0.05')
    (odd / RESULTS_FILENAME).write_text(results)
    checker = check_html(report_without_plots(fake_sweep.root))
    assert "optim.base_lr=0.05" in checker.cells
    assert "num_groups=8" in checker.cells  # GN's setting, shown once per norm instead of as a diff
    assert "ideal_batch_size=32, tau0=0.9, schedule=epoch" in checker.cells
    assert "optim.base_lr" in " ".join(checker.text)


def test_unreadable_results_are_listed(fake_sweep):
    broken = fake_sweep.root / "broken"
    broken.mkdir()
    (broken / RESULTS_FILENAME).write_text("{not json")
    checker = check_html(report_without_plots(fake_sweep.root))
    assert "unreadable" in checker.cells
    assert any(cell.startswith("JSONDecodeError") for cell in checker.cells)
    assert "Runs not in the table (4)" in " ".join(checker.text)


def test_checker_catches_broken_html():
    checker = StrictHTMLChecker()
    checker.feed('<!DOCTYPE html><html><body><table><tr><td>x</tr></table><img src="https://x/y.png"></body></html>')
    assert any("closes td" in e for e in checker.errors)
    assert any("external reference" in e for e in checker.errors)


@pytest.fixture(scope="module")
def written_with_baseline(module_sweep, tmp_path_factory):
    comparison = compare(collect_runs([module_sweep.root]), GridSpec(), interval="ci95", baseline="bn")
    out = tmp_path_factory.mktemp("out-baseline")
    return out, write_outputs(comparison, out, sources=[str(module_sweep.root)])


def test_a_second_compare_into_the_same_dir_removes_the_first_ones_files_it_does_not_write(module_sweep, tmp_path):
    out = tmp_path / "out"
    first = write_outputs(compare(collect_runs([module_sweep.root]), GridSpec(), interval="ci95", baseline="bn"), out)
    (out / "notes.txt").write_text("the user's")
    second = write_outputs(compare(collect_runs([module_sweep.root]), GridSpec(), curve_col=32), out)
    gone = {p.name for p in first} - {p.name for p in second}
    assert {"differences.csv", "final_test_acc1_difference_to_bn_vs_m.png", "test_acc1_vs_epoch_m2.png"} <= gone
    assert not any((out / name).exists() for name in gone)
    assert all(p.exists() for p in second) and (out / "notes.txt").read_text() == "the user's"
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {p.name for p in second} | {"notes.txt"}


def test_baseline_adds_differences_csv_plot_and_report_section(written_with_baseline, module_sweep):
    out, paths = written_with_baseline
    names = {p.name for p in paths}
    assert {"differences.csv", "final_test_acc1_difference_to_bn_vs_m.png",
            "final_test_acc1_difference_to_bn_vs_m.svg"} <= names
    rows = list(csv.DictReader(io.StringIO((out / "differences.csv").read_text())))
    assert len(rows) == 6 and {r["norm.name"] for r in rows} == {"gn", "mbn"}
    gn2 = next(r for r in rows if r["norm.name"] == "gn" and r["data.batch_size"] == "2")
    expected = 100 * (statistics.mean(module_sweep.completed_values("gn", 2))
                      - statistics.mean(module_sweep.completed_values("bn", 2)))
    assert float(gn2["diff_pct"]) == pytest.approx(expected, rel=1e-5)
    assert gn2["test"] == "Welch t" and gn2["baseline"] == "bn"  # bn m=2 lost seed 2

    html_text = (out / "report.html").read_text(encoding="utf-8")
    checker = check_html(html_text)
    assert len(checker.images) == 4
    section = html_text[html_text.index('<section id="differences">'):html_text.index('<section id="plots">')]
    assert "<h2>Difference to bn</h2>" in section and '<table class="results differences">' in section
    assert "data:image/png;base64," in section and "95% t CI" in section
    assert f"{expected:+.2f}" in checker.cells
    assert "95% t confidence interval of the mean over seed" in html_text  # the results table's caption


def test_every_table_file_holds_the_difference_table(written_with_baseline):
    out, _ = written_with_baseline
    for name in ("table.txt", "table.md", "table.tex"):
        text = (out / name).read_text()
        assert "difference to bn" in text and "Welch t (n=3, 2)" in text, name
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert len(rows) == 9  # one CSV: the cells, with the difference columns on the compared rows
    assert all((r["diff_pct"] == "") == (r["norm.name"] == "bn") for r in rows)
