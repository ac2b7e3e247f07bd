"""The batch-size studies' runner: its commands plan exactly the protocols' cells, it prints what it runs,
and a tiny study runs end to end through the CLI's stacked, parallel sweeps, mbn-compare and publish."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from experiments.batch_size_study import run as study
from cli_runner import checked_config, mbn_train

from mbn.cli.config import CONFIG_DIR
from mbn.cli.schema import load_job, to_run_spec
from mbn.models import build_model
from mbn.nn import norm_layer
from mbn.results import read_results

REPO_ROOT = Path(__file__).resolve().parents[2]
UNDERTRAINED = study.STUDIES["undertrained"]
TRAINED = study.STUDIES["trained"]


def compose_experiment(experiment: str, overrides: list[str], data_root: Path) -> tuple[dict, dict]:
    """(resolved config with a stand-in archive under data_root, sweeper params) of an experiment."""
    (data_root / "cifar10-jpeg.tar.gz").touch()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", f"paths.data_root={data_root}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    with open_dict(cfg):
        del cfg["hydra"]
    return checked_config(cfg), params


def sweep_jobs(params: dict, command: list[str]) -> list[dict[str, str]]:
    """The jobs Hydra's basic sweeper makes of ``mbn-train -m ...`` (its overrides win over the config's params)."""
    assert command[:2] == ["mbn-train", "-m"]
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()] + command[2:])
    return [dict(item.split("=", 1) for item in job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def planned_cells(commands: list[list[str]], output_root: Path, data_root: Path, capsys) -> dict[tuple[str, int], set[int]]:
    """(norm, m) -> seeds that ``dry_run=true`` of each command says it would start."""
    (data_root / "cifar10-jpeg.tar.gz").touch()  # a stand-in: the plan needs the archive path to exist
    cells: dict[tuple[str, int], set[int]] = {}
    for command in commands:
        assert command[:2] == ["mbn-train", "-m"]
        assert mbn_train([*command[1:], "dry_run=true", f"output_root={output_root}", f"paths.data_root={data_root}"]) == 0
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("mbn-train: would start "):
                parts = dict(p.split("=", 1) for p in line.split("/")[-1].split(" ")[0].split(","))
                cells.setdefault((parts["norm"], int(parts["data.batch_size"])), set()).add(int(parts["seed"]))
    return cells


def test_the_trained_study_commands_plan_exactly_the_protocols_cells(run_env, capsys, tmp_path):
    assert planned_cells(TRAINED.train_commands(), run_env, tmp_path, capsys) == {
        ("bn", 2): set(range(5)), ("mbn", 2): set(range(5)), ("bn", 32): set(range(5)), ("mbn", 32): {0},
        ("bn", 8): {0, 1, 2}, ("mbn", 8): {0, 1, 2}, ("gn", 2): {0, 1, 2}, ("brn", 2): {0, 1, 2}}


@pytest.mark.parametrize("name", sorted(study.STUDIES))
def test_the_documented_commands_are_the_runners(name):
    """The experiment config and EXPERIMENTS.md list exactly the commands the runner runs."""
    definition = study.STUDIES[name]
    config = (CONFIG_DIR / "experiment" / f"{definition.experiment}.yaml").read_text()
    listed = [line.split("#", 1)[1].strip() for line in config.splitlines() if line.startswith("#   mbn-train -m ")]
    # Studies that share an experiment config (the curve study's grids and its peers' grids) list their
    # commands there one study after the other.
    sharing = [d for d in study.STUDIES.values() if d.experiment == definition.experiment]
    assert listed == [study.shown(command) for d in sharing for command in d.train_commands()]
    experiments_md = (REPO_ROOT / "EXPERIMENTS.md").read_text()
    assert all(study.shown(command) in experiments_md for command in definition.train_commands())


def test_the_trained_experiment_is_the_protocols_recipe(tmp_path):
    config, params = compose_experiment("study_trained", [], tmp_path)
    assert (config["model"]["name"], config["model"]["width"], config["data"]["name"]) == ("resnet18", 16, "cifar10_archive")
    assert (config["epochs"], config["data"]["train_subset"], config["data"]["test_subset"]) == (30, 5000, 2000)
    optim = config["optim"]
    assert (optim["base_lr"], optim["reference_batch_size"], optim["momentum"], optim["weight_decay"]) == (0.1, 64, 0.9, 1e-4)
    assert optim["schedule"] == "cosine" and config["trainer"]["num_threads"] == 1
    assert (config["norm"]["name"], config["sweep_name"]) == ("bn", "study_trained")
    mbn, _ = compose_experiment("study_trained", ["norm=mbn"], tmp_path)
    assert (mbn["norm"]["ideal_batch_size"], mbn["norm"]["schedule"]) == (32, "epoch")


def test_the_curve_experiment_is_the_protocols_recipe(tmp_path):
    """EXPERIMENTS.md, "The paper's figure, fairly": the trained-regime recipe with a 1,000-image validation
    split, and BRN's ramps of 1 / 9 / 6 epochs; its grid tables read the validation split only."""
    config, _ = compose_experiment("study_curve", [], tmp_path)
    trained, _ = compose_experiment("study_trained", [], tmp_path)
    assert config["data"]["val_subset"] == 1000 and config["sweep_name"] == "study_curve"
    for key in ("model", "optim", "trainer", "epochs"):
        assert config[key] == trained[key], key
    assert {k: v for k, v in config["data"].items() if k != "val_subset"} == {k: v for k, v in trained["data"].items() if k != "val_subset"}
    brn, _ = compose_experiment("study_curve", ["norm=brn_epochs"], tmp_path)
    assert brn["norm"]["name"] == "brn"
    assert (brn["norm"]["warmup_epochs"], brn["norm"]["r_max_ramp_epochs"], brn["norm"]["d_max_ramp_epochs"]) == (1, 9, 6)
    assert (brn["norm"]["r_max"], brn["norm"]["d_max"]) == (3.0, 5.0)
    grid = study.STUDIES["curve_grid"]
    assert grid.metric == "final_val_acc1" and grid.curve_metric == "val_acc1" and grid.baseline is None


