"""HugeTLB guest_memfd split and merge policies at 1 TiB: what each costs (issue 10 part 6).

Every guest is a KVM_X86_SW_PROTECTED_VM of the model's `hugetlb` profile
(inplace plus guest_memfd on HugeTLB): one guest_memfd of
GUEST_MEMFD_FLAG_HUGETLB|MMAP on 1 GiB pages, HVO on, private at start
(HugeTLB refuses INIT_SHARED), mmapped whole by the host and bound whole by one
memslot at GPA 4 GiB (1 GiB-aligned, so 1 GiB stage-2 leaves are possible). The
model's memory holds the 1 GiB pool plus 1/32 of the guest for vmemmap (a
split can restore at most 1/64: 64 bytes of struct page per 4 KiB), so no
split fails. The split and merge policy (GuestMemfd.set_hugetlb_policy) is set
before the first folio: dynamic (the WIP), eager-4k, stepwise (1G->2M->4K),
lazy. Only the model runs: no real memory is touched, however large the guest.

Workload A, "CoCo boot": the guest faults all of its memory in, private, in
1 GiB runs (gmem_fault_path, mapping it at stage 2); then come three kinds of
small shared buffers, scattered: a 64 MiB swiotlb at 64 MiB, 36 virtio rings
of 4, 8, 16, 32 and 64 KiB in turn and 16 DMA buffers of 256 KiB (4 MiB), at
seeded random page-aligned offsets that do not overlap (--quick: 12 and 4). For each kind in turn:
the guest converts the buffers to shared (KVM_SET_MEMORY_ATTRIBUTES2), the host
writes them whole through its mapping (a memset: Mapping.fill, which faults
them in) and the guest faults on them. Memory by page size is sampled after
the boot and after each of those nine phases.

Workload B, conversions: the same booted guest (untimed), then --ops
conversions of 4 KiB, 2 MiB or 1 GiB (weights 60/30/10), at seeded random
offsets aligned to their size, each the other way from what the range is
(all private: to shared; else to private), so every call converts something and
both directions come. After every --fault-every-th conversion, the host writes
the first page of the range if it is now shared, and the guest faults on the
whole range (so stage-2 leaf sizes, host-fault splits and lazy's merges at
guest faults are exercised). Memory by page size is sampled --samples times.
Only the loop is timed: conversions, the sampled faults and the drawing of the
operations; not the samples.

Each (policy, workload) runs in a child process of its own, so that its peak
RSS (getrusage ru_maxrss; this parent stays smaller than any child: matplotlib
is imported only to plot, after the runs) is its own. Reported per run: ops/s,
peak RSS, splits, merges, bytes zeroed (a folio's first use; SW_PROTECTED keeps
contents across conversions, so here the boot's), vmemmap bytes restored (to split) and
freed (by merges), the final memory by folio size (memory_by_page_size), the
share of guest memory mapped with huge stage-2 leaves (vm.mmu.pages_by_level)
and the share a fault could map huge now (GmemInode.huge_mappable), and
whether the model's invariants hold at the end (a broken one: exit status 1).

The scale sweep: the same conversions on guests of 1 GiB, 16 GiB, 256 GiB and
1 TiB, side by side in this process: per (policy, size) a booted guest and
pairs of conversions of a 4 KiB, 2 MiB or 1 GiB range in turn (to shared, then
back to private; each pair leaves the guest as it found it, since the guest
faults the range in again, untimed, after it), --sweep-pairs pairs per batch,
--sweep-batches interleaved rounds of every case; µs per conversion is the
median of the batches, and max/min the spread across the sizes.

The plots (PNG, matplotlib's Agg backend) go to --plot-dir (bench/out/, which
git ignores; the README's are in docs/img/): memory by folio size across
workload A's phases and over workload B's conversions, one line per policy.

    .venv/bin/python bench/hugetlb.py [--quick] [--json | --markdown] [--ops N]
                                      [-p POLICY]... [--plot-dir DIR] [--in-process]
                                      [--load JSON]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from guestmem import uapi
from guestmem.lab.timing import no_gc
from guestmem.model import Kvm
from guestmem.model.gmem import GuestMemfd, HugetlbPolicy
from guestmem.model.invariants import violations
from guestmem.model.paths import complete, gmem_fault_path
from guestmem.model.process import Mapping
from guestmem.model.vm import Memslot, Vm

PAGE = uapi.PAGE_SIZE
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
PROFILE = "hugetlb"  # inplace plus guest_memfd on HugeTLB (the WIP branch)
GMEM_FLAGS = uapi.GUEST_MEMFD_FLAG_HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP
BASE_GPA = 4 * GIB  # 1 GiB-aligned, as is the file offset (0): 1 GiB leaves possible
SLOT = 1
VMEMMAP_HEADROOM = 32  # memory beyond the pool: guest / 32 (a split needs at most / 64)
POLICIES = tuple(policy.value for policy in HugetlbPolicy)  # dynamic, eager-4k, stepwise, lazy
WORKLOADS = {"A": "CoCo boot", "B": "conversions"}
# Folio and leaf sizes by name: bytes, and base pages (Stage2Mmu.pages_by_level's keys).
SIZES = {"4 KiB": 4 * KIB, "2 MiB": 2 * MIB, "1 GiB": GIB}
LEVELS = {name: size // PAGE for name, size in SIZES.items()}

BOOT_RUN = GIB  # workload A's boot faults the guest in runs of this
SWIOTLB_OFFSET, SWIOTLB = 64 * MIB, 64 * MIB
VIRTIO_SIZES = (4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB)  # in turn
DMA_SIZE = 256 * KIB
ACTIONS = ("convert", "host", "guest")
GRANULES = (4 * KIB, 2 * MIB, GIB)  # workload B's conversion sizes
WEIGHTS = (60, 30, 10)  # ... drawn with these weights
FILL = 0x5A  # what the host writes into shared buffers


@dataclass(frozen=True)
class Config:
    """What one run does; the defaults are the recorded run."""

    guest: int = TIB
    ops: int = 1_000_000  # workload B's conversions
    fault_every: int = 8  # workload B: faults after every Nth conversion
    samples: int = 100  # workload B: memory samples (plus one after the boot)
    virtio: int = 36  # workload A: virtio rings
    dma: int = 16  # workload A: DMA buffers of DMA_SIZE
    seed: int = 1
    sweep_sizes: tuple[int, ...] = (GIB, 16 * GIB, 256 * GIB, TIB)
    sweep_batches: int = 21
    sweep_pairs: int = 30  # conversion pairs per batch (4 KiB, 2 MiB, 1 GiB in turn)


QUICK = Config(guest=16 * GIB, ops=1500, samples=15, virtio=12, dma=4, sweep_batches=2,
               sweep_pairs=3)


def size_name(n: int) -> str:
    """1 TiB, 64 MiB, 4 KiB; else GiB with one decimal (as in 16.3 GiB)."""
    for unit, name in ((TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n} B"


# --- one guest --------------------------------------------------------------------------------
class Guest:
    """A SW_PROTECTED VM with one HugeTLB guest_memfd of `size` on 1 GiB pages (HVO
    on) under `policy`, bound whole at BASE_GPA, private, mmapped whole."""

    def __init__(self, size: int, policy: str) -> None:
        if size % GIB:
            raise ValueError(f"a guest of {size:#x} bytes is not whole 1 GiB pages")
        self.size, self.policy = size, policy
        self.kvm = Kvm(PROFILE)
        hugetlb = self.kvm.hugetlb
        hugetlb.hvo = True
        hugetlb.memory.free_bytes = size + size // VMEMMAP_HEADROOM
        if hugetlb.set_nr_hugepages(GIB, size // GIB) != size // GIB:
            raise RuntimeError("the model's memory could not give the 1 GiB pool")
        self.vm: Vm = self.kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        self.gmem: GuestMemfd = self.vm.create_guest_memfd(size, GMEM_FLAGS,
                                                           uapi.HUGETLB_PAGE_ORDER_1G)
        self.gmem.set_hugetlb_policy(policy)
        self.vm.set_user_memory_region2(SLOT, uapi.KVM_MEM_GUEST_MEMFD, BASE_GPA, size, 0,
                                        self.gmem, 0)
        self.slot: Memslot = self.vm.memslots[(0, SLOT)]
        self.view: Mapping = self.gmem.mmap()

    def close(self) -> None:
        self.view.munmap()
        self.gmem.close()
        self.vm.close()

    def convert(self, offset: int, length: int, private: bool) -> None:
        self.gmem.set_memory_attributes2(offset, length, PRIVATE if private else 0)

    def guest_fault(self, offset: int, length: int) -> None:
        """The vCPU touches [offset, offset+length) (a fault that maps it at stage 2)."""
        gfn = self.slot.base_gfn + offset // PAGE
        if not complete(gmem_fault_path(self.vm, self.slot, gfn, gfn + length // PAGE)):
            raise RuntimeError(f"guest fault at {offset:#x} retried: an invalidation ran")

    def host_write(self, offset: int, length: int) -> None:
        """The host memsets [offset, offset+length) through its mapping (write faults).
        Mapping.fill, not Mapping.write: the model keeps a uniform fill per range,
        where written bytes cost it a real 4 KiB per page."""
        self.view.fill(offset, FILL, length)

    def all_private(self, offset: int, length: int) -> bool:
        first, last = offset // PAGE, (offset + length) // PAGE
        return self.gmem.inode.private_ranges(first, last) == [(first, last)]

    def whole(self, offset: int, length: int) -> bool:
        """Are the 1 GiB folios [offset, offset+length) touches all unsplit?"""
        first, last = offset // GIB * LEVELS["1 GiB"], -(-(offset + length) // GIB) * LEVELS[
            "1 GiB"]
        return self.gmem.inode.split.covered(first, last) == 0

    def boot(self) -> int:
        """The guest faults all of its memory in, private, in BOOT_RUN runs; the faults."""
        for offset in range(0, self.size, BOOT_RUN):
            self.guest_fault(offset, BOOT_RUN)
        return self.size // BOOT_RUN

    def sample(self, label: str, at: int) -> Sample:
        inode = self.gmem.inode
        by_size = inode.memory_by_page_size()
        by_level = self.vm.mmu.pages_by_level()
        r = inode.restructure
        return Sample(label, at, r.splits, r.merges, r.vmemmap_restored, r.vmemmap_freed,
                      r.zeroed, allocated=inode.allocated_pages() * PAGE,
                      memory={name: by_size[size] for name, size in SIZES.items()},
                      stage2={name: by_level[level] * PAGE for name, level in LEVELS.items()})

    def huge_mappable(self) -> int:
        """Bytes a fault could map with a huge leaf now (whole private folios of at
        least 2 MiB: GmemInode.huge_mappable), asked one 1 GiB folio at a time: over
        a larger range its cost grows with (pieces x shared runs) of the range."""
        inode, step = self.gmem.inode, LEVELS["1 GiB"]
        return sum(b - a for first in range(0, self.size // PAGE, step)
                   for a, b, _ in inode.huge_mappable(first, first + step)) * PAGE

    def violations(self) -> list[str]:
        return violations(self.kvm)


@dataclass
class Sample:
    """The guest at one moment: restructuring so far (cumulative), memory by folio
    size and stage-2 mappings by leaf size (bytes)."""

    label: str  # workload A's phase ("" in workload B)
    at: int  # operations done
    splits: int
    merges: int
    vmemmap_restored: int
    vmemmap_freed: int
    zeroed: int
    allocated: int
    memory: dict[str, int]
    stage2: dict[str, int]

    def huge_mapped(self) -> int:
        return self.stage2["2 MiB"] + self.stage2["1 GiB"]


@dataclass(frozen=True)
class Buffer:
    kind: str  # swiotlb, virtio, dma
    offset: int
    length: int


@dataclass
class Step:
    """One action on one of workload A's buffers and what it restructured."""

    kind: str
    action: str  # convert (to shared), host (writes it), guest (faults on it)
    offset: int
    length: int
    whole_before: bool  # the 1 GiB folios it touches were unsplit before
    splits: int
    merges: int
    vmemmap_restored: int
    vmemmap_freed: int


