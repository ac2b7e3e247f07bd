"""``mbn-train -m ... stack=auto``: the sweep picks K (and each stacked convolution's path) from the stack probe.

Real Hydra multiruns through ``mbn-train`` with tiny fake-data jobs; the probe's measurements are
replaced by fixed speedups (``probe_for``), so what is tested is the planning, not this machine's timings.
"""

from __future__ import annotations

import pytest
from cli_runner import mbn_train as main
from sweep_helpers import job_dir

import mbn.cli.launch
import mbn.cli.sweep
import mbn.train.run
from mbn.models import build_model, stack, stacked_modules
from mbn.models.stack_probe import StackProbe
from mbn.models.stacked_layers import StackedConv2d
from mbn.nn import norm_layer

# The tiny runs' stacked convolutions (conftest: width-4 ResNet-18): every other one dense.
CONVS = [name for name, layer in stacked_modules(stack([build_model("resnet18", 10, norm_layer("bn"), width=4)] * 2))
         if isinstance(layer, StackedConv2d)]
PATHS = {name: ("dense" if index % 2 else "grouped") for index, name in enumerate(CONVS)}


def fake_probe(monkeypatch, speedups: dict) -> list[int]:
    """Have the planner and the jobs read ``speedups[K]`` (or ``speedups[m][K]`` at batch size m) and
    :data:`PATHS`; returns the Ks asked for."""
    asked = []

    def probe_for(spec, num_members):
        asked.append(num_members)
        if num_members == 1:
            return StackProbe(1, 1.0)
        speedup = speedups.get(spec.data.batch_size, speedups)[num_members]
        return StackProbe(num_members, speedup, 1e-3 * num_members / speedup, 1e-3, PATHS)

    monkeypatch.setattr(mbn.cli.sweep, "probe_for", probe_for)
    monkeypatch.setattr(mbn.cli.launch, "probe_for", probe_for)
    return asked


def test_stack_auto_trains_alone_when_stacking_does_not_pay(tiny, run_env, monkeypatch, capsys):
    asked = fake_probe(monkeypatch, {2: 0.8, 3: 0.9})
    base = ["-m", *tiny(), "seed=0,1,2", "stack=auto"]
    assert main([*base, "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert sorted(set(asked)) == [1, 2, 3]
    assert "mbn-train: stack=auto probe of resnet18 width 4, bn, m=8: K=2: 0.80x" in out
    assert ("mbn-train: stack=auto chose stack=1 for resnet18 width 4, bn, m=8 (projected speed of its 3 jobs against "
            "unstacked: K=1: 1.00x, K=2: 0.86x, K=3: 0.90x)") in out
    assert "would stack" not in out and "mbn-train: dry run of 3 jobs: 3 start; nothing was run" in out

    assert main(["-m", *tiny(), "seed=0,1", "stack=auto"]) == 0
    assert "sweep done: 2 completed, 0 failed, 0 skipped (of 2 jobs)" in capsys.readouterr().out
    # Each seed was launched as its own job: each dir has Hydra's job files.
    assert all((job_dir(run_env / "sweeps" / "default", f"seed={seed}") / ".hydra").is_dir() for seed in (0, 1))


def test_stack_auto_packs_the_fastest_k_and_the_jobs_take_the_probes_conv_paths(tiny, run_env, monkeypatch, capsys):
    fake_probe(monkeypatch, {2: 1.5, 4: 3.0, 5: 2.0})
    base = ["-m", *tiny(), "seed=0,1,2,3,4", "stack=auto"]
    assert main([*base, "dry_run=true"]) == 0
    out = capsys.readouterr().out
    # K=4: a pack of 4 (4 / 3.0) and one alone (1): 2.33 single-step units against 5 unstacked, 2.5 at K=5.
    assert ("mbn-train: stack=auto chose stack=4 for resnet18 width 4, bn, m=8 (projected speed of its 5 jobs against "
            "unstacked: K=1: 1.00x, K=2: 1.36x, K=4: 2.14x, K=5: 2.00x)") in out
    assert "mbn-train: would stack seeds 0, 1, 2, 3 in one process" in out
    assert "mbn-train: dry run of 5 jobs in 1 stacked pack: 5 start; nothing was run" in out

    applied = []
    real = mbn.train.run.set_conv_paths
    monkeypatch.setattr(mbn.train.run, "set_conv_paths", lambda model, paths: (applied.append(paths), real(model, paths)))
    assert main(base) == 0
    assert "sweep done: 5 completed, 0 failed, 0 skipped (of 5 jobs)" in capsys.readouterr().out
    assert applied == [PATHS]  # the pack of 4 took the probe's paths; seed 4 trained alone
    launched = [seed for seed in range(5) if (job_dir(run_env / "sweeps" / "default", f"seed={seed}") / ".hydra").is_dir()]
    assert launched == [0, 4]


@pytest.mark.parametrize("extra, message", [
    (["stack=fast"], "stack: must be a positive integer or auto, got 'fast'"),
    (["stack=2.5"], "stack: must be a positive integer or auto, got 2.5"),
    (["stack_path=fast"], "stack_path: must be one of grouped, dense, auto, got 'fast'"),
])
def test_bad_stack_values_exit_2_with_one_line(extra, message, tiny, run_env, capsys):
    assert main(["-m", *tiny(), "seed=0,1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stack_auto_picks_k_per_shape_and_a_smaller_k_trains_its_launched_pack_as_stacks_in_turn(tiny, run_env, monkeypatch, capsys):
    # m=4 pays most at K=4; m=8 at K=2 (K=4 loses there): the launcher packs 4 seeds, m=8's packs train as 2 + 2.
    fake_probe(monkeypatch, {4: {2: 1.5, 4: 3.0}, 8: {2: 1.2, 4: 0.9}})
    base = ["-m", *tiny(), "data.batch_size=4,8", "seed=0,1,2,3", "stack=auto"]
    assert main([*base, "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "mbn-train: stack=auto chose stack=4 for resnet18 width 4, bn, m=4" in out
    assert "mbn-train: stack=auto chose stack=2 for resnet18 width 4, bn, m=8" in out
    assert out.count("mbn-train: would stack seeds 0, 1, 2, 3 in one process") == 1
    assert out.count("mbn-train: would train seeds 0, 1 then 2, 3 in one process, one stack after another") == 1
    assert "mbn-train: dry run of 8 jobs in 2 stacked packs: 8 start; nothing was run" in out

    stacked_sizes = []
    real = mbn.train.run.set_conv_paths
    monkeypatch.setattr(mbn.train.run, "set_conv_paths",
                        lambda model, paths: (stacked_sizes.append(model.num_members), real(model, paths)))
    assert main(base) == 0
    assert "sweep done: 8 completed, 0 failed, 0 skipped (of 8 jobs)" in capsys.readouterr().out
    assert sorted(stacked_sizes) == [2, 2, 4]
