"""The Hydra config tree composes, resolves and validates; bad values fail fast with one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from cli_runner import mbn_train as main

from mbn.cli.config import CONFIG_DIR, ConfigError, group_options, job_dirname
from mbn.cli.schema import load_job, to_run_spec
from mbn.results import config_hash

EXPERIMENTS = group_options("experiment")


def composed(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_config_groups_match_the_library_registries():
    """Every option of the norm, model, data and logger groups is named alike by what builds it (the
    library's registry), by its schema (mbn.train.spec's registry, as stored in the ConfigStore) and by
    configs/<group>/, and composes into an object of that schema under its own name."""
    from mbn.data import DATASET_KINDS
    from mbn.models import MODEL_NAMES
    from mbn.nn import NORM_NAMES
    from mbn.train.loggers import LOGGER_BUILDERS
    from mbn.train.spec import GROUP_SCHEMAS, LOGGER_SCHEMAS

    built = {
        "norm": NORM_NAMES,
        "model": MODEL_NAMES,
        "data": DATASET_KINDS,
        "logger": [name for name, schema in LOGGER_SCHEMAS.items() if schema in LOGGER_BUILDERS],
    }
    assert set(GROUP_SCHEMAS) == set(built)
    assert set(LOGGER_BUILDERS) == set(LOGGER_SCHEMAS.values())
    stored = ConfigStore.instance().repo["schema"]
    # A variant is an option file that sets another option's values (norm=brn_epochs is BRN with its
    # ramps in epochs): it composes into that option's schema under that option's name.
    variants = {"norm": {"brn_epochs": "brn"}}
    for group, schemas in GROUP_SCHEMAS.items():
        assert set(built[group]) == set(schemas) == set(group_options(group)) - set(variants.get(group, {})), group
        assert {name.removesuffix(".yaml") for name in stored[group]} == set(schemas), group
        for option in group_options(group):
            overrides = [f"{group}=[{option}]" if group == "logger" else f"{group}={option}"]
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            node = cfg.logger[option] if group == "logger" else cfg[group]
            name = variants.get(group, {}).get(option, option)
            assert OmegaConf.get_type(node) is schemas[name], (group, option)
            if group != "logger":
                assert node.name == name


def test_every_schema_option_is_an_argument_of_what_it_builds():
    """A schema field the layer, model or dataset does not take would fail only when a run starts."""
    from mbn.data import dataset_arguments
    from mbn.models import model_options
    from mbn.nn import make_norm
    from mbn.train.spec import DATA_SCHEMAS, MODEL_SCHEMAS, NORM_SCHEMAS

    for name, schema in NORM_SCHEMAS.items():
        make_norm(name, 16, **schema().layer_options(16, steps_per_epoch=1))  # raises TypeError on an unaccepted keyword
    for name, schema in MODEL_SCHEMAS.items():
        assert set(schema(name=name).options) == set(model_options(name)), name
    for kind, schema in DATA_SCHEMAS.items():
        assert {f.name for f in dataclasses.fields(schema().source)} <= set(dataset_arguments(kind)), kind


def test_experiments_exist_and_have_distinct_sweep_names():
    assert {"demo", "paper_cifar10", "paper_cifar100"} <= set(EXPERIMENTS)
    names = [composed([f"experiment={name}"])["sweep_name"] for name in EXPERIMENTS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_builds_a_spec(experiment, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    sweep_params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    # Every experiment is a batch-size study (some fix the norm, e.g. study_cpu runs one per norm).
    assert "data.batch_size" in sweep_params
    with open_dict(cfg):
        del cfg["hydra"]
        if cfg.data.name in ("cifar100", "imagenet"):
            # No CIFAR-100 or ImageNet on this machine: point at a stand-in dir so the path check passes.
            cfg.data.source.root = str(tmp_path)
    job = load_job(cfg)
    config = job.config
    spec = to_run_spec(job, tmp_path / "run", [f"experiment={experiment}"], config_hash(config))
    assert spec.sweep_name == config["sweep_name"] == experiment
    assert spec.epochs == config["epochs"] >= 1


def test_paper_experiments_follow_the_paper():
    for experiment, dataset in (("paper_cifar10", "cifar10_archive"), ("paper_cifar100", "cifar100")):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        assert [int(m) for m in params["data.batch_size"].split(",")] == [2, 4, 8, 16, 32]
        assert set(params["norm"].split(",")) == {"bn", "gn", "brn", "mbn"}
        assert (cfg.epochs, cfg.model.name, cfg.model.width, cfg.data.name) == (200, "resnet18", 64, dataset)
        assert (cfg.optim.base_lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
        assert list(cfg.optim.milestones) == [0.3, 0.6, 0.9] and cfg.trainer.accelerator == "gpu"


def test_defaults_are_the_paper_recipe():
    config = composed([])
    assert config["norm"]["name"] == "bn" and config["model"]["name"] == "resnet18"
    assert config["optim"]["base_lr"] == 0.1 and config["optim"]["reference_batch_size"] == 64
    assert set(config["logger"]) == {"csv", "wandb"} and config["logger"]["wandb"]["offline"] is True
    assert Path(config["data"]["source"]["archive"]).name == "cifar10-jpeg.tar.gz"


def test_trainer_configs_gpu_and_ddp():
    gpu, ddp = composed(["trainer=gpu"])["trainer"], composed(["trainer=ddp", "trainer.devices=4"])["trainer"]
    assert (gpu["accelerator"], gpu["precision"], gpu["benchmark"], gpu["devices"]) == ("gpu", "bf16-mixed", True, 1)
    assert (ddp["strategy"], ddp["devices"], ddp["precision"]) == ("ddp", 4, "bf16-mixed")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        job = load_job(compose(config_name="train", overrides=["trainer=ddp", "data.batch_size=2"]))
    spec = to_run_spec(job, "/tmp/x", [], "h")
    assert (spec.data.batch_size, spec.trainer.world_size, spec.global_batch_size) == (2, 2, 4)
    assert spec.optim.lr(spec.global_batch_size) == pytest.approx(0.1 * 4 / 64)


def test_several_loggers_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MBN_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("MBN_OUTPUT_ROOT", str(tmp_path / "out"))
    config = composed(["logger=[csv,wandb,tensorboard]", "logger.wandb.offline=false"])
    assert set(config["logger"]) == {"csv", "wandb", "tensorboard"}
    assert config["logger"]["wandb"]["offline"] is False
    assert config["data"]["source"]["archive"] == f"{tmp_path}/cifar10-jpeg.tar.gz"
    assert config["output_root"] == str(tmp_path / "out")


def test_config_hash_ignores_location_and_loggers_but_not_the_science(tmp_path):
    base = config_hash(composed(["data=fake"]))
    assert config_hash(composed(["data=fake", f"output_root={tmp_path}", "sweep_name=x", "logger=[csv,wandb]"])) == base
    assert config_hash(composed(["data=fake", "norm=mbn"])) != base
    assert config_hash(composed(["data=fake", "data.batch_size=2"])) != base


def test_job_dirname_is_deterministic_sorted_and_excludes_keys():
    assert job_dirname([]) == "default"
    name = job_dirname(["norm=mbn", "data.batch_size=2", "+logger.wandb.offline=false", "output_root=/x"], ["logger", "output_root"])
    assert name == "data.batch_size=2,norm=mbn"
    assert job_dirname(["data.source.archive=/a/b.tar.gz"]) == "data.source.archive=_a_b.tar.gz"
    assert job_dirname(["hydra.launcher.n_jobs=2", "seed=1"]) == "seed=1"
    long_a = job_dirname([f"x{i}=1" for i in range(60)] + ["y=1"])
    long_b = job_dirname([f"x{i}=1" for i in range(60)] + ["y=2"])
    assert len(long_a) <= 200 and long_a != long_b


BAD_OVERRIDES = [
    (["data.batch_size=0"], "data.batch_size: must be a positive integer, got 0"),
    (["norm.name=foo"], "norm.name: unknown value 'foo'; expected one of bn, gn, brn, mbn, none, evonorm_b0, evonorm_s0, frn"),
    # A name is its option's: renaming one would configure another with the wrong schema.
    (["norm=bn", "norm.name=gn"], "norm.name: 'gn' is another option (a GroupNormSpec, not a BatchNormSpec): select it with norm=gn"),
    (["model.name=resnet19"], "model.name: unknown value 'resnet19'; expected one of resnet18, resnet34"),
    (["data=fake", "data.name=cifar10"], "data.name: 'cifar10' is another option (a Cifar10DataSpec, not a FakeDataSpec)"),
    (["norm=gn", "model.width=8", "norm.num_groups=3"], "norm.num_groups: 3 groups do not divide model.width=8 channels"),
    (["norm=gn", "model.width=16", "norm.num_groups=32"], "norm.num_groups: 32 groups do not divide model.width=16 channels (null means width-scaled"),
    (["norm=gn", "model.width=8", "norm.num_groups=null", "norm.group_size=3"], "norm.group_size: 3 does not divide model.width=8"),
    (["epochs=0"], "epochs: must be a positive integer, got 0"),
    (["data.source.archive=/no/such/archive.tar.gz"], "data.source.archive: no such file: /no/such/archive.tar.gz"),
    (["data=imagefolder"], "data.source.root: a value is required (set data.source.root=...)"),
    # A wrong type is OmegaConf's check, by the schema's type (the range check runs on integers).
    (["data=fake", "data.batch_size=abc"], "data.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    (["data=fake", "data.train_subset=4", "data.batch_size=8"], "data.train_subset: 4 images cannot fill one batch"),
    (["optim.milestones=[0.6,0.3]"], "optim.milestones: must be increasing, got [0.6, 0.3]"),
    (["optim.schedule=linear"], "optim.schedule: unknown value 'linear'; expected one of step, cosine"),
    (["norm=mbn", "norm.tau0=1.5"], "norm.tau0: must be a number in [0, 1], got 1.5"),
    (["norm=mbn", "norm.schedule=fixed"], "norm.fixed_lam: must be a number in [0, 1), got None"),
    (["trainer.precision=fp8"], "trainer.precision: unknown value 'fp8'; expected one of 64-true"),
    (["norm=mbn", "norm.ideal_batch_size=0"], "norm.ideal_batch_size: must be a number in [1, inf), got 0"),
    (["sweep_name=.."], "sweep_name: must name a dir inside its parent (not empty, '.' or '..', no '/'), got '..'"),
    (["sweep_name=/tmp/elsewhere"], "sweep_name: must name a dir inside its parent"),
    # The ImageNet ResNet's last feature map is 1x1 at 32 px: one image leaves BN one value per channel.
    (["model=imagenet_resnet18", "data=fake", "data.source.image_size=32", "data.batch_size=1"],
     "data.batch_size: 1 image per device leaves the bn layers of imagenet_resnet18 one value per channel at its "
     "smallest feature map (1x1 at 32 px)"),
    (["model=imagenet_resnet18", "norm=mbn", "data=fake", "data.source.image_size=32", "data.batch_size=1"],
     "data.batch_size: 1 image per device leaves the mbn layers"),
    (["model=imagenet_resnet18", "norm=evonorm_b0", "data=fake", "data.source.image_size=32", "data.batch_size=1"],
     "data.batch_size: 1 image per device leaves the evonorm_b0 layers"),
    (["norm=evonorm_s0", "model.width=8", "norm.num_groups=3"], "norm.num_groups: 3 groups do not divide model.width=8 channels"),
    (["norm=evonorm_b0", "norm.momentum=2"], "norm.momentum: must be a number in [0, 1], got 2.0"),
    (["norm=frn", "norm.eps=-1"], "norm.eps: must be a number in [0, inf), got -1.0"),
    (["trainer.compile=true", "norm=mabn"], "trainer.compile: norm=mabn would recompile at every training step"),
    (["trainer.compile=true", "norm=brn_epochs"], "trainer.compile: norm=brn would recompile at every training step"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[o[0][-1] for o in BAD_OVERRIDES])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, message, run_env, capsys):
    code = main([*overrides, f"output_root={run_env}"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mbn-train: invalid config: {message}"), err
    assert "Traceback" not in out + err
    # Nothing but Hydra's bookkeeping was created, and that is cleaned up.
    assert not run_env.exists() or not any(p.is_file() for p in (run_env / "runs").rglob("*"))


def test_unknown_key_and_unknown_group_option_fail_before_training(run_env):
    # Hydra's own composition errors get the same contract as every config error: one line, exit 2.
    for overrides, expected in ((["data.batch_sise=3"], "data.batch_sise: unknown key; did you mean data.batch_size or data.eval_batch_size?"),
                                (["norm=foo"], "norm: unknown option 'foo'; expected one of bn, brn, brn_epochs, cbn, evonorm_b0, evonorm_s0, frn, gn, mabn, mbn, none")):
        proc = subprocess.run(
            [sys.executable, "-m", "mbn.cli.train", *overrides, f"output_root={run_env}"],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2 and proc.stderr.strip() == f"mbn-train: invalid config: {expected}", proc.stderr


def test_config_error_carries_key():
    error = ConfigError("data.batch_size", "must be a positive integer, got 0")
    assert error.key == "data.batch_size" and str(error) == "data.batch_size: must be a positive integer, got 0"


def test_start_up_gn_default_is_the_layers_default():
    from mbn.train.spec import DEFAULT_GN_GROUPS
    from mbn.nn.group_norm import DEFAULT_NUM_GROUPS, GroupNorm

    assert DEFAULT_GN_GROUPS == DEFAULT_NUM_GROUPS == GroupNorm(64).num_groups


def test_the_imagenet_experiment_streams_224px_with_small_per_gpu_batches(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=paper_imagenet", f"data.source.root={tmp_path}"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert [int(m) for m in params["data.batch_size"].split(",")] == [2, 4, 8, 16, 32]
    with open_dict(cfg):
        del cfg["hydra"]
    job = load_job(cfg)
    spec = to_run_spec(job, tmp_path / "run", [], config_hash(job.config))
    assert spec.data.streams and spec.data.source.image_size == 224 and spec.model.name == "imagenet_resnet50"
    assert (spec.trainer.world_size, spec.trainer.strategy, spec.epochs) == (8, "ddp", 90)
    assert spec.optim.lr(spec.global_batch_size) == pytest.approx(0.1 * spec.data.batch_size * 8 / 256)


def test_streaming_needs_a_directory_tree(tmp_path, run_env, capsys):
    archive = tmp_path / "mini.tar.gz"
    archive.touch()
    assert main(["data=imagefolder", f"data.source.root={archive}", "data.in_memory=false", f"output_root={run_env}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"mbn-train: invalid config: data.in_memory: streaming reads a directory tree, but data.source.root is a file: {archive}")
