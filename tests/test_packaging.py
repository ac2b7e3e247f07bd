"""pyproject.toml declares ranges (torch only for the layers); constraints.txt pins the tested set inside
them (the ceiling) and constraints-floor.txt their lower bounds (the floor)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins(name: str = "constraints.txt") -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    return {canonicalize_name(name): version for name, _, version in
            (line.partition("==") for line in lines if line and not line.startswith("#"))}


def test_the_layers_need_only_torch_and_nothing_is_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [Requirement(r).name for r in project["dependencies"]] == ["torch"]
    assert set(project["optional-dependencies"]) >= {"train", "compare", "all", "dev"}
    requirements = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    requirements += [Requirement(r) for r in project["dependencies"]]
    assert not [str(r) for r in requirements if any(s.operator in ("==", "===") for s in r.specifier)]


def test_every_declared_range_holds_its_tested_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    texts = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    for requirement in map(Requirement, texts):
        if canonicalize_name(requirement.name) == "mbn":
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{requirement} excludes the tested {pinned[name]}"


def test_the_floor_pins_every_declared_range_at_its_lower_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = pins("constraints-floor.txt")
    texts = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    for requirement in map(Requirement, texts):
        name = canonicalize_name(requirement.name)
        if name == "mbn":
            continue
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{requirement}: the floor needs one lower bound"
        assert name in floor, f"{name} is not in constraints-floor.txt: run scripts/resolve_floor_constraints.py"
        assert Version(floor[name]) == Version(lower[0]), f"{requirement}: the floor pins {floor[name]}"
        assert requirement.specifier.contains(floor[name])


def test_makefile_installs_the_extras_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c $(CONSTRAINTS) torch torchvision" in makefile and "-c $(CONSTRAINTS) -e '.[all,dev]'" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/check_layers_only_install.sh" in ci and "scripts/check_floor_env.sh" in ci
    assert "-c constraints-floor.txt -e '.[all,dev]'" in (ROOT / "scripts" / "check_floor_env.sh").read_text()
    assert "scripts/check_wheel_install.sh" in ci


def test_the_wheel_carries_every_config_file_inside_the_package(tmp_path):
    """An installed ``mbn-train`` finds its configs: each file of configs/ is in the wheel, byte for byte."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mbn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.read(name) for name in archive.namelist()}
    configs = {f"mbn/configs/{p.relative_to(ROOT / 'configs').as_posix()}": p.read_bytes()
               for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert configs and {name: shipped.get(name) for name in configs} == configs
    sources = {f"mbn/{p.relative_to(ROOT / 'mbn').as_posix()}" for p in (ROOT / "mbn").rglob("*.py")}
    assert sources <= set(shipped)
    outside = {name for name in shipped if not name.startswith(("mbn/", "mbn-"))}
    assert not outside and not [name for name in shipped if "__pycache__" in name or name.endswith(".pyc")]
