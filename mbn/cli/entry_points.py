"""The console scripts ``mbn-train`` and ``mbn-compare``: run the command, or name the extra it lacks.

``pip install mbn`` installs the layers only (``mbn.nn``, ``mbn.models``: torch); the commands need
the framework's extras (``mbn[train]``, ``mbn[compare]``, or ``mbn[all]``). Without them a command
would stop with a traceback from deep inside an import; here it stops with one line instead::

    mbn-train: missing dependency 'hydra' — install the framework with: pip install 'mbn[train]'

and exit code 2. Nothing here imports more than the standard library before the check.

``mbn-train`` also takes overrides whose value holds ``=`` (``output_root=/tmp/a=b``; every run dir
is named ``key=value,...``), which Hydra's grammar rejects unquoted: the command runs with such an
override quoted (:mod:`mbn.cli.overrides`). ``hydra.main`` reads its arguments from ``sys.argv`` and
takes no argument list (facebookresearch/hydra#2064), so for the command's run, and only then,
``sys.argv`` holds the quoted form: what the shell would pass had the user quoted the value. Only
this entry point, the program that owns the command line, does so; no library code of ``mbn``
touches ``sys.argv``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
import sys
from typing import Callable, Iterator

# The console script -> (module whose main() it runs, the extra it needs).
COMMANDS: dict[str, tuple[str, str]] = {
    "mbn-train": ("mbn.cli.train", "train"),
    "mbn-compare": ("mbn.cli.compare", "compare"),
}
EXIT_MISSING_DEPENDENCY = 2
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def missing_dependency_line(program: str, dependency: str) -> str:
    """The one line a command prints when ``dependency`` is not installed.

    Args:
        program: the console script (a key of :data:`COMMANDS`).
        dependency: the missing module or distribution, e.g. ``hydra``.
    """
    extra = COMMANDS[program][1]
    return f"{program}: missing dependency {dependency!r} — install the framework with: pip install 'mbn[{extra}]'"


def missing_distributions(extra: str) -> list[str]:
    """The distributions that the installed ``mbn`` lists for ``extra`` and that are not installed.

    Empty when ``mbn`` itself has no installed metadata (a source checkout on ``PYTHONPATH``): the
    command's imports are the check then.

    Args:
        extra: an extra of the ``mbn`` distribution, e.g. ``train``.
    """
    try:
        requirements = importlib.metadata.requires("mbn") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = _REQUIREMENT_NAME.match(spec)
        wanted_by = _EXTRA_MARKER.search(marker)
        # Only this extra's own entries (``mbn[all]`` names ``mbn`` itself, which is installed).
        if name is None or wanted_by is None or wanted_by.group(1) != extra or name.group(1) == "mbn":
            continue
        try:
            importlib.metadata.distribution(name.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group(1))
    return missing


def run_command(program: str) -> int:
    """Run ``program``'s ``main()``; when its extra is missing, print one line and return 2.

    Args:
        program: a key of :data:`COMMANDS`.

    Returns:
        The command's exit code, or :data:`EXIT_MISSING_DEPENDENCY`.
    """
    module_name, extra = COMMANDS[program]
    missing = missing_distributions(extra)
    if missing:
        print(missing_dependency_line(program, missing[0]), file=sys.stderr, flush=True)
        return EXIT_MISSING_DEPENDENCY
    try:
        command: Callable[[], int] = importlib.import_module(module_name).main
    except ModuleNotFoundError as exc:
        top_level = (exc.name or "").partition(".")[0]
        if not top_level or top_level == "mbn":  # a broken install of mbn itself, not a missing extra
            raise
        print(missing_dependency_line(program, top_level), file=sys.stderr, flush=True)
        return EXIT_MISSING_DEPENDENCY
    if program != "mbn-train":
        return command()
    with _quoted_overrides_in_argv():
        return command()


@contextlib.contextmanager
def _quoted_overrides_in_argv() -> Iterator[None]:
    """While the command runs, ``sys.argv`` holds its overrides with ``=`` in the value quoted, if any."""
    from mbn.cli.overrides import quote_values_with_equals  # (Hydra is there: the command imported)

    given = sys.argv
    sys.argv = [given[0], *quote_values_with_equals(given[1:])]
    try:
        yield
    finally:
        sys.argv = given


def train() -> int:
    """``mbn-train``: :func:`mbn.cli.train.main`."""
    return run_command("mbn-train")


def compare() -> int:
    """``mbn-compare``: :func:`mbn.cli.compare.main`."""
    return run_command("mbn-compare")
