"""guest_memfd on HugeTLB in the model (issue 10, part 3 begun): creation rules,
reservation at creation, whole-huge-page allocation and punching, release. The
profile is inplace with gmem_hugetlb, not yet a named one."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from guestmem import uapi
from guestmem.api import HugetlbCounters
from guestmem.check import REGISTRY, Instance, Status, run_instance
from guestmem.model import PROFILES, Kvm
from guestmem.model.invariants import leaks_after_close, violations
from tests.test_model_hugetlb import errno_of

HUGETLB_PROFILE = PROFILES["hugetlb"]
S, G = 2 << 20, 1 << 30
HUGETLB = uapi.GUEST_MEMFD_FLAG_HUGETLB
SW = uapi.KVM_X86_SW_PROTECTED_VM


def kvm_with_pool(pages=4, size=S):
    kvm = Kvm(HUGETLB_PROFILE)
    kvm.hugetlb.set_nr_hugepages(size, pages)
    return kvm


@pytest.mark.parametrize("name", ["gmem_hugetlb.reporting", "gmem_hugetlb.creation_rules"])
def test_the_ported_cases_pass_on_the_model(name):
    (case,) = [c for c in REGISTRY if c.name == name]
    with Kvm(HUGETLB_PROFILE) as kvm:
        result = run_instance(kvm, Instance(case, SW))
    assert result.status is Status.PASS, result.observed
    assert len(result.checks) >= 5


def test_the_ported_cases_skip_without_the_flag_and_name_it():
    (case,) = [c for c in REGISTRY if c.name == "gmem_hugetlb.reporting"]
    with Kvm("inplace") as kvm:
        result = run_instance(kvm, Instance(case, SW))
    assert result.status is Status.SKIP and "GUEST_MEMFD_FLAG_HUGETLB" in result.observed


def test_a_1g_file_allocates_whole_folios_and_punches_only_whole_ones():
    kvm = kvm_with_pool(2, G)
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(2 * G, HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP,
                                 uapi.HUGETLB_PAGE_ORDER_1G)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 2, 0, 0)
    gmem.set_memory_attributes2(0, 2 * G, 0)  # HUGETLB starts private (no INIT_SHARED)
    view = gmem.mmap()
    view.write(5, b"x")  # one store faults a whole 1 GiB folio in
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0)
    assert gmem.inode.allocated_pages() == G // 4096
    for offset, length in ((0, S), (4096, G)):
        try:
            gmem.punch_hole(offset, length)
        except OSError as e:
            assert e.errno == errno.EINVAL
        else:
            pytest.fail("punched part of a huge folio")
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0), "nothing changed"
    gmem.punch_hole(0, G)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 2, 0, 0)
    assert violations(kvm) == []
    view.munmap()
    gmem.close()
    vm.close()
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 0, 0, 0)
    assert leaks_after_close(kvm) == []


def test_creation_never_takes_surplus_pages():
    """RFC patch 10: guest_memfd's subpool is made without surplus, even with overcommit."""
    kvm = kvm_with_pool(1)
    kvm.hugetlb.set_nr_overcommit_hugepages(S, 4)
    vm = kvm.create_vm(SW)
    try:
        vm.create_guest_memfd(2 * S, HUGETLB, uapi.HUGETLB_PAGE_ORDER_2M)
    except OSError as e:
        assert e.errno == errno.ENOMEM
    else:
        pytest.fail("reserved a page the pool does not have")
    assert kvm.hugetlb.counters(S) == HugetlbCounters(1, 1, 0, 0, 4)


def test_a_terabyte_of_huge_pages_is_per_range():
    kvm = Kvm(HUGETLB_PROFILE)
    kvm.hugetlb.memory.free_bytes = 2 << 40
    kvm.hugetlb.set_nr_hugepages(S, 1 << 19)
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(1 << 40, HUGETLB, uapi.HUGETLB_PAGE_ORDER_2M)
    gmem.allocate(0, 1 << 40)
    assert kvm.hugetlb.counters(S) == HugetlbCounters(1 << 19, 0, 0, 0, 0)
    gmem.punch_hole(1 << 39, 1 << 39)
    assert kvm.hugetlb.counters(S) == HugetlbCounters(1 << 19, 1 << 18, 1 << 18, 0, 0)
    gmem.close()
    vm.close()
    assert kvm.hugetlb.counters(S) == HugetlbCounters(1 << 19, 1 << 19, 0, 0, 0)


