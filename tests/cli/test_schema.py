"""The config's schema: one typed dataclass per group option, registered in Hydra's ConfigStore."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from cli_runner import mbn_train
from hydra import compose, initialize_config_dir

from mbn.cli import schema
from mbn.cli.config import CONFIG_DIR, group_options
from mbn.train import spec as specs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group", ["norm", "data", "model", "optim", "trainer", "logger"])
def test_group_yaml_files_extend_their_schema_and_repeat_none_of_its_defaults(group):
    defaults_of = specs.GROUP_SCHEMAS
    for path in (CONFIG_DIR / group).glob("*.yaml"):
        content = yaml.safe_load(path.read_text()) or {}
        assert any(str(entry).startswith(f"/schema/{group}/") or entry in group_options(group) for entry in content["defaults"]), path
        values = {k: v for k, v in content.items() if k != "defaults"}
        if group in defaults_of:
            # A variant file (norm/brn_epochs) extends another option's schema, the one its defaults name.
            schema_entry = next(str(entry) for entry in content["defaults"] if str(entry).startswith(f"/schema/{group}/"))
            schema_class = defaults_of[group][schema_entry.removeprefix(f"/schema/{group}/").split("@")[0]]
            defaults = {f.name: getattr(schema_class(**({"name": path.stem} if group == "model" else {})), f.name)
                        for f in dataclasses.fields(schema_class)}
            repeated = {k: v for k, v in values.items() if k in defaults and defaults[k] == v}
            assert not repeated, f"{path} repeats schema defaults {repeated}"


def test_the_run_spec_is_built_by_omegaconf_from_the_typed_config(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=fake", "norm=gn", "norm.num_groups=4", "model.width=8",
                                                       "logger=[csv,tensorboard]"])
    job = schema.load_job(cfg)
    run = schema.to_run_spec(job, tmp_path / "run", ["norm=gn"], "abc")
    assert isinstance(run.norm, specs.GroupNormSpec) and run.norm.options == {"num_groups": 4, "group_size": None, "eps": 1e-5}
    assert isinstance(run.data, specs.FakeDataSpec) and isinstance(run.data.source, specs.FakeSource)
    assert isinstance(run.model, specs.ResNetSpec) and run.model.options == {"zero_init_residual": False}
    assert run.loggers == specs.LoggerSpec(selected={"csv": specs.CsvLoggerSpec(), "tensorboard": specs.TensorBoardSpec()})
    assert run.run_name == "run" and run.config == job.config and "dry_run" not in job.config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["norm=foo"], "norm: unknown option 'foo'; expected one of bn, brn, brn_epochs, cbn, evonorm_b0, evonorm_s0, frn, gn, mabn, mbn, none"),
        (["model=foo"], "model: unknown option 'foo'; expected one of imagenet_resnet18"),
        (["logger=[foo]"], "logger: unknown option 'foo'; expected one of csv, tensorboard, wandb"),
        (["data.batchsize=2"], "data.batchsize: unknown key; did you mean data.batch_size"),
        (["norm.momentum=abc"], "norm.momentum: Value 'abc' of type 'str' could not be converted to Float"),
        (["norm.momentum=2"], "norm.momentum: must be a number in [0, 1], got 2.0"),
        (["norm=brn", "norm.momentum=-0.5"], "norm.momentum: must be a number in [0, 1], got -0.5"),
        (["norm=gn", "norm.eps=-1"], "norm.eps: must be a number in [0, inf), got -1.0"),
        (["trainer.devices=0"], "trainer.devices: must be a positive integer, got 0"),
        (["debug.fail_at_epoch=0"], "debug.fail_at_epoch: must be a positive integer or null, got 0"),
        (["debug.hold_at_epoch=-1"], "debug.hold_at_epoch: must be a positive integer or null, got -1"),
        (["dry_run=maybe"], "dry_run: Value 'maybe' is not a valid bool"),
        (["data.val_subset=-1"], "data.val_subset: must be a positive integer or null, got -1"),
        (["data.source.num_train=100", "data.val_subset=100"], "data.val_subset: must be smaller than the 100 training images, got 100"),
        # `+` opens the config for a key the schema lacks: still refused, after composition.
        (["+trainer.sync_batchnorm=true"], "trainer.sync_batchnorm: unknown key; valid keys of trainer: accelerator,"),
        (["+foo=1"], "foo: unknown key; valid keys of the config: data, debug,"),
        (["+model.widht=8"], "model.widht: unknown key; did you mean model.width?"),
        (["++norm.momentun=0.1"], "norm.momentun: unknown key; did you mean norm.momentum?"),
    ],
)
@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_every_composition_error_is_one_line_and_exit_2(overrides, message, multirun, run_env, capsys):
    argv = [*overrides, "data=fake", f"output_root={run_env}"]
    code = mbn_train(["-m", *argv, "seed=0,1"] if multirun else argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    # One line in a sweep too: Hydra stops at the first composition error, and a rule broken by every
    # job alike is said once.
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(message in line for line in lines), err
    assert "Traceback" not in out + err and "HYDRA_FULL_ERROR" not in out + err
    assert not list(run_env.rglob("results.json"))


SCHEMA_GROUPS = ["data", "data.source", "model", "norm", "optim", "trainer", "logger.csv", "logger.wandb", "paths", "debug"]


@pytest.mark.parametrize("group", SCHEMA_GROUPS)
def test_a_key_added_with_plus_to_any_group_is_refused_before_any_work(group, run_env, capsys):
    """A key outside the schema never reaches a run's record, whichever group it is added to."""
    argv = [f"+{group}.not_a_key=1", "data=fake", f"output_root={run_env}"]
    # Before a sweep starts too (the same check, on every job's composed config): shown for one group.
    for command in (argv, ["-m", *argv, "seed=0,1"]) if group == "trainer" else (argv,):
        assert mbn_train(command) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"mbn-train: invalid config: {group}.not_a_key: unknown key"), line
    assert not list(run_env.rglob("results.json")) and not list(run_env.rglob("config.yaml"))


def test_a_key_added_with_plus_to_the_loggers_must_name_a_logger(run_env, capsys):
    assert mbn_train(["+logger.foo={}", "data=fake", f"output_root={run_env}"]) == 2
    assert "logger.foo: unknown key; valid keys of logger: csv, tensorboard, wandb" in capsys.readouterr().err
