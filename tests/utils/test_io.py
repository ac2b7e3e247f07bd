import json
import os

import pytest

from mbn.utils import io
from mbn.utils.io import DiskFullError, atomic_write, atomic_write_json, is_disk_full, overwrite_in_place


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

    with pytest.raises(DiskFullError, match=f"the disk is full \\(no space left on device\\) writing {target}"):
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


def test_a_short_write_without_errno_on_a_nearly_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    # torch's zip writer reports a write the disk had no room for as "RuntimeError: ... unexpected pos".
    def short_write(f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 139264 vs 139160")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of room: not a full disk
        atomic_write(tmp_path / "a.ckpt", short_write)
    real_statvfs = os.statvfs

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(io.os, "statvfs", lambda path: Full() if str(path) == str(tmp_path) else real_statvfs(path))
    with pytest.raises(DiskFullError) as raised:
        atomic_write(tmp_path / "a.ckpt", short_write)
    assert raised.value.errno == 28 and raised.value.filename == str(tmp_path / "a.ckpt")
    assert is_disk_full(raised.value) and not is_disk_full(RuntimeError("unexpected pos"))
    assert os.listdir(tmp_path) == []


def test_overwrite_in_place_writes_only_what_fits_in_the_file(tmp_path):
    target = tmp_path / "results.json"
    assert not overwrite_in_place(target, b"{}")
    target.write_bytes(b'{"status": "running", "padding": "xxxxxxxx"}')
    assert not overwrite_in_place(target, b"x" * 100) and target.read_bytes().startswith(b'{"status": "running"')
    assert overwrite_in_place(target, b'{"status":"failed"}')
    assert json.loads(target.read_text()) == {"status": "failed"}