# --- split and merge on conversion (the WIP's restructuring) -----------------------------
def one_gig_file(hvo=True, free_bytes=None):
    kvm = kvm_with_pool(2, G)
    kvm.hugetlb.hvo = hvo
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(2 * G, HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP,
                                 uapi.HUGETLB_PAGE_ORDER_1G)
    gmem.allocate(0, 2 * G)
    if free_bytes is not None:
        kvm.hugetlb.memory.free_bytes = free_bytes
    return kvm, gmem


def test_sharing_one_4k_page_splits_its_1g_folio_and_restores_16_mib_of_vmemmap():
    """Issue 10's walk-through: one 4 KiB page to shared splits the whole 1 GiB
    folio (to order 0, no intermediate order) and HVO's 4095 vmemmap pages come
    back; converting it back merges the folio and frees them again."""
    kvm, gmem = one_gig_file()
    free = kvm.hugetlb.memory.free_bytes
    gmem.set_memory_attributes2(G + 4096, 4096, 0)
    r = gmem.inode.restructure
    assert (r.splits, r.merges, r.vmemmap_restored) == (1, 0, 4095 * 4096)
    assert free - kvm.hugetlb.memory.free_bytes == 4095 * 4096
    assert kvm.hugetlb.vmemmap_bytes(G) == 2 * 4096 + 4095 * 4096, "the pool view sees it"
    assert list(gmem.inode.split.items()) == [(G // 4096, 2 * G // 4096, True)]
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 0, 0, 0, 0), "the pool sees no change"
    gmem.set_memory_attributes2(G + 4096, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert (r.splits, r.merges, r.vmemmap_freed) == (1, 1, 4095 * 4096)
    assert kvm.hugetlb.memory.free_bytes == free and not gmem.inode.split.boundaries()
    assert kvm.hugetlb.vmemmap_bytes(G) == 2 * 4096
    assert violations(kvm) == []


def test_a_folio_with_a_shared_piece_stays_split_until_the_last_goes_private():
    kvm, gmem = one_gig_file()
    gmem.set_memory_attributes2(0, 2 * 4096, 0)
    gmem.set_memory_attributes2(0, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert gmem.inode.restructure.merges == 0 and gmem.inode.split.boundaries()
    gmem.set_memory_attributes2(4096, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert gmem.inode.restructure.merges == 1


def test_without_hvo_a_split_costs_no_vmemmap():
    kvm, gmem = one_gig_file(hvo=False)
    free = kvm.hugetlb.memory.free_bytes
    gmem.set_memory_attributes2(0, 4096, 0)
    assert gmem.inode.restructure.splits == 1 and kvm.hugetlb.memory.free_bytes == free


def test_a_split_memory_cannot_pay_for_is_enomem_and_changes_nothing():
    from guestmem.model.snapshot import snapshot
    kvm, gmem = one_gig_file(free_bytes=4095 * 4096 - 1)
    before = snapshot(kvm)
    try:
        gmem.set_memory_attributes2(G, 4096, 0)
    except OSError as e:
        assert (e.errno, e.error_offset) == (errno.ENOMEM, G)
    else:
        pytest.fail("split a folio without the memory for its vmemmap")
    assert snapshot(kvm) == before and gmem.inode.restructure.splits == 0


def test_punching_a_split_folio_with_a_pinned_piece_is_eagain_until_the_unpin():
    """merge_truncate_range(require_merge=true): a referenced piece blocks the merge."""
    from guestmem.model.snapshot import snapshot
    kvm, gmem = one_gig_file()
    gmem.set_memory_attributes2(0, 4096, 0)
    view = gmem.mmap(G)
    pin = view.pin(0, 4096)
    before = snapshot(kvm)
    for punch in (lambda: gmem.punch_hole(0, G),
                  lambda: view.madvise(0, G, 9)):  # MADV_REMOVE
        try:
            punch()
        except OSError as e:
            assert e.errno == errno.EAGAIN
        else:
            pytest.fail("punched a folio that could not merge")
        assert snapshot(kvm) == before
    pin.unpin()
    gmem.punch_hole(0, G)
    r = gmem.inode.restructure
    assert (r.splits, r.merges) == (1, 1)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0)
    view.munmap()


def test_close_merges_every_split_folio_and_the_pool_gets_them_back():
    kvm, gmem = one_gig_file()
    gmem.set_memory_attributes2(0, 2 * G, 0)
    assert gmem.inode.restructure.splits == 2
    vm = gmem.vm
    gmem.close()
    vm.close()
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 0, 0, 0)
    assert leaks_after_close(kvm) == []


def test_a_terabyte_converted_to_shared_and_back_is_per_range():
    kvm = Kvm(HUGETLB_PROFILE)
    kvm.hugetlb.memory.free_bytes = 4 << 40
    kvm.hugetlb.hvo = True
    kvm.hugetlb.set_nr_hugepages(S, 1 << 19)
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(1 << 40, HUGETLB, uapi.HUGETLB_PAGE_ORDER_2M)
    gmem.allocate(0, 1 << 40)
    gmem.set_memory_attributes2(0, 1 << 40, 0)
    gmem.set_memory_attributes2(0, 1 << 40, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    r = gmem.inode.restructure
    assert (r.splits, r.merges) == (1 << 19, 1 << 19)
    assert r.vmemmap_restored == r.vmemmap_freed == (1 << 19) * 7 * 4096


def test_a_host_fault_splits_the_fresh_folio_of_a_range_that_is_not_all_private():
    """The WIP's kvm_gmem_fault_user_mapping: a huge folio allocated for a shared
    page is split at once, so no whole huge folio holds a shared page."""
    kvm = kvm_with_pool(2, G)
    kvm.hugetlb.hvo = True
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(2 * G, HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP,
                                 uapi.HUGETLB_PAGE_ORDER_1G)
    gmem.set_memory_attributes2(G, 4096, 0)  # nothing allocated: nothing to split yet
    assert gmem.inode.restructure.splits == 0
    view = gmem.mmap()
    view.write(G, b"host")
    assert gmem.inode.restructure.splits == 1
    assert list(gmem.inode.split.items()) == [(G // 4096, 2 * G // 4096, True)]
    assert violations(kvm) == []
    gmem.inode.split.clear(0, 2 * G // 4096)  # what a fault that forgot to split leaves
    assert any("hold shared pages" in v for v in violations(kvm))


def test_a_host_fault_whose_split_memory_cannot_pay_for_is_sigbus_and_allocates_nothing():
    from guestmem.exits import HostSigbus
    kvm = kvm_with_pool(2, G)
    kvm.hugetlb.hvo = True
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(2 * G, HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP,
                                 uapi.HUGETLB_PAGE_ORDER_1G)
    gmem.set_memory_attributes2(0, 4096, 0)
    kvm.hugetlb.memory.free_bytes = 0
    view = gmem.mmap()
    try:
        view.write(0, b"host")
    except HostSigbus as e:
        assert "vmemmap" in e.reason
    else:
        pytest.fail("split a fresh folio without memory for its vmemmap")
    assert gmem.inode.allocated_pages() == 0 and gmem.inode.restructure.splits == 0
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 2, 0, 0)


# --- stage-2 leaf sizes (kvm_gmem_mapping_order, kvm_mmu_max_mapping_level) ----------------
GFN_4G = (4 << 30) >> 12
L2M, L1G = 512, 512 * 512


def bound_file(page_order, vm_type=SW, slot_gpa=4 << 30, slot_size=2 * G, offset=0,
               file_size=2 * G):
    """A HugeTLB guest_memfd (private: no INIT_SHARED) bound by one memslot."""
    size = 4096 << page_order
    kvm = kvm_with_pool(file_size // size, size)
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(file_size, HUGETLB | uapi.GUEST_MEMFD_FLAG_MMAP, page_order)
    vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, slot_gpa, slot_size, 0, gmem,
                               offset)
    return kvm, vm, gmem, vm.memslots[(0, 1)]


def guest_fault(vm, slot, gfn, pages=1):
    from guestmem.model.paths import complete, gmem_fault_path
    assert complete(gmem_fault_path(vm, slot, gfn, gfn + pages))


def test_a_private_1g_folio_is_mapped_with_one_1g_leaf():
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G)
    guest_fault(vm, slot, GFN_4G + 5)
    assert list(vm.mmu.levels.items()) == [(GFN_4G, GFN_4G + L1G, L1G)]
    assert vm.mmu.pages_by_level() == {1: 0, L2M: 0, L1G: L1G}
    assert violations(kvm) == []


def test_sharing_a_4k_page_splits_the_leaf_and_merging_maps_it_huge_again():
    """To shared: kvm_split_cross_boundary_leafs, then zap only the page, so the
    rest of the 1 GiB stays mapped at 4 KiB (no larger than the split folio);
    to private: the invalidation is rounded out to the huge page, and the next
    fault maps the merged folio with one 1 GiB leaf again."""
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G)
    guest_fault(vm, slot, GFN_4G)
    gmem.set_memory_attributes2(7 * 4096, 4096, 0)
    assert vm.mmu.leaf_splits == 1 and not vm.mmu.levels.boundaries()
    assert vm.mmu.pages_by_level() == {1: L1G - 1, L2M: 0, L1G: 0}
    assert violations(kvm) == []
    gmem.set_memory_attributes2(7 * 4096, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.mmu.mapped.covered(0, 1 << 40) == 0, "the whole huge page was zapped"
    guest_fault(vm, slot, GFN_4G + 7)
    assert vm.mmu.pages_by_level() == {1: 0, L2M: 0, L1G: L1G}
    assert violations(kvm) == []


def test_a_split_folio_is_mapped_at_4k():
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G)
    gmem.allocate(0, G)
    gmem.set_memory_attributes2(0, 4096, 0)
    guest_fault(vm, slot, GFN_4G + 1, 3)
    assert vm.mmu.pages_by_level() == {1: 3, L2M: 0, L1G: 0}


@pytest.mark.parametrize("slot_gpa, offset, slot_size, expected", [
    # base_gfn and the file offset agree modulo 2 MiB only: 2 MiB leaves
    ((4 << 30) + S, 0, G, L2M),
    ((4 << 30), S, G, L2M),
    # agree modulo 1 GiB, but the memslot is smaller than a 1 GiB leaf
    ((4 << 30), 0, 512 << 20, L2M),
    # agree modulo neither: 4 KiB
    ((4 << 30) + 4096, 0, G, 1),
])
def test_the_leaf_is_as_large_as_memslot_alignment_allows(slot_gpa, offset, slot_size,
                                                          expected):
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G, slot_gpa=slot_gpa,
                                     slot_size=slot_size, offset=offset)
    gfn = slot.base_gfn + 600  # inside the memslot's first 2 MiB-aligned leaf or after
    guest_fault(vm, slot, gfn)
    by_level = vm.mmu.pages_by_level()
    assert by_level[expected] == (expected if expected > 1 else 1)
    assert sum(by_level.values()) == by_level[expected]
    assert violations(kvm) == []


def test_tdx_maps_private_memory_with_2m_leaves_at_most():
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G, vm_type=uapi.KVM_X86_TDX_VM)
    guest_fault(vm, slot, GFN_4G + L2M + 3)
    assert list(vm.mmu.levels.items()) == [(GFN_4G + L2M, GFN_4G + 2 * L2M, L2M)]


def test_a_2m_file_is_mapped_with_2m_leaves_and_a_plain_one_at_4k():
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_2M, file_size=4 * S,
                                     slot_size=4 * S)
    guest_fault(vm, slot, GFN_4G, 3 * L2M)
    assert vm.mmu.pages_by_level() == {1: 0, L2M: 3 * L2M, L1G: 0}
    plain = Kvm(HUGETLB_PROFILE)
    vm2 = plain.create_vm(SW)
    g = vm2.create_guest_memfd(4 * S, uapi.GUEST_MEMFD_FLAG_MMAP)
    vm2.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, 4 << 30, 4 * S, 0, g, 0)
    guest_fault(vm2, vm2.memslots[(0, 1)], GFN_4G, L2M)
    assert vm2.mmu.pages_by_level() == {1: L2M, L2M: 0, L1G: 0}


