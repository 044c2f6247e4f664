"""Benchmark P1: the model at terabyte scale, and against a naive per-page model.

Workload (a SW_PROTECTED VM of the coco profile): create a guest_memfd of SIZE,
bind it across 8 memslots at GPA 4 GiB, allocate all of it (fallocate), then run
random operations through the public API, half KVM_SET_MEMORY_ATTRIBUTES
(PRIVATE or shared, 50/50) and half PUNCH_HOLE of 4 KiB-2 MiB at random offsets:

  workload A: attribute changes of 4 KiB-2 MiB too (log-uniform)
  workload B: attribute changes of 4 KiB-1 GiB (log-uniform; CoCo guests convert
              large ranges at boot, bounce buffers, ballooning)

Reported: create+bind+allocate time; time per operation at 1 GiB, 64 GiB and
1 TiB (flat = cost in ranges, not pages); a full run of --full-ops at 1 TiB with
its peak RSS (in a child process); the same operations at 64 GiB on a
deliberately naive per-page model (dicts keyed by page, written only here),
checked to end in the same state; the ratio by operation size (4 KiB to 1 GiB);
and peak RSS of both at 64 GiB.

    .venv/bin/python bench/scale.py [--ops N] [--full-ops N] [--naive-ops N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from guestmem import uapi
from guestmem.model import Kvm

PS = uapi.PAGE_SIZE
GIB = 1 << 30
BASE_GPA = 4 * GIB
SLOTS = 8
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


@dataclass(frozen=True)
class Op:
    kind: str  # "attr" or "punch"
    offset: int  # byte offset in the guest_memfd (= gpa - BASE_GPA)
    length: int
    private: bool = False


def _log_uniform_pages(rng: random.Random, max_bytes: int) -> int:
    return max(1, int(math.exp(rng.uniform(0, math.log(max_bytes // PS)))))


def operations(size: int, n: int, workload: str, seed: int = 1) -> Iterator[Op]:
    """The operations, generated lazily (a list of a million would dominate RSS)."""
    rng = random.Random(seed)
    attr_max = 2 << 20 if workload == "A" else GIB
    for _ in range(n):
        if rng.random() < 0.5:
            pages = min(_log_uniform_pages(rng, attr_max), size // PS)
            kind, private = "attr", rng.random() < 0.5
        else:
            pages = min(_log_uniform_pages(rng, 2 << 20), size // PS)
            kind, private = "punch", False
        start = rng.randrange(0, size // PS - pages + 1)
        yield Op(kind, start * PS, pages * PS, private)


# --- the model --------------------------------------------------------------------------------
class ModelGuest:
    def __init__(self, size: int) -> None:
        self.kvm = Kvm("coco")
        self.vm = self.kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        self.gmem = self.vm.create_guest_memfd(size, 0)
        per_slot = size // SLOTS
        for i in range(SLOTS):
            self.vm.set_user_memory_region2(i, uapi.KVM_MEM_GUEST_MEMFD, BASE_GPA + i * per_slot,
                                            per_slot, 0, self.gmem, i * per_slot)
        self.gmem.allocate(0, size)

    def apply(self, op: Op) -> None:
        if op.kind == "attr":
            self.vm.set_memory_attributes(BASE_GPA + op.offset, op.length,
                                          PRIVATE if op.private else 0)
        else:
            self.gmem.punch_hole(op.offset, op.length)

    def extents(self) -> int:
        inode = self.gmem.inode
        return (self.vm.attributes.boundaries() + inode.folios.boundaries()
                + inode.bindings.boundaries())


# --- the naive per-page model (only here, to compare against) ------------------------------------
class NaiveFolio:
    __slots__ = ("uptodate", "refcount")

    def __init__(self) -> None:
        self.uptodate, self.refcount = False, 1


class NaiveGuest:
    """One Python object per page, every operation a loop over its pages. It keeps
    what the model keeps for this workload (attributes per gfn, folios per file
    index, the binding of each index to its memslot, stage-2 mappings per gfn) and
    counts what the model counts, so both can be checked to agree (agrees())."""

    def __init__(self, size: int) -> None:
        npages, per_slot = size // PS, size // PS // SLOTS
        self.attrs: dict[int, int] = {}  # gfn - BASE_GFN -> attributes (absent: shared)
        self.binding = {i: i // per_slot for i in range(npages)}  # file index -> memslot
        self.folios = {i: NaiveFolio() for i in range(npages)}  # fallocate of everything
        self.stage2: set[int] = set()  # nothing runs, so nothing is ever mapped
        self.invalidations = 0

    def apply(self, op: Op) -> None:
        first, last = op.offset // PS, (op.offset + op.length) // PS
        if op.kind == "attr":
            value = PRIVATE if op.private else 0
            if all(self.attrs.get(g, 0) == value for g in range(first, last)):
                return  # nothing changes: no invalidation (as kvm_vm_set_mem_attributes)
            # memslots are found per range, as kvm_handle_gfn_range does (GPA = BASE_GPA
            # + index, so the gfn offset is the file index)
            in_slot = first in self.binding or last - 1 in self.binding
            for g in range(first, last):
                self.stage2.discard(g)
                if value:
                    self.attrs[g] = value
                else:
                    self.attrs.pop(g, None)
        else:
            in_slot = False
            for i in range(first, last):
                if i in self.binding:
                    in_slot = True
                    self.stage2.discard(i)
                self.folios.pop(i, None)
        self.invalidations += in_slot

    def agrees(self, model: ModelGuest, rng: random.Random, samples: int = 2_000) -> bool:
        """Same private pages, same folios, same invalidations (counts, then a sample)."""
        base_gfn, npages = BASE_GPA // PS, len(self.binding)
        attrs, inode = model.vm.attributes, model.gmem.inode
        if (attrs.covered(base_gfn, base_gfn + npages) != len(self.attrs)
                or inode.allocated_pages() != len(self.folios)
                or model.vm.mmu.invalidations != self.invalidations):
            return False
        for i in (rng.randrange(npages) for _ in range(samples)):
            if (attrs.get(base_gfn + i) or 0) != self.attrs.get(i, 0):
                return False
            if (inode.folios.get(i) is not None) != (i in self.folios):
                return False
        return True


def timed_setup(cls: type, size: int) -> tuple[object, float]:
    t0 = time.perf_counter()
    guest = cls(size)
    return guest, time.perf_counter() - t0


def run_ops(guest: object, ops: Iterable[Op]) -> float:
    t0 = time.perf_counter()
    for op in ops:
        guest.apply(op)  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def full_run(size: int, n: int, workload: str) -> dict[str, float]:
    """One full run; meant for a child process so its peak RSS is its own. The
    operations are generated while timing (the cost is in both columns alike)."""
    guest, setup = timed_setup(ModelGuest, size)
    elapsed = run_ops(guest, operations(size, n, workload))
    return {"setup_s": setup, "ops_s": elapsed, "us_per_op": elapsed / n * 1e6,
            "extents": guest.extents(),  # type: ignore[attr-defined]
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """VmHWM of this process's own address space. Not ru_maxrss: Linux carries
    that over from the forking parent across execve, so a child started by a
    parent holding a naive model would report the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(*args: str) -> dict[str, float]:
    """Run this script in a child process (its peak RSS is its own); its JSON answer."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def compare_memory(console: Console, n_ops: int) -> None:
    table = Table(title="64 GiB: peak RSS, each in its own process")
    for col in ("", "what ran", "peak RSS"):
        table.add_column(col, justify="right")
    model = child("--child", str(NAIVE_SIZE), str(n_ops), "A")
    naive = child("--child-naive", str(NAIVE_SIZE))
    table.add_row("model", f"setup + {n_ops:,} operations (A)", f"{model['peak_rss_mb']:,.0f} MB")
    table.add_row("naive", "setup only", f"{naive['peak_rss_mb']:,.0f} MB")
    console.print(table)


NAIVE_SIZE = 64 * GIB
BAND_SIZES = {"4 KiB": PS, "64 KiB": 64 << 10, "2 MiB": 2 << 20, "64 MiB": 64 << 20,
              "1 GiB": GIB}


def side_by_side(ops: list[Op]) -> tuple[float, float, float, float, bool]:
    """Both models at 64 GiB on the same operations: setup and per-op seconds of
    each (model, naive), and whether they end in the same state."""
    naive, naive_setup = timed_setup(NaiveGuest, NAIVE_SIZE)
    model, model_setup = timed_setup(ModelGuest, NAIVE_SIZE)
    m = run_ops(model, ops) / len(ops)
    n = run_ops(naive, ops) / len(ops)
    agree = naive.agrees(model, random.Random(5))  # type: ignore[attr-defined]
    return model_setup, naive_setup, m, n, agree


def compare_workloads(console: Console, n_ops: int) -> None:
    table = Table(title=f"64 GiB: model vs naive per-page model, the same {n_ops:,} operations")
    for col in ("workload", "setup model / naive", "µs/op model / naive", "ratio setup",
                "ratio per op", "10^6 ops incl. setup (projected)", "same end state"):
        table.add_column(col, justify="right")
    for workload in ("A", "B"):
        ops = list(operations(NAIVE_SIZE, n_ops, workload, seed=7))
        ms, ns, m, n, agree = side_by_side(ops)
        total = (ns + 1e6 * n) / (ms + 1e6 * m)
        table.add_row(workload, f"{ms * 1e3:.2f} ms / {ns:.1f} s",
                      f"{m * 1e6:.1f} / {n * 1e6:.1f}", f"{ns / ms:,.0f}x", f"{n / m:,.1f}x",
                      f"{total:,.1f}x", "yes" if agree else "NO")
    console.print(table)


def band_ops(length: int, n: int, seed: int) -> list[Op]:
    """n operations of exactly `length` bytes, half attribute changes, half punches."""
    rng = random.Random(seed)
    pages = length // PS
    return [Op("attr" if i % 2 else "punch", rng.randrange(NAIVE_SIZE // PS - pages + 1) * PS,
               length, rng.random() < 0.5) for i in range(n)]


def compare_sizes(console: Console) -> None:
    """Where the ratio comes from: the naive model pays per page, the model per range."""
    table = Table(title="64 GiB: the same operations by size (half attribute changes, "
                        "half punches)")
    for col in ("size", "operations", "µs/op model", "µs/op naive", "ratio", "same end state"):
        table.add_column(col, justify="right")
    naive, model = NaiveGuest(NAIVE_SIZE), ModelGuest(NAIVE_SIZE)  # one pair, bands in turn
    for name, length in BAND_SIZES.items():
        n = max(40, min(4_000, (1 << 22) // (length // PS)))
        ops = band_ops(length, n, seed=length)
        m, nv = run_ops(model, ops) / n, run_ops(naive, ops) / n
        agree = naive.agrees(model, random.Random(length))
        table.add_row(name, f"{n:,}", f"{m * 1e6:.1f}", f"{nv * 1e6:,.1f}", f"{nv / m:,.1f}x",
                      "yes" if agree else "NO")
    console.print(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000, help="operations per size in the table")
    ap.add_argument("--full-ops", type=int, default=1_000_000, help="operations of the 1 TiB run")
    ap.add_argument("--naive-ops", type=int, default=20_000, help="ops run on both at 64 GiB")
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "OPS", "WORKLOAD"), help=argparse.SUPPRESS)
    ap.add_argument("--child-naive", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_naive:
        _, setup = timed_setup(NaiveGuest, args.child_naive)
        print(json.dumps({"setup_s": setup, "peak_rss_mb": _peak_rss_mb()}))
        return 0
    if args.child:
        print(json.dumps(full_run(int(args.child[0]), int(args.child[1]), args.child[2])))
        return 0
    console = Console()
    sizes = {"1 GiB": GIB, "64 GiB": 64 * GIB, "1 TiB": 1 << 40}

    table = Table(title=f"model: {args.ops:,} random operations per size")
    for col in ("workload", "size", "create+bind+allocate", "µs/op", "extents after"):
        table.add_column(col, justify="right")
    for workload in ("A", "B"):
        for name, size in sizes.items():
            ops = list(operations(size, args.ops, workload))
            guest, setup = timed_setup(ModelGuest, size)
            elapsed = run_ops(guest, ops)
            table.add_row(workload, name, f"{setup * 1e3:.2f} ms",
                          f"{elapsed / args.ops * 1e6:.1f}", f"{guest.extents():,}")
    console.print(table)

    table = Table(title=f"model: full run at 1 TiB, {args.full_ops:,} operations (child process)")
    for col in ("workload", "create+bind+allocate", "total ops time", "µs/op", "peak RSS"):
        table.add_column(col, justify="right")
    for workload in ("A", "B"):
        r = child("--child", str(1 << 40), str(args.full_ops), workload)
        table.add_row(workload, f"{r['setup_s'] * 1e3:.2f} ms", f"{r['ops_s']:.1f} s",
                      f"{r['us_per_op']:.1f}", f"{r['peak_rss_mb']:.0f} MB")
    console.print(table)

    compare_workloads(console, args.naive_ops)
    compare_sizes(console)
    compare_memory(console, args.full_ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
