"""tools/testing/selftests/kvm/x86/private_mem_conversions_test.c, ported whole.

Upstream (torvalds @5171573c): a KVM_X86_SW_PROTECTED_VM with KVM_CAP_EXIT_HYPERCALL
for MAP_GPA_RANGE; one guest_memfd (flags 0) of 4 MiB per vCPU (2 MiB + 4 KiB
aligned up to 2 MiB) split over -m memslots at GPA 4 GiB, shared memory from the
-s source; each vCPU runs guest_code on its own 2 MiB + 4 KiB: the explicit
conversion test without and with fallocate, then the punch-hole test imprecise
and precise. The guest picks per hypercall, in the attrs argument, whether the
host sets attributes (BIT0), shared or private (BIT1), and fallocates (BIT2):
guestmem's Vmm does the same with conversion="guest-flags".

How the port runs it. A guest program runs to a sync point and halts; the host
side of the sync (GUEST_SYNC's memcmp_h/memset) happens between runs, and the
next run continues where the guest left off (guest memory and attributes carry
over, registers do not need to). Upstream runs one thread per vCPU; here the
vCPUs take turns, phase by phase, in one thread (the model's vCPUs run in the
caller's thread, and a deterministic order is reproducible): vCPU 1's phase k runs
after vCPU 0's phase k, so each vCPU's conversions, punches and syncs land between
another vCPU's writes and its checks. Every run must end with the program done
and every report 0 (a MAP_GPA_RANGE that returned 0, a verify that held): the
guest's GUEST_ASSERTs.

The same phases run on a VMM that converts in place (cases_inplace_vmm: one
guest_memfd, MMAP|INIT_SHARED, holds shared and private pages), with the two
changes the in-place series makes to this test (upstream-2026-11.md §1, v3
patches 29 and 34, "Reset shared memory after hole-punching" and "Update
private_mem_conversions_test to mmap() guest_memfd"): at SYNC_PRIVATE the host's
access to the private range takes SIGBUS (TEST_EXPECT_SIGBUS) instead of seeing
the old shared data, and the end of each range punches first and then resets the
whole per-vCPU data to init_p (a punch zeroes the very page the reset wrote).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from guestmem import api, uapi
from guestmem import program as p
from guestmem.check.suite import (
    Ctx,
    case,
    needs_exit_hypercall,
    needs_guests,
    needs_private_memory,
    only_on,
)
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Vmm
from guestmem.vmm.vmm import (
    IN_PLACE,
    MAP_GPA_DO_FALLOCATE,
    MAP_GPA_SET_ATTRIBUTES,
    MAP_GPA_SHARED,
)

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
SRC = "private_mem_conversions_test.c"
BASE_DATA_GPA = 1 << 32
PER_CPU_DATA_SIZE = MB2 + PS
PER_CPU_SIZE = 2 * MB2  # align_up(PER_CPU_DATA_SIZE, max(2 MiB, backing page size))
# test_ranges: (offset, size) within a vCPU's data
TEST_RANGES = ((0, PS), (0, MB2), (PS, PS), (PS, MB2), (MB2, PS))
DEF_P, INIT_P, P1, P2, P3, P4 = 0xAA, 0xCC, 0x11, 0x22, 0x33, 0x44

HostSync = Callable[[], None]


@dataclass(frozen=True)
class Phase:
    """Guest steps up to a sync point, then what the host does at the sync."""

    label: str
    steps: tuple[p.Step, ...]
    sync: HostSync | None = None


# Upstream TEST_REQUIREs KVM_X86_SW_PROTECTED_VM, where the attributes alone decide
# privateness (SNP/TDX take it from the hardware access).
needs_sw_protected = only_on(uapi.KVM_X86_SW_PROTECTED_VM,
                             "private_mem_conversions_test needs KVM_X86_SW_PROTECTED_VM")


NEEDS = (needs_sw_protected, needs_guests, needs_private_memory, needs_exit_hypercall)


def word(byte: int) -> int:
    """The 64-bit word a memset() of `byte` leaves."""
    return int.from_bytes(bytes([byte]) * 8, "little")


def fill(gpa: int, size: int, byte: int) -> p.WritePattern:
    """memset((void *)gpa, byte, size)"""
    return p.WritePattern(gpa, size, word(byte))


def expect(gpa: int, size: int, byte: int) -> p.VerifyPattern:
    """memcmp_g(gpa, byte, size)"""
    return p.VerifyPattern(gpa, size, word(byte))


def map_mem(gpa: int, size: int, shared: bool, do_fallocate: bool,
            set_attributes: bool = True) -> p.MapGpaRange:
    """guest_map_mem / guest_punch_hole: kvm_hypercall_map_gpa_range(gpa, size, flags)."""
    flags = ((MAP_GPA_SET_ATTRIBUTES if set_attributes else 0) | (MAP_GPA_SHARED if shared else 0)
             | (MAP_GPA_DO_FALLOCATE if do_fallocate else 0))
    return p.MapGpaRange(gpa, size // PS, encrypted=not shared, flags=flags)


class Host:
    """The host side of the syncs (memcmp_h, memset through addr_gpa2hva), over
    every memslot a range spans."""

    def __init__(self, ctx: Ctx, vmm: Vmm) -> None:
        self.ctx, self.vmm = ctx, vmm
        self.in_place = vmm.in_place  # shared and private pages in one guest_memfd

    def _pieces(self, gpa: int, size: int) -> Iterator[tuple[api.Mapping, int, int]]:
        for region in self.vmm.regions:
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo < hi:
                yield region.mapping, lo - region.gpa, hi - lo

    def sees(self, what: str, gpa: int, size: int, byte: int) -> None:
        for mapping, offset, length in self._pieces(gpa, size):
            self.ctx.bytes_equal(what, mapping, offset, bytes([byte]) * length)

    def writes(self, gpa: int, size: int, byte: int) -> None:
        for mapping, offset, length in self._pieces(gpa, size):
            mapping.fill(offset, byte, length)

    def sync_shared(self, gpa: int, size: int, current: int, new: int) -> HostSync:
        """SYNC_SHARED: the host sees `current` (the guest's data), then writes `new`."""
        def sync() -> None:
            self.sees(f"host sees {current:#x} at [{gpa:#x}, +{size:#x})", gpa, size, current)
            self.writes(gpa, size, new)
        return sync

    def sync_private(self, gpa: int, size: int, shared: int) -> HostSync:
        """SYNC_PRIVATE: the host still sees the shared data, not the guest's private
        data; in place there is no other copy: its access takes SIGBUS."""
        def sync() -> None:
            if self.in_place:
                self.faults(f"host access to private [{gpa:#x}, +{size:#x})", gpa, size)
                return
            self.sees(f"host sees the shared {shared:#x}, not private data, at [{gpa:#x}, "
                      f"+{size:#x})", gpa, size, shared)
        return sync

    def faults(self, what: str, gpa: int, size: int) -> None:
        """TEST_EXPECT_SIGBUS(memcmp_h(...)): the first byte of each memslot's piece."""
        for mapping, offset, _ in self._pieces(gpa, size):
            self.ctx.sigbus(what, mapping, offset)


def explicit_conversion(host: Host, base: int, do_fallocate: bool) -> Iterator[Phase]:
    """guest_test_explicit_conversion(base_gpa, do_fallocate)."""
    end = base + PER_CPU_DATA_SIZE
    yield Phase("memory starts shared: guest writes def_p",
                (fill(base, PER_CPU_DATA_SIZE, DEF_P), expect(base, PER_CPU_DATA_SIZE, DEF_P)),
                host.sync_shared(base, PER_CPU_DATA_SIZE, DEF_P, INIT_P))
    steps: list[p.Step] = [expect(base, PER_CPU_DATA_SIZE, INIT_P)]  # the host's init_p
    for offset, size in TEST_RANGES:
        gpa, tag = base + offset, f"({offset:#x},{size:#x})"
        steps += [fill(gpa, size, P1), map_mem(gpa, size, False, do_fallocate)]
        if size > PS:
            steps.append(fill(gpa, PS, P2))  # and `goto skip`
        else:
            steps.append(fill(gpa, size, P2))
            yield Phase(f"{tag} private p2", tuple(steps), host.sync_private(gpa, size, P1))
            steps = [expect(gpa, size, P2)]
            if gpa > base:
                steps.append(expect(base, gpa - base, INIT_P))
            if gpa + size < end:
                steps.append(expect(gpa + size, end - (gpa + size), INIT_P))
            yield from _odd_pages_shared(host, gpa, size, do_fallocate, tag, steps)
            steps = []
        # skip: the whole range back to shared; the guest writes p3, the host p4
        steps += [map_mem(gpa, size, True, do_fallocate), fill(gpa, size, P3)]
        yield Phase(f"{tag} shared again: guest writes p3", tuple(steps),
                    host.sync_shared(gpa, size, P3, P4))
        steps = [expect(gpa, size, P4), *_reset(host, base, gpa, size)]
    yield Phase("last range reset", tuple(steps))


def _reset(host: Host, base: int, gpa: int, size: int) -> tuple[p.Step, ...]:
    """Reset the range to init_p and free all private memory (PUNCH_HOLE); in place
    the punch first, then init_p over all the vCPU's data (the series' v3 29/43)."""
    punch = map_mem(base, PER_CPU_DATA_SIZE, True, True)
    if host.in_place:
        return punch, fill(base, PER_CPU_DATA_SIZE, INIT_P)
    return fill(gpa, size, INIT_P), punch


def _odd_pages_shared(host: Host, gpa: int, size: int, do_fallocate: bool, tag: str,
                      steps: list[p.Step]) -> Iterator[Phase]:
    """Odd page frames back to shared, holes in a private range (upstream reaches
    this loop only for size == PAGE_SIZE, i.e. j = 0, an even frame)."""
    for j in range(0, size, PS):
        if (j // PS) & 1:
            steps.append(map_mem(gpa + j, PS, True, do_fallocate))
            yield Phase(f"{tag} odd page {j // PS} shared", tuple(steps),
                        host.sync_shared(gpa + j, PS, P1, P3))
            steps = [expect(gpa + j, PS, P3)]
        else:
            yield Phase(f"{tag} page {j // PS} still private", tuple(steps),
                        host.sync_private(gpa + j, PS, P1))
            steps = []
    if steps:
        yield Phase(f"{tag} odd pages", tuple(steps))


def punch_hole(base: int, precise: bool) -> Iterator[Phase]:
    """guest_test_punch_hole(base_gpa, precise): all private (attributes only); per
    range, punch everything, fault in (only the target range if precise, else
    all of it) and fill, punch the target range: it reads zeros."""
    steps: list[p.Step] = [map_mem(base, PER_CPU_DATA_SIZE, False, False)]
    for offset, size in TEST_RANGES:
        gpa = base + offset
        steps.append(map_mem(base, PER_CPU_DATA_SIZE, True, True, set_attributes=False))
        lo, length = (gpa, size) if precise else (base, PER_CPU_DATA_SIZE)
        steps += [fill(lo, length, INIT_P), expect(lo, length, INIT_P),
                  map_mem(gpa, size, True, True, set_attributes=False), expect(gpa, size, 0)]
    yield Phase(f"punch holes ({'precise' if precise else 'all faulted in'})", tuple(steps))


def guest_code(host: Host, base: int) -> Iterator[Phase]:
    """guest_code: explicit conversion without and with fallocate, then PUNCH_HOLE
    with the whole guest_memfd faulted in and with only the target range."""
    yield from explicit_conversion(host, base, do_fallocate=False)
    yield from explicit_conversion(host, base, do_fallocate=True)
    yield from punch_hole(base, precise=False)
    yield from punch_hole(base, precise=True)


Guest = Callable[[Host, int], Iterator[Phase]]


def run_conversions(ctx: Ctx, guest: Guest, nr_vcpus: int = 1, nr_memslots: int = 1,
                    shared: str = "anon", in_place: bool = False) -> None:
    """test_mem_conversions(src_type, nr_vcpus, nr_memslots), then the guest_memfd
    outliving the VM: PUNCH_HOLE and allocate over all of it still succeed.
    `in_place`: the VMM must convert in place (else it must not)."""
    with Vmm(ctx.kvm, ctx.vm_type, conversion="guest-flags") as vmm:
        regions = vmm.add_private_memory(BASE_DATA_GPA, PER_CPU_SIZE * nr_vcpus, nr_memslots,
                                         shared)
        ctx.equal("memslot backing", [IN_PLACE if in_place else "gmem+shared"] * nr_memslots,
                  [r.backing for r in regions])
        ctx.equal("memslots on one guest_memfd, at offsets slot_size*i",
                  [(BASE_DATA_GPA + i * r.size, i * r.size) for i, r in enumerate(regions)],
                  [(r.gpa, r.gmem_offset) for r in regions])
        vcpus = [vmm.vcpu] + [vmm.add_vcpu() for _ in range(nr_vcpus - 1)]
        host = Host(ctx, vmm)
        workers = [(i, v, guest(host, BASE_DATA_GPA + i * PER_CPU_SIZE))
                   for i, v in enumerate(vcpus)]
        _interleave(ctx, vmm, workers)
        gmem = regions[0].guest_memfd
        _vm_free(vmm)
        size = PER_CPU_SIZE * nr_vcpus
        ctx.ok("PUNCH_HOLE all after the VM is gone", gmem.punch_hole, 0, size)
        ctx.ok("allocate all after the VM is gone", gmem.allocate, 0, size)


def _vm_free(vmm: Vmm) -> None:
    """kvm_vm_free: the vCPUs, the shared memory and the VM fd go; the guest_memfd
    stays open (and keeps its reference to the VM). Vmm.close repeats nothing."""
    for vcpu in vmm.vcpus:
        vcpu.close()
    for region in vmm.regions:
        region.mapping.munmap()
    vmm.vm.close()


def _interleave(ctx: Ctx, vmm: Vmm, workers: list[tuple[int, api.Vcpu, Iterator[Phase]]]) -> None:
    """Each vCPU's next phase in turn until all are done (see the module docstring)."""
    abi = default_hypercall_abi(ctx.caps, vmm.cpl)
    while workers:
        still = []
        for i, vcpu, phases in workers:
            phase = next(phases, None)
            if phase is None:
                continue
            vmm.load(compile_program(p.Program.of(*phase.steps), abi), vcpu=vcpu)
            result = vmm.run(vcpu=vcpu)
            ctx.equal(f"vCPU {i}: {phase.label}", "done, every report 0",
                      _outcome(phase.steps, result))
            if phase.sync is not None:
                phase.sync()
            still.append((i, vcpu, phases))
        workers = still


def _outcome(steps: tuple[p.Step, ...], result: RunResult) -> str:
    """How a run went, for a check: "done, every report 0" (every GUEST_ASSERT held),
    or the first step whose report was not 0 and what it said."""
    reports = iter(result.reports)
    checks = (s for s in steps if isinstance(s, p.VerifyPattern | p.MapGpaRange))
    for index, step in enumerate(checks):
        value = next(reports, None)
        if value == p.MISMATCH_TAG and isinstance(step, p.VerifyPattern):
            addr, found = next(reports, 0), next(reports, 0)
            return f"check {index} ({step.gpa:#x}, +{step.length:#x}): {found:#x} at {addr:#x}"
        if value != 0:
            ret = value - (1 << 64) if value is not None and value >> 63 else value
            return f"check {index} ({type(step).__name__} {step.gpa:#x}): {ret}"
    return f"{result.stop}, every report 0" if next(reports, None) is None else \
        f"{result.stop}, extra reports {result.reports}"


def explicit_both(host: Host, base: int) -> Iterator[Phase]:
    """guest_test_explicit_conversion without, then with, fallocate (guest_code)."""
    yield from explicit_conversion(host, base, do_fallocate=False)
    yield from explicit_conversion(host, base, do_fallocate=True)


def punch_hole_both(host: Host, base: int) -> Iterator[Phase]:
    """guest_test_punch_hole imprecise, then precise (guest_code)."""
    yield from punch_hole(base, precise=False)
    yield from punch_hole(base, precise=True)


@case("coco.conversions.explicit", f"{SRC} guest_test_explicit_conversion",
      "memory starts shared (guest writes 0xaa, the host sees it and writes 0xcc, the guest "
      "sees that); for (0,4K) (0,2M) (4K,4K) (4K,2M) (2M,4K) of 2 MiB + 4 KiB: to private, "
      "the guest's p2 is invisible to the host (p1), data outside the range keeps 0xcc; back "
      "to shared, the host sees the guest's p3 and the guest the host's p4; once with "
      "attributes only (do_fallocate = false), once with fallocate; every hypercall 0",
      needs=NEEDS)
def explicit(ctx: Ctx) -> None:
    run_conversions(ctx, explicit_both)


@case("coco.conversions.punch_hole", f"{SRC} guest_test_punch_hole",
      "all private (attributes only); per range of the five: PUNCH_HOLE everything without "
      "touching attributes, fault in and fill (everything, then only the target range: "
      "precise), punch the range: the guest reads zeros there",
      needs=NEEDS)
def punch_holes(ctx: Ctx) -> None:
    run_conversions(ctx, punch_hole_both)


@case("coco.conversions.vcpus", f"{SRC} -n 2 (test_mem_conversions with nr_vcpus 2)",
      "two vCPUs, each running the whole guest_code on its own 4 MiB, phase by phase in "
      "turn: every check of either holds",
      needs=NEEDS)
def vcpus(ctx: Ctx) -> None:
    run_conversions(ctx, guest_code, nr_vcpus=2)


@case("coco.conversions.memslots", f"{SRC} -m 2 and -n 2 -m 4",
      "one guest_memfd split over several memslots (one vCPU, 2 slots of 2 MiB: its "
      "2 MiB + 4 KiB crosses a slot; two vCPUs, 4 slots): the whole guest_code holds, "
      "conversions and punches spanning slots included",
      needs=NEEDS)
def memslots(ctx: Ctx) -> None:
    run_conversions(ctx, guest_code, nr_vcpus=1, nr_memslots=2)
    run_conversions(ctx, guest_code, nr_vcpus=2, nr_memslots=4)


@case("coco.conversions.thp", f"{SRC} -s anonymous_thp",
      "shared memory from 2 MiB-aligned anonymous memory with MADV_HUGEPAGE: the whole "
      "guest_code holds", needs=NEEDS)
def thp(ctx: Ctx) -> None:
    run_conversions(ctx, guest_code, shared="thp")


@case("coco.conversions.handler", f"{SRC} handle_exit_hypercall",
      "every MAP_GPA_RANGE reaches the host as nr 12 and gets 0; BIT0 alone changes only "
      "the attributes (private data survives a round trip), BIT2 alone only fallocates "
      "(a punch zeroes private pages and leaves them private; an allocate leaves shared "
      "memory shared), both punch and convert (private pages read zeros after)",
      needs=NEEDS)
def handler(ctx: Ctx) -> None:
    """The three paths of the handler, one at a time. Contents: a private page that
    was not punched is the same folio when it becomes private again (only
    PUNCH_HOLE frees it: kvm_gmem_punch_hole; KVM_SET_MEMORY_ATTRIBUTES zaps SPTEs
    only); a punched one is a new folio, zeroed when the guest faults it
    (kvm_gmem_get_pfn prepares a !uptodate folio)."""
    base, size = BASE_DATA_GPA, PS
    with Vmm(ctx.kvm, ctx.vm_type, conversion="guest-flags") as vmm:
        vmm.add_private_memory(base, PER_CPU_SIZE)
        host, abi = Host(ctx, vmm), default_hypercall_abi(ctx.caps, vmm.cpl)
        host.writes(base, size, P1)
        phases: list[tuple[str, tuple[p.Step, ...]]] = [
            ("attributes only: private, the guest writes p2", (
                map_mem(base, size, False, False), fill(base, size, P2))),
            ("attributes only: shared, the guest sees the host's p1", (
                map_mem(base, size, True, False), expect(base, size, P1))),
            ("attributes only: private again, p2 is still there", (
                map_mem(base, size, False, False), expect(base, size, P2))),
            ("fallocate only, punch: still private, zeros", (
                map_mem(base, size, True, True, set_attributes=False), expect(base, size, 0))),
            ("both: shared and punched, the guest sees p1", (
                fill(base, size, P3), map_mem(base, size, True, True), expect(base, size, P1))),
            ("attributes only: private, zeros (p3 was punched)", (
                map_mem(base, size, False, False), expect(base, size, 0))),
            ("both: shared again; fallocate only, allocate: still shared", (
                map_mem(base, size, True, True),
                map_mem(base, size, False, True, set_attributes=False), expect(base, size, P1))),
        ]
        for label, steps in phases:
            vmm.load(compile_program(p.Program.of(*steps), abi))
            result = vmm.run()
            ctx.equal(label, "done, every report 0", _outcome(steps, result))
            ctx.equal(f"{label}: hypercalls the host handled as MAP_GPA_RANGE",
                      sum(isinstance(s, p.MapGpaRange) for s in steps),
                      sum(line.startswith("MAP_GPA_RANGE") for line in result.log))
        set_attributes = [s for _, steps in phases for s in steps
                          if isinstance(s, p.MapGpaRange) and s.attrs & MAP_GPA_SET_ATTRIBUTES]
        ctx.equal("the tracker records the attribute changes only (BIT0 calls)",
                  len(set_attributes), len(vmm.tracker.requests))
        host.sees("the host's shared page was never punched", base, size, P1)
