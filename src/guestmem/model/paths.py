"""Kernel paths that can race, written as generators (DESIGN.md "Concurrency
without threads").

Each yields where the kernel drops a lock or can be preempted; `complete()` runs
one to the end, which is what ordinary calls do. An explorer advances several
of them step by step in any interleaving and checks the invariants after each.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from guestmem.model.vm import Memslot, Vm

T = TypeVar("T")
Path = Generator[str, None, T]


def complete(path: Path[T]) -> T:
    """Run a path to its end; its return value."""
    while True:
        try:
            next(path)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def gmem_fault_path(vm: Vm, slot: Memslot, first: int, last: int) -> Path[bool]:
    """A guest fault on guest_memfd pages [first, last) (x86 kvm_mmu_page_fault with
    kvm_mmu_faultin_pfn_gmem): snapshot mmu_invalidate_seq, get the pfns
    (kvm_gmem_get_pfn: allocate, zero once, take a reference), then under
    mmu_lock map them unless an invalidation ran meanwhile or is running
    (mmu_invalidate_retry_gfn), in which case the fault retries: returns False."""
    seq = vm.mmu.sequence
    yield "invalidate seq read"
    inode = slot.gmem
    if inode is None:
        return False
    lo, hi = slot.gmem_index(first), slot.gmem_index(last)
    inode.get_pages(lo, hi)
    inode.guest_fault_restructure(lo, hi)
    huge = vm.huge_leaves(slot, first, last)
    for g0, g1, _ in huge:  # kvm_gmem_get_pfn prepares the whole folio it maps
        inode.get_pages(slot.gmem_index(g0), slot.gmem_index(g1))
    yield "pfn taken"
    if vm.mmu.in_progress or vm.mmu.sequence != seq or slot.gmem is not inode:
        return False
    vm.mmu.map(first, last, slot)
    for g0, g1, level in huge:
        vm.mmu.map(g0, g1, slot, level)
    return True


def set_attributes_path(vm: Vm, first: int, last: int, attributes: int) -> Path[None]:
    """kvm_vm_set_mem_attributes after validation: invalidate (zap mappings of the
    old kind), store the new value, end the invalidation."""
    ranges = [(max(first, s.base_gfn), min(last, s.end_gfn)) for s in vm.memslots.values()
              if s.base_gfn < last and first < s.end_gfn]
    if ranges:  # kvm_handle_gfn_range begins an invalidation only on a memslot in range
        vm.mmu.invalidate_begin(ranges)
    yield "invalidate_begin"
    vm.attributes.set(first, last, attributes or None)
    yield "attributes stored"
    if ranges:
        vm.mmu.invalidate_end()
