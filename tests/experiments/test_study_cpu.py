"""The CPU-scale batch-size study: its config, its grid, the runner's chunks/commands, a tiny end-to-end run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from experiments.batch_size_study import run as study
from cli_runner import checked_config

from mbn.cli.config import CONFIG_DIR
from mbn.cli.schema import load_job, to_run_spec
from mbn.models import build_model
from mbn.nn import norm_layer
from mbn.results import read_results


def compose_study(overrides: list[str], data_root: Path) -> tuple[dict, dict]:
    """(resolved config with a stand-in archive under data_root, sweeper params) of study_cpu."""
    (data_root / "cifar10-jpeg.tar.gz").touch()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=study_cpu", f"paths.data_root={data_root}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    with open_dict(cfg):
        del cfg["hydra"]
    return checked_config(cfg), params


def hydra_args(command: list[str]) -> list[str]:
    """The Hydra overrides of a ``python -m mbn.cli.train -m ...`` command."""
    assert command[command.index("mbn.cli.train") + 1] == "-m"
    return command[command.index("mbn.cli.train") + 2:]


def sweep_jobs(params: dict, command: list[str]) -> list[dict[str, str]]:
    """The jobs Hydra's basic sweeper launches for ``command`` (its overrides win over the config's params)."""
    cli = hydra_args(command)
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()] + cli)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [dict(item.split("=", 1) for item in job) for batch in batches for job in batch]


def test_study_config_is_the_cpu_recipe(tmp_path):
    config, params = compose_study(["norm=mbn", "norm.schedule=iteration"], tmp_path)
    assert (config["model"]["name"], config["model"]["width"], config["data"]["name"]) == ("resnet18", 16, "cifar10_archive")
    assert config["epochs"] >= 1 and config["data"]["train_subset"] < 50_000 and config["trainer"]["num_threads"] == 1
    optim = config["optim"]
    assert (optim["base_lr"], optim["reference_batch_size"], optim["momentum"], optim["weight_decay"]) == (0.1, 64, 0.9, 1e-4)
    assert (config["norm"]["ideal_batch_size"], config["norm"]["schedule"]) == (32, "iteration")
    assert config["sweep_name"] == "study_cpu"
    assert set(params["norm"].split(",")) == set(study.NORM_OVERRIDES)


@pytest.mark.parametrize("norm", sorted(study.NORM_OVERRIDES))
def test_every_norm_of_the_study_validates_and_builds(norm, tmp_path):
    command = study.train_command(study.Chunk(norm, 0), "study_cpu", tmp_path / "out")
    config, _ = compose_study(hydra_args(command), tmp_path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=study_cpu", f"paths.data_root={tmp_path}", *hydra_args(command)])
    job = load_job(cfg)
    run = to_run_spec(job, tmp_path / "run", [], "hash")
    model = build_model("resnet18", num_classes=10, norm_layer=norm_layer(norm, **run.norm_options), width=config["model"]["width"])
    assert sum(p.numel() for p in model.parameters()) > 0
    if norm == "gn":  # the width-scaled default: 8 groups in every layer of the width-16 network
        assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}


def test_runner_chunks_cover_exactly_the_grid(tmp_path):
    _, params = compose_study([], tmp_path)
    norms, seeds = params["norm"].split(","), [int(s) for s in str(params["seed"]).split(",")]
    chunks = study.chunks(norms, seeds)
    jobs = [job for chunk in chunks for job in sweep_jobs(params, study.train_command(chunk, "study_cpu", tmp_path))]
    grid = {(job["norm"], int(job["data.batch_size"]), int(job["seed"])) for job in jobs}
    assert len(jobs) == len(grid) == 4 * 5 * 2
    assert {n for n, _, _ in grid} == {"bn", "gn", "brn", "mbn"}
    assert {m for _, m, _ in grid} == {2, 4, 8, 16, 32} and {s for _, _, s in grid} == {0, 1}
    # MBN's jobs carry their option; the others none (GN's width-scaled default needs no override).
    assert all(job.get("norm.schedule") == "iteration" for job in jobs if job["norm"] == "mbn")
    assert not any("norm.num_groups" in job or "norm.schedule" in job for job in jobs if job["norm"] in ("bn", "gn", "brn"))


def test_chunks_are_seed_major_and_bad_input_is_named():
    assert [c.name for c in study.chunks(["bn", "mbn"], [0, 1])] == ["bn_seed0", "mbn_seed0", "bn_seed1", "mbn_seed1"]
    with pytest.raises(ValueError, match="norms: unknown norm 'ln'"):
        study.chunks(["bn", "ln"], [0])
    with pytest.raises(ValueError, match="seeds"):
        study.chunks(["bn"], [-1])


def test_train_and_compare_commands(tmp_path):
    command = study.train_command(study.Chunk("gn", 1), "study_cpu", tmp_path, ["epochs=1"])
    assert command[:5] == [sys.executable, "-m", "mbn.cli.train", "-m", "experiment=study_cpu"]
    assert command[5:] == ["norm=gn", "seed=1", f"output_root={tmp_path}", "epochs=1"]
    compare = study.compare_command(tmp_path / "sweep", tmp_path / "cmp", curve_batch_size=2)
    assert compare[1:] == ["-m", "mbn.cli.compare", str(tmp_path / "sweep"), "--out", str(tmp_path / "cmp"),
                           "--format", "markdown", "--metric", "final_val_acc1", "--curve-batch-size", "2"]
    assert study.single_thread_env({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_run_chunks_runs_in_parallel_and_stops_after_an_interrupted_chunk(tmp_path):
    def write(text: str, code: int) -> list[str]:
        return [sys.executable, "-c", f"print({text!r}); raise SystemExit({code})"]

    codes = study.run_chunks({"a": write("A", 0), "b": write("B", 1)}, jobs=2, log_dir=tmp_path / "logs")
    assert codes == {"a": 0, "b": 1}
    assert (tmp_path / "logs" / "a.log").read_text().strip() == "A"
    codes = study.run_chunks({"x": write("X", 130), "y": write("Y", 0), "z": write("Z", 0)}, jobs=1, log_dir=tmp_path / "logs")
    assert codes == {"x": 130}
    assert not (tmp_path / "logs" / "y.log").exists()
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        study.run_chunks({}, jobs=0, log_dir=tmp_path)


def test_tiny_study_runs_end_to_end(tiny, run_env, tmp_path, capsys):
    """Two 1-epoch fake-data runs (bn, mbn at m=8) through the runner, mbn-compare and publish."""
    published = tmp_path / "published"
    extra = tiny(data__train_subset="null", data__test_subset="null")
    code = study.main(["--out", str(run_env), "--norms", "bn,mbn", "--seeds", "0", "--publish", str(published), *extra])
    assert code == 0
    results = sorted((run_env / "sweeps" / "study_cpu").glob("*/results.json"))
    assert [read_results(p)["norm"] for p in results] == ["bn", "mbn"]
    assert all(read_results(p)["status"] == "completed" and read_results(p)["batch_size"] == 8 for p in results)
    assert read_results(results[1])["config"]["norm"]["schedule"] == "iteration"
    table = (published / "table.md").read_text()
    assert "bn" in table and "mbn" in table
    pngs = {p.name for p in published.glob("*.png")}
    assert pngs == {"final_val_acc1_vs_m.png", "val_acc1_vs_epoch_m8.png", "mbn_lam_tau_vs_epoch.png"}
    runs = (published / "runs.csv").read_text().splitlines()
    header = runs[0].split(",")
    assert header[0] == "norm.name" and "final_val_acc1" in header and "optim.base_lr" not in header
    assert sorted(row.split(",")[0] for row in runs[1:]) == ["bn", "mbn"]
    # Rerunning skips both completed runs.
    assert study.main(["--out", str(run_env), "--norms", "bn,mbn", "--seeds", "0", "--no-compare", *extra]) == 0
    assert "skipped" in (run_env / "logs" / "bn_seed0.log").read_text()


STUDY_TRAINED = Path(__file__).resolve().parents[2] / "configs" / "experiment" / "study_trained.yaml"


def test_the_trained_study_commands_plan_exactly_the_protocols_cells(run_env, capsys, tmp_path):
    from cli_runner import mbn_train

    commands = [line.split("mbn-train -m ", 1)[1].split() for line in STUDY_TRAINED.read_text().splitlines()
                if line.startswith("#   mbn-train -m ")]
    assert len(commands) == 5
    (tmp_path / "cifar10-jpeg.tar.gz").touch()  # a stand-in: the plan needs the archive path to exist
    cells: dict[tuple[str, int], set[int]] = {}
    for command in commands:
        assert mbn_train(["-m", *command, "dry_run=true", f"output_root={run_env}", f"paths.data_root={tmp_path}"]) == 0
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("mbn-train: would start "):
                parts = dict(p.split("=", 1) for p in line.split("/")[-1].split(" ")[0].split(","))
                cells.setdefault((parts["norm"], int(parts["data.batch_size"])), set()).add(int(parts["seed"]))
    assert cells == {("bn", 2): set(range(5)), ("mbn", 2): set(range(5)), ("bn", 32): set(range(5)), ("mbn", 32): {0},
                     ("bn", 8): {0, 1, 2}, ("mbn", 8): {0, 1, 2}, ("gn", 2): {0, 1, 2}, ("brn", 2): {0, 1, 2}}
