"""KVM_PRE_FAULT_MEMORY: tools/testing/selftests/kvm/pre_fault_memory_test.c, ported
whole (torvalds @3d5e4894; upstream.md §2.14, §4.5), and what a kernel without it does.

Upstream runs three configurations: the default VM and a SW_PROTECTED VM with an
anonymous ("shared") slot, and a SW_PROTECTED VM with a guest_memfd slot whose
range is PRIVATE. The slot (10) is 2 MiB + 4 KiB at a 2 MiB-aligned GPA near the
top of guest memory; it pre-faults (0, 2M), (2M, 2 pages) and (2M + 4K, 1 page),
each while a worker thread deletes the slot and recreates it (new memory) racing
the ioctl; then the guest reads every page.

The race, deterministically. The worker's delete lands either before the ioctl
finds the slot or after the ioctl is done; each call here is run with each
order (two VMs), the rest of upstream's loop as is: every call must make
progress or fail, never both nor neither ("(range.size < prev) ^ (ret < 0)"); after
the first call the slot is recreated and an unfinished range retried; the last
answer is success with 0 bytes left or ENOENT with the page past the slot left.
A delete that lands between two pages of one ioctl ends it early with success
and bytes left, which looks to the caller like the "after" order of a shorter
range; the window inside one page's fault (the memslot being invalidated, which
KVM may answer with EAGAIN) needs a second thread and is not reproduced.
"""

from __future__ import annotations

import errno
from contextlib import ExitStack

from guestmem import api, machine, uapi
from guestmem import program as p
from guestmem.check.suite import (
    Ctx,
    case,
    needs_guests,
    needs_no_pre_fault,
    needs_pre_fault,
    needs_private_memory,
    only_on,
)
from guestmem.exits import PreFaultError, errno_name
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
GMEM = uapi.KVM_MEM_GUEST_MEMFD
SRC = "pre_fault_memory_test.c"
TEST_SIZE = MB2 + PS
TEST_SLOT = 10
# Upstream: align_down((max_gfn - TEST_NPAGES) * page_size, 2M). A guestmem guest's
# page tables map [0, 64 GiB): the top of that is its max_gfn.
TEST_GPA = ((machine.IDENTITY_MAP_GIB << 30) - TEST_SIZE) & ~(MB2 - 1)
_FINALIZED_TYPES = (uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM)


def needs_pre_fault_allowed(caps: object, vm_type: int, gmem_flags: int) -> str | None:
    """x86 kvm_arch_vcpu_pre_fault_memory: SNP/TDX only after the VM is finalized."""
    if vm_type in _FINALIZED_TYPES:
        return "KVM_PRE_FAULT_MEMORY needs a finalized SNP/TDX VM (no finalize step here)"
    return None


def needs_finalized_type(caps: object, vm_type: int, gmem_flags: int) -> str | None:
    return None if vm_type in _FINALIZED_TYPES else "case is for SNP/TDX VMs"


needs_sw_protected = only_on(uapi.KVM_X86_SW_PROTECTED_VM,
                             "pre_fault_memory_test's private configuration")


def outcome(vcpu: api.Vcpu, gpa: int, size: int) -> tuple[str, int, int]:
    """KVM_PRE_FAULT_MEMORY: ("ok" or the errno's name, gpa, size) as KVM left them."""
    try:
        return ("ok", *vcpu.pre_fault_memory(gpa, size))
    except PreFaultError as e:
        return (errno_name(e.errno), e.gpa, e.size)


