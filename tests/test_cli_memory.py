"""`guestmem memory`: another process's guest_memfd, as the kernel shows it."""

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from guestmem.cli import main

HOLDER = textwrap.dedent("""
    import sys
    from guestmem.host import Kvm
    from guestmem import uapi
    kvm = Kvm()
    vm = kvm.create_vm()
    flags = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    gmem = vm.create_guest_memfd(16 * 4096, flags)
    view = gmem.mmap(8 * 4096, 4 * 4096)   # file pages 4-11
    view.write(0, b"x" * 3 * 4096)         # file pages 4-6: uptodate and mapped here
    gmem.allocate(12 * 4096, 4096)         # allocated, never touched: mincore cannot see it
    other = gmem.mmap(4096, 14 * 4096)
    other.read(0, 8)                       # file page 14
    other.munmap()                         # uptodate, no longer mapped
    print(gmem.fd, flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def holder(host_kvm):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.pid, int(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_memory_shows_another_process_guest_memfd(holder):
    pid, fd = holder
    result = CliRunner().invoke(main, ["memory", "--pid", str(pid), "--fd", str(fd), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (record["pid"], record["size"], record["known"]) == (
        pid, 16 * 4096, ["host-mapped", "uptodate"])
    assert [(r["first"], r["last"], r["state"]) for r in record["runs"]] == [
        (0, 4, []), (4, 7, ["host-mapped", "uptodate"]), (7, 14, []), (14, 15, ["uptodate"]),
        (15, 16, [])]


def test_memory_table_fits_80_columns(holder):
    pid, fd = holder
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        main, ["memory", "--pid", str(pid), "--fd", str(fd), "--offset", "16K", "--length", "12K"])
    assert result.exit_code == 0, result.output
    assert "4-6" in result.output and "host-mapped, uptodate" in result.output
    assert max(map(len, result.output.splitlines())) <= 80


def test_memory_refuses_what_is_not_a_guest_memfd(holder):
    pid, _ = holder
    result = CliRunner().invoke(main, ["memory", "--pid", str(pid), "--fd", "0"])
    assert result.exit_code == 1
    assert "not a guest_memfd" in result.output
    result = CliRunner().invoke(main, ["memory", "--pid", str(pid), "--fd", "9999"])
    assert result.exit_code == 1 and "No such file" in result.output
    pid, fd = holder
    result = CliRunner().invoke(main, ["memory", "--pid", str(pid), "--fd", str(fd),
                                       "--offset", "1"])
    assert result.exit_code == 2 and "page-aligned" in result.output


def test_memory_names_the_option_and_the_problem(holder):
    pid, fd = holder
    base = ["memory", "--pid", str(pid), "--fd", str(fd)]
    result = CliRunner().invoke(main, [*base, "--length", "1x"])
    assert result.exit_code == 2 and "--length" in result.output
    result = CliRunner().invoke(main, [*base, "--length", "1M"])  # a 64 KiB file
    assert result.exit_code == 2 and "past the end" in result.output
