"""The VMM converting in place: private_mem_conversions_test and
private_mem_kvm_exits_test as the in-place conversion series runs them.

With in-place conversion (upstream-2026-11.md §1; the model's `inplace` profile)
the VMM backs a private VM with one guest_memfd, MMAP|INIT_SHARED, mapped at
userspace_addr ("gmem-inplace"), and converts with KVM_SET_MEMORY_ATTRIBUTES2 on
it. Here:
- private_mem_conversions_test's phases, from cases_conversions unchanged but for
  the series' two changes to that test (its module docstring), on the in-place VMM;
  the -s anonymous_thp run has no in-place variant (shared pages are the
  guest_memfd's, there is no other source);
- the guest's conversion flags one at a time, with what in-place contents are on a
  SW_PROTECTED VM (the series: "KVM does not directly manipulate the memory
  contents of pages during attribute updates"; PUNCH_HOLE frees the one page);
- a to-private request over a page someone pinned: EAGAIN, the VMM's bounded
  retries, failure to the guest, the GPA in the log; after the unpin it succeeds;
- private_mem_kvm_exits_test's test_private_access_memslot_deleted as the series'
  v8 changes it: with the attributes in the guest_memfd a deleted memslot's GPA
  looks shared, so the access is KVM_EXIT_MMIO (phys_addr = GPA, len 8, read), not
  a MEMORY_FAULT. test_private_access_memslot_not_private is skipped in that mode
  upstream (PRIVATE cannot be set on a slot without a guest_memfd): not ported.

Every case needs the in-place capability first, so a kernel without it says so.
"""

from __future__ import annotations

from guestmem import program as p
from guestmem import uapi
from guestmem.check.cases_coco import _delete_at_first_tick, _run
from guestmem.check.cases_conversions import (
    BASE_DATA_GPA,
    P1,
    P2,
    P3,
    PER_CPU_SIZE,
    PS,
    Guest,
    Host,
    _outcome,
    expect,
    explicit_both,
    fill,
    guest_code,
    map_mem,
    needs_sw_protected,
    punch_hole_both,
    run_conversions,
    word,
)
from guestmem.check.suite import (
    Ctx,
    case,
    needs_exit_hypercall,
    needs_gmem_attributes,
    needs_guests,
)
from guestmem.exits import MmioExit
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import MemoryRegion, Vmm
from guestmem.vmm.vmm import CONVERSION_RETRIES, IN_PLACE

CONVERSIONS = "private_mem_conversions_test.c (the in-place series' version)"
EXITS = "private_mem_kvm_exits_test.c (the in-place series' v8 version)"
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
NEEDS = (needs_gmem_attributes, needs_sw_protected, needs_guests, needs_exit_hypercall)


def run_in_place(ctx: Ctx, guest: Guest, nr_vcpus: int = 1, nr_memslots: int = 1) -> None:
    """cases_conversions.run_conversions on the VMM that converts in place."""
    run_conversions(ctx, guest, nr_vcpus, nr_memslots, in_place=True)


@case("inplace.conversions.explicit", f"{CONVERSIONS} guest_test_explicit_conversion",
      "coco.conversions.explicit on one guest_memfd converted in place: every hypercall 0, "
      "every guest check holds; at each private sync the host's access takes SIGBUS",
      needs=NEEDS)
def explicit(ctx: Ctx) -> None:
    run_in_place(ctx, explicit_both)


@case("inplace.conversions.punch_hole", f"{CONVERSIONS} guest_test_punch_hole",
      "coco.conversions.punch_hole on one guest_memfd converted in place: a punched "
      "private range reads zeros", needs=NEEDS)
def punch_holes(ctx: Ctx) -> None:
    run_in_place(ctx, punch_hole_both)


@case("inplace.conversions.vcpus", f"{CONVERSIONS} -n 2",
      "two vCPUs, each running the whole guest_code on its own 4 MiB of the one "
      "guest_memfd, phase by phase in turn: every check of either holds", needs=NEEDS)
