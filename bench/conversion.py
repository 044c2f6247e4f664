"""Conversion cost on the model: KVM_SET_MEMORY_ATTRIBUTES2 of the `inplace` profile.

Every guest is a KVM_X86_SW_PROTECTED_VM of the inplace profile (PRIVATE kept per
guest_memfd inode, upstream-2026-11.md §1) with one guest_memfd created
MMAP|INIT_SHARED, mmapped whole by the host and bound by one memslot at GPA 4 GiB.
At setup the host faults the whole file in (MADV_POPULATE_WRITE) and one vCPU
maps all of it in stage 2 (KVM_PRE_FAULT_MEMORY). Only the model runs: no real
memory is touched, however large the guest.

Table 1 (a 4 GiB guest): ranges of 4 KiB to 1 GiB converted shared->private and
back, alternately, in two modes:
  mapped:    before each conversion (untimed) the host re-faults the range where
             it is shared and the vCPU pre-faults it in stage 2 again, so every
             conversion zaps: to-private finds host PTEs and stage-2 mappings,
             to-shared stage-2 mappings (the host cannot map private pages);
  unmapped:  nothing is re-mapped: after the first pair (untimed) the range is
             mapped nowhere and a conversion only flips the attribute.
Table 2: the same conversions (mapped mode) on guests of 1 GiB to 1 TiB, plus a
fragmented first GiB (every other 2 MiB private): a 2 MiB conversion between two
private runs, and the whole fragmented GiB to private and to shared (restored to
fragmented, untimed, before each). Table 3: create + bind, map everything
(host and stage 2), and convert the WHOLE guest to private in one call.

Each time is the median of --batches batches of --pairs conversion pairs (of
--frag-pairs for the fragmented GiB), the batches of all cases of a table run in
interleaved rounds; only the conversion call is inside time.perf_counter().
Counters are per conversion: invalidations, TLB flushes and stage-2 pages zapped
of the VM (vm.mmu), host PTEs zapped (process stats); "mapped" says what was
mapped in the range just before the conversion. Peak RSS is this process's VmHWM.

    .venv/bin/python bench/conversion.py [--quick] [--json] [--batches N] [--pairs N]
                                         [--frag-pairs N] [--whole-reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from guestmem import uapi
from guestmem.lab.timing import no_gc
from guestmem.model import Kvm
from guestmem.model.gmem import GuestMemfd
from guestmem.model.process import MADV_POPULATE_WRITE, Mapping
from guestmem.model.vcpu import Vcpu
from guestmem.model.vm import Vm

PS = uapi.PAGE_SIZE
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BASE_GPA = 4 * GIB
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
CHUNK = 2 * MIB  # the fragmented case: every other 2 MiB of the first GiB is private

TABLE1_GUEST = 4 * GIB
TABLE1_OFFSET = GIB  # ranges start 1 GiB into the guest (mapped memory on both sides)
RANGES = {"4 KiB": 4 * KIB, "64 KiB": 64 * KIB, "2 MiB": 2 * MIB, "64 MiB": 64 * MIB,
          "1 GiB": GIB}
GUESTS = {"1 GiB": GIB, "16 GiB": 16 * GIB, "256 GiB": 256 * GIB, "1 TiB": TIB}


def size_name(n: int) -> str:
    for unit, name in ((TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


class Counters(NamedTuple):
    """The model's cost counters (cumulative, or a difference of two readings)."""

    invalidations: int = 0
    tlb_flushes: int = 0
    s2_zapped: int = 0  # stage-2 pages zapped (vm.mmu.zapped_pages)
    ptes_zapped: int = 0  # host userspace PTEs zapped (process stats)

    def __add__(self, other: tuple[int, ...]) -> Counters:  # type: ignore[override]
        return Counters(*(a + b for a, b in zip(self, other, strict=True)))

    def __sub__(self, other: tuple[int, ...]) -> Counters:
        return Counters(*(a - b for a, b in zip(self, other, strict=True)))


