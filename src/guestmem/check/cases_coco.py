"""Private-memory cases (VM types with KVM_SET_MEMORY_ATTRIBUTES), ported from
tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c and
private_mem_conversions_test.c (upstream.md §4.2, §4.3). They run wherever the
backend has a private-memory VM type: the model's coco profile today; the
kernel on a host with KVM_X86_SW_PROTECTED_VM.
"""

from __future__ import annotations

import errno

from guestmem import program as p
from guestmem import uapi
from guestmem.check.suite import Ctx, case, needs_exit_hypercall, needs_guests, needs_private_memory
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Sharing, Vmm

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
SW = uapi.KVM_X86_SW_PROTECTED_VM
EXITS = "private_mem_kvm_exits_test.c"
CONV = "private_mem_conversions_test.c"


def needs_sw_protected(caps: object, vm_type: int, gmem_flags: int) -> str | None:
    """The selftests run on KVM_X86_SW_PROTECTED_VM, where the attributes alone decide
    privateness; SNP/TDX take it from the hardware access instead."""
    return None if vm_type == SW else "case is for sw-protected VMs (attributes decide privateness)"


def _run(vmm: Vmm, ctx: Ctx, *steps: p.Step) -> RunResult:
    vmm.load(compile_program(p.Program.of(*steps), default_hypercall_abi(ctx.caps, vmm.cpl)))
    return vmm.run()


def _private_fault(ctx: Ctx, result: object, gpa: int) -> None:
    ctx.equal("KVM_RUN errno", errno.EFAULT, result.errno)  # type: ignore[attr-defined]
    fault = result.memory_fault  # type: ignore[attr-defined]
    ctx.equal("MEMORY_FAULT (flags, gpa, size)", (uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa, PS),
              (fault.flags, fault.gpa, fault.size) if fault else None)


@case("coco.exits.memslot_not_private", f"{EXITS} test_private_access_memslot_not_private",
      "PRIVATE set on an ordinary (non-guest_memfd) slot: a guest access fails KVM_RUN with "
      "EFAULT and a PRIVATE MEMORY_FAULT exit naming the page",
      needs=(needs_sw_protected, needs_guests, needs_private_memory))
def memslot_not_private(ctx: Ctx) -> None:
    gpa = 0xC0000000
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        vmm.add_memory(gpa, PS, backing="anon")
        ctx.ok("set PRIVATE", vmm.vm.set_memory_attributes, gpa, PS, PRIVATE)
        _private_fault(ctx, _run(vmm, ctx, p.ReadValue(gpa)), gpa)


@case("coco.exits.memslot_deleted", f"{EXITS} test_private_access_memslot_deleted",
      "a private gfn whose guest_memfd slot was deleted: EFAULT, PRIVATE MEMORY_FAULT",
      needs=(needs_sw_protected, needs_guests, needs_private_memory))
def memslot_deleted(ctx: Ctx) -> None:
    gpa = 0xC0000000
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(gpa, PS)
        ctx.ok("set PRIVATE", vmm.vm.set_memory_attributes, gpa, PS, PRIVATE)
        first = _run(vmm, ctx, p.ReadValue(gpa))
        ctx.equal("private read before the delete", ("done", [0]), (first.stop, first.reports))
        ctx.ok("delete the slot", vmm.vm.delete_memslot, region.slot)
        _private_fault(ctx, _run(vmm, ctx, p.ReadValue(gpa)), gpa)


@case("coco.conversions.explicit", f"{CONV} guest_test_explicit_conversion",
      "guest converts to private with MAP_GPA_RANGE and writes there; the host still sees "
      "the shared data; back to shared, the guest sees what the host wrote",
      needs=(needs_sw_protected, needs_guests, needs_private_memory, needs_exit_hypercall))
def explicit_conversion(ctx: Ctx) -> None:
    base = 1 << 32
    p1, p2, p3 = 0x1111111111111111, 0x2222222222222222, 0x3333333333333333
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(base, MB2)
        ctx.equal("backing (no INIT_SHARED on private VMs)", "gmem+shared", region.backing)
        for offset, size in ((0, PS), (0, MB2), (PS, PS), (PS, MB2 - PS), (MB2 - PS, PS)):
            gpa = base + offset
            region.mapping.write(offset, p1.to_bytes(8, "little") * (size // 8))
            r = _run(vmm, ctx, p.VerifyPattern(gpa, size, p1),
                     p.MapGpaRange(gpa, size // PS, PS, encrypted=True),
                     p.WritePattern(gpa, size, p2), p.VerifyPattern(gpa, size, p2))
            ctx.equal(f"({offset:#x},{size:#x}) shared p1, convert, private p2", [0, 0, 0],
                      r.reports)
            ctx.bytes_equal("host still sees p1", region.mapping, offset,
                            p1.to_bytes(8, "little") * (size // 8))
            region.mapping.write(offset, p3.to_bytes(8, "little") * (size // 8))
            r = _run(vmm, ctx, p.MapGpaRange(gpa, size // PS, PS, encrypted=False),
                     p.VerifyPattern(gpa, size, p3),
                     p.MapGpaRange(gpa, size // PS, PS, encrypted=True),
                     p.VerifyPattern(gpa, size, 0),
                     p.MapGpaRange(gpa, size // PS, PS, encrypted=False))
            ctx.equal("back to shared: guest sees the host's p3; private again: p2 was "
                      "punched, zeros", [0, 0, 0, 0, 0], r.reports)
        ctx.equal("tracker agrees nothing is private", [], vmm.tracker.ranges(Sharing.PRIVATE))


@case("coco.conversions.punch_hole", f"{CONV} guest_test_punch_hole",
      "all memory private; the guest writes; PUNCH_HOLE of a range; the guest reads zeros there",
      needs=(needs_sw_protected, needs_guests, needs_private_memory))
def punch_hole(ctx: Ctx) -> None:
    base, value = 1 << 32, 0x4444444444444444
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(base, MB2)
        ctx.ok("all private", vmm.vm.set_memory_attributes, base, MB2, PRIVATE)
        r = _run(vmm, ctx, p.WritePattern(base, MB2, value), p.VerifyPattern(base, MB2, value))
        ctx.equal("private write", [0], r.reports)
        ctx.ok("punch 16 KiB at 64 KiB", region.guest_memfd.punch_hole, 0x10000, 4 * PS)
        r = _run(vmm, ctx, p.VerifyPattern(base + 0x10000, 4 * PS, 0),
                 p.VerifyPattern(base, 0x10000, value),
                 p.VerifyPattern(base + 0x14000, MB2 - 0x14000, value))
        ctx.equal("zeros in the hole, data elsewhere", [0, 0, 0], r.reports)
        ctx.bytes_equal("shared view untouched", region.mapping, 0x10000, bytes(8))
