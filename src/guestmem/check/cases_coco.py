"""Private-memory exits, ported from
tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c (torvalds @5171573c,
upstream.md §4.3). They run wherever the backend has KVM_X86_SW_PROTECTED_VM: the
model's coco profile here. private_mem_conversions_test.c is in cases_conversions.
"""

from __future__ import annotations

import errno

from guestmem import program as p
from guestmem import uapi
from guestmem.caps import Capabilities
from guestmem.check.suite import Ctx, case, needs_guests, needs_private_memory, only_on
from guestmem.exits import Exit, IoExit
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Vmm

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
SW = uapi.KVM_X86_SW_PROTECTED_VM
EXITS = "private_mem_kvm_exits_test.c"
# The selftests run on KVM_X86_SW_PROTECTED_VM, where the attributes alone decide
# privateness; SNP/TDX take it from the hardware access instead.
needs_sw_protected = only_on(SW, "attributes decide privateness")


def _run(vmm: Vmm, ctx: Ctx, *steps: p.Step) -> RunResult:
    vmm.load(compile_program(p.Program.of(*steps), default_hypercall_abi(ctx.caps, vmm.cpl)))
    return vmm.run()


def _private_fault(ctx: Ctx, result: RunResult, gpa: int) -> None:
    ctx.equal("KVM_RUN errno", errno.EFAULT, result.errno)
    fault = result.memory_fault
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
      "a guest reading a private gfn of a guest_memfd slot, the slot deleted (before its first "
      "access; between two exits of its read loop, the page mapped): KVM_RUN fails EFAULT "
      "with a PRIVATE MEMORY_FAULT exit naming the page (gpa 0xc0000000, size 4096)",
      needs=(needs_sw_protected, needs_guests, needs_private_memory))
def memslot_deleted(ctx: Ctx) -> None:
    """Upstream deletes the slot from the main thread while another runs the vCPU,
    whose guest reads in a loop that never exits; whichever comes first, the next
    read after the delete faults. Here, deterministically, both orders: the delete
    before the vCPU runs, and the delete while its guest loop is under way, between
    two of its exits (the page mapped, its SPTE zapped by the delete). Not covered:
    a delete that lands while the vCPU is in guest mode or inside the fault path
    (the memslot-invalidation window), which takes a second thread."""
    gpa, loop = 0xC0000000, p.Loop(3, (p.ReadValue(0xC0000000), p.Tick()))
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(gpa, PS)
        ctx.ok("set PRIVATE", vmm.vm.set_memory_attributes, gpa, PS, PRIVATE)
        ctx.ok("delete the slot before KVM_RUN", vmm.vm.delete_memslot, region.slot)
        _private_fault(ctx, _run(vmm, ctx, loop), gpa)
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(gpa, PS)
        ctx.ok("set PRIVATE", vmm.vm.set_memory_attributes, gpa, PS, PRIVATE)
        _delete_at_first_tick(vmm, region.slot)
        result = _run(vmm, ctx, loop)
        ctx.equal("first read done, then the delete at its exit", ([0], 1),
                  (result.reports, result.ticks))
        _private_fault(ctx, result, gpa)


def _delete_at_first_tick(vmm: Vmm, slot: int) -> None:
    """Delete the memslot when the guest's first Tick exits, then go on."""
    handle_io = vmm.handlers[IoExit]

    def handler(exit: Exit, result: RunResult) -> bool:
        if isinstance(exit, IoExit) and exit.port == p.PORT_TICK and not result.ticks:
            vmm.vm.delete_memslot(slot)
        return handle_io(exit, result)

    vmm.handlers[IoExit] = handler


def needs_hardware_privateness(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    """SNP and TDX: the access's C-bit / shared bit says private or shared."""
    if vm_type in (uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM):
        return None
    return "case is for SNP/TDX VMs (privateness comes from the hardware access)"


@case("coco.exits.private_mismatch", "upstream.md §2.10 (x86 kvm_mmu_faultin_pfn: "
      "fault->is_private != kvm_mem_is_private -> kvm_mmu_prepare_memory_fault_exit)",
      "SNP/TDX: an access whose privateness disagrees with the attributes fails KVM_RUN "
      "with EFAULT and a MEMORY_FAULT exit, both ways: a private access to a shared gfn "
      "(flags PRIVATE) and a shared access to a private gfn (flags 0)",
      needs=(needs_hardware_privateness, needs_guests, needs_private_memory))
def private_mismatch(ctx: Ctx) -> None:
    gpa = 1 << 32
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        vmm.add_memory(gpa, 2 * PS)
        converted = _run(vmm, ctx, p.MapGpaRange(gpa, 1, PS, encrypted=True),
                         p.WritePattern(gpa, 8, 0x5EC), p.ReadValue(gpa))
        ctx.equal("the guest makes page 0 private and uses it", [0, 0x5EC], converted.reports)
        ctx.ok("the host makes it shared behind the guest's back",
               vmm.vm.set_memory_attributes, gpa, PS, 0)
        fault = _run(vmm, ctx, p.ReadValue(gpa)).memory_fault
        ctx.equal("private access to a shared gfn", (uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa, PS),
                  (fault.flags, fault.gpa, fault.size) if fault else None)
        ctx.ok("the host makes page 1 private; the guest still thinks it shared",
               vmm.vm.set_memory_attributes, gpa + PS, PS, PRIVATE)
        fault = _run(vmm, ctx, p.ReadValue(gpa + PS)).memory_fault
        ctx.equal("shared access to a private gfn", (0, gpa + PS, PS),
                  (fault.flags, fault.gpa, fault.size) if fault else None)
