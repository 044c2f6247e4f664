"""The model's invariants, in one place (DESIGN.md "Concurrency without threads").

`violations(kvm)` may be called after any step of any run (stateful tests, the
explorer); it returns what is wrong, empty when all hold. Each check costs in
ranges, so it can run after every step even of a terabyte guest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from guestmem.model.gmem import GmemInode, HugetlbPolicy
from guestmem.model.process import AnonymousMemory
from guestmem.model.profile import Conversion


def violations(kvm: Any) -> list[str]:
    out: list[str] = []
    for check in (_confidentiality, _mapped_pages_are_live, _nothing_stale_is_reachable,
                  _conversions_keep_data_only_where_preserved, _huge_folios_are_uniform,
                  _stage2_leaves_fit_folios, _counters_add_up):
        out.extend(check(kvm))
    return out


def _inodes(kvm: Any) -> Iterator[GmemInode]:
    return (b for b in list(kvm.process.backings) if isinstance(b, GmemInode))


def _confidentiality(kvm: Any) -> Iterator[str]:
    """Host userspace never has private memory mapped: no host PTE on a private
    guest_memfd page (without INIT_SHARED all are, on mainline; with in-place
    conversion, the inode's attributes say), nor on a page whose gfn is private in
    a VM it is bound to."""
    for mapping in kvm.process.all_mappings():  # every process's page tables
        inode = mapping.backing
        if not isinstance(inode, GmemInode):
            continue
        for lo, hi, _ in mapping.ptes.items():
            first, last = mapping.pgoff + lo, mapping.pgoff + hi
            private = inode.private_ranges(first, last)
            if private:
                yield f"inode {inode.ino}: host PTEs on private pages {private}"
            for slot, g0, g1 in inode.bound_gfn_ranges(first, last):
                if not slot.vm.attributes.all_equal(g0, g1, None):
                    private = [(s, e) for s, e, a in slot.vm.attributes.overlapping(g0, g1)
                               if a & 8]
                    if private:
                        yield f"inode {inode.ino}: host maps private gfns {private}"


def _mapped_pages_are_live(kvm: Any) -> Iterator[str]:
    """No folio is freed while mapped by the host or the stage-2 MMU."""
    for inode in _inodes(kvm):
        for mapping in inode.mappings:
            for lo, hi, _ in mapping.ptes.items():
                yield from _live(inode, mapping.pgoff + lo, mapping.pgoff + hi, "host PTE")
    for vm, slot, g0, g1 in _gmem_sptes(kvm):
        if slot not in vm.memslots.values():
            yield f"VM {vm._fd}: SPTEs for gfns [{g0}, {g1}) of a deleted memslot"
        elif slot.gmem is None:
            yield f"VM {vm._fd}: SPTEs for gfns [{g0}, {g1}) after guest_memfd release"
        else:
            yield from _live(slot.gmem, slot.gmem_index(g0), slot.gmem_index(g1), "SPTE")


def _gmem_sptes(kvm: Any) -> Iterator[tuple[Any, Any, int, int]]:
    for vm in list(kvm.vms):
        for g0, g1, source in vm.mmu.mapped.items():
            if source != "hva":
                yield vm, source, g0, g1


def _live(inode: GmemInode, first: int, last: int, what: str) -> Iterator[str]:
    missing = list(inode.folios.gaps(first, last))
    if missing:
        yield f"inode {inode.ino}: {what} on freed pages {missing}"


def _nothing_stale_is_reachable(kvm: Any) -> Iterator[str]:
    """Zeroing, checked on content, not on flags: no page the host or a guest can
    read through a PTE or an SPTE still holds a previous owner's data (Stale). A
    path that skips zeroing (kvm_gmem_get_pfn, kvm_gmem_fault_user_mapping,
    shmem_fault) leaves exactly that; seed 000's SGP_WRITE bug was one."""
    for mapping in kvm.process.all_mappings():  # the VMM's and its forked children's
        for lo, hi, _ in mapping.ptes.items():
            stale = mapping.backing.store.stale(mapping.pgoff + lo, mapping.pgoff + hi)
            if stale:
                yield f"host PTEs at {mapping.addr:#x} on another owner's data {stale}"
    for vm, slot, g0, g1 in _gmem_sptes(kvm):
        if slot.gmem is not None:
            stale = slot.gmem.store.stale(slot.gmem_index(g0), slot.gmem_index(g1))
            if stale:
                yield f"VM {vm._fd}: SPTEs on another owner's data, file pages {stale}"
    for vm in list(kvm.vms):
        for g0, g1, source in vm.mmu.mapped.items():
            if source == "hva":
                yield from _stale_through_hva(kvm, vm, g0, g1)


def _stale_through_hva(kvm: Any, vm: Any, first: int, last: int) -> Iterator[str]:
    """SPTEs made through userspace_addr: the host pages behind them."""
    for slot in vm.memslots.values():
        lo, hi = max(first, slot.base_gfn), min(last, slot.end_gfn)
        if lo >= hi:
            continue
        found = kvm.process.mapping_at(slot.userspace_addr + (lo - slot.base_gfn) * 4096)
        if found is None:
            continue
        mapping, offset = found
        index = mapping.pgoff + offset // 4096
        stale = mapping.backing.store.stale(index, index + hi - lo)
        if stale:
            yield f"VM {vm._fd}: SPTEs through userspace_addr on another owner's data {stale}"


def _conversions_keep_data_only_where_preserved(kvm: Any) -> Iterator[str]:
    """No page that changed owner in an in-place conversion still holds what its
    previous owner left there, unless the VM type (and the profile's seed-003
    option) says conversion preserves (profile.Conversion)."""
    for inode in _inodes(kvm):
        if not inode.store.handed_over.boundaries():
            continue
        if kvm.profile.conversion_of(inode.vm.vm_type_info) is Conversion.PRESERVE:
            continue
        kept = inode.store.kept_across_conversion(0, inode.npages)
        if kept:
            yield (f"inode {inode.ino} ({inode.vm.vm_type_info.name}): pages {kept} kept "
                   "the previous owner's data across a conversion")


def _huge_folios_are_uniform(kvm: Any) -> Iterator[str]:
    """A HugeTLB guest_memfd's folio larger than 4 KiB (a whole huge folio, or a
    stepwise 2 MiB piece) stays whole only while every page of it is private; one
    with a shared page is split (the WIP's restructuring). Under `lazy` the split
    waits for a host fault, so there the rule is what splitting protects: no host
    mapping reaches into a folio holding private pages."""
    for inode in _inodes(kvm):
        if inode.spool is None:
            continue
        lazy = inode.hugetlb_policy is HugetlbPolicy.LAZY
        for lo, hi, _ in inode.folios.overlapping(0, inode.npages):
            for a, b, piece in inode._pieces(lo, hi):
                if piece == 1:
                    continue
                for x, y in _shared_runs(inode, a, b):
                    x, y = x // piece * piece, -(-y // piece) * piece
                    if not lazy:
                        yield f"inode {inode.ino}: whole folios in [{x}, {y}) hold shared pages"
                    elif inode.private_ranges(x, y) and any(
                            m.ptes.covered(x - m.pgoff, y - m.pgoff) for m in inode.mappings):
                        yield (f"inode {inode.ino}: the host maps into whole folios [{x}, {y}) "
                               "holding private pages")


def _shared_runs(inode: GmemInode, first: int, last: int) -> list[tuple[int, int]]:
    out, at = [], first
    for lo, hi in inode.private_ranges(first, last):
        if at < lo:
            out.append((at, lo))
        at = hi
    return out + ([(at, last)] if at < last else [])


def _stage2_leaves_fit_folios(kvm: Any) -> Iterator[str]:
    """Mapping size <= folio size (the rule Yan Zhao's review holds the WIP to): a
    huge stage-2 leaf maps allocated private guest_memfd pages of folios at least
    as large as it, aligned, no larger than the VM type allows (TDX: 2 MiB)."""
    for vm in list(kvm.vms):
        for g0, g1, level in vm.mmu.levels.items():
            slot = vm.mmu.mapped.get(g0)
            if g0 % level or g1 % level or not vm.mmu.mapped.all_equal(g0, g1, slot):
                yield f"VM {vm._fd}: huge leaves [{g0}, {g1}) unaligned or not one memslot's"
                continue
            if slot == "hva" or slot.gmem is None:
                yield f"VM {vm._fd}: huge leaves [{g0}, {g1}) not on guest_memfd pages"
                continue
            inode, lo = slot.gmem, slot.gmem_index(g0)
            hi = lo + g1 - g0
            fits = (all(level <= piece for _, _, piece in inode._pieces(lo, hi))
                    and inode.folios.covered(lo, hi) == hi - lo
                    and sum(b - a for a, b in inode.private_ranges(lo, hi)) == hi - lo)
            if not fits or level > vm.vm_type_info.max_private_leaf:
                yield (f"VM {vm._fd}: leaves of {level} pages on gfns [{g0}, {g1}) exceed "
                       f"the folios of inode {inode.ino} or the VM type")


def _counters_add_up(kvm: Any) -> Iterator[str]:
    """The process's allocated-page counter equals what the backings hold plus the
    pages truncated while pinned (alive until unpinned)."""
    held = 0
    for backing in list(kvm.process.backings):
        if isinstance(backing, GmemInode):
            held += backing.allocated_pages()
        elif isinstance(backing, AnonymousMemory):
            held += backing.present.covered(0, backing.npages)
    stats = kvm.process.stats
    if held + stats.orphaned != stats.pages_allocated:
        yield (f"pages allocated {stats.pages_allocated} != held by backings {held} "
               f"+ truncated but pinned {stats.orphaned}")


def leaks_after_close(kvm: Any) -> list[str]:
    """After every object was closed: no model fd but /dev/kvm's, no live VM or
    backing, no allocated page."""
    out = []
    others = [fd for fd, obj in kvm.process.fds.items() if obj is not kvm]
    if others:
        out.append(f"model fds still open: {others}")
    if kvm.vms:
        out.append(f"{len(kvm.vms)} VM(s) still alive")
    if kvm.process.backings:
        out.append(f"{len(kvm.process.backings)} backing(s) still alive")
    if kvm.process.stats.pages_allocated:
        out.append(f"{kvm.process.stats.pages_allocated} pages still allocated "
                   f"({kvm.process.stats.orphaned} truncated but pinned)")
    return out
