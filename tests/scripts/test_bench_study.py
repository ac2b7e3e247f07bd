"""scripts/bench_study.py: its packs are the ones mbn-train's sweeps form, its schedule is longest-first on
the launcher's processes, and it reads a pack's measured time from its members' records. No timing is asserted."""

from __future__ import annotations

import pytest

from experiments.batch_size_study import curve
from experiments.batch_size_study import run as runner
from experiments.batch_size_study.curve import read_factors
from mbn.results import write_results

@pytest.fixture(scope="module")
def bench_study(load_script):
    return load_script("bench_study")


def test_the_packs_of_every_study_command_are_the_sweeps(bench_study):
    grid = runner.STUDIES["curve_grid"].sweeps
    packs = [bench_study.expand(sweep) for sweep in grid]
    # m = 2: each norm's 4 lrs one stacked lr-grid pack; m = 32 unstacked: 3 norms x 4 lrs one run each.
    assert [(p.norm, p.batch_size, p.members, p.lr_grid) for p in packs[0]] == [("bn", 2, 4, True), ("mbn", 2, 4, True)]
    assert [(p.norm, p.members) for p in packs[1]] == [("gn", 4), ("brn_epochs", 4)]
    assert len(packs[2]) == 12 and all(p.members == 1 and p.batch_size == 32 for p in packs[2])
    # The peers: one command per peer and m, each peer's m = 2 grid one pack, its m = 32 grid 4 runs.
    peers = [bench_study.expand(sweep) for sweep in runner.STUDIES["peers_grid"].sweeps]
    assert [[(p.norm, p.batch_size, p.members) for p in packs] for packs in peers[:5]] == [
        [(peer, 2, 4)] for peer in ("cbn", "evonorm_b0", "evonorm_s0", "frn", "mabn")]
    assert sorted(p.norm for packs in peers[5:] for p in packs) == sorted(curve.PEERS * 4)
    assert all(len(packs) == 4 and {(p.batch_size, p.members) for p in packs} == {(32, 1)} for packs in peers[5:])
    trained = [bench_study.expand(sweep) for sweep in runner.STUDIES["trained"].sweeps]
    assert [len(p) for p in trained] == [2, 5, 1, 2, 2]
    assert [p.members for p in trained[0]] == [5, 5] and not trained[0][0].lr_grid
    # A stack that does not divide the values: the last pack holds the rest.
    assert [p.members for p in bench_study.expand(("norm=bn", "data.batch_size=2", "seed=0,1,2,3,4", "stack=2"))] == [2, 2, 1]


def test_the_schedule_puts_the_longest_first_on_the_first_free_process(bench_study):
    assert bench_study.schedule([10, 10, 10], 2) == 20
    assert bench_study.schedule([3, 5, 7, 9], 2) == 12  # 9+3, 7+5
    assert bench_study.schedule([4], 2) == 4


def test_a_packs_measured_time_is_its_slowest_members_record(bench_study, tmp_path):
    pack = bench_study.expand(("norm=gn,brn_epochs", "data.batch_size=2", "seed=0,1", "stack=2"))[1]
    for seed, wall in ((0, 100.0), (1, 130.0)):
        config = {"norm": {"name": "brn"}, "data": {"batch_size": 2}, "seed": seed}
        write_results(tmp_path / f"brn{seed}", {"status": "completed", "config": config, "wall_time_s": wall})
    # Resumed: 90 s of its last attempt, 160 s over both.
    config = {"norm": {"name": "brn"}, "data": {"batch_size": 2}, "seed": 0}
    write_results(tmp_path / "brn0", {"status": "completed", "config": config, "wall_time_s": 90.0,
                                      "attempts": [{"wall_time_s": 70.0}, {"wall_time_s": 90.0}]})
    write_results(tmp_path / "gn0", {"status": "completed", "config": {"norm": {"name": "gn"}, "data": {"batch_size": 2}, "seed": 0},
                                     "wall_time_s": 999.0})
    records = bench_study._records(tmp_path)
    assert bench_study.measured_pack(pack, records) == 160.0
    gn_pack = bench_study.expand(("norm=gn", "data.batch_size=2", "seed=0,1", "stack=2"))[0]
    assert bench_study.measured_pack(gn_pack, records) is None  # seed 1 has not run


