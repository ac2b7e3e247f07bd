"""CIFAR pickles are unpickled with an allow-list: a crafted batch is refused before any code it names runs,
while the official files' format (Python 2, protocol 2, numpy arrays) still loads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_layouts import write_cifar_pickles

from mbn.data import load_dataset
from mbn.data.cifar_unpickler import CifarPickleRefused, load_cifar_pickle


class Payload:
    """Pickles as ``call(*args)``: what a crafted file makes plain ``pickle.load`` run."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def make_split(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), [int(v) for v in rng.integers(0, num_classes, n)]


@pytest.mark.parametrize("style", ["python2", "protocol2"])
@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_the_official_pickle_format_loads_pixel_exact(tmp_path, rng, style, name, num_classes):
    train, test = make_split(rng, 12, num_classes), make_split(rng, 3, num_classes)
    class_names = [f"name{i:03d}" for i in range(num_classes)]
    write_cifar_pickles(tmp_path, name, train, test, class_names, style=style)
    data = load_dataset(name, root=tmp_path, cache_dir=tmp_path / "cache")
    assert data.train.classes == class_names
    assert torch.equal(data.train.images, torch.from_numpy(train[0])) and data.train.labels.tolist() == train[1]
    assert torch.equal(data.test.images, torch.from_numpy(test[0])) and data.test.labels.tolist() == test[1]


@pytest.mark.parametrize("payload_kind", ["os.system", "open", "Path.touch"])
def test_a_crafted_batch_is_refused_and_its_code_never_runs(tmp_path, rng, payload_kind):
    folder = write_cifar_pickles(tmp_path, "cifar10", make_split(rng, 10, 10), make_split(rng, 2, 10), list("abcdefghij"))
    marker = tmp_path / "code-ran"
    call, args, protocol = {
        "os.system": (os.system, (f"touch {marker}",), 2),  # protocol 2, as the official files use
        "open": (open, (str(marker), "w"), 2),
        "Path.touch": (Path.touch, (marker,), pickle.HIGHEST_PROTOCOL),
    }[payload_kind]
    refused_name = f"{call.__module__}.{call.__qualname__}"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"batch_label": b"training batch 1 of 5",
             b"filenames": [b"a.png", Payload(call, *args)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))

    with pytest.raises(CifarPickleRefused) as refused:
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    assert str(refused.value) == (
        f"refused to load {folder / 'data_batch_1'}: it references {refused_name}, which a CIFAR batch never holds "
        "(a crafted or corrupt file?)"
    )
    assert isinstance(refused.value, ValueError) and refused.value.global_name == refused_name
    assert not marker.exists()


def test_bytes_are_rebuilt_only_by_the_latin1_encode_python_writes(tmp_path):
    path = tmp_path / "batches.meta"
    # _codecs.encode(text, "rot13") is no bytes pickle writes: refused, not run
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(CifarPickleRefused, match=r"it references _codecs.encode\(str, 'rot13'\)"):
        load_cifar_pickle(path)
    path.write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    assert load_cifar_pickle(path) == {b"label_names": [b"airplane"]}
