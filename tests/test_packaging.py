"""The package others depend on: one version, compatible-release ranges in
pyproject.toml, and a constraints file that pins exactly what is installed."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import guestmem
from guestmem.cli import main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")


def constraints() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [PIN.match(line) for line in lines if line.strip() and not line.startswith("#")]
    assert all(pins), "every line of constraints.txt that is not a comment is name==version"
    return {canonicalize_name(m[1]): m[2] for m in pins}


def installed_closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution that installing name[extras] pulls in, from installed metadata."""
    found: set[str] = set()
    todo = [(canonicalize_name(name), extras)]
    while todo:
        dist, dist_extras = todo.pop()
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in dist_extras | {""})
            if wanted and canonicalize_name(req.name) not in found:
                found.add(canonicalize_name(req.name))
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def test_version_is_written_once():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "guestmem.__version__"}
    assert metadata.version("guestmem") == guestmem.__version__
    result = CliRunner().invoke(main, ["--version"])
    assert result.stdout.split()[-1] == guestmem.__version__


def test_dependencies_are_compatible_release_ranges():
    project = PYPROJECT["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        specifiers = list(Requirement(line).specifier)
        assert [s.operator for s in specifiers] == ["~="], line


def test_constraints_pin_exactly_what_is_installed():
    pins = constraints()
    build = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]}
    installed = installed_closure("guestmem", frozenset({"test"}))
    assert set(pins) == installed | build
    assert {name: metadata.version(name) for name in installed} == \
        {name: pins[name] for name in installed}


def test_constraints_fall_inside_the_ranges():
    pins = constraints()
    project = PYPROJECT["project"]
    for line in (*project["dependencies"], *project["optional-dependencies"]["test"],
                 *PYPROJECT["build-system"]["requires"]):
        req = Requirement(line)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), line


def test_license_is_shipped():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert metadata.metadata("guestmem")["License-Expression"] == "MIT"