def test_the_undertrained_study_covers_exactly_its_grid(tmp_path):
    config, params = compose_experiment("study_cpu", [], tmp_path)
    assert (config["epochs"], config["data"]["train_subset"], config["model"]["width"]) == (6, 3000, 16)
    jobs = [job for command in UNDERTRAINED.train_commands() for job in sweep_jobs(params, command)]
    grid = {(job["norm"], int(job["data.batch_size"]), int(job["seed"])) for job in jobs}
    assert len(jobs) == len(grid) == 4 * 5 * 2
    assert {n for n, _, _ in grid} == {"bn", "gn", "brn", "mbn"}
    assert {m for _, m, _ in grid} == {2, 4, 8, 16, 32} and {s for _, _, s in grid} == {0, 1}
    # Only MBN's jobs carry an option (GN's width-scaled default needs no override).
    assert all(job.get("norm.schedule") == "iteration" for job in jobs if job["norm"] == "mbn")
    assert not any("norm.schedule" in job or "norm.num_groups" in job for job in jobs if job["norm"] != "mbn")


@pytest.mark.parametrize("norm", ["bn", "gn", "brn", "mbn"])
def test_every_norm_of_the_studies_validates_and_builds(norm, tmp_path):
    command = next(c for c in UNDERTRAINED.train_commands() if any(norm in o.split("=")[1].split(",") for o in c if o.startswith("norm=")))
    options = [o for o in command[3:] if o.startswith("norm.")]
    (tmp_path / "cifar10-jpeg.tar.gz").touch()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=study_cpu", f"paths.data_root={tmp_path}", f"norm={norm}", *options])
    run = to_run_spec(load_job(cfg), tmp_path / "run", [], "hash")
    model = build_model("resnet18", num_classes=10, norm_layer=norm_layer(norm, **run.norm_options()), width=run.model.width)
    assert sum(p.numel() for p in model.parameters()) > 0
    if norm == "gn":  # the width-scaled default: 8 groups in every layer of the width-16 network
        assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    if norm == "mbn":
        assert run.norm.schedule == "iteration"


