"""No private name of a library underneath (torch, Lightning, Hydra, TensorBoard, W&B, ...) is used in
``mbn/`` outside :mod:`mbn.utils.library_internals`, the one adapter where each such use is a small
documented function with its own test (tests/utils/test_library_internals.py).

What counts as a private use, read from the source with :mod:`ast` (a name is private when it has
one leading underscore: ``_x`` but not ``__x__``, nor Hydra's config keys ``_target_``/``_recursive_``
..., nor namedtuple's public ``_replace``/``_asdict``/..., nor ``os._exit``):

1. an import of a module outside ``mbn`` with a private component (``import torch._dynamo``,
   ``from hydra._internal.utils import x``) or of a private name (``from torch.nn.modules.batchnorm
   import _BatchNorm``);
2. ``obj._x``, or ``getattr``/``setattr``/``hasattr``/``delattr(obj, "_x")``, where no code of
   ``mbn`` defines ``_x`` (a def, a class, a module- or class-level name, or a ``self._x =``
   assignment); ``self._x``/``cls._x``/``super()._x`` too when ``_x`` is a private name of a library
   base class of the enclosing class;
3. a method or class attribute of an ``mbn`` class that overrides a private name of one of its
   library base classes (``def _save_checkpoint`` in a ``ModelCheckpoint``), except the hooks whose
   own docstrings invite subclasses to override them (:data:`DOCUMENTED_HOOKS`);
4. a string that is exactly a dotted path with a private component into one of the libraries
   (``"hydra._internal.core_plugins.basic_sweeper.BasicSweeper"``: a private class named for a lookup).

A library base class's private names are its class attributes and the ``self._x`` it assigns in its
own source. The check cannot see the type of an arbitrary ``obj``: a private library attribute that
happens to share its name with one ``mbn`` defines passes rule 2 (a limitation, not a licence).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mbn"
ADAPTER = PACKAGE / "utils" / "library_internals.py"
# Libraries whose class hierarchies and dotted paths the check knows; rules 1 and 2 hold for any module.
LIBRARY_ROOTS = ("torch", "torchvision", "torchmetrics", "pytorch_lightning", "lightning", "lightning_fabric",
                 "lightning_utilities", "hydra", "omegaconf", "tensorboard", "wandb")
# Private by spelling, public by documentation.
PUBLIC_UNDERSCORE_NAMES = {"_exit", "_replace", "_asdict", "_fields", "_field_defaults", "_make"}
# torch.nn.Module's docstrings of these say subclasses override them (class-specific state_dict
# loading and saving, versioned through ``_version``): torch's documented extension points.
DOCUMENTED_HOOKS = {"_load_from_state_dict", "_save_to_state_dict", "_version"}
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    """``_x``: one leading underscore, not a dunder, not a Hydra key ``_x_``, not a documented public name."""
    return (name.startswith("_") and not name.startswith("__") and not re.fullmatch(r"_[a-z]+_", name)
            and name not in PUBLIC_UNDERSCORE_NAMES)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def assigned_self_attributes(tree: ast.AST) -> set[str]:
    """The ``_x`` in ``self._x = ...`` / ``cls._x = ...`` (plain, annotated, augmented) anywhere in ``tree``."""
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for element in ast.walk(target):
                if (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                        and element.value.id in ("self", "cls")):
                    names.add(element.attr)
    return names


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a source defines: functions, classes, assigned names, ``import ... as`` aliases, ``self._x``."""
    names = assigned_self_attributes(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname for alias in node.names if alias.asname)  # (an imported name is not defined here)
    return names


