"""Rules of the run spec that depend on more than one field or on the environment: GN's width-scaled
default groups, trainer.compile's torch floor and the norms it refuses; the registries of group options and the loggers a run selects."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from mbn.nn import functional
from mbn.train import spec as specs


@pytest.mark.parametrize("width, groups", [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1), (1, 1), (128, 64),
                                           (12, 6), (15, 5), (9, 3), (7, 1)])
def test_width_scaled_groups_keep_the_standard_networks_channels_per_group(width, groups):
    assert specs.width_scaled_gn_groups(width) == groups
    assert width % groups == 0


def test_the_run_resolves_gn_defaults_with_its_width_and_keeps_set_values():
    def run(norm: specs.GroupNormSpec, width: int) -> specs.RunSpec:
        return specs.RunSpec(data=specs.FakeDataSpec(), model=specs.ResNetSpec(name="resnet18", width=width), norm=norm)

    assert run(specs.GroupNormSpec(), 16).norm_options() == {"num_groups": 8, "group_size": None, "eps": 1e-5}
    assert run(specs.GroupNormSpec(), 64).norm_options()["num_groups"] == specs.DEFAULT_GN_GROUPS
    assert run(specs.GroupNormSpec(num_groups=2), 16).norm_options()["num_groups"] == 2
    assert run(specs.GroupNormSpec(group_size=4), 16).norm_options() == {"num_groups": None, "group_size": 4, "eps": 1e-5}
    assert run(specs.BatchNormSpec(), 16).norm_options() == {"eps": 1e-5, "momentum": 0.1}
    with pytest.raises(specs.SpecError, match="norm.num_groups: 32 groups do not divide model.width=16"):
        run(specs.GroupNormSpec(num_groups=32), 16)



def test_evonorm_s0_takes_gns_groups_width_scaled_and_checked_against_the_width():
    def run(norm: specs.NormSpec, width: int) -> specs.RunSpec:
        return specs.RunSpec(data=specs.FakeDataSpec(), model=specs.ResNetSpec(name="resnet18", width=width), norm=norm)

    assert run(specs.EvoNormS0Spec(), 16).norm_options() == {"num_groups": 8, "group_size": None, "eps": 1e-5}
    assert run(specs.EvoNormS0Spec(), 64).norm_options()["num_groups"] == specs.DEFAULT_GN_GROUPS
    assert run(specs.EvoNormS0Spec(group_size=4), 16).norm_options() == {"num_groups": None, "group_size": 4, "eps": 1e-5}
    with pytest.raises(specs.SpecError, match="norm.num_groups: 32 groups do not divide model.width=16"):
        run(specs.EvoNormS0Spec(num_groups=32), 16)
    with pytest.raises(specs.SpecError, match="group_size: set num_groups or group_size, not both"):
        specs.EvoNormS0Spec(num_groups=2, group_size=4)
    assert run(specs.EvoNormB0Spec(), 16).norm_options() == {"eps": 1e-5, "momentum": 0.1}
    assert run(specs.FilterResponseNormSpec(), 16).norm_options() == {"eps": 1e-6}


@pytest.mark.parametrize("spec, changes, message", [
    (specs.EvoNormB0Spec, {"eps": -1.0}, "eps: must be a number in [0, inf), got -1.0"),
    (specs.EvoNormB0Spec, {"momentum": 1.5}, "momentum: must be a number in [0, 1], got 1.5"),
    (specs.EvoNormS0Spec, {"num_groups": 0}, "num_groups: must be a positive integer or null, got 0"),
    (specs.FilterResponseNormSpec, {"eps": float("nan")}, "eps: must be a number in [0, inf), got nan"),
])
def test_the_peers_schemas_refuse_bad_values(spec, changes, message):
    with pytest.raises(specs.SpecError, match=re.escape(message)):
        spec(**changes)

def test_compile_is_refused_below_the_torch_that_compiles_mbn(monkeypatch):
    assert specs.COMPILE_MIN_TORCH == functional.COMPILE_MIN_TORCH
    # The installed torch passes exactly when mbn.nn says it compiles MBN.
    try:
        specs.TrainerSpec(compile=True)
        accepted = True
    except specs.SpecError:
        accepted = False
    assert accepted == functional.compile_supported(), torch.__version__
    for version, refused in (("2.3.1", True), ("2.5.1+cu124", True), ("2.6.0", False), ("2.14.1+cu130", False), ("3.0.0", False)):
        monkeypatch.setattr(specs, "_installed_torch", lambda: version)
        specs.TrainerSpec(compile=False)  # only compile asks for the newer torch
        if refused:
            with pytest.raises(specs.SpecError, match=rf"^compile: needs torch >= 2\.6 .* this is torch {re.escape(version)}: set trainer.compile=false$"):
                specs.TrainerSpec(compile=True)
        else:
            specs.TrainerSpec(compile=True)


def _graphs_compiled(run: specs.RunSpec, steps: int) -> list[int]:
    """Dynamo's graph count after each of ``steps`` SGD steps of ``run``'s model, compiled."""
    from torch._dynamo.utils import counters

    from mbn.models import build_model
    from mbn.nn import norm_layer

    torch.manual_seed(0)
    model = build_model(run.model.name, width=run.model.width, norm_layer=norm_layer(run.norm.name, **run.norm_options(steps_per_epoch=1)))
    model.compile(backend="eager")  # dynamo's guards and recompiles are the backend's inputs, whatever the backend
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


@pytest.mark.torch_compile
@pytest.mark.parametrize("name", sorted(specs.NORM_SCHEMAS))
def test_compile_is_refused_exactly_for_the_norms_that_recompile_every_step(name):
    norm = specs.NORM_SCHEMAS[name]()
    model = specs.ResNetSpec(name="resnet18", width=8)
    build = lambda compile_model: specs.RunSpec(data=specs.FakeDataSpec(), model=model, norm=norm, trainer=specs.TrainerSpec(compile=compile_model))
    graphs = _graphs_compiled(build(False), steps=4)
    # MBN compiles twice in its first two steps (its batch size is learnt at the first forward), then never again.
    recompiles_each_step = graphs[3] > graphs[2]
    assert recompiles_each_step == norm.RECOMPILES_EACH_STEP, graphs
    if norm.RECOMPILES_EACH_STEP:
        with pytest.raises(specs.SpecError, match=rf"^trainer.compile: norm={name} would recompile at every training step .*: "
                                                  r"set trainer.compile=false$"):
            build(True)
    else:
        build(True)


def test_a_schema_registers_under_its_name_default_or_the_names_given_and_never_twice():
    registry: dict[str, type] = {}

    @specs.schema_of(registry)
    @dataclass
    class ToyNormSpec(specs.NormSpec):
        name: str = "toy"

    @specs.schema_of(registry, "toy_a", "toy_b")
    @dataclass
    class ToyModelSpec(specs.ModelSpec):
        pass

    assert registry == {"toy": ToyNormSpec, "toy_a": ToyModelSpec, "toy_b": ToyModelSpec}
    with pytest.raises(ValueError, match="option 'toy_b' of VGGSpec is taken by ToyModelSpec"):
        specs.schema_of(registry, "toy_b")(specs.VGGSpec)
    with pytest.raises(ValueError, match="VGGSpec has no name default"):
        specs.schema_of({})(specs.VGGSpec)
    assert "toy" not in specs.NORM_SCHEMAS  # a registry of its own: the project's are untouched


def test_the_loggers_of_a_run_are_the_selected_ones_and_csv_in_registry_order():
    wandb = specs.WandbSpec(project="p")
    loggers = specs.LoggerSpec(selected={"wandb": wandb, "tensorboard": specs.TensorBoardSpec()})
    assert loggers.active() == {"csv": specs.CsvLoggerSpec(), "tensorboard": specs.TensorBoardSpec(), "wandb": wandb}
    assert list(specs.LoggerSpec().active()) == ["csv"]
    with pytest.raises(specs.SpecError, match="^foo: unknown logger; expected one of csv, tensorboard, wandb$"):
        specs.LoggerSpec(selected={"foo": specs.TensorBoardSpec()})
    with pytest.raises(specs.SpecError, match="^wandb: must be a WandbSpec, got TensorBoardSpec"):
        specs.LoggerSpec(selected={"wandb": specs.TensorBoardSpec()})


def test_brn_ramps_given_in_epochs_become_steps_with_the_runs_steps_per_epoch():
    norm = specs.BatchRenormSpec(warmup_epochs=1, r_max_ramp_epochs=9, d_max_ramp_epochs=0.5)
    options = norm.layer_options(16, steps_per_epoch=2500)
    assert (options["warmup_steps"], options["r_max_ramp_steps"], options["d_max_ramp_steps"]) == (2500, 22500, 1250)
    assert not {"warmup_epochs", "r_max_ramp_epochs", "d_max_ramp_epochs"} & options.keys()
    # Given in steps (the default), they stay steps whatever the epoch length.
    assert specs.BatchRenormSpec(warmup_steps=7).layer_options(16, steps_per_epoch=2500)["warmup_steps"] == 7
    with pytest.raises(specs.SpecError, match="warmup_epochs: needs the run's steps per epoch"):
        specs.BatchRenormSpec(warmup_epochs=1).layer_options(16)


def test_cbn_burn_in_is_8_epochs_by_default_in_steps_of_the_run_or_in_steps_when_epochs_are_null():
    """The reference's burnin=8 is in epochs (its tools/train.py converts it); steps only when asked for."""
    assert specs.CrossIterationBatchNormSpec().layer_options(16, steps_per_epoch=2500)["burnin_steps"] == 20000
    options = specs.CrossIterationBatchNormSpec(burnin_epochs=0.5).layer_options(16, steps_per_epoch=125)
    assert options["burnin_steps"] == 62 and "burnin_epochs" not in options  # round(62.5), to even
    steps = specs.CrossIterationBatchNormSpec(burnin_epochs=None, burnin_steps=100)
    assert steps.layer_options(16)["burnin_steps"] == 100  # no steps per epoch needed
    with pytest.raises(specs.SpecError, match="burnin_epochs: needs the run's steps per epoch"):
        specs.CrossIterationBatchNormSpec().layer_options(16)


@pytest.mark.parametrize("spec, changes, message", [
    (specs.CrossIterationBatchNormSpec, {"burnin_steps": 100},
     r"burnin_epochs: set burnin_steps or burnin_epochs, not both \(burnin_steps=100; burnin_epochs=null gives"),
    (specs.CrossIterationBatchNormSpec, {"burnin_epochs": -1.0}, r"burnin_epochs: must be a number in \[0, inf\)"),
    (specs.CrossIterationBatchNormSpec, {"burnin_epochs": None, "burnin_steps": -1}, "burnin_steps: must be"),
])
def test_cbn_burn_in_refuses_bad_values(spec, changes, message):
    with pytest.raises(specs.SpecError, match=message):
        spec(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"warmup_epochs": 1, "warmup_steps": 10}, "warmup_epochs: set warmup_steps or warmup_epochs, not both"),
    ({"r_max_ramp_epochs": -1.0}, r"r_max_ramp_epochs: must be a number in \[0, inf\)"),
    ({"d_max_ramp_epochs": float("nan")}, "d_max_ramp_epochs: must be a number"),
])
def test_brn_ramps_in_epochs_refuse_bad_values(changes, message):
    with pytest.raises(specs.SpecError, match=message):
        specs.BatchRenormSpec(**changes)
