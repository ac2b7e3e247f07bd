"""A sweep over every norm composes and builds at every width the configs use (GN's groups scale with it)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from cli_runner import mbn_train
from mbn.cli.config import CONFIG_DIR
from mbn.cli.schema import load_job, to_run_spec
from mbn.models import build_model
from mbn.nn import norm_layer

NORMS = ("bn", "gn", "brn", "mbn")
WIDTHS = (8, 16, 64)


def test_a_sweep_over_every_norm_and_width_plans_every_job(run_env, capsys):
    code = mbn_train(["-m", "data=fake", f"norm={','.join(NORMS)}", f"model.width={','.join(map(str, WIDTHS))}",
                      "dry_run=true", f"output_root={run_env}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("would start") == len(NORMS) * len(WIDTHS), out
    assert "invalid config" not in out + err


def test_the_demo_sweep_with_gn_at_width_16_plans_its_jobs(run_env, capsys):
    # The command of the issue: GN's old default of 32 groups stopped it before it started (stack=3 as
    # the demo had then: its stack=auto would spend this test's time on probes, tests/sweeps/test_auto_stack.py).
    argv = ["-m", "experiment=demo", "norm=bn,gn", "data.batch_size=8", "stack=3", "dry_run=true", f"output_root={run_env}"]
    assert mbn_train(argv) == 0
    assert capsys.readouterr().out.count("would start") == 2 * 3  # 2 norms x the demo's 3 seeds


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_builds_at_every_width(norm, width, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=fake", f"norm={norm}", f"model.width={width}"])
    run = to_run_spec(load_job(cfg), tmp_path / "run", [], "hash")
    model = build_model(run.model.name, num_classes=10, norm_layer=norm_layer(norm, **run.norm_options()), width=width)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    if norm == "gn":  # 2 channels per group in the first stage, as GN-32 in the 64-wide network
        assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {width // 2}
