"""The decoded-dataset cache leaves no lock file behind, whether decoding succeeds or fails."""

from __future__ import annotations

import threading

import pytest
import torch

from mbn.data.arrays import DatasetSplits, ImageArrays
from mbn.data.cache import cached_splits


def tiny_splits() -> DatasetSplits:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    arrays = ImageArrays(images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    return DatasetSplits(name="tiny", train=arrays, test=arrays, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_a_failed_decode_leaves_no_lock_file(tmp_path):
    def broken() -> DatasetSplits:
        raise ValueError("cannot read dataset archive x.tar.gz: truncated")

    for _ in range(2):
        with pytest.raises(ValueError, match="truncated"):
            cached_splits(tmp_path, "tiny", {"source": "x"}, broken)
    assert list(tmp_path.iterdir()) == []


def test_a_decoded_dataset_leaves_only_its_cache_file_and_concurrent_loads_decode_once(tmp_path):
    calls = []
    barrier = threading.Barrier(3)

    def decode() -> DatasetSplits:
        calls.append(1)
        return tiny_splits()

    def load() -> None:
        barrier.wait()
        cached_splits(tmp_path, "tiny", {"source": "y"}, decode)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]
