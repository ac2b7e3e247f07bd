"""scripts/bench_study.py: its packs are the ones mbn-train's sweeps form, its schedule is longest-first on
the launcher's processes, and it reads a pack's measured time from its members' records. No timing is asserted."""

from __future__ import annotations

import pytest

from experiments.batch_size_study import run as runner
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