class SlotWorker:
    """delete_slot_worker: deletes TEST_SLOT and recreates it on new memory
    (vm_userspace_mem_region_add: anonymous memory, plus a new guest_memfd for the
    private configuration), when the port's schedule says."""

    def __init__(self, ctx: Ctx, vmm: Vmm, stack: ExitStack, private: bool) -> None:
        self.ctx, self.vmm, self.stack, self.private = ctx, vmm, stack, private

    def create(self) -> None:
        vm = self.vmm.vm
        memory = self.stack.enter_context(self.ctx.kvm.mmap_anonymous(TEST_SIZE))
        if not self.private:
            self.ctx.ok("slot 10: anonymous memory", vm.set_user_memory_region2, TEST_SLOT, 0,
                        TEST_GPA, TEST_SIZE, memory.addr)
            return
        gmem = self.stack.enter_context(vm.create_guest_memfd(TEST_SIZE, 0))
        self.ctx.ok("slot 10: guest_memfd, anonymous memory for shared pages",
                    vm.set_user_memory_region2, TEST_SLOT, GMEM, TEST_GPA, TEST_SIZE,
                    memory.addr, gmem, 0)

    def delete(self) -> None:
        self.ctx.ok("the worker deletes slot 10", self.vmm.vm.delete_memslot, TEST_SLOT)


def pre_fault_memory(ctx: Ctx, vcpu: api.Vcpu, worker: SlotWorker, offset: int, size: int,
                     expected_left: int, delete_first: bool) -> None:
    """pre_fault_memory(vcpu, base_gpa, offset, size, expected_left, private)."""
    what = f"pre-fault ({offset:#x}, {size:#x}), delete {'before' if delete_first else 'after'}"
    gpa, left, recreated = TEST_GPA + offset, size, False
    if delete_first:
        worker.delete()
    while True:
        prev = left
        result, gpa, left = outcome(vcpu, gpa, left)
        ctx.equal(f"{what}: range.size shrinks iff the call succeeds ({result})",
                  result == "ok", left < prev)
        if result == "EINTR":
            continue
        if not recreated:
            if not delete_first:
                worker.delete()
            worker.create()
            recreated = True
            if left:
                continue
        if not left or result != "ok":
            break
    ctx.equal(f"{what}: bytes left", expected_left, left)
    ctx.equal(f"{what}: last result", "ENOENT" if expected_left else "ok", result)


