"""The oracle of the bad-input tests sees every kind of state.

`snapshot(kvm)` is how tests prove that a failed call changed nothing; a piece of
state it left out would let any bug in that piece pass. Each step below is a
successful call that changes one piece, and the snapshot must change with it.
"""

from __future__ import annotations

from guestmem import program as p
from guestmem import uapi
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm
from guestmem.model.invariants import leaks_after_close
from guestmem.model.snapshot import snapshot
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
GPA = 1 << 32
ANON_GPA = GPA + (2 << 20)
GMEM = uapi.KVM_MEM_GUEST_MEMFD
DIRTY = uapi.KVM_MEM_LOG_DIRTY_PAGES
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def test_every_successful_step_changes_the_snapshot():
    kvm = Kvm("coco", numa_nodes=2)
    vmm = Vmm(kvm)  # a VM whose vCPU can run guest code; its guest_memfd is host-accessible
    vm, vcpu = vmm.vm, vmm.vcpu
    sw = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)  # with memory attributes
    g = vm.create_guest_memfd(8 * PS, FLAGS)
    anon = kvm.mmap_anonymous(4 * PS)
    state: dict[str, object] = {}

    def step(what: str, call) -> None:
        before = snapshot(kvm)
        state[what] = call()
        assert snapshot(kvm) != before, f"the snapshot does not see: {what}"

    step("a guest_memfd memslot", lambda: vm.set_user_memory_region2(
        1, GMEM, GPA, 8 * PS, 0, g, 0))
    step("an anonymous, dirty-logged memslot", lambda: vm.set_user_memory_region2(
        2, DIRTY, ANON_GPA, 4 * PS, anon.addr))
    step("memory attributes", lambda: sw.set_memory_attributes(
        GPA, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    step("a vCPU", lambda: sw.create_vcpu(0))
    step("a stage-2 mapping (pre-fault)", lambda: vcpu.pre_fault_memory(GPA, PS))
    step("the folios of an allocation", lambda: g.allocate(4 * PS, 2 * PS))
    step("a guest_memfd mapping", lambda: g.mmap(8 * PS))
    step("a guest_memfd page's bytes", lambda: state["a guest_memfd mapping"].write(
        5 * PS, b"\xaa" * 16))
    step("a NUMA policy of the inode", lambda: state["a guest_memfd mapping"].mbind(
        6 * PS, PS, uapi.MPOL_BIND, 0b10))
    step("a pin", lambda: state["a guest_memfd mapping"].pin(5 * PS, PS))
    step("an anonymous page", lambda: anon.write(PS, b"\x01"))
    step("a dirty bit and a stage-2 mapping of anonymous memory", lambda: _guest_write(
        vmm, ANON_GPA + 2 * PS))
    step("the MMU's invalidation counters", lambda: g.punch_hole(4 * PS, PS))
    step("registers", lambda: vcpu.set_regs(_with_rbx(vcpu.get_regs(), 0x1234)))
    step("KVM_CAP_EXIT_HYPERCALL", lambda: sw.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 12))
    step("a closed vCPU", vcpu.close)
    state["a pin"].unpin()
    step("the guest_memfd's file closed", g.close)
    step("a VM closed", sw.close)



def test_the_snapshot_sees_in_place_attributes():
    """With in-place conversion, PRIVATE lives in the guest_memfd: a conversion must
    change the snapshot, or a failed one that changed it would pass unseen."""
    kvm = Kvm("inplace")
    g = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(4 * PS, FLAGS)
    before = snapshot(kvm)
    g.set_memory_attributes2(0, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert snapshot(kvm) != before


def _guest_write(vmm: Vmm, gpa: int) -> None:
    abi = default_hypercall_abi(vmm.kvm.capabilities, vmm.cpl)
    vmm.load(compile_program(p.Program.of(p.WritePattern(gpa, 8, 3)), abi))
    assert vmm.run().stop == "done"


def _with_rbx(regs, value: int):
    regs.rbx = value
    return regs


def test_the_leak_check_names_every_kind_of_leak():
    """leaks_after_close, the oracle of the lifetime tests, reports open fds, live
    VMs and backings, and allocated pages, and nothing once all is closed."""
    kvm = Kvm("coco")
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(2 * PS, FLAGS)
    g.allocate(0, PS)
    assert leaks_after_close(kvm) == [f"model fds still open: {sorted([vm.fd, g.fd])}",
                                      "1 VM(s) still alive", "1 backing(s) still alive",
                                      "1 pages still allocated (0 truncated but pinned)"]
    g.close()
    vm.close()
    assert leaks_after_close(kvm) == []
