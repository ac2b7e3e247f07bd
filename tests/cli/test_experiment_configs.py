"""Every ``experiment=`` config runs as a single run and as a sweep, under every launcher.

A user's first move with an experiment is one run of it; the experiment's launcher settings belong
to its launcher option, so swapping the launcher (``hydra/launcher=basic``, ...) composes too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import mbn_train
from hydra import compose, initialize_config_dir

from mbn.cli.config import CONFIG_DIR, group_options
from mbn.results import iter_results, read_results

EXPERIMENTS = group_options("experiment")
LAUNCHERS = ["basic", "joblib", "parallel", "slurm", "slurm_local"]
REAL_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def stand_in_data(tmp_path: Path) -> list[str]:
    """Overrides that point every experiment's dataset at an empty stand-in (a dry run reads no image)."""
    (tmp_path / "cifar10-jpeg.tar.gz").touch()
    return [f"paths.data_root={tmp_path}", f"data.source.root={tmp_path}"]


def needs_source_root(experiment: str) -> bool:
    return experiment in ("paper_cifar100", "paper_imagenet")


def dry_run(experiment: str, tmp_path: Path, run_env: Path, *extra: str) -> list[str]:
    stand_ins = stand_in_data(tmp_path)
    if not needs_source_root(experiment):
        stand_ins = stand_ins[:1]
    return [f"experiment={experiment}", *stand_ins, f"output_root={run_env}", "dry_run=true", *extra]


def test_the_experiments_are_the_ones_shipped():
    assert {"demo", "study_trained", "paper_cifar10", "paper_imagenet"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_starts_as_a_single_run(experiment, tmp_path, run_env, capsys):
    assert mbn_train(dry_run(experiment, tmp_path, run_env)) == 0
    out, err = capsys.readouterr()
    (line,) = out.strip().splitlines()
    assert line.startswith(f"mbn-train: would start {run_env / 'runs'}/") and "(new)" in line, out + err


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_plans_its_sweep(experiment, tmp_path, run_env, capsys):
    """The experiment's own sweep (its launcher, its swept norms), cut to m = 2 and seed 0 to keep the test
    short: every job of every experiment's full sweep is planned by CI's wheel check."""
    assert mbn_train(["-m", *dry_run(experiment, tmp_path, run_env, "data.batch_size=2", "seed=0")]) == 0
    out, err = capsys.readouterr()
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("mbn-train: dry run of ") and "nothing was run" in summary, out + err
    jobs = int(summary.split("dry run of ")[1].split()[0])
    assert out.count("mbn-train: would start") == jobs > 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_under_every_launcher(experiment, launcher):
    """The launcher is swappable: the experiment sets nothing that only one launcher knows."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "parallel": "JoblibLauncher",
            "slurm": "SlurmLauncher", "slurm_local": "LocalLauncher"}[launcher] in target


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sweep_plans_under_every_launcher(launcher, tmp_path, run_env, capsys):
    # One cell of the demo (command-line values win over the experiment's swept ones), two seeds, packed as
    # one stack (stack=3 as the demo had: its stack=auto probes, which tests/sweeps/test_auto_stack.py covers).
    cell = ["norm=bn", "data.batch_size=2", "seed=0,1", "stack=3"]
    assert mbn_train(["-m", *dry_run("demo", tmp_path, run_env, f"hydra/launcher={launcher}", *cell)]) == 0
    out, err = capsys.readouterr()
    assert "mbn-train: dry run of 2 jobs" in out and not err.strip(), out + err


def test_a_launcher_setting_is_named_with_its_file_when_the_launcher_lacks_it(run_env, capsys):
    assert mbn_train(["-m", "experiment=demo", "hydra/launcher=basic", "hydra.launcher.n_jobs=2", f"output_root={run_env}", "dry_run=true"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mbn-train: invalid config: hydra.launcher.n_jobs: unknown key")


def test_an_unknown_key_set_by_a_user_experiment_names_its_file(tmp_path, run_env, capsys):
    user_configs = tmp_path / "my_configs" / "experiment"
    user_configs.mkdir(parents=True)
    (user_configs / "broken.yaml").write_text("# @package _global_\ntrainer:\n  sync_batchnorm: true\n")
    argv = ["--config-dir", str(tmp_path / "my_configs"), "experiment=broken", "data=fake", f"output_root={run_env}", "dry_run=true"]
    assert mbn_train(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mbn-train: invalid config: trainer.sync_batchnorm: unknown key (set in experiment/broken.yaml)"), line


def test_a_user_experiment_extends_the_shipped_groups(tmp_path, run_env, capsys):
    """The README's example: a user's config dir adds an experiment on the shipped groups."""
    user_configs = tmp_path / "my_configs" / "experiment"
    user_configs.mkdir(parents=True)
    (user_configs / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: fake\n  - override /norm: mbn\n"
        "sweep_name: my_exp\nepochs: 1\nmodel:\n  width: 4\ndata:\n  batch_size: 8\n  source:\n    num_train: 32\n"
        "    num_test: 16\n    image_size: 8\nlogger:\n  csv: {}\n"
    )
    argv = ["--config-dir", str(tmp_path / "my_configs"), "experiment=my_exp", "logger=[csv]", f"output_root={run_env}"]
    assert mbn_train(argv) == 0
    (path,) = iter_results(run_env)
    results = read_results(path)
    assert results["status"] == "completed" and results["config"]["norm"]["name"] == "mbn"
    assert results["config"]["model"]["width"] == 4 and results["config"]["data"]["source"]["num_train"] == 32


def test_one_tiny_real_single_run_of_the_demo_completes(run_env, capsys):
    """The demo's config (joblib launcher, stack=3) as one run: no sweep-only value is needed."""
    assert REAL_CIFAR10.is_file(), "the real CIFAR-10 archive is part of this project's environment"
    argv = ["experiment=demo", "norm=mbn", "epochs=1", "data.train_subset=64", "data.test_subset=50",
            "data.batch_size=8", "model.width=4", "logger=[csv]", f"paths.data_root={REAL_CIFAR10.parent}",
            f"output_root={run_env}"]
    assert mbn_train(argv) == 0, capsys.readouterr().err
    (path,) = iter_results(run_env / "runs")
    results = read_results(path)
    assert results["status"] == "completed" and results["norm"] == "mbn" and results["epochs_completed"] == 1