class Guest:
    """One SW_PROTECTED VM of the inplace profile: a guest_memfd of `size`
    (MMAP|INIT_SHARED, all shared), mmapped whole, bound by one memslot at
    BASE_GPA, and one vCPU for KVM_PRE_FAULT_MEMORY."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.kvm = Kvm("inplace")
        self.vm: Vm = self.kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        self.gmem: GuestMemfd = self.vm.create_guest_memfd(size, GMEM_FLAGS)
        self.mapping: Mapping = self.gmem.mmap()
        self.vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, BASE_GPA, size,
                                        self.mapping.addr, self.gmem, 0)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)

    def close(self) -> None:
        self.vcpu.close()
        self.mapping.munmap()
        self.gmem.close()
        self.vm.close()

    def counters(self) -> Counters:
        mmu = self.vm.mmu
        return Counters(mmu.invalidations, mmu.tlb_flushes, mmu.zapped_pages,
                        self.kvm.process.stats.ptes_zapped)

    def convert(self, offset: int, length: int, private: bool) -> None:
        self.gmem.set_memory_attributes2(offset, length, PRIVATE if private else 0)

    def private_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Private runs of [offset, offset+length), in pages of the file."""
        return self.gmem.inode.private_ranges(offset // PS, (offset + length) // PS)

    def shared_runs(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        at = offset // PS
        for lo, hi in self.private_runs(offset, length):
            if at < lo:
                yield at, lo
            at = hi
        if at < (offset + length) // PS:
            yield at, (offset + length) // PS

    def remap(self, offset: int, length: int) -> None:
        """The host faults the shared pages of the range in, and the vCPU maps the
        whole range in stage 2 (private pages as private)."""
        for lo, hi in self.shared_runs(offset, length):
            self.mapping.madvise(lo * PS, (hi - lo) * PS, MADV_POPULATE_WRITE)
        gpa, left = self.vcpu.pre_fault_memory(BASE_GPA + offset, length)
        if left:
            raise RuntimeError(f"KVM_PRE_FAULT_MEMORY stopped at {gpa:#x}, {left:#x} left")

    def mapped(self, offset: int, length: int) -> tuple[int, int]:
        """(host pages with a PTE, gfns with a stage-2 mapping) in the range."""
        first = offset // PS
        last = first + length // PS
        base = BASE_GPA // PS
        return (self.mapping.ptes.covered(first, last),
                self.vm.mmu.mapped.covered(base + first, base + last))

    def fragment(self, offset: int = 0, length: int = GIB) -> None:
        """Every other CHUNK of [offset, offset+length) private, starting private."""
        for i, at in enumerate(range(offset, offset + length, CHUNK)):
            self.convert(at, CHUNK, i % 2 == 0)  # a chunk already so: no invalidation


@dataclass
class Row:
    """One direction of one case: µs per conversion and the per-conversion counters."""

    case: str
    guest: int  # bytes
    offset: int
    length: int
    to: str  # "private" or "shared"
    mode: str  # "mapped" or "unmapped"
    us_per_op: float  # median over the batches
    us_batches: list[float]
    ops: int
    host_mapped: float  # pages with a host PTE in the range before the conversion (mean)
    s2_mapped: float  # gfns mapped in stage 2 in the range before the conversion (mean)
    invalidations: float
    tlb_flushes: float
    s2_zapped: float
    ptes_zapped: float

    @property
    def pages(self) -> int:
        return self.length // PS

    def mapped_label(self) -> str:
        """What the range had mapped before each conversion, for the tables."""
        def part(name: str, pages: float) -> str:
            if pages >= self.pages:
                return name
            return f"{name} {pages / self.pages:.0%}"

        parts = [part(name, pages) for name, pages in (("host", self.host_mapped),
                                                       ("S2", self.s2_mapped)) if pages]
        return "+".join(parts) or "none"


class Case:
    """Alternate to-private and to-shared conversions of [offset, offset+length) of
    a guest, `pairs` pairs per batch; before each conversion (untimed) `prepare`
    and, if `remap`, Guest.remap. Cases are run in interleaved batches (run()), so
    that a busy moment of the machine falls on every case alike."""

    def __init__(self, guest: Guest, name: str, offset: int, length: int, *, remap: bool,
                 pairs: int, prepare: Callable[[], None] | None = None) -> None:
        self.guest, self.name, self.offset, self.length = guest, name, offset, length
        self.remap, self.pairs, self.prepare = remap, pairs, prepare
        self.times: dict[bool, list[float]] = {True: [], False: []}  # µs/op per batch
        self.counts = {True: Counters(), False: Counters()}
        self.mapped = {True: [0, 0], False: [0, 0]}  # host pages, stage-2 gfns (sums)
        if not remap:  # warm-up pair: afterwards nothing in the range is mapped any more
            for private in (True, False):
                self._prepare()
                guest.convert(offset, length, private)

    def _prepare(self) -> None:
        if self.prepare is not None:
            self.prepare()
        if self.remap:
            self.guest.remap(self.offset, self.length)

    def batch(self) -> None:
        guest, offset, length = self.guest, self.offset, self.length
        elapsed = {True: 0.0, False: 0.0}
        for _ in range(self.pairs):
            for private in (True, False):
                self._prepare()
                host, s2 = guest.mapped(offset, length)
                self.mapped[private][0] += host
                self.mapped[private][1] += s2
                before = guest.counters()
                t0 = time.perf_counter()
                guest.convert(offset, length, private)
                elapsed[private] += time.perf_counter() - t0
                self.counts[private] += guest.counters() - before
        for private in (True, False):
            self.times[private].append(elapsed[private] / self.pairs * 1e6)

    def rows(self) -> tuple[Row, Row]:
        """(to-private, to-shared)."""
        n = len(self.times[True]) * self.pairs
        rows = []
        for private in (True, False):
            c, (host, s2) = self.counts[private], self.mapped[private]
            rows.append(Row(self.name, self.guest.size, self.offset, self.length,
                            "private" if private else "shared",
                            "mapped" if self.remap else "unmapped",
                            statistics.median(self.times[private]), self.times[private], n,
                            host / n, s2 / n, c.invalidations / n, c.tlb_flushes / n,
                            c.s2_zapped / n, c.ptes_zapped / n))
        return rows[0], rows[1]


def run(cases: list[Case], batches: int) -> list[Row]:
    """`batches` rounds, one batch of every case in each; then close the guests."""
    with no_gc():
        for _ in range(batches):
            for case in cases:
                case.batch()
    rows = [row for case in cases for row in case.rows()]
    for case in cases:
        case.guest.close()
    return rows


def map_all(guest: Guest) -> None:
    guest.remap(0, guest.size)


# --- table 1: by range size on a 4 GiB guest ------------------------------------------------------
def table1(batches: int, pairs: int, ranges: dict[str, int] | None = None,
           guest_size: int = TABLE1_GUEST) -> list[Row]:
    cases = []
    for name, length in (ranges or RANGES).items():
        for remap in (True, False):
            guest = Guest(guest_size)  # a guest per case, all of it mapped
            map_all(guest)
            cases.append(Case(guest, name, TABLE1_OFFSET, length, remap=remap, pairs=pairs))
    return run(cases, batches)


# --- table 2: flat from 1 GiB to 1 TiB ------------------------------------------------------------
# The fragmented cases: the first GiB is every other 2 MiB private (256 runs, 128
# private); "2 MiB, frag." converts a shared 2 MiB between two private ones (the
# runs merge and split again), "1 GiB, frag." converts that whole GiB, fragmented
# again (untimed) before each conversion.
CASES = ("2 MiB", "1 GiB", "2 MiB, frag.", "1 GiB, frag.")


def table2_case(size: int, case: str, pairs: int) -> Case:
    """One of CASES on a new guest of `size`, everything mapped (mapped mode)."""
    guest = Guest(size)
    prepare: Callable[[], None] | None = None
    if case == "2 MiB":
        offset, length = size // 2, 2 * MIB
    elif case == "1 GiB":
        offset, length = size - GIB, GIB
    else:
        guest.fragment()
        if case == "2 MiB, frag.":
            offset, length = CHUNK, CHUNK  # shared, between two private chunks
        else:
            offset, length, prepare = 0, GIB, guest.fragment
    map_all(guest)
    return Case(guest, case, offset, length, remap=True, pairs=pairs, prepare=prepare)


def table2(batches: int, pairs: int, frag_pairs: int,
           guests: dict[str, int] | None = None) -> list[Row]:
    """Every case on every guest size; the fragmented GiB with `frag_pairs` pairs
    per batch (each conversion of it is preceded by up to 256 untimed ones), in
    rounds of its own (its untimed work would slow whatever batch follows it)."""
    sizes = list((guests or GUESTS).values())
    rows = run([table2_case(size, case, pairs) for size in sizes for case in CASES[:-1]],
               batches)
    rows += run([table2_case(size, CASES[-1], frag_pairs) for size in sizes], batches)
    return sorted(rows, key=lambda r: (r.guest, CASES.index(r.case)))  # stable: →p, →s


# --- table 3: the whole guest in one call ---------------------------------------------------------
@dataclass
class Whole:
    guest: int
    create_bind_ms: float  # VM, guest_memfd, mmap, memslot, vCPU
    map_ms: float  # host MADV_POPULATE_WRITE + KVM_PRE_FAULT_MEMORY of everything
    convert_ms: float  # one KVM_SET_MEMORY_ATTRIBUTES2 of the whole guest to private
    back_ms: float  # and back to shared (nothing mapped any more)
    invalidations: int
    tlb_flushes: int
    s2_zapped: int
    ptes_zapped: int


def whole_guest(size: int) -> Whole:
    with no_gc():
        t0 = time.perf_counter()
        guest = Guest(size)
        t1 = time.perf_counter()
        map_all(guest)
        t2 = time.perf_counter()
        before = guest.counters()
        guest.convert(0, size, True)
        t3 = time.perf_counter()
        c = guest.counters() - before
        guest.convert(0, size, False)
        t4 = time.perf_counter()
    guest.close()
    return Whole(size, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3,
                 c.invalidations, c.tlb_flushes, c.s2_zapped, c.ptes_zapped)


def table3(reps: int, guests: dict[str, int] | None = None) -> list[Whole]:
    """whole_guest `reps` times per size, each field's median (the counters agree)."""
    sizes = list((guests or GUESTS).values())
    runs: list[list[dict[str, Any]]] = [[] for _ in sizes]
    for _ in range(reps):  # interleaved rounds, as the other tables
        for i, size in enumerate(sizes):
            runs[i].append(asdict(whole_guest(size)))
    return [Whole(**{k: statistics.median_low([r[k] for r in rs]) for k in rs[0]})
            for rs in runs]


def peak_rss_mb() -> float:
    """VmHWM of this process (as bench/scale.py)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- output ---------------------------------------------------------------------------------------
def _count(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) else f"{x:,.2f}"


def print_table1(console: Console, rows: list[Row], batches: int, pairs: int) -> None:
    table = Table(title=f"1: conversions on a {size_name(TABLE1_GUEST)} guest, median of "
                        f"{batches} x {pairs} pairs", title_justify="left")
    for col in ("range", "to", "mapped", "µs/op", "inval", "TLB", "S2 zap", "PTE zap"):
        table.add_column(col, justify="left" if col in ("range", "to", "mapped") else "right")
    for r in rows:
        table.add_row(r.case, r.to, r.mapped_label(), f"{r.us_per_op:.1f}",
                      _count(r.invalidations), _count(r.tlb_flushes), _count(r.s2_zapped),
                      _count(r.ptes_zapped))
    console.print(table)


def print_table2(console: Console, rows: list[Row]) -> None:
    table = Table(title="2: conversions by guest size, mapped mode (→p: to private, "
                        "→s: to shared)", title_justify="left")
    for col in ("case", "guest", "µs →p", "µs →s", "S2 zap →p", "S2 zap →s", "PTEs →p"):
        table.add_column(col, justify="left" if col in ("case", "guest") else "right",
                         no_wrap=True)
    for p, s in zip(rows[::2], rows[1::2], strict=True):
        table.add_row(p.case, size_name(p.guest), f"{p.us_per_op:.1f}", f"{s.us_per_op:.1f}",
                      _count(p.s2_zapped), _count(s.s2_zapped), _count(p.ptes_zapped))
    console.print(table)
    table = Table(title="2b: spread of µs/op across 1 GiB..1 TiB guests", title_justify="left")
    for col in ("case", "to", "min", "max", "max/min"):
        table.add_column(col, justify="left" if col in ("case", "to") else "right")
    for case in CASES:
        for to in ("private", "shared"):
            us = [r.us_per_op for r in rows if r.case == case and r.to == to]
            table.add_row(case, to, f"{min(us):.1f}", f"{max(us):.1f}", f"{max(us) / min(us):.2f}")
    console.print(table)


def print_table3(console: Console, wholes: list[Whole], reps: int) -> None:
    table = Table(title="3: the whole guest to private in one call", title_justify="left")
    for col in ("guest", "create+bind", "map all", "→private", "→shared", "inv/TLB",
                "zapped"):
        table.add_column(col, justify="left" if col == "guest" else "right", no_wrap=True)
    for w in wholes:
        zapped = (f"{w.ptes_zapped:,}" if w.ptes_zapped == w.s2_zapped
                  else f"{w.ptes_zapped:,} / {w.s2_zapped:,}")
        table.add_row(size_name(w.guest), f"{w.create_bind_ms:.2f} ms", f"{w.map_ms:.2f} ms",
                      f"{w.convert_ms:.2f} ms", f"{w.back_ms:.2f} ms",
                      f"{w.invalidations}/{w.tlb_flushes}", zapped)
    console.print(table)
    console.print("zapped: host PTEs = stage-2 pages (else host / stage 2); "
                  f"median of {reps} runs each")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batches", type=int, default=21, help="timed batches per case (median)")
    ap.add_argument("--pairs", type=int, default=60,
                    help="conversion pairs per batch (to-private + to-shared)")
    ap.add_argument("--frag-pairs", type=int, default=5,
                    help="pairs per batch of the fragmented-GiB case (256 untimed conversions "
                         "restore it before each)")
    ap.add_argument("--whole-reps", type=int, default=5,
                    help="runs of the whole-guest case per size (median)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 batches of 5 pairs")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.pairs, args.frag_pairs, args.whole_reps = 3, 5, 2, 1
    start = time.perf_counter()
    rss_start = peak_rss_mb()
    t1 = table1(args.batches, args.pairs)
    t2 = table2(args.batches, args.pairs, args.frag_pairs)
    t3 = table3(args.whole_reps)
    elapsed = time.perf_counter() - start
    result = {"parameters": {"batches": args.batches, "pairs": args.pairs,
                             "frag_pairs": args.frag_pairs, "whole_reps": args.whole_reps,
                             "quick": args.quick},
              "table1": [asdict(r) | {"mapped": r.mapped_label()} for r in t1],
              "table2": [asdict(r) | {"mapped": r.mapped_label()} for r in t2],
              "whole_guest": [asdict(w) for w in t3],
              "peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": rss_start,
              "elapsed_s": elapsed}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    console = Console(width=80)
    print_table1(console, t1, args.batches, args.pairs)
    print_table2(console, t2)
    print_table3(console, t3, args.whole_reps)
    console.print(f"peak RSS {result['peak_rss_mb']:.0f} MB (VmHWM; {rss_start:.0f} MB after "
                  f"imports), run {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