def test_the_invariant_sees_a_leaf_larger_than_its_folio():
    kvm, vm, gmem, slot = bound_file(uapi.HUGETLB_PAGE_ORDER_1G)
    guest_fault(vm, slot, GFN_4G)
    gmem.inode.split.set(0, L1G, True)  # what splitting before zapping would leave
    assert any("exceed the folios" in v for v in violations(kvm))


# --- split and merge policies (issue 10 part 4) ----------------------------------------------
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
MIB, PAGE = 1 << 20, 4096


def policy_file(policy, page_order=uapi.HUGETLB_PAGE_ORDER_1G):
    """Two huge pages, HVO on, bound at GPA 4 GiB, under `policy`."""
    kvm, vm, gmem, slot = bound_file(page_order, file_size=2 * (PAGE << page_order),
                                     slot_size=2 * (PAGE << page_order))
    kvm.hugetlb.hvo = True
    gmem.set_hugetlb_policy(policy)
    return kvm, vm, gmem, slot


def test_the_policy_is_chosen_before_the_first_folio_and_only_with_hugetlb():
    kvm, vm, gmem, slot = policy_file("dynamic")
    gmem.allocate(0, G)
    plain = vm.create_guest_memfd(S, uapi.GUEST_MEMFD_FLAG_MMAP)
    for file, errno_ in ((gmem, errno.EBUSY), (plain, errno.EINVAL)):
        try:
            file.set_hugetlb_policy("eager-4k")
        except OSError as e:
            assert e.errno == errno_
        else:
            pytest.fail("chose a policy it should have refused")
    assert gmem.inode.hugetlb_policy.value == "dynamic"
    with pytest.raises(ValueError, match="sideways"):
        policy_file("sideways")


