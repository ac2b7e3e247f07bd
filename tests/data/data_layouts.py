"""Generated stand-ins for on-disk dataset layouts (image trees, archives, CIFAR pickles) for the data tests."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_CIFAR10_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Shared across test sessions and xdist workers (gitignored): the real archive is decoded only once.
SESSION_CACHE_DIR = REPO_ROOT / ".cache" / "mbn-test"


def random_images(rng: np.random.Generator, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """HWC uint8 RGB images."""
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def make_tree(
    splits: dict[str, dict[str, list[np.ndarray]]], fmt: str = "PNG", suffix: str = ".png"
) -> dict[str, bytes]:
    """``{relative path: file content}`` for ``split/class/NNNN<suffix>`` files."""
    return {
        f"{split}/{cls}/{i:04d}{suffix}": encode(image, fmt)
        for split, classes in splits.items()
        for cls, images in classes.items()
        for i, image in enumerate(images)
    }


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "", order: list[str] | None = None) -> Path:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for name in order or list(files):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return path


NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # what ndarray pickles with (numpy._core.multiarray's on numpy 2)


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR batches (protocol 2): bytes as Python 2
    str opcodes, and numpy's ``_reconstruct`` under its numpy 1 module name ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None) -> None:
        if obj is NUMPY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_cifar_pickles(root: Path, name: str, train: tuple[np.ndarray, list[int]], test: tuple[np.ndarray, list[int]],
                        class_names: list[str], style: str = "python3") -> Path:
    """The official python-pickle layout: rows of 3072 bytes (R plane, G plane, B plane).

    ``style``: ``"python3"`` str keys, default protocol; ``"protocol2"`` bytes keys plus the official files'
    ``batch_label``/``filenames``, ``pickle.dump(protocol=2)``; ``"python2"`` the same content as the
    official files' Python 2 byte stream.
    """

    def dump(path: Path, content: dict) -> None:
        if style != "python3":
            content = {key.encode(): _python2_text(value) if style == "python2" else value
                       for key, value in content.items()}
            if b"data" in content:
                content[b"batch_label"] = f"{path.name} of {name}".encode()
                content[b"filenames"] = [f"image_{i:05d}.png".encode() for i in range(len(content[b"data"]))]
        with open(path, "wb") as f:
            if style == "python2":
                Python2Pickler(f, protocol=2).dump(content)
            else:
                pickle.dump(content, f, **({"protocol": 2} if style == "protocol2" else {}))

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        images, labels = train
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            batch = {"data": images[part].reshape(len(part), -1), "labels": [labels[j] for j in part]}
            dump(folder / f"data_batch_{i}", batch)
        dump(folder / "test_batch", {"data": test[0].reshape(len(test[1]), -1), "labels": test[1]})
        dump(folder / "batches.meta", {"label_names": class_names, "num_cases_per_batch": 10})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, (images, labels) in (("train", train), ("test", test)):
            dump(folder / split, {"data": images.reshape(len(labels), -1), "fine_labels": labels,
                                  "coarse_labels": [label // 5 for label in labels]})
        dump(folder / "meta", {"fine_label_names": class_names, "coarse_label_names": ["unused"]})
    return folder


def _python2_text(value):
    """Class names as the official files hold them: Python 2 str, written as bytes."""
    return [v.encode() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def flat_images(rng: np.random.Generator, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Single-color HWC uint8 images: survive JPEG almost exactly, so lossy layouts stay checkable."""
    colors = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    return [np.broadcast_to(color, (size[1], size[0], 3)).copy() for color in colors]
