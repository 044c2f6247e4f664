"""The model's stage-2 MMU accounting: what invalidations cost (seed 000)."""

from guestmem import program as p
from guestmem import uapi
from guestmem.guest import compile_program
from guestmem.model import Kvm
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
GMEM = uapi.KVM_MEM_GUEST_MEMFD


def three_slot_guest(profile="mainline", vm_type=0, flags=None):
    """One guest_memfd bound by three memslots, every page mapped by a guest run."""
    kvm = Kvm(profile)
    vmm = Vmm(kvm, vm_type, cpl=0)
    vm = vmm.vm
    flags = (uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
             if flags is None else flags)
    g = vm.create_guest_memfd(3 * MB2, flags)
    for i in range(3):
        vm.set_user_memory_region2(10 + i, GMEM, (4 + i) << 30, MB2, 0, g, i * MB2)
    if vm.supported_attributes():  # private VM: the guest's pages come from guest_memfd
        vm.set_memory_attributes(4 << 30, 3 << 30, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    steps = [p.WritePattern((4 + i) << 30, MB2, i) for i in range(3)]
    vmm.load(compile_program(p.Program.of(*steps)))
    assert vmm.run().stop == "done"
    assert vm.mmu.mapped.covered(0, 1 << 40) >= 3 * MB2 // PS
    return kvm, vmm, vm, g


def test_a_punch_across_three_memslots_is_one_invalidation_and_one_tlb_flush():
    """Seed 000 (Sean): guest_memfd lets KVM batch TLB flushes when a PUNCH_HOLE
    spans multiple memslots."""
    kvm, vmm, vm, g = three_slot_guest()
    before = (vm.mmu.invalidations, vm.mmu.tlb_flushes)
    g.punch_hole(MB2 // 2, 2 * MB2)  # the second half of slot 10, all of 11, half of 12
    assert (vm.mmu.invalidations - before[0], vm.mmu.tlb_flushes - before[1]) == (1, 1)
    assert vm.mmu.mapped.covered(4 << 30 >> 12, 7 << 30 >> 12) == MB2 // PS  # half + half left
    vmm.close()


def test_a_punch_of_unmapped_pages_flushes_nothing():
    kvm, vmm, vm, g = three_slot_guest()
    g.punch_hole(0, MB2)
    flushes = vm.mmu.tlb_flushes
    g.punch_hole(0, MB2)  # already gone: an invalidation, but nothing to flush
    assert vm.mmu.tlb_flushes == flushes
    vmm.close()


def test_a_conversion_across_memslots_is_one_flush():
    kvm, vmm, vm, g = three_slot_guest("coco", uapi.KVM_X86_SW_PROTECTED_VM, flags=0)
    before = (vm.mmu.invalidations, vm.mmu.tlb_flushes)
    vm.set_memory_attributes(4 << 30, 3 << 30, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert (vm.mmu.invalidations, vm.mmu.tlb_flushes) == before  # no change: no invalidation
    vm.set_memory_attributes(4 << 30, 3 << 30, 0)  # to shared: zap the private mappings
    assert (vm.mmu.invalidations - before[0], vm.mmu.tlb_flushes - before[1]) == (1, 1)
    assert vm.mmu.mapped.covered(0, 1 << 40) == 0
    vmm.close()