@dataclass
class Result:
    """One (policy, workload) run."""

    policy: str
    workload: str  # "A" or "B"
    guest: int
    ops: int
    seconds: float
    peak_rss_mib: float  # getrusage ru_maxrss of the process that ran it
    in_process: bool  # ran in this process (then its peak RSS is the whole run's)
    final: Sample
    huge_mappable: int
    samples: list[Sample]
    violations: list[str]
    steps: list[Step] = field(default_factory=list)  # workload A
    buffers: list[Buffer] = field(default_factory=list)  # workload A

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @staticmethod
    def from_json(data: dict[str, Any]) -> Result:
        data = dict(data)
        data["final"] = Sample(**data["final"])
        data["samples"] = [Sample(**s) for s in data["samples"]]
        data["steps"] = [Step(**s) for s in data["steps"]]
        data["buffers"] = [Buffer(**b) for b in data["buffers"]]
        known = {f.name for f in fields(Result)}
        return Result(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ops_per_s": self.ops_per_s}


Progress_ = Callable[[int, int], None]  # (done, total)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- workload A: CoCo boot --------------------------------------------------------------------
def coco_buffers(cfg: Config) -> list[Buffer]:
    """The swiotlb, then --virtio rings and --dma DMA buffers at seeded random
    page-aligned offsets, none overlapping another."""
    rng = random.Random(cfg.seed)
    buffers = [Buffer("swiotlb", SWIOTLB_OFFSET, SWIOTLB)]
    wanted = [("virtio", VIRTIO_SIZES[i % len(VIRTIO_SIZES)]) for i in range(cfg.virtio)]
    wanted += [("dma", DMA_SIZE)] * cfg.dma
    for kind, length in wanted:
        while True:
            offset = rng.randrange((cfg.guest - length) // PAGE + 1) * PAGE
            if not any(b.offset < offset + length and offset < b.offset + b.length
                       for b in buffers):
                break
        buffers.append(Buffer(kind, offset, length))
    return buffers


def _act(guest: Guest, action: str, buffer: Buffer) -> Step:
    r = guest.gmem.inode.restructure
    before = (r.splits, r.merges, r.vmemmap_restored, r.vmemmap_freed)
    whole = guest.whole(buffer.offset, buffer.length)
    if action == "convert":
        guest.convert(buffer.offset, buffer.length, False)
    elif action == "host":
        guest.host_write(buffer.offset, buffer.length)
    else:
        guest.guest_fault(buffer.offset, buffer.length)
    after = (r.splits, r.merges, r.vmemmap_restored, r.vmemmap_freed)
    return Step(buffer.kind, action, buffer.offset, buffer.length, whole,
                *(a - b for a, b in zip(after, before, strict=True)))


def workload_a(policy: str, cfg: Config, progress: Progress_) -> Result:
    """Boot (all private, faulted in), then each kind of buffer to shared, written by
    the host and faulted on by the guest; a sample after the boot and each phase."""
    buffers = coco_buffers(cfg)
    kinds = list(dict.fromkeys(b.kind for b in buffers))
    total = cfg.guest // BOOT_RUN + len(ACTIONS) * len(buffers)
    guest = Guest(cfg.guest, policy)
    steps: list[Step] = []
    elapsed = 0.0
    with no_gc():
        t0 = time.perf_counter()
        ops = guest.boot()
        elapsed += time.perf_counter() - t0
        samples = [guest.sample("boot", ops)]
        for kind in kinds:
            for action in ACTIONS:
                t0 = time.perf_counter()
                steps += [_act(guest, action, b) for b in buffers if b.kind == kind]
                elapsed += time.perf_counter() - t0
                ops += sum(1 for b in buffers if b.kind == kind)
                samples.append(guest.sample(f"{kind} {action}", ops))
                progress(ops, total)
    return _result(guest, "A", ops, elapsed, samples, steps, buffers)


def _result(guest: Guest, workload: str, ops: int, elapsed: float, samples: list[Sample],
            steps: list[Step] | None = None, buffers: list[Buffer] | None = None) -> Result:
    return Result(guest.policy, workload, guest.size, ops, elapsed, peak_rss_mib(), True,
                  samples[-1], guest.huge_mappable(), samples, guest.violations(),
                  steps or [], buffers or [])


# --- workload B: a million conversions --------------------------------------------------------
def conversions(cfg: Config) -> Iterator[tuple[int, int]]:
    """(offset, length) of each conversion, drawn lazily (a list of a million would
    weigh in the peak RSS)."""
    rng = random.Random(cfg.seed)
    for _ in range(cfg.ops):
        (length,) = rng.choices(GRANULES, WEIGHTS)
        yield rng.randrange(cfg.guest // length) * length, length


def _convert_and_fault(guest: Guest, offset: int, length: int, fault: bool) -> None:
    to_private = not guest.all_private(offset, length)
    guest.convert(offset, length, to_private)
    if fault:
        if not to_private:
            guest.host_write(offset, PAGE)
        guest.guest_fault(offset, length)


def workload_b(policy: str, cfg: Config, progress: Progress_) -> Result:
    """Boot (untimed), then cfg.ops conversions; memory sampled cfg.samples times."""
    guest = Guest(cfg.guest, policy)
    guest.boot()
    samples = [guest.sample("boot", 0)]
    every = max(1, cfg.ops // max(1, cfg.samples))
    elapsed = 0.0
    with no_gc():
        t0 = time.perf_counter()
        for i, (offset, length) in enumerate(conversions(cfg), 1):
            _convert_and_fault(guest, offset, length, i % cfg.fault_every == 0)
            if i % every == 0 or i == cfg.ops:
                elapsed += time.perf_counter() - t0
                samples.append(guest.sample("", i))
                progress(i, cfg.ops)
                t0 = time.perf_counter()
    return _result(guest, "B", cfg.ops, elapsed, samples)


WORKLOAD_RUNNERS: dict[str, Callable[[str, Config, Progress_], Result]] = {
    "A": workload_a, "B": workload_b}


# --- the scale sweep ----------------------------------------------------------------------------
@dataclass
class SweepRow:
    policy: str
    guest: int
    us_per_op: float  # median of the batches
    us_batches: list[float]
    ops: int
    splits: int  # during the timed conversions
    merges: int


class SweepCase:
    """Pairs of conversions (to shared, back to private) of 4 KiB, 2 MiB and 1 GiB
    ranges in turn, at seeded random aligned offsets of a booted guest; the guest
    faults each range in again after its pair (untimed)."""

    def __init__(self, policy: str, size: int, cfg: Config) -> None:
        self.guest = Guest(size, policy)
        self.guest.boot()
        self.rng = random.Random(cfg.seed)
        self.pairs = cfg.sweep_pairs
        self.times: list[float] = []
        self.splits = self.merges = 0

    def batch(self) -> None:
        guest, r = self.guest, self.guest.gmem.inode.restructure
        elapsed = 0.0
        for i in range(self.pairs):
            length = GRANULES[i % len(GRANULES)]
            offset = self.rng.randrange(guest.size // length) * length
            splits, merges = r.splits, r.merges
            t0 = time.perf_counter()
            guest.convert(offset, length, False)
            guest.convert(offset, length, True)
            elapsed += time.perf_counter() - t0
            self.splits += r.splits - splits
            self.merges += r.merges - merges
            guest.guest_fault(offset, length)
        self.times.append(elapsed / (2 * self.pairs) * 1e6)

    def row(self) -> SweepRow:
        return SweepRow(self.guest.policy, self.guest.size, statistics.median(self.times),
                        self.times, 2 * self.pairs * len(self.times), self.splits, self.merges)


def sweep(cfg: Config, policies: tuple[str, ...], progress: Progress_) -> list[SweepRow]:
    """Every (policy, size) case, batches in interleaved rounds (a busy moment of the
    machine falls on every case alike)."""
    cases = [SweepCase(policy, size, cfg) for policy in policies for size in cfg.sweep_sizes]
    total = cfg.sweep_batches * len(cases)
    with no_gc():
        for round_ in range(cfg.sweep_batches):
            for i, case in enumerate(cases):
                case.batch()
                progress(round_ * len(cases) + i + 1, total)
    rows = [case.row() for case in cases]
    for case in cases:
        case.guest.close()
    return rows


def sweep_spread(rows: list[SweepRow]) -> dict[str, float]:
    """max/min of µs per conversion across the sizes, per policy."""
    out = {}
    for policy in dict.fromkeys(r.policy for r in rows):
        us = [r.us_per_op for r in rows if r.policy == policy]
        out[policy] = max(us) / min(us)
    return out


# --- running: in this process or in a child per run -------------------------------------------
def run_in_process(policy: str, workload: str, cfg: Config, progress: Progress_) -> Result:
    return WORKLOAD_RUNNERS[workload](policy, cfg, progress)


def run_in_child(policy: str, workload: str, cfg: Config, progress: Progress_) -> Result:
    """This script with --child, its progress read from its stderr, its result from a
    file (not a pipe: a child blocked on a full stdout would never end its stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--child", policy, workload, str(out),
                   "--child-config", json.dumps(asdict(cfg))]
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as child:
            assert child.stderr is not None
            errors = []
            for line in child.stderr:
                words = line.split()
                if len(words) == 3 and words[0] == "progress":
                    progress(int(words[1]), int(words[2]))
                else:
                    errors.append(line)
        if child.returncode:
            raise RuntimeError(f"{policy} / {workload}: exit {child.returncode}\n"
                               + "".join(errors[-20:]))
        result = Result.from_json(json.loads(out.read_text()))
    result.in_process = False
    return result


def child_main(policy: str, workload: str, out: str, cfg: Config) -> int:
    """Run one (policy, workload) here; progress lines on stderr, the result to `out`."""
    def progress(done: int, total: int) -> None:
        print(f"progress {done} {total}", file=sys.stderr, flush=True)

    result = run_in_process(policy, workload, cfg, progress)
    result.peak_rss_mib = peak_rss_mib()
    Path(out).write_text(json.dumps(result.to_json()))
    return 0


def run_all(cfg: Config, policies: tuple[str, ...], in_process: bool,
            console: Console) -> tuple[list[Result], list[SweepRow]]:
    """Every (policy, workload), then the sweep, under a progress bar (on stderr)."""
    runner = run_in_process if in_process else run_in_child
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        results = []
        for workload in WORKLOADS:
            for policy in policies:
                task = bar.add_task(f"{workload}: {WORKLOADS[workload]}, {policy}", total=None)
                results.append(runner(policy, workload, cfg,
                                      _advance(bar, task)))
        task = bar.add_task("scale sweep", total=None)
        rows = sweep(cfg, policies, _advance(bar, task))
    return results, rows


def _advance(bar: Progress, task: Any) -> Progress_:
    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
    return progress


# --- plots ------------------------------------------------------------------------------------
STYLES = {"dynamic": ("tab:blue", "-", "o"), "eager-4k": ("tab:red", "--", "s"),
          "stepwise": ("tab:green", "-.", "^"), "lazy": ("tab:purple", ":", "D")}


PLOTS = {"A": "hugetlb-coco-boot.png", "B": "hugetlb-conversions.png"}


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    """Memory by folio size across workload A's phases and over workload B's
    conversions: a subplot per folio size, a line per policy; the PNGs' paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for workload, name in PLOTS.items():
        runs = [r for r in results if r.workload == workload]
        if runs:
            fig, axes = plt.subplots(1, len(SIZES), figsize=(13, 4.4), sharex=True)
            for ax, size in zip(axes, SIZES, strict=True):
                _subplot(ax, size, workload, runs)
            (axes[2] if workload == "A" else axes[0]).legend(title="policy", loc="center right")
            fig.suptitle(_plot_title(workload, runs[0]))
            fig.tight_layout()
            paths.append(out_dir / name)
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
    return paths


def _subplot(ax: Any, size: str, workload: str, runs: list[Result]) -> None:
    """One folio size, a line per policy: across A's phases (symlog: eager-4k's
    whole guest and the other policies' few GiB on one axis), or over B's
    conversions (in thousands)."""
    for r in runs:
        color, style, marker = STYLES.get(r.policy, ("black", "-", "x"))
        x = [i if workload == "A" else s.at / 1000 for i, s in enumerate(r.samples)]
        ax.plot(x, [s.memory[size] / GIB for s in r.samples], label=r.policy, color=color,
                linestyle=style, marker=marker, markersize=4 if workload == "A" else 0,
                linewidth=1.6)
    ax.set_title(f"in {size} folios")
    ax.grid(True, alpha=0.3)
    if workload == "A":
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylabel("GiB (symlog)")
        ax.set_xticks(range(len(runs[0].samples)), [s.label for s in runs[0].samples],
                      rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("phase (after)")
    else:
        ax.set_ylabel("GiB")
        ax.set_xlabel("conversions done (thousands)")


def _plot_title(workload: str, r: Result) -> str:
    what = ("CoCo boot, then swiotlb, virtio rings and DMA buffers shared" if workload == "A"
            else f"{r.ops:,} conversions of 4 KiB / 2 MiB / 1 GiB")
    return (f"Workload {workload}: guest memory by folio size, {what}\n"
            f"{size_name(r.guest)} guest on 1 GiB HugeTLB pages, HVO; one line per policy")


# --- output -----------------------------------------------------------------------------------
def human(n: int) -> str:
    """Bytes in three significant figures: 0, 518 KiB, 4.31 GiB, 16.0 GiB, 1.00 TiB."""
    if n == 0:
        return "0"
    for unit, name in ((TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit:
            value = n / unit
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{digits}f} {name}"
    return f"{n} B"


def _share(n: int, of: int) -> str:
    return f"{n / of:.1%}" if of else "-"


COST_COLUMNS = ("policy", "ops/s", "peak RSS\nMiB", "splits", "merges", "S2 huge",
                "huge-\nmappable")
MEMORY_COLUMNS = ("policy", "zeroed", "vmemmap\nrestored", "vmemmap\nfreed", "in 4 KiB\nfolios",
                  "in 2 MiB\nfolios", "in 1 GiB\nfolios")


def cost_cells(r: Result) -> list[str]:
    f = r.final
    return [r.policy, f"{r.ops_per_s:,.0f}", f"{r.peak_rss_mib:.0f}", f"{f.splits:,}",
            f"{f.merges:,}", _share(f.huge_mapped(), r.guest), _share(r.huge_mappable, r.guest)]


def memory_cells(r: Result) -> list[str]:
    f = r.final
    return [r.policy, human(f.zeroed), human(f.vmemmap_restored), human(f.vmemmap_freed),
            *(human(f.memory[s]) for s in SIZES)]


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        width = max([len(row[i]) for row in rows] + [len(word) for word in col.split()])
        table.add_column(col, justify="left" if i == 0 else "right", min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def workload_title(workload: str, runs: list[Result]) -> str:
    r = runs[0]
    return f"{workload}: {WORKLOADS[workload]}, {size_name(r.guest)} guest, {r.ops:,} ops"


def print_tables(console: Console, results: list[Result], rows: list[SweepRow]) -> None:
    for workload in WORKLOADS:
        runs = [r for r in results if r.workload == workload]
        if not runs:
            continue
        title = workload_title(workload, runs)
        console.print(_table(f"{title}: cost, stage 2 at the end", COST_COLUMNS,
                             [cost_cells(r) for r in runs]))
        console.print(_table(f"{title}: memory at the end", MEMORY_COLUMNS,
                             [memory_cells(r) for r in runs]))
    console.print(_table("scale sweep: µs per conversion by guest size", *sweep_grid(rows)))
    console.print("vmemmap +/-: restored to split, freed by merges; S2 huge: guest memory "
                  "mapped with 2 MiB or 1 GiB stage-2 leaves; mappable: what a fault could "
                  "map huge now; RSS: ru_maxrss" + (" of this whole process (in-process)"
                                                    if any(r.in_process for r in results)
                                                    else " of the run's child process"))
    for r in results:
        for v in r.violations:
            console.print(f"[bold]model invariant broken[/] ({r.policy}, {r.workload}): {v}")


def sweep_grid(rows: list[SweepRow]) -> tuple[tuple[str, ...], list[list[str]]]:
    sizes = list(dict.fromkeys(r.guest for r in rows))
    spread = sweep_spread(rows)
    by = {(r.policy, r.guest): r for r in rows}
    grid = [[policy, *(f"{by[policy, s].us_per_op:.1f}" for s in sizes),
             f"{spread[policy]:.2f}"] for policy in spread]
    return ("policy", *(size_name(s) for s in sizes), "max/min"), grid


def markdown(results: list[Result], rows: list[SweepRow]) -> str:
    """The tables as markdown (for the README): one per workload, then the sweep."""
    out = []
    columns = tuple(c.replace("\n", " ").replace("- ", "-")
                    for c in (*COST_COLUMNS, *MEMORY_COLUMNS[1:]))
    for workload in WORKLOADS:
        runs = [r for r in results if r.workload == workload]
        if runs:
            out += [f"{workload_title(workload, runs)}:", "", _md_row(columns),
                    "|---" * len(columns) + "|"]
            out += [_md_row([*cost_cells(r), *memory_cells(r)[1:]]) for r in runs] + [""]
    header, grid = sweep_grid(rows)
    out += ["µs per conversion by guest size:", "", _md_row(header), "|---" * len(header) + "|"]
    out += [_md_row(row) for row in grid]
    return "\n".join(out) + "\n"


def _md_row(cells: tuple[str, ...] | list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- main ---------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a small run (16 GiB guest, 1,500 conversions, in this process)")
    ap.add_argument("--ops", type=int, help="workload B's conversions (default 1,000,000)")
    ap.add_argument("--samples", type=int, help="workload B's memory samples (default 100)")
    ap.add_argument("--fault-every", type=int, help="workload B: faults after every Nth (8)")
    ap.add_argument("--seed", type=int, help="the random offsets' seed (1)")
    ap.add_argument("--sweep-batches", type=int, help="scale sweep: rounds (median; 21)")
    ap.add_argument("--sweep-pairs", type=int, help="scale sweep: pairs per batch (30)")
    ap.add_argument("-p", "--policy", action="append", choices=POLICIES,
                    help="only this policy (repeatable)")
    ap.add_argument("--plot-dir", type=Path, default=Path(__file__).parent / "out",
                    help="where the PNGs go (default bench/out/)")
    ap.add_argument("--in-process", action="store_true",
                    help="run everything in this process (--quick does)")
    ap.add_argument("--load", type=Path, metavar="JSON",
                    help="measure nothing: show (and plot) a report --json saved")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--child", nargs=3, metavar=("POLICY", "WORKLOAD", "OUT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--child-config", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else Config()
    for name in ("ops", "samples", "fault_every", "seed", "sweep_batches", "sweep_pairs"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "seed" else 1):
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
            cfg = replace(cfg, **{name: value})
    return cfg


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run what the arguments ask for; the report (as --json prints it), or None if
    a run failed."""
    cfg = config(args)
    policies = tuple(args.policy or POLICIES)
    start = time.perf_counter()
    stderr = Console(stderr=True)
    try:
        results, rows = run_all(cfg, policies, args.in_process or args.quick, stderr)
    except RuntimeError as e:
        stderr.print(f"[bold red]failed:[/] {e}")
        return None
    return {"parameters": asdict(cfg) | {"quick": args.quick}, "policies": list(policies),
            "runs": [r.to_json() for r in results], "sweep": [asdict(r) for r in rows],
            "sweep_spread": sweep_spread(rows), "elapsed_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        data = json.loads(args.child_config)
        data["sweep_sizes"] = tuple(data["sweep_sizes"])
        policy, workload, out = args.child
        return child_main(policy, workload, out, Config(**data))
    report = json.loads(args.load.read_text()) if args.load else measure(args)
    if report is None:
        return 1
    results = [Result.from_json(r) for r in report["runs"]]
    rows = [SweepRow(**r) for r in report["sweep"]]
    report["plots"] = [str(p) for p in plot(results, args.plot_dir)]
    if args.json:
        print(json.dumps(report, indent=1))
    elif args.markdown:
        print(markdown(results, rows), end="")
    else:
        console = Console(width=80)
        print_tables(console, results, rows)
        console.print(f"run {report['elapsed_s']:.0f} s; plots: " + ", ".join(report["plots"]))
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