def test_eager_4k_splits_every_folio_when_allocated_and_maps_nothing_huge():
    kvm, vm, gmem, slot = policy_file("eager-4k")
    free = kvm.hugetlb.memory.free_bytes
    gmem.allocate(0, 2 * G)
    r = gmem.inode.restructure
    assert (r.splits, r.vmemmap_restored) == (2, 2 * 4095 * PAGE)
    assert free - kvm.hugetlb.memory.free_bytes == 2 * 4095 * PAGE
    assert gmem.inode.memory_by_page_size() == {PAGE: 2 * G, S: 0, G: 0}
    gmem.set_memory_attributes2(0, PAGE, 0)
    gmem.set_memory_attributes2(0, PAGE, PRIVATE)
    assert (r.splits, r.merges) == (2, 0), "conversions restructure nothing"
    guest_fault(vm, slot, GFN_4G, 8)
    assert vm.mmu.pages_by_level() == {1: 8, L2M: 0, L1G: 0}
    gmem.punch_hole(0, G)  # the pool takes whole folios back: merged first
    assert (r.merges, r.vmemmap_freed) == (1, 4095 * PAGE)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0)
    assert violations(kvm) == []


def test_eager_4k_without_memory_for_the_vmemmap_fails_allocation_and_guest_faults():
    from guestmem.model.snapshot import snapshot
    kvm, vm, gmem, slot = policy_file("eager-4k")
    kvm.hugetlb.memory.free_bytes = 4095 * PAGE - 1
    before = snapshot(kvm)
    try:
        gmem.allocate(0, G)
    except OSError as e:
        assert e.errno == errno.ENOMEM
    else:
        pytest.fail("split a new folio without memory for its vmemmap")
    assert snapshot(kvm) == before
    vcpu_fault = vm.create_vcpu(0)._fault_in(GFN_4G, GFN_4G + 1, False, True, slot)
    assert vcpu_fault.err == errno.ENOMEM and gmem.inode.allocated_pages() == 0
    assert vcpu_fault.exit.reason == uapi.KVM_EXIT_MEMORY_FAULT