def vcpus(ctx: Ctx) -> None:
    run_in_place(ctx, guest_code, nr_vcpus=2)


@case("inplace.conversions.memslots", f"{CONVERSIONS} -m 2 and -n 2 -m 4",
      "one guest_memfd over several memslots, each mapping its piece at userspace_addr: "
      "the whole guest_code holds, conversions spanning memslots included", needs=NEEDS)
def memslots(ctx: Ctx) -> None:
    run_in_place(ctx, guest_code, nr_vcpus=1, nr_memslots=2)
    run_in_place(ctx, guest_code, nr_vcpus=2, nr_memslots=4)


@case("inplace.conversions.handler", f"{CONVERSIONS} handle_exit_hypercall",
      "in place, on SW_PROTECTED: a page made private keeps the host's p1, made shared "
      "again the guest's p2 (one page, preserved); BIT2 alone punches a shared page "
      "(zeros, still shared); both, private then shared, leave zeros",
      needs=NEEDS)
def handler(ctx: Ctx) -> None:
    """The handler's paths one at a time, on one page. Contents in place: a
    conversion keeps the page and its bytes (kvm_gmem_set_attributes leaves contents
    alone; SW_PROTECTED keeps them); only PUNCH_HOLE frees it, and the next fault,
    guest or host, gets a zeroed page."""
    base = BASE_DATA_GPA
    with Vmm(ctx.kvm, ctx.vm_type, conversion="guest-flags") as vmm:
        vmm.add_private_memory(base, PER_CPU_SIZE)
        host, abi = Host(ctx, vmm), default_hypercall_abi(ctx.caps, vmm.cpl)
        host.writes(base, PS, P1)
        phases: list[tuple[str, tuple[p.Step, ...]]] = [
            ("attributes only: private, the guest reads the host's p1 and writes p2", (
                map_mem(base, PS, False, False), expect(base, PS, P1), fill(base, PS, P2))),
            ("attributes only: shared, the guest still reads its p2", (
                map_mem(base, PS, True, False), expect(base, PS, P2))),
            ("fallocate only, punch: zeros, still shared", (
                map_mem(base, PS, True, True, set_attributes=False), expect(base, PS, 0),
                fill(base, PS, P3))),
            ("both: private (allocate), p3 kept; shared (punch): zeros", (
                map_mem(base, PS, False, True), expect(base, PS, P3),
                map_mem(base, PS, True, True), expect(base, PS, 0))),
        ]
        for label, steps in phases:
            vmm.load(compile_program(p.Program.of(*steps), abi))
            ctx.equal(label, "done, every report 0", _outcome(steps, vmm.run()))
            if label.startswith("attributes only: shared"):
                host.sees("the host sees the guest's p2 in the same page", base, PS, P2)
        host.sees("the host reads the punched shared page as zeros", base, PS, 0)


@case("inplace.conversions.pinned", "upstream-2026-11.md §1 (kvm_gmem_set_attributes: "
      "EAGAIN + error_offset on an elevated refcount) through the VMM",
      "a to-private MAP_GPA_RANGE over 3 pages spanning 2 memslots, the last page pinned "
      "by someone else: the guest gets -KVM_EINVAL after the VMM's retries, the log and "
      "the tracker name the pinned page's GPA, nothing changed (the host still reads the "
      "first pages); after the unpin the same request returns 0; a pin of the VMM's own "
      "is dropped and the request succeeds", needs=NEEDS)