def test_dry_run_prints_what_a_user_types(capsys, monkeypatch):
    monkeypatch.delenv("MBN_OUTPUT_ROOT", raising=False)
    assert study.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [study.shown(command) for command in TRAINED.train_commands()]
    assert lines[0] == "mbn-train -m experiment=study_trained norm=bn,mbn data.batch_size=2 seed=0,1,2,3,4 stack=5"
    assert lines[5] == ("mbn-compare outputs/sweeps/study_trained --out outputs/compare/study_trained --format markdown "
                        "--rows norm --cols data.batch_size --metric final_test_acc1 --interval ci95 --curve-metric test_acc1 --curve-batch-size 2 --baseline bn")
    assert lines[6:] == [
        "mbn-compare outputs/sweeps/study_trained --format markdown --rows norm --cols data.batch_size --metric final_train_loss --interval ci95 "
        "--decimals 3 > outputs/compare/study_trained/final_train_loss.md",
        "mbn-compare outputs/sweeps/study_trained --format markdown --rows norm --cols data.batch_size --metric final_train_acc1 --interval ci95 "
        "--decimals 2 > outputs/compare/study_trained/final_train_acc1.md"]
    # Without --out the sweep dir follows the config's output_root default, $MBN_OUTPUT_ROOT included.
    monkeypatch.setenv("MBN_OUTPUT_ROOT", "/data/runs")
    assert study.sweep_dir_of(TRAINED, None) == Path("/data/runs/sweeps/study_trained")
    assert study.sweep_dir_of(TRAINED, "x") == Path("x/sweeps/study_trained")
    assert study.main(["--dry-run", "--study", "undertrained", "--out", "x y", "--no-compare", "epochs=1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "mbn-train -m experiment=study_cpu norm=bn,gn,brn seed=0,1 'output_root=x y' epochs=1",
        "mbn-train -m experiment=study_cpu norm=mbn norm.schedule=iteration seed=0,1 'output_root=x y' epochs=1"]


def test_commands_run_as_printed_and_nothing_starts_after_an_interrupt(tmp_path, capfd):
    assert study.executable(["mbn-train", "-m", "a=1"]) == [sys.executable, "-m", "mbn.cli.train", "-m", "a=1"]
    assert study.executable(["echo", "hi"]) == ["echo", "hi"]

    def exits(text: str, code: int) -> list[str]:
        return [sys.executable, "-c", f"print({text!r}); raise SystemExit({code})"]

    assert study.run_commands([(exits("A", 0), None), (exits("B", 1), tmp_path / "sub" / "b.txt"), (exits("C", 0), None)]) == [0, 1, 0]
    out = capfd.readouterr().out
    assert "$ " + study.shown(exits("B", 1), tmp_path / "sub" / "b.txt") in out and "A\n" in out and "B\n" not in out
    assert (tmp_path / "sub" / "b.txt").read_text() == "B\n"
    assert study.run_commands([(exits("X", 130), None), (exits("Y", 0), None)]) == [130]
    assert "Y\n" not in capfd.readouterr().out


def test_a_tiny_study_runs_end_to_end_stacked_and_in_parallel(tiny, run_env, tmp_path, monkeypatch, capfd):
    """BN and MBN x 2 seeds, each norm's seeds one stacked pack, the two packs in two joblib workers,
    then mbn-compare with the difference to BN, the side tables and publish; on a fresh machine
    (no sweep dir) the study's rerun restores the published records and trains nothing."""
    published = tmp_path / "published"
    monkeypatch.setitem(study.STUDIES, "tiny", study.Study(
        experiment="study_trained", sweep_name="tiny", sweeps=(("norm=bn,mbn", "seed=0,1", "stack=2"),), curve_batch_size=8,
        published=str(published)))
    extra = [o for o in tiny(data__train_subset="null", data__test_subset="null", epochs=2, sweep_name="tiny")
             if not o.startswith("output_root=")]
    stale_plot = run_env / "compare" / "tiny" / "test_acc1_vs_epoch_m2.png"  # an earlier compare's, at another m
    stale_plot.parent.mkdir(parents=True)
    stale_plot.write_bytes(b"")
    assert study.main(["--study", "tiny", "--out", str(run_env), "--publish", str(published), *extra]) == 0
    out = capfd.readouterr().out
    assert "$ mbn-train -m experiment=study_trained norm=bn,mbn seed=0,1 stack=2" in out
    records = sorted((run_env / "sweeps" / "tiny").glob("*/results.json"))
    assert sorted((read_results(p)["norm"], read_results(p)["seed"]) for p in records) == [("bn", 0), ("bn", 1), ("mbn", 0), ("mbn", 1)]
    assert all(read_results(p)["status"] == "completed" and read_results(p)["epochs_completed"] == 2 for p in records)
    # Each norm's two seeds trained in one process; the two packs in two other processes (joblib).
    pids = {read_results(p)["norm"]: set() for p in records}
    for p in records:
        pids[read_results(p)["norm"]].add(read_results(p)["attempts"][-1]["pid"])
    assert all(len(v) == 1 for v in pids.values()) and pids["bn"] != pids["mbn"]
    assert {p.name for p in published.iterdir()} == {
        "table.md", "differences.csv", "final_train_loss.md", "final_train_acc1.md", "runs.csv", "runs",
        "final_test_acc1_vs_m.png", "final_test_acc1_difference_to_bn_vs_m.png", "test_acc1_vs_epoch_m8.png",
        "mbn_lam_tau_vs_epoch.png"}
    table = (published / "table.md").read_text()
    assert "difference to bn" in table and "paired t (n=2)" in table
    assert "final_train_loss" in (published / "final_train_loss.md").read_text()
    header, *rows = (published / "runs.csv").read_text().splitlines()
    assert header.split(",")[:2] == ["norm.name", "seed"] and "final_train_acc1" in header.split(",")
    assert len(rows) == 4
    copies = sorted((published / "runs").glob("*/results.json"))
    assert [p.parent.name for p in copies] == [p.parent.name for p in records]
    assert json.loads(copies[0].read_text()) == json.loads(records[0].read_text())

    # A fresh clone: the committed records are all there is. The rerun copies them back and skips every run.
    originals = {p.parent.name: p.read_bytes() for p in records}
    shutil.rmtree(run_env / "sweeps" / "tiny")
    assert study.main(["--study", "tiny", "--out", str(run_env), "--no-compare", *extra]) == 0
    out = capfd.readouterr().out
    assert f"restored 4 finished runs from {published / 'runs'} into {run_env / 'sweeps' / 'tiny'}" in out
    assert {p.parent.name: p.read_bytes() for p in (run_env / "sweeps" / "tiny").glob("*/results.json")} == originals
    assert not list((run_env / "sweeps" / "tiny").glob("*/checkpoints"))  # nothing trained

    # Only finished records are restored (completed, and diverged: a sweep keeps both as final), and
    # never over a record the sweep dir holds.
    interrupted = json.loads(copies[1].read_text()) | {"status": "interrupted"}
    copies[1].write_text(json.dumps(interrupted))
    copies[3].write_text(json.dumps(json.loads(copies[3].read_text()) | {"status": "diverged"}))
    own = {**json.loads(copies[2].read_text()), "status": "interrupted"}
    shutil.rmtree(run_env / "sweeps" / "tiny")
    (run_env / "sweeps" / "tiny" / copies[2].parent.name).mkdir(parents=True)
    (run_env / "sweeps" / "tiny" / copies[2].parent.name / "results.json").write_text(json.dumps(own))
    restored = study.restore(published / "runs", run_env / "sweeps" / "tiny")
    assert sorted(p.parent.name for p in restored) == [copies[0].parent.name, copies[3].parent.name]
    assert json.loads((run_env / "sweeps" / "tiny" / copies[2].parent.name / "results.json").read_text()) == own
    assert not (run_env / "sweeps" / "tiny" / copies[1].parent.name).exists()
    assert json.loads(restored[1].read_text())["status"] == "diverged"
    assert study.restore(tmp_path / "nothing-published", run_env / "sweeps" / "tiny") == []