def test_stepwise_splits_1g_to_2m_and_only_the_cut_2m_piece_to_4k():
    kvm, vm, gmem, slot = policy_file("stepwise")
    gmem.allocate(0, 2 * G)
    free = kvm.hugetlb.memory.free_bytes
    gmem.set_memory_attributes2(3 * S + PAGE, PAGE, 0)
    r = gmem.inode.restructure
    # 1 GiB -> 512 x 2 MiB restores 4095 pages and HVO frees 7 of each piece again;
    # the cut 2 MiB piece -> 4 KiB restores its 7.
    assert (r.splits, r.vmemmap_restored) == (2, (4095 - 512 * 7 + 7) * PAGE)
    assert free - kvm.hugetlb.memory.free_bytes == 518 * PAGE
    assert gmem.inode.memory_by_page_size() == {PAGE: S, S: G - S, G: G}
    guest_fault(vm, slot, GFN_4G + 5 * L2M)  # a private 2 MiB piece: one 2 MiB leaf
    guest_fault(vm, slot, GFN_4G + 3 * L2M)  # the cut piece: 4 KiB
    assert vm.mmu.pages_by_level() == {1: 1, L2M: L2M, L1G: 0}
    assert violations(kvm) == []
    gmem.set_memory_attributes2(3 * S + PAGE, PAGE, PRIVATE)
    assert (r.merges, r.vmemmap_freed) == (2, 518 * PAGE), "back a step at a time"
    assert kvm.hugetlb.memory.free_bytes == free and not gmem.inode.split.boundaries()
    guest_fault(vm, slot, GFN_4G)
    assert vm.mmu.pages_by_level() == {1: 0, L2M: 0, L1G: L1G}


def test_stepwise_on_2m_pages_is_dynamic():
    kvm, vm, gmem, slot = policy_file("stepwise", uapi.HUGETLB_PAGE_ORDER_2M)
    gmem.allocate(0, 2 * S)
    gmem.set_memory_attributes2(PAGE, PAGE, 0)
    r = gmem.inode.restructure
    assert (r.splits, r.vmemmap_restored) == (1, 7 * PAGE)


