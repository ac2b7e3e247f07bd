"""The console scripts name the extra to install when the framework's dependencies are missing."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from mbn.cli import entry_points

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: a meta-path finder that makes `hydra` (and everything below it)
# unimportable, as in an environment that has only torch and mbn, then the mbn-train entry point.
BLOCKED_HYDRA = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class NoHydra(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hydra" or name.startswith("hydra."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoHydra())
    from mbn.cli.entry_points import train
    sys.exit(train())
    """
)


def test_mbn_train_without_hydra_says_which_extra_to_install_in_one_line():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_HYDRA], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "mbn-train: missing dependency 'hydra' — install the framework with: pip install 'mbn[train]'"
    assert proc.stdout == ""


def test_a_missing_distribution_of_the_extra_is_named_before_anything_runs(monkeypatch, capsys):
    requirements = ['torch>=2.3', 'pandas>=2.0; extra == "compare"', 'pytorch-lightning<2.7,>=2.6; extra == "train"',
                    'mbn[compare,train]; extra == "all"']
    installed = importlib.metadata.distribution

    def distribution(name: str):
        if name == "pytorch-lightning":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requirements if name == "mbn" else None)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail(f"imported {name} before the check"))
    assert entry_points.missing_distributions("compare") == []
    assert entry_points.train() == 2
    assert capsys.readouterr().err == (
        "mbn-train: missing dependency 'pytorch-lightning' — install the framework with: pip install 'mbn[train]'\n"
    )


def test_a_missing_module_of_mbn_itself_is_a_real_error_not_an_extra(monkeypatch):
    def broken(name: str):
        raise ModuleNotFoundError("No module named 'mbn.cli.nothing'", name="mbn.cli.nothing")

    monkeypatch.setattr(entry_points, "missing_distributions", lambda extra: [])
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="mbn.cli.nothing"):
        entry_points.compare()


def test_console_scripts_point_at_the_checked_entry_points():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mbn-train = "mbn.cli.entry_points:train"' in text
    assert 'mbn-compare = "mbn.cli.entry_points:compare"' in text


def test_mbn_train_quotes_values_with_equals_for_the_command_in_this_process(monkeypatch):
    # No re-exec of the interpreter: the command runs here, sees the quoted form in sys.argv (which
    # hydra.main reads), and the command line is given back as typed when it returns.
    seen = []
    command = types.SimpleNamespace(main=lambda: seen.append(list(sys.argv)) or 0)
    monkeypatch.setattr(entry_points, "missing_distributions", lambda extra: [])
    monkeypatch.setattr(importlib, "import_module", lambda name: command if name == "mbn.cli.train" else pytest.fail(name))
    typed = ["mbn-train", "-m", "output_root=/tmp/a=b", "norm=bn,mbn", "seed=0"]
    monkeypatch.setattr(sys, "argv", list(typed))
    assert entry_points.train() == 0
    assert seen == [["mbn-train", "-m", "output_root='/tmp/a=b'", "norm=bn,mbn", "seed=0"]]
    assert sys.argv == typed
