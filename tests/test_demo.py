"""`guestmem demo`: every step holds, on each backend and profile."""

from click.testing import CliRunner

import guestmem
from guestmem import demo
from guestmem.cli import main


def titles(kvm):
    steps = list(demo.run(kvm))
    assert [(s.title, s.detail) for s in steps if not s.ok] == []
    return [s.title for s in steps]


def test_coco_demo_shows_private_memory():
    with guestmem.Kvm("model", profile="coco") as kvm:
        seen = titles(kvm)
    for title in ("guest converts 1 MiB to private", "host reads the same GPA",
                  "the guest_memfd's pages", "host touches a guest_memfd page that is not shared",
                  "guest converts it back to shared"):
        assert title in seen


def test_mainline_demo_is_the_shared_one():
    with guestmem.Kvm("model") as kvm:
        seen = titles(kvm)
    assert "guest converts 1 MiB to private" not in seen
    assert seen[-1] == "guest_memfd closed for good"


def test_cli_demo_coco_prints_the_private_steps():
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["demo", "--profile", "coco"])
    assert result.exit_code == 0, result.output
    assert "coco profile" in result.output and "SIGBUS" in result.output
    assert "FAILED" not in result.output


def test_cli_accepts_the_host_profile(host_kvm):
    import json

    result = CliRunner().invoke(main, ["info", "--json", "--profile", "host"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (record["backend"], record["profile"]) == ("model", "host")
    assert record["implementation"] == host_kvm.capabilities.implementation
    assert record["execution"]["cpu_vendor"] == host_kvm.capabilities.execution.cpu_vendor


def test_switching_backends_names_the_option_that_belongs_to_the_other():
    import pytest

    with pytest.raises(TypeError, match="'profile' .*model backend"):
        guestmem.Kvm("kvm", profile="mainline")
    with pytest.raises(TypeError, match="'populate_limit' .*kvm backend"):
        guestmem.Kvm("model", populate_limit=1 << 30)
    with pytest.raises(ValueError, match="host"):
        guestmem.Kvm("model", profile="nope")


def test_inplace_demo_hands_a_buffer_over_and_shows_pins_and_forks():
    with guestmem.Kvm("model", profile="inplace") as kvm:
        seen = titles(kvm)
    assert seen[1:] == ["pkvm: 256 MiB shared -> private", "snp: 256 MiB shared -> private",
                        "a pinned page holds the conversion back", "after the unpin",
                        "a forked child"]


def test_cli_demo_inplace_exits_zero_and_names_the_errno():
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["demo", "--profile", "inplace"])
    assert result.exit_code == 0, result.output
    assert "EAGAIN" in result.output and "SIGBUS" in result.output
    assert "FAILED" not in result.output