def test_lazy_splits_at_the_host_fault_and_merges_at_the_guest_fault():
    kvm, vm, gmem, slot = policy_file("lazy")
    gmem.allocate(0, 2 * G)
    gmem.set_memory_attributes2(PAGE, PAGE, 0)
    r = gmem.inode.restructure
    assert r.splits == 0 and violations(kvm) == [], "a shared page no one maps: no split"
    view = gmem.mmap(G)
    view.write(PAGE, b"host")
    assert (r.splits, r.vmemmap_restored) == (1, 4095 * PAGE)
    assert violations(kvm) == []
    view.munmap()
    gmem.set_memory_attributes2(PAGE, PAGE, PRIVATE)
    assert r.merges == 0 and gmem.inode.split.boundaries(), "no merge at conversion"
    guest_fault(vm, slot, GFN_4G)
    assert (r.merges, r.vmemmap_freed) == (1, 4095 * PAGE)
    assert vm.mmu.pages_by_level() == {1: 0, L2M: 0, L1G: L1G}
    assert violations(kvm) == []


def test_the_invariant_sees_a_host_mapping_into_a_whole_folio_with_private_pages():
    kvm, vm, gmem, slot = policy_file("lazy")
    gmem.allocate(0, G)
    gmem.set_memory_attributes2(0, PAGE, 0)
    view = gmem.mmap(G)
    view.write(0, b"host")
    gmem.inode.split.clear(0, L1G)  # what a lazy fault that forgot to split leaves
    assert any("holding private pages" in v for v in violations(kvm))


def test_dynamic_memory_by_page_size_follows_splits_and_merges():
    kvm, vm, gmem, slot = policy_file("dynamic")
    gmem.allocate(0, 2 * G)
    assert gmem.inode.memory_by_page_size() == {PAGE: 0, S: 0, G: 2 * G}
    gmem.set_memory_attributes2(G, PAGE, 0)
    assert gmem.inode.memory_by_page_size() == {PAGE: G, S: 0, G: G}


def test_the_first_use_of_a_huge_folio_zeroes_all_of_it_and_a_split_piece_only_itself():
    """kvm_gmem_prepare_folio clears every page of the folio it prepares."""
    kvm, vm, gmem, slot = policy_file("dynamic")
    guest_fault(vm, slot, GFN_4G + 3)
    assert gmem.inode.restructure.zeroed == G
    gmem.allocate(G, G)
    gmem.set_memory_attributes2(G, PAGE, 0)  # split: 4 KiB folios from here on
    view = gmem.mmap(PAGE, G)
    view.write(0, b"x")
    assert gmem.inode.restructure.zeroed == G + PAGE


# --- the restructuring worker: pieces outliving the file --------------------------------------
def test_a_folio_whose_piece_is_pinned_at_close_comes_back_only_after_the_worker_runs():
    """Close merges with require_merge=false: a folio with a pinned piece stays
    split; its other pieces are freed, the pinned one at the unpin, and only then
    does the "hugetlb_restructuring" worker merge it and give it to the pool, so
    the counters lag until settle(). The subpool (and its reservation) waits for
    the folio."""
    kvm, gmem = one_gig_file()
    vm = gmem.vm
    gmem.set_memory_attributes2(G + 5 * PAGE, PAGE, 0)
    view = gmem.mmap(PAGE, G + 5 * PAGE)
    pin = view.pin(0, PAGE)
    view.munmap()
    gmem.close()
    vm.close()
    r = gmem.inode.restructure
    assert (r.splits, r.merges) == (1, 0)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0), "one folio held"
    pin.unpin()
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0), "the worker has not run"
    assert len(kvm.hugetlb.deferred) == 1
    kvm.hugetlb.settle()
    assert (r.merges, r.vmemmap_freed) == (1, 4095 * PAGE)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 0, 0, 0)
    assert leaks_after_close(kvm) == []


def test_two_pins_in_one_folio_hold_it_until_both_go():
    kvm, gmem = one_gig_file()
    vm = gmem.vm
    gmem.set_memory_attributes2(0, 4 * PAGE, 0)
    view = gmem.mmap(4 * PAGE)
    pins = [view.pin(0, PAGE), view.pin(2 * PAGE, PAGE)]
    view.munmap()
    gmem.close()
    vm.close()
    pins[0].unpin()
    kvm.hugetlb.settle()
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0)
    pins[1].unpin()
    kvm.hugetlb.settle()
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 2, 0, 0, 0)


# --- hwpoison on huge folios -------------------------------------------------------------------
def test_an_error_in_an_unsplit_1g_folio_poisons_all_of_it():
    """try_memory_failure_hugetlb poisons the hugetlb folio whole: the guest loses
    1 GiB for one bad 4 KiB page; the other folio is untouched."""
    kvm, vm, gmem, slot = policy_file("dynamic")
    guest_fault(vm, slot, GFN_4G)
    gmem.inode.memory_failure(5, 6)
    assert gmem.memory_map(0, 2 * G).pages_with("hwpoison") == L1G
    assert vm.mmu.mapped.covered(0, 1 << 40) == 0, "the whole leaf was zapped"
    fault = vm.create_vcpu(0)._fault_in(GFN_4G + L1G - 1, GFN_4G + L1G, False, True, slot)
    assert fault.err == uapi.EHWPOISON
    guest_fault(vm, slot, GFN_4G + L1G)  # the other folio
    assert violations(kvm) == []