@functools.lru_cache(maxsize=None)
def library_private_names(cls: type) -> frozenset[str]:
    """The private names of ``cls``'s library base classes: class attributes and ``self._x`` of their source."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in LIBRARY_ROOTS:
            continue
        names.update(name for name in vars(base) if is_private(name))
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):  # a C extension type: its class attributes are all there is
            continue
        names.update(name for name in assigned_self_attributes(ast.parse(_dedent(source))) if is_private(name))
    return frozenset(names)


def _dedent(source: str) -> str:
    lines = source.splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())
    return "\n".join(line[indent:] for line in lines)


@dataclass
class Source:
    """One module of the checked package: its path (as reported), dotted name, parsed tree."""

    path: Path
    name: str
    tree: ast.Module


def private_uses(sources: list[Source], own_names: set[str], package: str = "mbn") -> list[str]:
    """``path:line: what`` for every private use (rules 1-4 of the module docstring) in ``sources``.

    Args:
        sources: the modules to check; each is imported (by ``name``) to resolve its classes' bases.
        own_names: the names the package defines (:func:`defined_names` over all its modules).
        package: the checked package's top-level name: imports from it are its own.
    """
    found: list[tuple[str, int, str]] = []
    for source in sources:
        module = importlib.import_module(source.name)

        def report(node: ast.AST, what: str) -> None:
            found.append((str(source.path), node.lineno, what))

        def visit(node: ast.AST, classes: list[type | None], in_function: bool = False) -> None:
            owner = classes[-1] if classes else None
            library_names = library_private_names(owner) if isinstance(owner, type) else frozenset()
            if isinstance(node, ast.ClassDef):
                # A class defined in a function is not reachable by name: only rule 2's package-wide names apply.
                parent = None if in_function else owner if classes else module
                cls = getattr(parent, node.name, None) if parent is not None else None
                cls = cls if isinstance(cls, type) else None
                inherited = library_private_names(cls) if cls is not None else frozenset()
                for statement in node.body:
                    names = [statement.name] if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) else [
                        t.id for t in getattr(statement, "targets", [getattr(statement, "target", None)])
                        if isinstance(t, ast.Name)]
                    for name in names:
                        if name in inherited and name not in DOCUMENTED_HOOKS:
                            report(statement, f"{node.name}.{name} overrides a private name of a library base class")
                for child in ast.iter_child_nodes(node):
                    visit(child, [*classes, cls], in_function)
                return
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function = True
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] != package and any(is_private(part) for part in parts):
                        report(node, f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] != package:
                    if any(is_private(part) for part in parts):
                        report(node, f"from {node.module} import ...")
                    for alias in node.names:
                        if is_private(alias.name):
                            report(node, f"from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                check_attribute(node, node.value, node.attr, library_names)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_FUNCTIONS
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and is_private(node.args[1].value)):
                check_attribute(node, node.args[0], node.args[1].value, library_names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = node.value.split(".")
                if (len(parts) > 1 and parts[0] in LIBRARY_ROOTS and all(p.isidentifier() for p in parts)
                        and any(is_private(p) for p in parts)):
                    report(node, f"the dotted path {node.value!r}")
            for child in ast.iter_child_nodes(node):
                visit(child, classes, in_function)

        def check_attribute(node: ast.AST, value: ast.expr, name: str, library_names: frozenset[str]) -> None:
            on_self = (isinstance(value, ast.Name) and value.id in ("self", "cls")) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super")
            if on_self and name in library_names and name not in DOCUMENTED_HOOKS:
                report(node, f"{ast.unparse(value)}.{name}: a private name of a library base class")
            elif name not in own_names:
                report(node, f"{ast.unparse(value)}.{name}: a private name the package does not define")

        visit(source.tree, [])
    return [f"{path}:{line}: {what}" for path, line, what in sorted(found, key=lambda use: use[:2])]


def package_sources() -> list[Source]:
    return [Source(path.relative_to(ROOT), module_name(path), ast.parse(path.read_text(), str(path)))
            for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_private_name_of_a_library_is_used_outside_the_adapter():
    sources = package_sources()
    own_names = set().union(*(defined_names(source.tree) for source in sources))
    checked = [source for source in sources if ROOT / source.path != ADAPTER]
    offenders = private_uses(checked, own_names)
    assert offenders == [], ("private names of libraries used outside mbn/utils/library_internals.py "
                             "(move each into a documented function there, with a test):\n" + "\n".join(offenders))


def test_the_adapter_is_where_the_private_uses_are():
    # The check sees the adapter's own uses: it is the adapter, not a blind spot, that lets them pass.
    sources = package_sources()
    own_names = set().union(*(defined_names(source.tree) for source in sources))
    (adapter,) = [source for source in sources if ROOT / source.path == ADAPTER]
    assert private_uses([adapter], own_names) != []


SAMPLE = '''
import torch._dynamo
from hydra._internal.utils import get_args_parser
from torch.nn.modules.batchnorm import _BatchNorm
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
TARGET = "hydra.sweeper._target_"


class Checkpoints(ModelCheckpoint):
    def _save_checkpoint(self, trainer, filepath):
        self._own_counter = 1
        return self._own_counter + self._last_global_step_saved + super()._monitor_candidates(trainer)


def stop(loader: DataLoader):
    loader._iterator._shutdown_workers()
    return getattr(loader, "_iterator", None), loader._own_counter
'''


def test_the_check_names_each_kind_of_private_use_with_its_line(tmp_path, monkeypatch):
    (tmp_path / "sample_pkg").mkdir()
    (tmp_path / "sample_pkg" / "__init__.py").write_text("")
    (tmp_path / "sample_pkg" / "sample.py").write_text(SAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    tree = ast.parse(SAMPLE)
    found = private_uses([Source(Path("sample.py"), "sample_pkg.sample", tree)], defined_names(tree), package="sample_pkg")
    assert found == [
        "sample.py:2: import torch._dynamo",
        "sample.py:3: from hydra._internal.utils import ...",
        "sample.py:4: from torch.nn.modules.batchnorm import _BatchNorm",
        "sample.py:8: the dotted path 'hydra._internal.core_plugins.basic_sweeper.BasicSweeper'",
        "sample.py:13: Checkpoints._save_checkpoint overrides a private name of a library base class",
        "sample.py:15: self._last_global_step_saved: a private name of a library base class",
        "sample.py:15: super()._monitor_candidates: a private name of a library base class",
        "sample.py:19: loader._iterator._shutdown_workers: a private name the package does not define",
        "sample.py:19: loader._iterator: a private name the package does not define",
        "sample.py:20: loader._iterator: a private name the package does not define",
    ]