def pinned(ctx: Ctx) -> None:
    base, slot_size = BASE_DATA_GPA, PER_CPU_SIZE // 2
    gpa, pinned_gpa = base + slot_size - PS, base + slot_size + PS
    with Vmm(ctx.kvm, ctx.vm_type, conversion="attributes") as vmm:
        regions = vmm.add_private_memory(base, PER_CPU_SIZE, nr_memslots=2)
        host = Host(ctx, vmm)
        host.writes(gpa, 3 * PS, P1)
        pin = ctx.ok("pin the third page", regions[1].mapping.pin, PS, PS)
        result = _run(vmm, ctx, p.MapGpaRange(gpa, 3))
        ctx.equal("the guest's MAP_GPA_RANGE", -uapi.KVM_EINVAL, _signed(result.reports[0]))
        ctx.equal("tries, EAGAIN each", 1 + CONVERSION_RETRIES,
                  sum("EAGAIN" in line for line in result.log))
        ctx.true(f"the log names gpa {pinned_gpa:#x}",
                 any(f"failed at gpa {pinned_gpa:#x}" in line for line in result.log))
        ctx.equal("the tracker's record", (-uapi.KVM_EINVAL, pinned_gpa),
                  (vmm.tracker.requests[-1].ret, vmm.tracker.requests[-1].failed_gpa))
        host.sees("nothing became private: the host reads every page", gpa, 3 * PS, P1)
        pin.unpin()
        result = _run(vmm, ctx, p.MapGpaRange(gpa, 3), p.VerifyPattern(gpa, 3 * PS, word(P1)))
        ctx.equal("after the unpin", [0, p.VERIFY_OK], result.reports)
        vmm.pin(base, PS)
        result = _run(vmm, ctx, p.MapGpaRange(base, 1))
        ctx.equal("a pin of the VMM's own: dropped, then 0", ([0], []),
                  (result.reports, vmm.pins))


def _signed(value: int) -> int:
    """A report (a u64) as the guest's signed RAX."""
    return value - (1 << 64) if value >> 63 else value


@case("inplace.exits.memslot_deleted", f"{EXITS} test_private_access_memslot_deleted",
      "a guest reading a private gfn of an in-place guest_memfd slot, the slot deleted "
      "(before its first access; at its first exit): the gfn now looks shared, KVM_RUN "
      "exits KVM_EXIT_MMIO (phys_addr 0xc0000000, len 8, a read)",
      needs=(needs_gmem_attributes, needs_sw_protected, needs_guests))
def memslot_deleted(ctx: Ctx) -> None:
    """cases_coco.memslot_deleted, both orders, with PRIVATE set on the guest_memfd."""
    gpa, loop = 0xC0000000, p.Loop(3, (p.ReadValue(0xC0000000), p.Tick()))
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = _private_page(ctx, vmm, gpa)
        ctx.ok("delete the slot before KVM_RUN", vmm.vm.delete_memslot, region.slot)
        _mmio_read(ctx, _run(vmm, ctx, loop).exit, gpa)
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = _private_page(ctx, vmm, gpa)
        _delete_at_first_tick(vmm, region.slot)
        result = _run(vmm, ctx, loop)
        ctx.equal("first read done, then the delete at its exit", ([0], 1),
                  (result.reports, result.ticks))
        _mmio_read(ctx, result.exit, gpa)


def _private_page(ctx: Ctx, vmm: Vmm, gpa: int) -> MemoryRegion:
    """One page of in-place guest_memfd at gpa, made private on the guest_memfd."""
    region = vmm.add_memory(gpa, PS)
    ctx.equal("memslot backing", IN_PLACE, region.backing)
    ctx.ok("KVM_SET_MEMORY_ATTRIBUTES2 PRIVATE", region.guest_memfd.set_memory_attributes2,
           region.gmem_offset, PS, PRIVATE)
    return region


def _mmio_read(ctx: Ctx, exit: object, gpa: int) -> None:
    """The run ended with an 8-byte MMIO read of gpa (upstream v8's check)."""
    ctx.equal("KVM_EXIT_MMIO (phys_addr, len, is_write)", (gpa, 8, False),
              (exit.phys_addr, exit.length, exit.is_write) if isinstance(exit, MmioExit)
              else exit)