def test_an_error_in_a_split_folio_poisons_only_its_4k_page():
    kvm, vm, gmem, slot = policy_file("dynamic")
    gmem.allocate(0, G)
    gmem.set_memory_attributes2(0, PAGE, 0)
    view = gmem.mmap(PAGE)
    view.write(0, b"x")
    view.madvise(0, PAGE, 100)  # MADV_HWPOISON
    assert gmem.memory_map(0, G).pages_with("hwpoison") == 1
    guest_fault(vm, slot, GFN_4G + 10)
    view.munmap()


def test_a_freed_poisoned_folio_counts_as_free_but_is_never_handed_out_again():
    """free_huge_folio enqueues it (free +1) and dequeue skips hwpoison pages: the
    next allocation takes a clean page or, with none and no surplus possible for a
    gigantic size, fails with ENOMEM changing nothing; shrinking the pool
    dissolves it, its bad page kept out of memory."""
    from guestmem.model.snapshot import snapshot
    kvm, vm, gmem, slot = policy_file("dynamic")
    gmem.allocate(0, 2 * G)
    gmem.inode.memory_failure(7, 8)
    gmem.punch_hole(0, G)
    h = kvm.hugetlb.hstates[G]
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0) and h.hwpoisoned == 1
    before = snapshot(kvm)
    assert errno_of(gmem.allocate, 0, G) == errno.ENOMEM
    assert snapshot(kvm) == before and h.hwpoisoned == 1
    gmem.punch_hole(G, G)  # a clean page comes back: the next allocation takes it
    gmem.allocate(0, G)
    assert kvm.hugetlb.counters(G) == HugetlbCounters(2, 1, 1, 0, 0) and h.hwpoisoned == 1
    gmem.punch_hole(0, G)
    gmem.close()
    vm.close()
    memory = kvm.hugetlb.memory.free_bytes
    kvm.hugetlb.set_nr_hugepages(G, 0)
    assert h.hwpoisoned == 0
    assert kvm.hugetlb.memory.free_bytes - memory == 2 * G - PAGE, "the bad page stays out"


def test_the_wrapped_cases_see_a_leak(monkeypatch):
    """The wrapper's no-leak check fails where the model forgets to give the
    subpool's reservations back at release."""
    from guestmem.model.hugetlb import Hugetlb

    monkeypatch.setattr(Hugetlb, "gmem_release", lambda self, spool: None)
    (case,) = [c for c in REGISTRY if c.name == "gmem_hugetlb.wrapped.conversions.init_private"]
    with Kvm(HUGETLB_PROFILE) as kvm:
        result = run_instance(kvm, Instance(case, SW))
    assert result.status is Status.FAIL and "pool's counters after it" in result.observed


def test_the_wrapped_cases_run_every_conversions_case_on_hugetlb_and_pass():
    wrapped = [c for c in REGISTRY if c.name.startswith("gmem_hugetlb.wrapped.")]
    inner = [c for c in REGISTRY if c.name.startswith("gmem_conversions.")]
    assert len(wrapped) == len(inner) == 9
    with Kvm(HUGETLB_PROFILE) as kvm:
        for case in wrapped:
            result = run_instance(kvm, Instance(case, SW))
            assert result.status is Status.PASS, (case.name, result.observed)
        assert kvm.hugetlb.counters(S) == HugetlbCounters(0, 0, 0, 0, 0)


# --- the RFC's encoding of the page size: a second uAPI variant ---------------------------------
RFC_PROFILE = replace(PROFILES["hugetlb"], name="hugetlb-rfc", gmem_hugetlb_encoding="flags")
RFC_2M = 21 << uapi.GUESTMEM_HUGETLB_FLAG_SHIFT  # GUESTMEM_HUGETLB_FLAG_2MB, 0x54...
RFC_1G = 30 << uapi.GUESTMEM_HUGETLB_FLAG_SHIFT  # GUESTMEM_HUGETLB_FLAG_1GB, 0x78...