def test_a_member_that_another_command_trained_is_complete_but_costs_the_pack_nothing(bench_study, tmp_path):
    # The curve study's seed 0 is its lr grid's run (the same config): that command's cost, not this one's.
    pack = bench_study.expand(("norm=bn", "data.batch_size=2", "optim.base_lr=0.3", "seed=0,1,2", "stack=3"))[0]
    grid = ["norm=bn", "data.batch_size=2", "optim.base_lr=0.03,0.1,0.3,1", "stack=4"]
    for seed, overrides, wall in ((0, grid, 7000.0), (1, [*pack_overrides(pack), "seed=1"], 4000.0)):
        config = {"norm": {"name": "bn"}, "data": {"batch_size": 2}, "optim": {"base_lr": 0.3}, "seed": seed}
        write_results(tmp_path / f"bn{seed}", {"status": "completed", "config": config, "overrides": overrides, "wall_time_s": wall})
    assert bench_study.measured_pack(pack, bench_study._records(tmp_path)) is None  # seed 2 has not run
    config = {"norm": {"name": "bn"}, "data": {"batch_size": 2}, "optim": {"base_lr": 0.3}, "seed": 2}
    write_results(tmp_path / "bn2", {"status": "completed", "config": config, "overrides": [*pack_overrides(pack), "seed=2"],
                                     "wall_time_s": 4100.0})
    assert bench_study.measured_pack(pack, bench_study._records(tmp_path)) == 4100.0
    only_grid = bench_study.expand(("norm=bn", "data.batch_size=2", "optim.base_lr=0.3", "seed=0"))[0]
    assert bench_study.measured_pack(only_grid, bench_study._records(tmp_path)) == 0.0


def pack_overrides(pack) -> list[str]:
    return ["+experiment=x", *(f"{key}={value}" for key, value in pack.values if key != "seed")]


def test_measured_only_times_nothing_and_reads_the_curve_studys_seed_commands(bench_study, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_study, "time_pack", lambda *args: pytest.fail("--measured-only timed a pack"))
    config = {"norm": {"name": "bn"}, "data": {"batch_size": 32}, "optim": {"base_lr": 0.3}, "seed": 0}
    write_results(tmp_path / "bn32", {"status": "completed", "config": config, "wall_time_s": 600.0,
                                      "overrides": ["norm=bn", "data.batch_size=32", "optim.base_lr=0.3", "seed=0,1,2"]})
    assert bench_study.main(["--study", "curve", "--measured-only", "--sweep-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    study = runner.curve_study(read_factors())
    assert sum(" command: projected - min" in line for line in lines) == len(study.sweeps)
    assert any(line.split()[1:4] == ["bn", "32", "1"] and line.split()[-1] == "10.0" for line in lines)
    assert lines[-1] == "# study projected - h; measured (not every command has run)"


def test_a_diverged_member_is_finished_and_its_time_counts(bench_study, tmp_path):
    # A grid run that diverged is final (a sweep skips it), so its command has run; an interrupted one has not.
    pack = bench_study.expand(("norm=bn", "data.batch_size=32", "optim.base_lr=0.1,1"))
    for lr, status, wall in ((0.1, "completed", 700.0), (1, "diverged", 6.0)):
        config = {"norm": {"name": "bn"}, "data": {"batch_size": 32}, "optim": {"base_lr": lr}, "seed": 0}
        write_results(tmp_path / f"bn{lr}", {"status": status, "config": config, "wall_time_s": wall})
    records = bench_study._records(tmp_path)
    assert [bench_study.measured_pack(p, records) for p in pack] == [700.0, 6.0]
    config = {"norm": {"name": "bn"}, "data": {"batch_size": 32}, "optim": {"base_lr": 1}, "seed": 0}
    write_results(tmp_path / "bn1", {"status": "interrupted", "config": config, "wall_time_s": 6.0})
    assert bench_study.measured_pack(pack[1], bench_study._records(tmp_path)) is None
