"""Stale memory: a new page holds its previous owner's data until a zeroing path
clears it, so a skipped zeroing shows, and the invariants check content."""

import pytest

from guestmem import uapi
from guestmem.model import Kvm
from guestmem.model.content import STALE_TAG, Stale
from guestmem.model.gmem import GmemInode
from guestmem.model.invariants import violations

PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def test_an_allocated_page_holds_another_owners_data_until_a_fault_zeroes_it():
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4 * PS, FLAGS) as g:
        g.allocate(0, 4 * PS)  # kvm_gmem_allocate: folios, not zeroed
        store = g.inode.store
        assert store.stale(0, 4) == [(0, 4)]
        assert int.from_bytes(store.read(0, 8), "little") >> 32 == STALE_TAG >> 32
        with g.mmap() as m:
            assert m.read(PS, 8) == bytes(8)  # kvm_gmem_fault_user_mapping zeroes it
            assert store.stale(0, 4) == [(0, 1), (2, 4)]
        g.punch_hole(0, 4 * PS)
        g.allocate(0, PS)
        first, second = store.content(0), Stale(0)
        assert isinstance(first, Stale) and first != second  # a new owner each time


def test_anonymous_memory_is_zeroed_when_it_is_first_touched():
    with Kvm() as kvm, kvm.mmap_anonymous(2 * PS) as m:
        assert m.read(0, 16) == bytes(16)
        assert m.backing.store.stale(0, 2) == []


@pytest.mark.parametrize("path", ["host", "guest"])
def test_a_skipped_zeroing_is_a_visible_leak_and_an_invariant_violation(monkeypatch, path):
    """The bug class of seed 000: a path hands out a page without zeroing it."""
    monkeypatch.setattr(GmemInode, "_make_uptodate", lambda self, first, last: None)
    from guestmem import program as p
    from guestmem.guest import compile_program, default_hypercall_abi
    from guestmem.vmm import Vmm

    with Kvm() as kvm, Vmm(kvm) as vmm:
        region = vmm.add_memory(1 << 32, PS)
        region.guest_memfd.allocate(0, PS)
        if path == "host":
            seen = int.from_bytes(region.mapping.read(0, 8), "little")
        else:
            vmm.load(compile_program(p.Program.of(p.ReadValue(1 << 32)),
                                     default_hypercall_abi(kvm.capabilities, vmm.cpl)))
            (seen,) = vmm.run().reports
        assert seen >> 32 == STALE_TAG >> 32, "the previous owner's data shows"
        assert any("another owner's data" in v for v in violations(kvm))
