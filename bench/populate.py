"""Benchmark (a): populate 1 GiB of guest memory three ways, side by side.

  guestmem   GuestMemfd.allocate() (fallocate(KEEP_SIZE) through guestmem's wrapper)
  bare       the same fallocate(2) on the same kind of fd, called straight through libc
  memset     filling 1 GiB of anonymous memory (what a VMM without guest_memfd does)

Each round uses a fresh guest_memfd / mapping, so every run allocates every page.
Cases are interleaved; minimum and median are reported (timings here are noisy).

    .venv/bin/python bench/populate.py [--size-mib N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from guestmem import uapi
from guestmem.host import Kvm, libc

_raw_fallocate = ctypes.CDLL("libc.so.6", use_errno=True).fallocate
_raw_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def via_guestmem(vm, size: int) -> float:
    with vm.create_guest_memfd(size) as g:
        t0 = time.perf_counter()
        g.allocate(0, size)
        return time.perf_counter() - t0


def via_bare_fallocate(vm, size: int) -> float:
    with vm.create_guest_memfd(size) as g:
        fd = g.fd
        t0 = time.perf_counter()
        if _raw_fallocate(fd, uapi.FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        return time.perf_counter() - t0


def via_memset(vm, size: int) -> float:
    addr = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS)
    try:
        t0 = time.perf_counter()
        libc.memset(addr, 0x5A, size)
        return time.perf_counter() - t0
    finally:
        libc.munmap(addr, size)


CASES: dict[str, Callable] = {
    "guestmem allocate": via_guestmem,
    "bare fallocate": via_bare_fallocate,
    "memset anonymous": via_memset,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    size = args.size_mib << 20
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with Kvm() as kvm, kvm.create_vm() as vm:
        for fn in CASES.values():  # warm the host's free memory first
            fn(vm, size)
        for _ in range(args.rounds):
            for name, fn in CASES.items():
                times[name].append(fn(vm, size))
    table = Table(title=f"populate {args.size_mib} MiB, {args.rounds} interleaved rounds")
    for col in ("method", "min s", "median s", "min GiB/s", "median / bare fallocate"):
        table.add_column(col, justify="right")
    bare = statistics.median(times["bare fallocate"])
    for name, ts in times.items():
        med = statistics.median(ts)
        table.add_row(name, f"{min(ts):.3f}", f"{med:.3f}", f"{size / min(ts) / 2**30:.2f}",
                      f"{med / bare:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
