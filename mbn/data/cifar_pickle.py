"""Read CIFAR-10 / CIFAR-100 from torchvision's layout (the python pickle batches of the official release)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbn.data.arrays import ImageArrays
from mbn.data.cifar_unpickler import CifarPickleRefused, load_cifar_pickle

# name -> (folder under root, train files, test files, label key, meta file, class-names key)
CIFAR_LAYOUTS: dict[str, tuple[str, list[str], list[str], str, str, str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def cifar_folder(name: str, root: str | Path) -> Path:
    """Folder holding the pickle batches of ``name`` (``"cifar10"``/``"cifar100"``) under ``root``."""
    return Path(root) / CIFAR_LAYOUTS[name][0]


def download_cifar(name: str, root: str | Path) -> None:
    """Download and extract the official archive into ``root`` via torchvision (needs network access)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        dataset_class(root=str(root), train=True, download=True)
    except Exception as exc:
        raise RuntimeError(
            f"could not download {name} into {root} ({type(exc).__name__}: {exc}); without network access "
            f"put the extracted {CIFAR_LAYOUTS[name][0]}/ there, or use the cifar10_archive dataset"
        ) from exc


def read_cifar(name: str, root: str | Path) -> tuple[ImageArrays, ImageArrays]:
    """Read the train and test splits of ``name`` from ``root/<folder>``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (CIFAR-100 uses the 100 fine labels).
        root: directory that contains ``cifar-10-batches-py/`` or ``cifar-100-python/``.

    Raises:
        CifarPickleRefused: a file names a global no CIFAR batch holds (nothing it names is run).
    """
    folder_name, train_files, test_files, label_key, meta_file, names_key = CIFAR_LAYOUTS[name]
    folder = Path(root) / folder_name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} not found: no folder {folder} (set download=true to fetch it, or point root at the "
            f"directory that contains {folder_name}/)"
        )
    classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]
    splits = []
    for files in (train_files, test_files):
        images, labels = [], []
        for file in files:
            batch = _unpickle(folder / file)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in batch[label_key])
        splits.append(
            ImageArrays(
                torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64), classes
            )
        )
    return splits[0], splits[1]


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR file {path}")
    try:
        content = load_cifar_pickle(path)
    except CifarPickleRefused:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read CIFAR file {path}: {type(exc).__name__}: {exc}") from exc
    # The official batches were pickled by Python 2; keys may come back as bytes.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