def test_the_rfc_encoding_names_the_page_size_in_flag_bits_58_to_63():
    assert (RFC_2M, RFC_1G) == (0x5400000000000000, 0x7800000000000000)
    kvm = Kvm(RFC_PROFILE)
    kvm.hugetlb.set_nr_hugepages(G, 1)
    kvm.hugetlb.set_nr_hugepages(S, 1)
    vm = kvm.create_vm(SW)
    one_g = vm.create_guest_memfd(G, HUGETLB | RFC_1G)
    assert one_g.inode.huge_pages == L1G
    # page_order is reserved space there: unread
    two_m = vm.create_guest_memfd(S, HUGETLB | RFC_2M, uapi.HUGETLB_PAGE_ORDER_1G)
    assert two_m.inode.huge_pages == L2M
    for what, flags in (("size bits without HUGETLB", RFC_2M),
                        ("4 MiB: no hstate", HUGETLB | 22 << uapi.GUESTMEM_HUGETLB_FLAG_SHIFT)):
        try:
            vm.create_guest_memfd(S, flags)
        except OSError as e:
            assert e.errno == errno.EINVAL, what
        else:
            pytest.fail(what)


def test_the_wip_encoding_refuses_the_rfc_size_bits_as_unknown_flags():
    kvm = kvm_with_pool(1)
    vm = kvm.create_vm(SW)
    try:
        vm.create_guest_memfd(S, HUGETLB | RFC_2M)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        pytest.fail("took bits 58-63 that KVM_CAP_GUEST_MEMFD_FLAGS does not offer")
    assert kvm.hugetlb.counters(S) == HugetlbCounters(1, 1, 0, 0, 0)


def test_hugetlb_takes_the_bit_the_direct_map_series_also_claims():
    """Neither series is merged; a model offering both must not trust either value."""
    assert uapi.GUEST_MEMFD_FLAG_HUGETLB == uapi.GUEST_MEMFD_FLAG_NO_DIRECT_MAP == 1 << 2


def test_a_new_folio_holding_a_shared_page_is_split_on_every_allocation_path():
    """Not only a host fault: a guest fault or a fallocate that allocates a folio
    whose range is not all private splits it (dynamic), so no whole folio holds
    a shared page."""
    for allocate in ("guest", "fallocate"):
        kvm, vm, gmem, slot = policy_file("dynamic")
        gmem.set_memory_attributes2(PAGE, PAGE, 0)  # nothing allocated yet
        if allocate == "guest":
            guest_fault(vm, slot, GFN_4G + 1)
        else:
            gmem.allocate(0, G)
        assert gmem.inode.restructure.splits == 1, allocate
        assert violations(kvm) == [], allocate


@pytest.mark.parametrize("policy", ["stepwise", "lazy"])
def test_a_cut_1g_leaf_becomes_2m_leaves_where_the_folio_allows(policy):
    """kvm_split_cross_boundary_leafs splits only as far as it must: 2 MiB leaves
    over 2 MiB pieces (stepwise) or a still whole folio (lazy), 4 KiB around the
    cut; a later split of the folio (lazy's host fault) splits its leaves first."""
    kvm, vm, gmem, slot = policy_file(policy)
    guest_fault(vm, slot, GFN_4G)
    gmem.set_memory_attributes2(3 * S + PAGE, PAGE, 0)
    assert vm.mmu.pages_by_level() == {1: L2M - 1, L2M: L1G - L2M, L1G: 0}
    assert violations(kvm) == []
    if policy == "lazy":
        view = gmem.mmap(PAGE, 3 * S + PAGE)
        view.write(0, b"host")  # splits the whole 1 GiB folio to 4 KiB
        assert vm.mmu.pages_by_level() == {1: L1G - 1, L2M: 0, L1G: 0}
        assert violations(kvm) == []


def test_with_only_poisoned_pages_free_a_surplus_page_is_taken_as_fragmentation_allows():
    """Where the pool's free pages are all poisoned, a 2 MiB folio comes from the
    buddy allocator as a surplus page, if fragmentation still gives one."""
    kvm = kvm_with_pool(1)
    kvm.hugetlb.set_nr_overcommit_hugepages(S, 1)
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(S, HUGETLB, uapi.HUGETLB_PAGE_ORDER_2M)
    gmem.allocate(0, S)
    gmem.inode.memory_failure(0, 1)
    gmem.punch_hole(0, S)
    assert kvm.hugetlb.hstates[S].hwpoisoned == 1
    kvm.hugetlb.memory.obtainable[S] = 0
    assert errno_of(gmem.allocate, 0, S) == errno.ENOMEM
    kvm.hugetlb.memory.obtainable[S] = 1
    gmem.allocate(0, S)
    assert kvm.hugetlb.counters(S) == HugetlbCounters(2, 1, 0, 1, 1)
