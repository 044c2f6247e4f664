"""Memslot overlap checks and gfn lookups: a gfn-ordered tree, never a scan.

bench/memslots.py measures it (16,384 one-page slots); here the model's answers
are checked against a naive reference, and a memslot table that refuses to be
scanned proves that no operation walks every slot.
"""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import uapi
from guestmem.model import Kvm

PS = uapi.PAGE_SIZE


class NoScan(dict):
    """A memslot table that fails the test when something walks all of it."""

    def _scan(self, *args):
        raise AssertionError("an operation scanned every memslot")

    values = items = keys = __iter__ = _scan


def test_no_operation_scans_every_memslot():
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(64 * PS) as g:
        vm.memslots = NoScan()
        for i in range(32):  # create, with holes between the slots
            vm.set_user_memory_region2(i, uapi.KVM_MEM_GUEST_MEMFD, (64 + 2 * i) * PS, PS, 0, g,
                                       i * PS)
        overlapping = vm.set_user_memory_region2
        try:
            overlapping(40, uapi.KVM_MEM_GUEST_MEMFD, 64 * PS, PS, 0, g, 40 * PS)
        except OSError as e:
            assert e.errno == errno.EEXIST
        else:
            raise AssertionError("an overlapping slot was accepted")
        assert vm.slot_for_gfn(64 + 2 * 5).id == 5
        assert vm.slot_for_gfn(64 + 2 * 5 + 1) is None
        for i in range(32):
            vm.delete_memslot(i)
        assert vm.slot_for_gfn(64) is None
        vm.memslots = {}  # destroying the VM walks its slots, rightly


ops = st.lists(st.tuples(st.sampled_from(["create", "move", "delete"]), st.integers(0, 5),
                         st.integers(0, 40), st.integers(1, 6)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_overlaps_and_lookups_match_a_naive_reference(ops):
    """Ordinary (anonymous) slots, which may also move: the moving slot is not an
    overlap of itself."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        naive: dict[int, tuple[int, int]] = {}  # id -> (base_gfn, npages)
        for op, slot, gfn, npages in ops:
            if op == "delete":
                want = None if slot in naive else errno.EINVAL
                call = (slot, 0, 0, 0, 0)
            else:  # an existing slot with a new base moves (KVM_MR_MOVE)
                if op == "move" and slot in naive:
                    npages = naive[slot][1]
                others = [(b, n) for i, (b, n) in naive.items() if i != slot]
                clash = any(b < gfn + npages and gfn < b + n for b, n in others)
                want = errno.EEXIST if clash else None
                if slot in naive and naive[slot][1] != npages:
                    want = errno.EINVAL  # a slot's size never changes
                elif naive.get(slot) == (gfn, npages):
                    want = None  # nothing changes
                call = (slot, 0, gfn * PS, npages * PS, 1 << 30)
            try:
                vm.set_user_memory_region2(*call)
                got = None
            except OSError as e:
                got = e.errno
            assert got == want, f"{op} slot {slot} at {gfn}+{npages}: {got} != {want}"
            if got is None:
                if op == "delete":
                    del naive[slot]
                else:
                    naive[slot] = (gfn, npages)
            for g in range(48):
                owner = next((i for i, (b, n) in naive.items() if b <= g < b + n), None)
                found = vm.slot_for_gfn(g)
                assert (found.id if found else None) == owner, f"gfn {g}"
