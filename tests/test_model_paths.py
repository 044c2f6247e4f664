"""Racing kernel paths, interleaved by hand: the fault retries when a punch or a
conversion runs between its pfn lookup and its mapping, and the invariants
catch a fault that would not."""

from guestmem import uapi
from guestmem.model import Kvm
from guestmem.model.invariants import violations
from guestmem.model.paths import complete, gmem_fault_path, set_attributes_path

PS = uapi.PAGE_SIZE
GFN = (1 << 32) // PS


def setup(profile="mainline", vm_type=0, flags=uapi.GUEST_MEMFD_FLAG_MMAP):
    kvm = Kvm(profile)
    vm = kvm.create_vm(vm_type)
    g = vm.create_guest_memfd(8 * PS, flags)
    vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GFN * PS, 8 * PS, 0, g, 0)
    slot = vm.memslots[(0, 1)]
    return kvm, vm, g, slot


def test_uninterrupted_fault_maps():
    kvm, vm, g, slot = setup()
    assert complete(gmem_fault_path(vm, slot, GFN, GFN + 2)) is True
    assert vm.mmu.mapped.covered(GFN, GFN + 8) == 2
    assert violations(kvm) == []


def test_punch_between_lookup_and_map_makes_the_fault_retry():
    kvm, vm, g, slot = setup()
    fault = gmem_fault_path(vm, slot, GFN, GFN + 2)
    assert next(fault) == "invalidate seq read"
    assert next(fault) == "pfn taken"
    punch = g.inode.punch_hole_path(0, 2)
    assert list(punch) == ["invalidate_begin", "truncated"]
    assert complete(fault) is False  # mmu_invalidate_seq moved: retry
    assert vm.mmu.mapped.covered(GFN, GFN + 8) == 0
    assert violations(kvm) == []
    assert complete(gmem_fault_path(vm, slot, GFN, GFN + 2)) is True  # the retry maps
    assert violations(kvm) == []


def test_fault_while_an_invalidation_is_in_progress_retries():
    kvm, vm, g, slot = setup()
    fault = gmem_fault_path(vm, slot, GFN, GFN + 1)
    next(fault)
    punch = g.inode.punch_hole_path(4, 5)  # another range, but in progress
    assert next(punch) == "invalidate_begin"
    next(fault)
    assert complete(fault) is False
    complete(punch)


def test_conversion_between_lookup_and_map_makes_the_fault_retry():
    kvm, vm, g, slot = setup("coco", uapi.KVM_X86_SW_PROTECTED_VM)
    fault = gmem_fault_path(vm, slot, GFN, GFN + 1)
    next(fault)
    next(fault)
    complete(set_attributes_path(vm, GFN, GFN + 1, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))
    assert complete(fault) is False
    assert vm.is_private(GFN)


def test_invariants_catch_a_fault_that_maps_freed_pages():
    kvm, vm, g, slot = setup()
    g.inode.get_pages(0, 2)
    g.punch_hole(0, 2 * PS)  # frees the folios
    vm.mmu.map(GFN, GFN + 2, slot)  # what a fault without the retry check would do
    problems = violations(kvm)
    assert problems and "freed pages" in problems[0]


def test_invariants_catch_a_host_mapping_of_private_memory():
    kvm, vm, g, slot = setup("coco", uapi.KVM_X86_SW_PROTECTED_VM)
    m = g.mmap(8 * PS)
    m.ptes.set(0, 1, True)  # a host PTE the kernel would never install
    assert any("private pages" in v for v in violations(kvm))


def test_invariants_catch_counters_that_do_not_add_up():
    kvm, vm, g, slot = setup()
    g.allocate(0, PS)
    kvm.process.stats.pages_allocated += 1
    assert any("pages allocated" in v for v in violations(kvm))


def test_nothing_leaks_after_everything_is_closed():
    from guestmem.model.invariants import leaks_after_close

    kvm, vm, g, slot = setup(flags=uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    m = g.mmap(8 * PS)
    m.write(0, b"x")
    vcpu = vm.create_vcpu(0)
    assert leaks_after_close(kvm)  # still open: reported
    m.munmap()
    g.close()
    vcpu.close()
    vm.close()
    assert leaks_after_close(kvm) == []


def test_a_fault_that_read_the_sequence_inside_an_invalidation_retries_after_it():
    """mmu_invalidate_seq is bumped when an invalidation *ends*
    (kvm_mmu_invalidate_end): a fault that sampled it while the invalidation was
    running, and took its pfn before the truncation freed the page, must see it
    change and retry, else it maps the freed page. Bumping at begin would let it
    map (the fault's seq is already the new one)."""
    kvm, vm, g, slot = setup()
    complete(gmem_fault_path(vm, slot, GFN, GFN + 2))  # the pages exist
    punch = g.inode.punch_hole_path(0, 2)
    assert next(punch) == "invalidate_begin"
    fault = gmem_fault_path(vm, slot, GFN, GFN + 2)
    assert next(fault) == "invalidate seq read"  # sampled inside the invalidation
    assert next(fault) == "pfn taken"  # the old folios
    assert list(punch) == ["truncated"]  # frees them, then invalidate_end
    assert vm.mmu.in_progress == 0
    assert complete(fault) is False, "the fault must retry: its sequence is stale"
    assert vm.mmu.mapped.covered(GFN, GFN + 8) == 0
    assert violations(kvm) == []
