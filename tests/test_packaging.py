"""The package others depend on: one version, and its license."""

import tomllib
from importlib import metadata
from pathlib import Path

from click.testing import CliRunner

import guestmem
from guestmem.cli import main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "guestmem.__version__"}
    assert metadata.version("guestmem") == guestmem.__version__
    result = CliRunner().invoke(main, ["--version"])
    assert result.stdout.split()[-1] == guestmem.__version__


def test_license_is_shipped():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert metadata.metadata("guestmem")["License-Expression"] == "MIT"