def test_pre_fault_memory(ctx: Ctx, private: bool, delete_first: bool) -> None:
    """__test_pre_fault_memory(vm_type, private), then the guest reads every page."""
    with Vmm(ctx.kvm, ctx.vm_type) as vmm, ExitStack() as stack:
        worker = SlotWorker(ctx, vmm, stack, private)
        worker.create()
        if private:
            ctx.ok("vm_mem_set_private", vmm.vm.set_memory_attributes, TEST_GPA, TEST_SIZE,
                   uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        pre_fault_memory(ctx, vmm.vcpu, worker, 0, MB2, 0, delete_first)
        pre_fault_memory(ctx, vmm.vcpu, worker, MB2, 2 * PS, PS, delete_first)
        pre_fault_memory(ctx, vmm.vcpu, worker, TEST_SIZE, PS, PS, delete_first)
        program = p.Program.of(p.VerifyPattern(TEST_GPA, TEST_SIZE, 0))
        vmm.load(compile_program(program, default_hypercall_abi(ctx.caps, vmm.cpl)))
        result = vmm.run()
        ctx.equal("the guest reads every page (new memory: zeros) and is done",
                  ("done", [p.VERIFY_OK]), (result.stop, result.reports))


@case("prefault.shared", f"{SRC} __test_pre_fault_memory(vm_type, private=false)",
      "an anonymous slot of 2 MiB + 4 KiB, deleted and recreated around each call: (0, 2M) "
      "ends with 0 left; (2M, 2 pages) and (2M + 4K, 1 page) end ENOENT with 1 page left; "
      "every call progresses xor fails; then the guest reads every page",
      needs=(needs_pre_fault, needs_pre_fault_allowed, needs_guests))
def prefault_shared(ctx: Ctx) -> None:
    for delete_first in (True, False):
        test_pre_fault_memory(ctx, private=False, delete_first=delete_first)


@case("prefault.private", f"{SRC} __test_pre_fault_memory(KVM_X86_SW_PROTECTED_VM, "
      "private=true)", "the same on a guest_memfd slot whose range is PRIVATE (the pages "
      "come from guest_memfd; a recreated slot gets a new guest_memfd)",
      needs=(needs_sw_protected, needs_private_memory, needs_pre_fault, needs_guests))
def prefault_private(ctx: Ctx) -> None:
    for delete_first in (True, False):
        test_pre_fault_memory(ctx, private=True, delete_first=delete_first)


@case("prefault.gmem_only", "upstream.md §2.14, §2.15 (not in the selftest: an MMAP "
      "guest_memfd slot takes even shared pages from the file)", "on a guest_memfd-only "
      "slot (MMAP, userspace_addr NULL): (0, 2M) leaves 0; 2 pages, the second past the slot, "
      "succeed with 1 page left; that page alone fails ENOENT, the range copied back as is",
      needs=(needs_pre_fault, needs_pre_fault_allowed))
def prefault_gmem_only(ctx: Ctx) -> None:
    base = 1 << 32
    with ctx.vm() as vm, ctx.gmem(vm, TEST_SIZE, uapi.GUEST_MEMFD_FLAG_MMAP) as g:
        vm.set_user_memory_region2(TEST_SLOT, GMEM, base, TEST_SIZE, 0, g, 0)
        with vm.create_vcpu(0) as vcpu:
            ctx.equal("pre-fault (0, 2M): (gpa, size) after", (base + MB2, 0),
                      ctx.ok("pre-fault (0, 2M)", vcpu.pre_fault_memory, base, MB2))
            ctx.equal("pre-fault (2M, 2 pages): (gpa, size) after", (base + TEST_SIZE, PS),
                      ctx.ok("pre-fault (2M, 2 pages)", vcpu.pre_fault_memory, base + MB2, 2 * PS))
            ctx.equal("pre-fault the page past the slot", ("ENOENT", base + TEST_SIZE, PS),
                      outcome(vcpu, base + TEST_SIZE, PS))


@case("prefault.unsupported", f"{SRC} (TEST_REQUIREs the capability); host observation",
      "without KVM_CAP_PRE_FAULT_MEMORY (no TDP): EOPNOTSUPP with a memslot, ENOSPC with none; "
      "bad flags/size/alignment EINVAL first; a failed call leaves the range as given",
      needs=(needs_no_pre_fault,))
def prefault_unsupported(ctx: Ctx) -> None:
    with ctx.vm() as vm, vm.create_vcpu(0) as vcpu:
        # Observed on 6.18 PVM: with no memslot at all the vCPU's MMU cannot be loaded.
        ctx.fails("pre-fault with no memslot", errno.ENOSPC, vcpu.pre_fault_memory, 0, PS)
        with ctx.gmem(vm, MB2, 0) as g:
            vm.set_user_memory_region2(0, GMEM, 0, MB2, 0, g, 0)
            # kvm_vcpu_pre_fault_memory's generic checks come before the arch hook.
            ctx.fails("flags 1", errno.EINVAL, vcpu.pre_fault_memory, 0, PS, 1)
            ctx.fails("size 0", errno.EINVAL, vcpu.pre_fault_memory, 0, 0)
            ctx.fails("unaligned gpa", errno.EINVAL, vcpu.pre_fault_memory, 1, PS)
            # x86 kvm_arch_vcpu_pre_fault_memory: no TDP -> -EOPNOTSUPP.
            ctx.fails("pre-fault 1 page", errno.EOPNOTSUPP, vcpu.pre_fault_memory, 0, PS)
            ctx.equal("the failed call copies the range back unchanged",
                      ("EOPNOTSUPP", PS, 2 * PS), outcome(vcpu, PS, 2 * PS))


@case("prefault.before_finalize", "upstream.md §2.14 (x86 !pre_fault_allowed)",
      "SNP/TDX VM not finalized: KVM_PRE_FAULT_MEMORY fails with EOPNOTSUPP",
      needs=(needs_pre_fault, needs_finalized_type))
def prefault_before_finalize(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, MB2, 0) as g:
        vm.set_user_memory_region2(10, GMEM, 1 << 32, MB2, 0, g, 0)
        with vm.create_vcpu(0) as vcpu:
            ctx.fails("pre-fault 1 page", errno.EOPNOTSUPP, vcpu.pre_fault_memory, 1 << 32, PS)
            ctx.fails("flags still checked first", errno.EINVAL, vcpu.pre_fault_memory,
                      1 << 32, PS, 1)
