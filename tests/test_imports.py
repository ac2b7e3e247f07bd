"""The package's import graph: no cycle, and no lower layer importing an upper one.

Every ``import`` of an ``mbn`` module is read from the source (function-local ones too, since an
import inside a function only hides a cycle; those under ``if TYPE_CHECKING:`` are left out, they
never run). Layers, bottom up: ``nn``/``models``/``data``/``utils``/``results``/``compare`` know
nothing of ``train`` or ``cli``; ``train`` knows nothing of ``cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mbn"
LOWER_LAYERS = ("nn", "models", "data", "utils", "results", "compare")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(name: str) -> set[str]:
    """The ``mbn`` modules that module ``name`` imports anywhere in its body (``TYPE_CHECKING`` aside)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for statement in node.orelse:
                    self.visit(statement)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.split(".")[0] == "mbn":
                    add(alias.name)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mbn":
                return
            for alias in node.names:
                add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)

    Visitor().visit(ast.parse(path.read_text()))
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_reader_sees_function_local_imports_and_skips_type_checking_ones():
    assert "mbn.train.spec" in GRAPH["mbn.cli.schema"]
    # mbn.cli.config imports mbn.models / mbn.nn inside check_buildable and RunSpec only for typing.
    assert {"mbn.models", "mbn.nn"} <= GRAPH["mbn.cli.config"] and "mbn.train.spec" not in GRAPH["mbn.cli.config"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_lower_layer_imports_train_or_cli_and_train_never_imports_cli():
    wrong = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if (layer(name) in LOWER_LAYERS and layer(target) in ("train", "cli")) or (layer(name) == "train" and layer(target) == "cli")
    )
    assert wrong == []
