"""What `check` and `info` print, at 80 columns and at 200: nothing truncated,
no name broken, no name eaten as rich markup."""

import json
import re

import pytest
from click.testing import CliRunner

from guestmem.check import instances
from guestmem.cli import main

WIDTHS = (80, 200)
ELLIPSIS = "…"  # what rich puts where it truncates
CELL_BORDERS = re.compile(r"[\s│┃]+")


def run(args, columns):
    # FORCE_COLOR would put escape codes between the words that are compared here
    env = {"COLUMNS": str(columns), "FORCE_COLOR": None}
    result = CliRunner(env=env).invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def words(output):
    """Every word of the output, table borders and whitespace taken as separators."""
    return CELL_BORDERS.split(output)


def assert_fits(output, columns):
    assert ELLIPSIS not in output
    too_wide = [line for line in output.splitlines() if len(line) > columns]
    assert too_wide == []


@pytest.mark.parametrize("columns", WIDTHS)
def test_check_prints_every_instance_name_whole_once(columns):
    output = run(["check", "--profile", "coco", "--all-vm-types"], columns)
    found = words(output)
    names = [i.name for i in instances()]
    missing = [n for n in names if found.count(n) != 1]
    assert missing == [], f"{len(missing)} of {len(names)} names not intact, e.g. {missing[:3]}"
    assert_fits(output, columns)


def test_check_layout_follows_the_width():
    """A table where expected and observed fit beside the name, else a line per case."""
    args = ["check", "-k", "gmem.invalid_sizes"]
    assert "┃ case" in run(args, 200)
    narrow = run(args, 80)
    assert "┃" not in narrow
    assert "pass  gmem.invalid_sizes[default,MMAP|INIT_SHARED]" in narrow.splitlines()


def test_narrow_check_shows_why_a_case_skips():
    output = run(["check", "-k", "coco.exits.memslot_deleted"], 80)
    lines = output.splitlines()
    at = lines.index("skip  coco.exits.memslot_deleted[default]")
    assert lines[at + 1].split(maxsplit=1) == ["reason", "case is for sw-protected VMs "
                                               "(attributes decide privateness)"]


@pytest.mark.parametrize("columns", WIDTHS)
def test_info_prints_every_capability_name_whole(columns):
    output = run(["info", "--profile", "coco"], columns)
    record = json.loads(run(["info", "--profile", "coco", "--json"], columns))
    found = words(output)
    assert [cap for cap in record["system"] if cap not in found] == []
    assert_fits(output, columns)


def test_info_shows_vm_values_where_they_differ_from_system_scope():
    lines = run(["info", "--profile", "coco"], 80).splitlines()
    row = next(line for line in lines if "KVM_CAP_MEMORY_ATTRIBUTES" in line)
    assert words(row)[1:4] == ["KVM_CAP_MEMORY_ATTRIBUTES", "8", "0"]
    assert "0 on default, sev, sev-es" in row


def test_vm_differences_groups_vm_types_by_value():
    from guestmem.cli import vm_differences

    record = {"system": {"CAP": 3},
              "vm": {"a": {"CAP": 3}, "b": {"CAP": 1}, "c": {"CAP": 0x400}, "d": {"CAP": 1}}}
    assert vm_differences(record, "CAP") == "1 on b, d; 0x400 on c"
    assert vm_differences({"system": {"CAP": 3}, "vm": {"a": {"CAP": 3}}}, "CAP") == ""
