"""Every ``mbn-train`` / ``mbn-compare`` command the README shows works as written.

``mbn-train`` commands run with ``dry_run=true`` (their whole sweep is composed, validated and listed,
nothing is trained); ``mbn-compare`` commands run for real on a generated sweep at the paths they name.
The two Makefile commands are what CI runs.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from cli_runner import mbn_train as train_main

from mbn.cli.compare import build_parser
from mbn.cli.compare import main as compare_main

sys.path.insert(0, str(Path(__file__).parent / "compare"))
from fake_sweep import make_fake_sweep  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(program: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith(program + " ")]


def test_readme_shows_both_programs_and_the_two_make_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert len(readme_commands("mbn-train")) >= 3 and len(readme_commands("mbn-compare")) >= 3


@pytest.mark.parametrize("argv", readme_commands("mbn-train"), ids=" ".join)
def test_mbn_train_commands_compose_and_validate(argv, tmp_path, capsys):
    args = argv[1:]
    if args == ["--help"]:
        assert train_main(args) == 0
        assert "norm: bn, brn, brn_epochs, cbn, evonorm_b0, evonorm_s0, frn, gn, mabn, mbn, none" in capsys.readouterr().out
        return
    if args[0] == "-m" and not any(a.startswith("stack=") for a in args):
        # Seeds only renumber a cell's jobs: plan seed 0 of each (a 60-job sweep composes in 8 s, not 24).
        args = [*args, "seed=0"]
    assert train_main([*args, "dry_run=true", f"output_root={tmp_path}"]) == 0
    assert "would start" in capsys.readouterr().out


@pytest.mark.parametrize("argv", readme_commands("mbn-compare"), ids=" ".join)
def test_mbn_compare_commands_run(argv, tmp_path, monkeypatch, capsys):
    args = argv[1:]
    if "--wandb" in args:  # needs the W&B servers: only the arguments are checked here
        build_parser().parse_args(args)
        return
    monkeypatch.chdir(tmp_path)
    for path in args:
        if path.startswith("outputs/sweeps/"):
            make_fake_sweep(tmp_path / path, sweep_name=Path(path).name)
    assert compare_main(args) == 0
    assert "mbn" in capsys.readouterr().out
    if "--out" in args:
        assert (tmp_path / args[args.index("--out") + 1] / "report.html").is_file()


@pytest.mark.parametrize("argv", readme_commands("python"), ids=" ".join)
def test_experiment_commands_exist_and_plan_their_runs(argv, tmp_path, capsys, monkeypatch):
    assert argv[:2] == ["python", "-m"], argv
    module = __import__(argv[2], fromlist=["main"])
    args = [a if a not in ("outputs/paper", "outputs/sweeps/study_curve") else str(tmp_path) for a in argv[3:]]
    if argv[2] == "experiments.batch_size_study.curve":  # on an empty sweep dir: every grid still to run, nothing written
        written = tmp_path / "factors.json"
        assert module.main([a if not a.endswith(".json") else str(written) for a in args]) == 1
        assert "still to run: bn at m=2" in capsys.readouterr().out and not written.exists()
        return
    if argv[2] == "experiments.batch_size_study.run" and "curve" in args:  # the seeds' study, once factors are chosen
        from experiments.batch_size_study import curve

        monkeypatch.setattr(module, "read_factors", lambda: {n: dict.fromkeys(curve.CURVE_BATCH_SIZES, 1.0) for n in curve.NORMS})
    assert module.main([*args, "--dry-run"] if "--dry-run" not in args else args) == 0
    out = capsys.readouterr().out
    assert "mbn.cli.train -m" in out or "mbn-train -m" in out
