"""Overrides whose value holds '=' (paths below run dirs) work: quoted for Hydra, others unchanged."""

from __future__ import annotations

import subprocess
import sys

from hydra.core.override_parser.overrides_parser import OverridesParser

from mbn.cli.overrides import quote_values_with_equals
from mbn.results import iter_results, read_results


def test_values_with_equals_are_quoted_and_parse_to_the_value_given():
    parser = OverridesParser.create()
    given = ["output_root=/tmp/a=b", "+x=/runs/data.batch_size=2,norm=mbn", "y=/it's=here"]
    quoted = quote_values_with_equals(given)
    assert quoted == ["output_root='/tmp/a=b'", "+x='/runs/data.batch_size=2,norm=mbn'", 'y="/it\'s=here"']
    assert [parser.parse_override(o).value() for o in quoted] == ["/tmp/a=b", "/runs/data.batch_size=2,norm=mbn", "/it's=here"]


def test_overrides_that_parse_as_given_are_left_alone():
    unchanged = ["-m", "--help", "norm=bn,mbn", "data.batch_size=range(start=2,stop=8)", "output_root='/tmp/a=b'",
                 "hydra.run.dir=\"/x=y\"", "seed=0", "'logger=[csv]'"]
    assert quote_values_with_equals(unchanged) == unchanged


def test_a_sweep_under_an_output_root_with_equals_as_typed_in_the_shell(tiny, run_env):
    # The console script's process (python -m mbn.cli.train is the same): it runs the command with
    # the override quoted in sys.argv, so Hydra parses it.
    root = run_env.parent / "a=b"
    overrides = [o for o in tiny() if not o.startswith("output_root=")] + [f"output_root={root}"]
    proc = subprocess.run([sys.executable, "-m", "mbn.cli.train", "-m", *overrides, "norm=bn,mbn"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in proc.stdout
    records = [read_results(path) for path in iter_results(root)]
    assert len(records) == 2 and {r["status"] for r in records} == {"completed"}
    assert {r["norm"] for r in records} == {"bn", "mbn"}
