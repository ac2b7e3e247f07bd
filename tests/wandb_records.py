"""Read W&B's offline run files (``run-*.wandb``) in tests: the records, the logged history."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def read_wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (``run-*.wandb``): LevelDB log framing around protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7  # 7 = the ":W&B" file header
    assert data[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # the record wandb's service is still writing: the file ends inside it
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full record
            chunks.append(chunk)
        elif kind in (2, 3):  # first / middle fragment
            pending += chunk
        elif kind == 4:  # last fragment
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def read_finished_wandb_records(path: Path, timeout: float = 30.0) -> list:
    """Records of a finished run's ``run-*.wandb`` file.

    ``run.finish()`` returns once wandb's service process has the exit record, which then writes
    the transaction log on its own schedule: wait until the file holds the exit record. A read
    while a block is half flushed can see a record's bytes cut short (a protobuf decode error): that
    is the file not written yet too, read again.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_wandb_records(path)
        except DecodeError:
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(records: list) -> dict[str, list]:
    """Every logged metric's values in order, by key (``val/acc1`` -> [...])."""
    logged: dict[str, list] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                logged.setdefault(key, []).append(json.loads(item.value_json))
    return logged
