"""`check -k`: substrings joined by and/or/not/parentheses, repeatable; and
selecting nothing is an error."""

import json

import pytest
from click.testing import CliRunner

from guestmem.check import instances
from guestmem.cli import main

NAME = "gmem.mmap_supported[default,MMAP]"


@pytest.mark.parametrize("expression, selected", [
    ("gmem", True),
    ("mmap_supported[default", True),
    ("MMAP]", True),
    ("mmap", True),
    ("Mmap", False),  # case-sensitive: lower case names the case, upper case its flags
    ("memslot", False),
    ("gmem and mmap", True),
    ("gmem and memslot", False),
    ("memslot or mmap", True),
    ("not gmem", False),
    ("not not gmem", True),
    ("not memslot and gmem", True),  # not binds tighter than and
    ("memslot and gmem or mmap", True),  # and binds tighter than or
    ("memslot and (gmem or mmap)", False),
    ("(memslot or gmem) and not (sev or INIT_SHARED)", True),
    ("((gmem))", True),
])
def test_expression_selects(expression, selected):
    from guestmem.cli import parse_selection

    assert parse_selection(expression)(NAME) is selected


@pytest.mark.parametrize("expression, message", [
    ("", "a name or '(' is missing at the end"),
    ("gmem and", "a name or '(' is missing at the end"),
    ("not", "a name or '(' is missing at the end"),
    ("and gmem", "a name or '(' is missing before 'and'"),
    ("gmem or or mmap", "a name or '(' is missing before 'or'"),
    ("()", "a name or '(' is missing before ')'"),
    ("(gmem", "'(' without its ')'"),
    ("gmem)", "unexpected ')'"),
    ("gmem mmap", "unexpected 'mmap'"),
])
def test_malformed_expression_is_refused(expression, message):
    from guestmem.cli import SelectionError, parse_selection

    with pytest.raises(SelectionError) as raised:
        parse_selection(expression)
    assert str(raised.value) == message


def selected_names(*args):
    result = CliRunner().invoke(main, ["check", "--json", *args])
    assert result.exit_code == 0, result.output
    return [r["instance"] for r in json.loads(result.stdout)["results"]]


def default_vm_names(predicate):
    return [i.name for i in instances((0,)) if predicate(i.name)]


def test_check_k_takes_an_expression():
    want = default_vm_names(lambda n: "gmem" in n and "mmap" not in n)
    assert want and selected_names("-k", "gmem and not mmap") == want


def test_check_k_repeated_selects_what_any_of_them_selects():
    want = default_vm_names(lambda n: "gmem.flags" in n or "memslot.overlap" in n)
    assert len(want) == 2
    assert selected_names("-k", "gmem.flags", "-k", "memslot.overlap") == want


def test_check_selecting_nothing_is_an_error():
    result = CliRunner().invoke(main, ["check", "-k", "no_such_case"])
    assert result.exit_code == 2
    assert "-k 'no_such_case' selects no case instance (VM types: default; " \
           "--all-vm-types adds the VM types the backend lacks)" in result.stderr
    assert result.stdout == ""


def test_check_selecting_only_absent_vm_types_names_the_option():
    result = CliRunner().invoke(main, ["check", "-k", "sw-protected"])
    assert result.exit_code == 2 and "--all-vm-types adds" in result.stderr
    assert selected_names("-k", "memslot.overlap and sw-protected", "--all-vm-types") == \
        ["memslot.overlap[sw-protected]"]


def test_check_malformed_k_is_a_usage_error():
    result = CliRunner().invoke(main, ["check", "-k", "gmem and (not mmap"])
    assert result.exit_code == 2
    assert "Invalid value for '-k': '(' without its ')' in 'gmem and (not mmap'" in result.stderr
