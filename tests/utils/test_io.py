import json
import os

import pytest

from mbn.utils.io import atomic_write, atomic_write_json


def test_atomic_write_json_round_trips_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_json(target, {"a": 1, "b": [1.5, None]})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1.5, None]}
    assert os.listdir(target.parent) == ["results.json"]


def test_failed_write_keeps_old_content_and_removes_temp(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"status": "running"})

    def crash_midway(f):
        f.write(b'{"status": "compl')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, crash_midway)
    assert json.loads(target.read_text()) == {"status": "running"}
    assert os.listdir(tmp_path) == ["results.json"]


def test_numpy_and_torch_scalars_are_serialized(tmp_path):
    torch = pytest.importorskip("torch")
    target = atomic_write_json(tmp_path / "x.json", {"acc": torch.tensor(0.5), "path": tmp_path})
    data = json.loads(target.read_text())
    assert data == {"acc": 0.5, "path": str(tmp_path)}


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        target = atomic_write_json(tmp_path / "report.json", {})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
