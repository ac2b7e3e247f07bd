"""Write ``constraints-floor.txt``: the lowest versions pyproject.toml's ranges allow, as a resolver picks them.

constraints.txt pins the newest set this project is tested with (the ceiling); this file pins the
floor: every requirement of mbn[all,dev] at the lowest version its range allows (uv's
``--resolution lowest-direct``) and what those need at the newest versions that fit them, resolved
for CI's machine (CPython 3.11, x86_64 Linux). scripts/check_floor_env.sh installs it into a second
virtualenv and tests there; tests/test_packaging.py checks that every declared range's lower bound is
what it pins. Rerun this after changing a range (it needs uv: ``pip install uv``):

    python scripts/resolve_floor_constraints.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ROOT / "constraints-floor.txt"
EXTRAS = ("all", "dev")
# CI's interpreter and platform (.ci/run runs on CPython 3.11, x86_64 Linux).
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-unknown-linux-gnu"
HEADER = f"""\
# The floor: the lowest versions pyproject.toml's ranges allow (the dependency closure of mbn[all,dev],
# each declared requirement at its lower bound, what they need at the newest versions that fit them),
# resolved for CPython {PYTHON_VERSION} on x86_64 Linux by scripts/resolve_floor_constraints.py
# (uv pip compile --resolution lowest-direct). scripts/check_floor_env.sh (run by CI) tests it.
"""


def resolve(uv: str) -> str:
    """The floor resolution of pyproject.toml's requirements, as ``name==version`` lines."""
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "floor.txt"
        command = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), "--resolution", "lowest-direct",
                   "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
                   "--no-header", "--no-annotate", "--quiet", "--output-file", str(output)]
        command += [arg for extra in EXTRAS for arg in ("--extra", extra)]
        subprocess.run(command, check=True)
        return output.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv executable (default: uv on PATH)")
    args = parser.parse_args(argv)
    if args.uv is None:
        print("resolve_floor_constraints: needs uv (pip install uv), or pass --uv PATH", file=sys.stderr)
        return 2
    pins = resolve(args.uv)
    FLOOR.write_text(HEADER + pins)
    print(f"wrote {FLOOR} ({len(pins.splitlines())} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
