"""Benchmark (b): port-I/O exits per second, guestmem's VMM vs a minimal C VMM.

Both run the same guest (a loop of N `out` instructions compiled by guestmem)
on the same machine state: exits.py writes the low-memory image, sregs and regs
that guestmem's VMM loads, and the C program loads those files verbatim. The
C program is built with the machine's gcc at bench time. Runs are interleaved;
minimum and median are reported (host-notes: timings are noisy and bimodal).

    .venv/bin/python bench/exits.py [--exits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from guestmem import machine
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.host import Kvm
from guestmem.vmm import Vmm

HERE = Path(__file__).parent


def build_c(out_dir: Path) -> Path:
    exe = out_dir / "exits"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "c" / "exits.c")], check=True)
    return exe


def write_machine_files(kvm: Kvm, image: machine.GuestImage, out_dir: Path) -> list[str]:
    """The exact state guestmem's VMM starts the guest in, as files for the C VMM."""
    mem = bytearray(machine.LOW_MEMORY_SIZE)
    for gpa, data in machine.low_memory_contents(image):
        mem[gpa:gpa + len(data)] = data
    with Vmm(kvm) as vmm:
        vmm.load(image)
        sregs, regs = bytes(vmm.vcpu.get_sregs()), bytes(vmm.vcpu.get_regs())
    paths = []
    for name, data in (("mem.bin", bytes(mem)), ("sregs.bin", sregs), ("regs.bin", regs)):
        (out_dir / name).write_bytes(data)
        paths.append(str(out_dir / name))
    return paths


def run_python(kvm: Kvm, image: machine.GuestImage, n: int) -> float:
    with Vmm(kvm) as vmm:
        vmm.load(image)
        t0 = time.perf_counter()
        result = vmm.run(timeout=600)
        elapsed = time.perf_counter() - t0
    assert result.stop == "done" and result.ticks == n, result
    return result.exits / elapsed


def run_c(exe: Path, files: list[str], n: int) -> float:
    out = subprocess.run([str(exe), *files, str(p.PORT_TICK), str(p.PORT_DONE)], check=True,
                         capture_output=True, text=True).stdout.split()
    exits, ticks, seconds = int(out[0]), int(out[1]), float(out[2])
    assert ticks == n, out
    return exits / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    console = Console()
    with Kvm() as kvm, tempfile.TemporaryDirectory() as tmp:
        implementation = kvm.capabilities.implementation
        out_dir = Path(tmp)
        image = compile_program(p.Program.of(p.Loop(args.exits, (p.Tick(),))),
                                default_hypercall_abi(kvm.capabilities))
        exe = build_c(out_dir)
        files = write_machine_files(kvm, image, out_dir)
        run_python(kvm, image, args.exits)  # warm up both
        run_c(exe, files, args.exits)
        py, c = [], []
        for _ in range(args.rounds):  # interleaved
            py.append(run_python(kvm, image, args.exits))
            c.append(run_c(exe, files, args.exits))
    table = Table(title=f"KVM_EXIT_IO exits/s, {args.exits} exits x {args.rounds} rounds "
                        f"({implementation})")
    for col in ("VMM", "best exits/s", "median exits/s"):
        table.add_column(col, justify="right")
    table.add_row("guestmem (Python)", f"{max(py):,.0f}", f"{statistics.median(py):,.0f}")
    table.add_row("minimal C", f"{max(c):,.0f}", f"{statistics.median(c):,.0f}")
    console.print(table)
    console.print(f"ratio C/guestmem: best {max(c) / max(py):.2f}x, "
                  f"median {statistics.median(c) / statistics.median(py):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
