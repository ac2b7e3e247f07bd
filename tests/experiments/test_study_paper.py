"""The paper's full-scale targets: every config they run composes and validates, and the commands are right."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.paper import run as paper
from cli_runner import checked_config

from mbn.cli.config import CONFIG_DIR
from mbn.models import build_model
from mbn.nn import norm_layer

TRAIN_CASES = [(name, i) for name, target in paper.TARGETS.items() for i in range(len(target.models))]


def hydra_args(command: list[str]) -> list[str]:
    """The Hydra overrides of a ``python -m mbn.cli.train -m ...`` command."""
    assert command[command.index("mbn.cli.train") + 1] == "-m"
    return command[command.index("mbn.cli.train") + 2:]


def compose_config(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.mark.parametrize(("target_name", "index"), TRAIN_CASES)
def test_every_sweep_of_every_target_composes_and_validates(target_name, index, tmp_path):
    target = paper.TARGETS[target_name]
    model = target.models[index]
    command = paper.train_commands(target, tmp_path / "out", seeds=[0, 1, 2])[index]
    # Stand-ins for the datasets (no CIFAR-100 here; the archive may be missing on CI machines).
    (tmp_path / "cifar10-jpeg.tar.gz").touch()
    stand_ins = [f"paths.data_root={tmp_path}"] + ([f"data.source.root={tmp_path}"] if target.dataset == "cifar100" else [])
    fixed = [o for o in hydra_args(command) if "," not in o]
    params = OmegaConf.to_container(compose_config(fixed, return_hydra_config=True).hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + hydra_args(command))
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    settings = [dict(o.split("=", 1) for o in job) for job in jobs]
    grid = {(s["norm"], int(s["data.batch_size"]), int(s["seed"])) for s in settings}
    assert len(jobs) == len(grid) == 4 * 5 * 3
    assert {n for n, _, _ in grid} == {"bn", "gn", "brn", "mbn"} and {m for _, m, _ in grid} == {2, 4, 8, 16, 32}
    # One job per norm (m=2, the hardest case) composes, validates, and its network builds.
    for job, setting in zip(jobs, settings):
        if setting["data.batch_size"] != "2" or setting["seed"] != "0":
            continue
        cfg = compose_config([*job, *stand_ins])
        config = checked_config(cfg)
        assert (config["model"]["name"], config["epochs"], config["sweep_name"]) == (model, 200, target.sweep_name(model))
        assert config["data"]["name"] == {"cifar10": "cifar10_archive", "cifar100": "cifar100"}[target.dataset]
        assert config["trainer"]["accelerator"] == "gpu" and config["model"]["width"] == 64
        if setting["norm"] == "gn":  # the one norm with a shape constraint (groups divide channels)
            options = {k: v for k, v in config["norm"].items() if k != "name"}
            net = build_model(model, num_classes=100, norm_layer=norm_layer("gn", **options), width=64)
            assert sum(p.numel() for p in net.parameters()) > 0


def test_targets_cover_the_papers_comparisons():
    assert set(paper.TARGETS) == {"cifar10", "cifar100", "curves_cifar100"}
    for dataset in ("cifar10", "cifar100"):
        assert paper.TARGETS[dataset].models == ("resnet18", "resnet34", "resnet50", "vgg11")
    assert paper.TARGETS["curves_cifar100"].curve_batch_size == 2
    # The figure reuses the table's ResNet-18 sweep instead of training it again.
    assert paper.TARGETS["curves_cifar100"].sweep_name("resnet18") == paper.TARGETS["cifar100"].sweep_name("resnet18")


def test_train_and_compare_commands(tmp_path):
    target = paper.TARGETS["cifar10"]
    commands = paper.train_commands(target, tmp_path, seeds=[0, 1], extra=["hydra/launcher=joblib"])
    assert len(commands) == 4
    assert commands[2] == [sys.executable, "-m", "mbn.cli.train", "-m", "experiment=paper_cifar10", "model=resnet50",
                           "sweep_name=paper_cifar10_resnet50", "seed=0,1", f"output_root={tmp_path}", "hydra/launcher=joblib"]
    compare = paper.compare_command(target, tmp_path)
    assert compare[3:7] == [str(tmp_path / "sweeps" / f"paper_cifar10_{m}") for m in target.models]
    assert compare[7:] == ["--out", str(tmp_path / "compare" / "cifar10"), "--format", "markdown"]
    assert paper.compare_command(paper.TARGETS["curves_cifar100"], tmp_path)[-2:] == ["--curve-batch-size", "2"]
    with pytest.raises(ValueError, match="seeds"):
        paper.train_commands(target, tmp_path, seeds=[])


def test_dry_run_prints_every_command(tmp_path, capsys):
    assert paper.main(["cifar100", "--out", str(tmp_path), "--seeds", "0", "--dry-run", "--", "trainer=ddp"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert all("experiment=paper_cifar100" in line and line.endswith("trainer=ddp") for line in lines[:4])
    assert "mbn.cli.compare" in lines[4] and str(Path(tmp_path) / "compare" / "cifar100") in lines[4]
