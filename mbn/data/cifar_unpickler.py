"""Unpickle CIFAR batch files without running code: only the globals a CIFAR batch holds are admitted.

Plain ``pickle.load`` calls whatever a file names, so a crafted ``data_batch_1`` could run any code.
The official batches (pickled by Python 2) hold dicts, lists, str/bytes, numbers and numpy arrays;
an array is rebuilt through a few numpy functions, which are the only globals admitted here.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

# (module, name) of every global a CIFAR batch references: numpy 1 names in the official files, numpy 2
# names in a copy re-pickled today; _frombuffer where numpy pickled the array with protocol 5.
CIFAR_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)
# Python 3 writes bytes as _codecs.encode(text, "latin1") under protocols 0-2; only that use is admitted.
_LATIN1_ENCODE = ("_codecs", "encode")
_LATIN1_NAMES = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1"})


class CifarPickleRefused(ValueError):
    """A CIFAR pickle names a global that no CIFAR batch holds; nothing it names was called.

    Args:
        path: the refused file.
        global_name: the refused ``module.name`` (or call).
    """

    def __init__(self, path: str | os.PathLike, global_name: str) -> None:
        super().__init__(
            f"refused to load {path}: it references {global_name}, which a CIFAR batch never holds "
            "(a crafted or corrupt file?)"
        )
        self.path = Path(path)
        self.global_name = global_name


class CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`CIFAR_PICKLE_GLOBALS` (and latin-1 ``_codecs.encode``).

    Args:
        file: the open binary file.
        path: its path, named in the refusal.
        **kwargs: as for :class:`pickle.Unpickler` (e.g. ``encoding="latin1"`` for Python 2 files).
    """

    def __init__(self, file, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        """The admitted global ``module.name``; raises :class:`CifarPickleRefused` for any other."""
        if (module, name) == _LATIN1_ENCODE:
            return self._latin1_bytes
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise CifarPickleRefused(self.path, f"{module}.{name}")
        return super().find_class(module, name)

    def _latin1_bytes(self, text: str, encoding: str) -> bytes:
        # Stands in for _codecs.encode: the same result for the one call Python's pickler writes.
        if not (isinstance(text, str) and isinstance(encoding, str) and encoding.lower() in _LATIN1_NAMES):
            raise CifarPickleRefused(self.path, f"_codecs.encode({type(text).__name__}, {encoding!r})")
        return text.encode("latin1")


def load_cifar_pickle(path: str | os.PathLike) -> Any:
    """Unpickle one CIFAR file with :class:`CifarUnpickler` (Python 2 str decoded as latin-1, as torchvision does).

    Args:
        path: a batch or meta file of ``cifar-10-batches-py/`` or ``cifar-100-python/``.

    Raises:
        CifarPickleRefused: the file names a global outside :data:`CIFAR_PICKLE_GLOBALS`.
    """
    with open(path, "rb") as f:
        return CifarUnpickler(f, path, encoding="latin1").load()
