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

HUGETLB_PROFILE = replace(PROFILES["inplace"], name="hugetlb", gmem_hugetlb=True)
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
