"""The guest_memfd inode and file (virt/kvm/guest_memfd.c), per range, never per page."""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Self

from guestmem import _args, memmap, uapi
from guestmem.exits import oserror
from guestmem.extents import ExtentMap
from guestmem.memmap import MemoryMap
from guestmem.model.addrspace import page_align
from guestmem.model.content import PAGE, ZERO, Ciphertext, PageStore
from guestmem.model.hugetlb import Subpool
from guestmem.model.mempolicy import LOCAL_NODE, MemPolicy, Placement
from guestmem.model.process import PROT_EXEC, PROT_WRITE, HostProcess, Mapping
from guestmem.model.profile import Conversion, HostPrivateAccess

if TYPE_CHECKING:
    from guestmem.model.vm import Memslot, Vm

MAX_LFS_FILESIZE = (1 << 63) - 1  # s_maxbytes of the guest_memfd mount
ANON_INODE_DEV = 16  # st_dev of "anon_inode:[kvm-gmem]" files on this project's host (0:16)
SEEK_MAX = 4  # SEEK_HOLE (include/uapi/linux/fs.h)
STRUCT_PAGE = 64  # sizeof(struct page): vmemmap bytes per base page
LEVEL_2M_PAGES = 512  # base pages of a 2 MiB folio (stepwise's intermediate order)
_inode_numbers = itertools.count(0x1000)
_conversion_keys = itertools.count(1)  # a new SNP key stream per conversion (Ciphertext)


class ConversionPolicy(Enum):
    """What a guest_memfd lets host userspace do around in-place conversion: the
    upstream series' rule and seed 004's three designs, selectable per file (a
    model extension, GuestMemfd.set_conversion_policy) to compare what each allows."""

    # The series (upstream-2026-11.md §1): any mappings; to private unmaps them in
    # every process and fails with EAGAIN on a page with an extra reference.
    PER_PAGE = "per-page"
    # Seed 004 items 1, 4, 5: "the entire memfd must be mapped, and at most one mapping
    # is allowed", "disallow splitting VMAs", "require that there are no outstanding
    # references at munmap()". So a conversion to private waits for the munmap.
    WHOLE_FILE = "whole-file"
    # Seed 004 item 2: "acquiring a reference via get_pfn() is disallowed if there's a
    # mapping": the guest cannot fault pages in while the host has the file mapped.
    NO_GET_PFN_WHILE_MAPPED = "no-get-pfn-while-mapped"
    # Seed 004, the reply: ordinary mappings "but don't allow any form of GUP or
    # pinning"; the switch to private blocks new faults and unmaps through the rmap
    # (unmap_mapping_range), so no reference can stand in its way.
    RMAP_SWITCH = "rmap-switch"


class HugetlbPolicy(Enum):
    """When a HugeTLB guest_memfd splits and merges its folios (issue 10 part 4; a
    model extension, GuestMemfd.set_hugetlb_policy): the WIP's rule and the
    alternatives seed 003 and the RFC leave open, to compare what each costs."""

    # The WIP branch and RFC patch 39: a to-shared conversion splits the huge page
    # it cuts to 4 KiB; a to-private one merges it when the whole page is private.
    DYNAMIC = "dynamic"
    # RFC patch 25: every folio is split to 4 KiB when allocated and never merged
    # until it is freed (punch, close): no restructuring at conversion, no huge
    # stage-2 leaves.
    EAGER_4K = "eager-4k"
    # Seed 003's TODO "intermediate splits": 1 GiB -> 2 MiB -> 4 KiB; only the 2 MiB
    # pieces a conversion cuts go to 4 KiB, and merges go back a step at a time.
    STEPWISE = "stepwise"
    # Seed 003's TODO "lazy splitting": conversions restructure nothing; a host
    # fault splits the folio it maps into, a guest fault merges a split folio
    # that is private whole (our choice of where merging happens).
    LAZY = "lazy"

    @property
    def restructures_on_conversion(self) -> bool:
        return self in (HugetlbPolicy.DYNAMIC, HugetlbPolicy.STEPWISE)


@dataclass(frozen=True)
class FolioState:
    """One range of folios: uptodate = initialised (zeroed or written), PG_uptodate."""

    uptodate: bool = False
    hwpoison: bool = False
    placement: Placement = Placement((LOCAL_NODE,))  # the NUMA node(s) of these pages


@dataclass(eq=False)
class Orphan:
    """Pages truncated from the file while pinned: allocated until `refs` pins go."""

    pages: int
    refs: int
    folios: tuple[int, int] | None = None  # HugeTLB: the huge folios its pieces belong to


@dataclass
class Restructure:
    """What a guest_memfd's splits and merges did (mm/hugetlb_restructuring.c), and
    the bytes it zeroed."""

    splits: int = 0
    merges: int = 0
    vmemmap_restored: int = 0  # bytes of vmemmap HVO had freed, allocated again to split
    vmemmap_freed: int = 0  # bytes freed again by merges (hugetlb_vmemmap_optimize_folio)
    zeroed: int = 0  # bytes cleared: folios at first use, pages a conversion re-initialises


class Pin:
    """One pin_user_pages() on a guest_memfd; unpin() drops it."""

    def __init__(self, inode: GmemInode) -> None:
        self.inode = inode
        self.live: ExtentMap[bool] = ExtentMap()  # pinned pages still in the file
        self.orphans: list[Orphan] = []
        self.active = True

    def unpin(self) -> None:
        """unpin_user_pages: drop the pin on pages still in the file; the last pin
        on truncated pages frees them."""
        if not self.active:
            return
        self.active = False
        inode = self.inode
        for lo, hi, _ in list(self.live.items()):
            for a, b, count in list(inode.pins.overlapping(lo, hi)):
                inode.pins.set(a, b, count - 1 if count > 1 else None)
        for orphan in self.orphans:
            orphan.refs -= 1
            if orphan.refs == 0:
                inode.process.stats.orphaned -= orphan.pages
                inode.process.stats.free(orphan.pages)
                inode.orphan_freed(orphan)
        inode.live_pins.discard(self)


class GmemInode:
    def __init__(self, process: HostProcess, vm: Vm, size: int, flags: int,
                 spool: Subpool | None = None) -> None:
        self.process = process
        # HugeTLB backing (the WIP branch): the inode's subpool, min = max = its huge
        # pages, all reserved at creation; folios are whole huge pages.
        self.spool = spool
        self.huge_pages = 1 if spool is None else spool.hstate.page_size // PAGE
        # Huge folios split to 4 KiB pages (the WIP's restructuring), by base index,
        # whole huge pages at a time; and what splitting and merging cost so far.
        self.split: ExtentMap[int] = ExtentMap()  # index -> base pages per piece
        # Huge folios truncated while pieces were pinned -> pinned pieces still out.
        self.waiting: ExtentMap[int] = ExtentMap()
        self.restructure = Restructure()
        self.hugetlb_policy = HugetlbPolicy.DYNAMIC
        self.vm = vm
        self.size = size
        self.npages = size // PAGE
        self.flags = flags
        self.ino = next(_inode_numbers)
        self.created_ns = time.time_ns()  # i_atime, never updated (no read path)
        self.mtime_ns = self.created_ns  # i_mtime = i_ctime: see modified()
        self.folios: ExtentMap[FolioState] = ExtentMap()
        self.store = PageStore()
        self.bindings: ExtentMap[Memslot] = ExtentMap()  # file index -> memslot (kvm_gmem_bind)
        self.mappings: set[Mapping] = set()
        self.pins: ExtentMap[int] = ExtentMap()  # index -> GUP pin count (FOLL_PIN)
        # The shared NUMA policy by file index (gmem_inode->policy), where the profile
        # has one (kvm_gmem_set_policy); None: policies stay on the VMAs.
        self.policy: ExtentMap[MemPolicy] | None = (
            ExtentMap() if vm.kvm.profile.gmem_shared_policy else None)
        self.live_pins: set[Pin] = set()
        # In-place conversion: PRIVATE per index, set by KVM_SET_MEMORY_ATTRIBUTES2; an
        # index without an entry is in the INIT state (private unless INIT_SHARED).
        self.private: ExtentMap[bool] = ExtentMap()
        self.conversion_policy = ConversionPolicy.PER_PAGE
        self.file_open = True  # the fd; mappings also hold the file (kvm_gmem_release)
        self.forked_refs = 0  # the same file, inherited by forked children still alive
        self.released = False
        process.backings.add(self)

    @property
    def mmap_supported(self) -> bool:
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)

    # --- folios -------------------------------------------------------------------------------
    def allocated_pages(self) -> int:
        return self.folios.covered(0, self.npages)

    def _allocate(self, first: int, last: int) -> None:
        """kvm_gmem_get_folio for every missing index: new folios, not uptodate, on
        the node the inode's policy for the index picks (the task's policy, i.e.
        the local node, where there is none), in ascending index order."""
        chooser = self.process.node_chooser
        first, last = self._huge_round_out(first, last)
        fresh = list(self.folios.gaps(first, last))
        plan = self._fresh_plan(fresh)
        for lo, hi in fresh:
            if self.spool is not None:  # whole huge folios, from the reserved subpool
                self.vm.kvm.hugetlb.gmem_alloc(self.spool, (hi - lo) // self.huge_pages)
            self.store.set(lo, hi, self.process.new_pages(hi - lo))  # not zeroed yet
            policies = ([(lo, hi, None)] if self.policy is None
                        else _with_gaps(self.policy.overlapping(lo, hi), lo, hi))
            for a, b, policy in policies:
                self.folios.set(a, b, FolioState(placement=chooser.place(policy, a, b)))
        self._restructure(plan)

    def _fresh_plan(self, fresh: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """The splits new huge folios get when allocated: eager-4k splits each to
        4 KiB; dynamic and stepwise split one whose range is not all private (the
        WIP's kvm_gmem_fault_user_mapping does so for a fresh folio; our reading:
        on every allocation path, so that no whole folio holds a shared page);
        lazy waits for a host fault."""
        if self.spool is None or not fresh or self.hugetlb_policy is HugetlbPolicy.LAZY:
            return []
        if self.hugetlb_policy is HugetlbPolicy.EAGER_4K:
            return [(a, b, 1) for a, b in fresh]
        shared = [run for a, b in fresh for run in _complement(self.private_ranges(a, b), a, b)]
        return self._unsplit_for_shared(shared, only_allocated=False)

    def _huge_round_out(self, first: int, last: int) -> tuple[int, int]:
        """[first, last) widened to whole folios (a huge folio is allocated whole)."""
        hp = self.huge_pages
        return first // hp * hp, min(-(-last // hp) * hp, self.npages)

    def huge_aligned(self, first: int, last: int) -> bool:
        """Do [first, last) start and end on huge folio boundaries?"""
        return first % self.huge_pages == 0 and last % self.huge_pages == 0

    def nodes_in(self, first: int, last: int) -> int:
        """The nodemask of the folios in [first, last), per extent."""
        mask = 0
        for lo, hi, state in self.folios.overlapping(first, last):
            cycle = state.placement.nodes
            for i in range(lo, min(hi, lo + len(cycle))):  # one lap of the cycle suffices
                mask |= 1 << state.placement.node_of(i)
        return mask

    def node_of(self, index: int) -> int | None:
        state = self.folios.get(index)
        return state.placement.node_of(index) if state is not None else None

    def _make_uptodate(self, first: int, last: int) -> None:
        """Zero every !uptodate folio once and mark it uptodate (guest_memfd.c
        kvm_gmem_get_pfn / kvm_gmem_fault_user_mapping: folio_zero + mark uptodate)."""
        for lo, hi, state in list(self.folios.overlapping(first, last)):
            if not state.uptodate:
                self.store.set(lo, hi, ZERO)
                self.folios.set(lo, hi, replace(state, uptodate=True))
                self.restructure.zeroed += (hi - lo) * PAGE

    def poisoned(self, first: int, last: int) -> int | None:
        for lo, _, state in self.folios.overlapping(first, last):
            if state.hwpoison:
                return lo
        return None

    def get_pages(self, first: int, last: int) -> None:
        """Allocate and initialise [first, last) for a user (host fault or guest);
        a folio is initialised whole (kvm_gmem_prepare_folio clears every page of
        it), so a huge one from its first to its last page."""
        self._allocate(first, last)
        if self.spool is not None:
            first -= first % self._piece_at(first)
            last += -last % self._piece_at(last - 1)
        self._make_uptodate(first, min(last, self.npages))

    def allocation_affordable(self, first: int, last: int, fault: bool = False) -> bool:
        """Can [first, last) be allocated: a clean page (or a surplus one) for each
        new folio, and memory for the vmemmap of the splits the allocation brings
        (_fresh_plan), and, for a host fault under lazy, of the splits it makes?"""
        if self.spool is None:
            return True
        fresh = list(self.folios.gaps(*self._huge_round_out(first, last)))
        folios = sum(b - a for a, b in fresh) // self.huge_pages
        if folios > self.vm.kvm.hugetlb.gmem_obtainable(self.spool):
            return False  # only poisoned pages are free, and no surplus page comes
        if not self.vm.kvm.hugetlb.hvo:
            return True
        plan = self._fresh_plan(fresh) + (self._lazy_fault_plan(first, last) if fault else [])
        return self._affordable(plan)

    def _free(self, first: int, last: int) -> None:
        """Remove folios [first, last) from the file and free them. A pinned folio
        leaves the file too but stays allocated until its last pin is dropped
        (truncate drops the page-cache reference; the pin keeps the page until
        the final folio_put)."""
        orphaned = 0
        pinned = list(self.pins.overlapping(first, last)) if self.pins.boundaries() else []
        held = 0  # pages of huge folios that wait for pinned pieces
        for lo, hi, count in self._pin_segments(pinned):
            pages = self.folios.covered(lo, hi)
            folios = None if self.spool is None else self._huge_round_out(lo, hi)
            if folios is not None:
                for a, b in list(self.waiting.gaps(*folios)):
                    held += self.folios.covered(a, b)
                    self.waiting.set(a, b, 0)
                for a, b, n in list(self.waiting.overlapping(*folios)):
                    self.waiting.set(a, b, n + 1)
            orphan = Orphan(pages, count, folios)
            for pin in self.live_pins:
                if pin.live.covered(lo, hi):
                    pin.live.clear(lo, hi)
                    pin.orphans.append(orphan)
            orphaned += pages
        if pinned:
            self.pins.clear(first, last)
        self.process.stats.orphaned += orphaned
        poisoned = 0 if self.spool is None else self._poisoned_folios(first, last)
        taken = self.folios.take(first, last)
        self.process.stats.free(taken - orphaned)
        if self.spool is not None and taken > held:  # free_huge_folio, per whole folio
            self.vm.kvm.hugetlb.gmem_free(self.spool, (taken - held) // self.huge_pages,
                                          poisoned)
        self.store.clear(first, last)

    def _poisoned_folios(self, first: int, last: int) -> int:
        """Whole huge folios of [first, last) with a hwpoison page (the raw page
        stays on the folio's raw_hwp_list across a merge)."""
        bad: ExtentMap[bool] = ExtentMap()
        for lo, hi, state in self.folios.overlapping(first, last):
            if state.hwpoison:
                bad.set(*self._huge_round_out(lo, hi), True)
        for a, b, _ in list(self.waiting.overlapping(first, last)):
            bad.clear(a, b)  # these wait for their pinned pieces
        return bad.covered(first, last) // self.huge_pages

    def _pin_segments(self, pinned: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The pinned runs cut where a pin begins or ends: the pages each Orphan holds
        are held by the same pins (adjacent pins of one count merge in `pins`)."""
        out = []
        for lo, hi, count in pinned:
            cuts = {lo, hi}
            for pin in self.live_pins:
                for a, b, _ in pin.live.overlapping(lo, hi):
                    cuts.update(p for p in (a, b) if lo < p < hi)
            edges = sorted(cuts)
            out += [(a, b, count) for a, b in zip(edges, edges[1:], strict=False)]
        return out

    def orphan_freed(self, orphan: Orphan) -> None:
        """The last pin of truncated pieces is gone: a huge folio with no piece left
        is merged and freed by the restructuring worker, later (the WIP's
        nr_pages_waiting_to_be_merged reaching zero queues it)."""
        if orphan.folios is None:
            return
        done = []
        for a, b, n in list(self.waiting.overlapping(*orphan.folios)):
            self.waiting.set(a, b, n - 1 if n > 1 else None)
            if n == 1:
                done.append((a, b))
        if done:
            self.vm.kvm.hugetlb.defer(lambda: self._merge_freed(done))

    def _merge_freed(self, ranges: list[tuple[int, int]]) -> None:
        """The worker: merge the freed pieces back and return the folios to the pool."""
        self._restructure([(a, b, self.huge_pages) for a, b in ranges], merge=True)
        folios = sum(b - a for a, b in ranges) // self.huge_pages
        assert self.spool is not None
        self.vm.kvm.hugetlb.gmem_free(self.spool, folios)

    # --- GUP pins (pin_user_pages on a guest_memfd mapping) ------------------------------------
    def pin(self, first: int, last: int) -> Pin:
        """FOLL_PIN on pages already faulted in (Mapping.pin faults them first)."""
        for lo, hi, count in list(self.pins.overlapping(first, last)):
            self.pins.set(lo, hi, count + 1)
        for lo, hi in list(self.pins.gaps(first, last)):
            self.pins.set(lo, hi, 1)
        pin = Pin(self)
        pin.live.set(first, last, True)
        self.live_pins.add(pin)
        return pin

    def pinned(self, first: int, last: int) -> bool:
        return not self.pins.all_equal(first, last, None)

    # --- conversion policies (ConversionPolicy) -------------------------------------------------
    @property
    def whole_file(self) -> bool:
        """One mapping of the whole file, never split, not inherited by fork
        (our choice for "at most one mapping": the VMA is VM_DONTCOPY)."""
        return self.conversion_policy is ConversionPolicy.WHOLE_FILE

    @property
    def gup_refused(self) -> bool:
        """rmap-switch: GUP and pins on the file's mappings fail (EFAULT, as
        check_vma_flags refuses a VMA GUP may not touch)."""
        return self.conversion_policy is ConversionPolicy.RMAP_SWITCH

    def get_pfn_refused(self) -> bool:
        """no-get-pfn-while-mapped: kvm_gmem_get_pfn fails while any process maps
        the file (EBUSY: our choice of errno; the seed names none)."""
        return (self.conversion_policy is ConversionPolicy.NO_GET_PFN_WHILE_MAPPED
                and bool(self.mappings))

    def may_unmap(self, mapping: Mapping) -> None:
        """whole-file: munmap with pages still referenced (pinned) is EBUSY, the
        mapping stays (seed 004 item 5; the errno is our choice)."""
        if self.whole_file and self.pins.boundaries():
            raise oserror(errno.EBUSY, "munmap: whole-file guest_memfd has pinned pages")

    # --- privateness (in-place conversion) -----------------------------------------------------
    def is_private(self, index: int) -> bool:
        """The series' kvm_gmem_is_private: the attribute at index, else the INIT
        state (a missing maple-tree entry: shared iff INIT_SHARED; upstream-2026-11.md §1)."""
        value = self.private.get(index)
        return not self.init_shared if value is None else value

    def private_ranges(self, first: int, last: int) -> list[tuple[int, int]]:
        """The private runs of [first, last), INIT-state gaps included."""
        runs = [(lo, hi) for lo, hi, private in self.private.overlapping(first, last) if private]
        if not self.init_shared:
            runs += list(self.private.gaps(first, last))
        return sorted(runs)

    def set_private(self, first: int, last: int, private: bool) -> None:
        """kvm_gmem_set_attributes after its argument checks (upstream.md §7.1):
        nothing to do when the range already is so; to private, zap every host
        mapping, then fail with EAGAIN (error_offset: the first pinned page) if a
        page has a reference beyond the file's, changing no attribute; then zap the
        stage-2 mappings of every bound VM, store the attribute and let the VM type
        decide what the pages that changed owner hold (_make_private/_make_shared)."""
        private_now = self.private_ranges(first, last)
        covered = sum(hi - lo for lo, hi in private_now)
        if covered == (last - first if private else 0):
            return
        if private and self.whole_file and self.mappings:
            error = oserror(errno.EBUSY, "KVM_SET_MEMORY_ATTRIBUTES2: whole-file mapping")
            error.error_offset = 0  # type: ignore[attr-defined]  # not written back: as passed
            raise error  # seed 004: conversion waits for the one mapping's munmap
        if private:
            for m in self.mappings:  # unmap_mapping_pages: in every process
                m.zap(first, last)
            for lo, _, _ in self.pins.overlapping(first, last):
                error = oserror(errno.EAGAIN, "KVM_SET_MEMORY_ATTRIBUTES2")
                error.error_offset = max(first, lo) * PAGE  # type: ignore[attr-defined]
                raise error
        changing = _complement(private_now, first, last) if private else private_now
        restructures = self.hugetlb_policy.restructures_on_conversion
        to_split = [] if private or not restructures else self._unsplit_for_shared(changing)
        if not self._affordable(to_split):
            # Our choice: all or nothing, as the ioctl's documentation says of
            # failures (the WIP converts one huge page per batch and "a failed
            # split can't be undone").
            error = oserror(errno.ENOMEM, "KVM_SET_MEMORY_ATTRIBUTES2: vmemmap for a split")
            error.error_offset = first * PAGE  # type: ignore[attr-defined]
            raise error
        if private:  # the invalidation is rounded out to huge pages (the WIP)
            vms = self._invalidate_begin(*self._huge_round_out(first, last))
        else:  # to shared: split the folios and the stage-2 leaves crossing the range,
            # then zap only it (the model's order: the state after is the kernel's)
            self._restructure(to_split)
            self._split_crossing_leaves(first, last)
            vms = self._invalidate_begin(first, last)
        self.private.set(first, last, private)
        if private and restructures:
            self._restructure(self._merges_for_private(first, last), merge=True)
        preserves = self.vm.kvm.profile.conversion_of(
            self.vm.vm_type_info) is Conversion.PRESERVE
        for lo, hi in changing:
            # What the old owner left, for the invariant to compare with, taken
            # apart from the hook it checks (where the VM type preserves, the bytes
            # stay and there is nothing to compare).
            before = [] if preserves else self.store.contents(self._initialised(lo, hi))
            self._change_owner(lo, hi)
            self.store.remember(before)
        for vm in vms:
            vm.mmu.invalidate_end()

    # --- HugeTLB restructuring (the WIP branch, upstream-2026-11.md §2) -----------------------
    # A plan is a list of (lo, hi, piece): make the folios of [lo, hi) pieces of
    # `piece` base pages (1: 4 KiB; LEVEL_2M_PAGES: 2 MiB; huge_pages: whole again).
    def _piece_at(self, index: int) -> int:
        """Base pages per folio at index: huge_pages unless split."""
        return self.split.get(index) or self.huge_pages

    def _vmemmap_kept(self, pages: int) -> int:
        """Bytes of vmemmap a folio of `pages` base pages keeps: HVO leaves one
        page of a huge folio (HUGETLB_VMEMMAP_RESERVE_SIZE), else 64 bytes of
        struct page per base page (vmemmap_dedup.rst)."""
        if pages > 1 and self.vm.kvm.hugetlb.hvo:
            return PAGE
        return pages * STRUCT_PAGE

    def _pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """[lo, hi) by current piece size."""
        at = lo
        for a, b, piece in self.split.overlapping(lo, hi):
            if at < a:
                yield at, a, self.huge_pages
            yield a, b, piece
            at = b
        if at < hi:
            yield at, hi, self.huge_pages

    def _simulate(self, plan: list[tuple[int, int, int]],
                  merge: bool = False) -> tuple[ExtentMap[int], Restructure]:
        """Carry the plan out on a copy of the pieces of its ranges, in order: the
        pieces after it, and what it costs. A split plan splits only folios larger
        than an entry's piece, whole; a merge plan (`merge`) only merges smaller
        pieces, into whole pieces of the entry's size. A split restores the vmemmap HVO freed
        (hugetlb_vmemmap_restore_folio); a merge frees it again
        (hugetlb_vmemmap_optimize_folio). Folios not allocated yet count as whole."""
        pieces: ExtentMap[int] = ExtentMap()
        done = Restructure()
        if not plan:
            return pieces, done
        hp = self.huge_pages
        lo, hi = min(a for a, _, _ in plan) // hp * hp, -(-max(b for _, b, _ in plan) // hp) * hp
        for a, b, piece in self._pieces(lo, min(hi, self.npages)):
            pieces.set(a, b, piece)
        for lo, hi, piece in plan:
            if merge:
                self._simulate_merge(pieces, done, lo, hi, piece)
                continue
            for a, b, old in list(pieces.overlapping(lo, hi)):
                if old > piece:  # split whole folios of `old`
                    a, b = max(a, lo // old * old), min(b, -(-hi // old) * old)
                    done.splits += (b - a) // old
                    done.vmemmap_restored += (b - a) // piece * self._vmemmap_kept(piece) - \
                        (b - a) // old * self._vmemmap_kept(old)
                    pieces.set(a, b, piece)
        return pieces, done

    def _simulate_merge(self, pieces: ExtentMap[int], done: Restructure, lo: int, hi: int,
                        piece: int) -> None:
        """The merge part of a plan entry: every `piece`-sized unit of [lo, hi) that
        holds smaller pieces becomes one folio of `piece` pages."""
        units: ExtentMap[bool] = ExtentMap()
        for a, b, old in pieces.overlapping(lo, hi):
            if old < piece:
                units.set(a // piece * piece, -(-b // piece) * piece, True)
        for x, y, _ in list(units.items()):
            kept = sum((b - a) // old * self._vmemmap_kept(old)
                       for a, b, old in pieces.overlapping(x, y))
            done.merges += (y - x) // piece
            done.vmemmap_freed += kept - (y - x) // piece * self._vmemmap_kept(piece)
            pieces.set(x, y, piece)

    def _affordable(self, plan: list[tuple[int, int, int]]) -> bool:
        _, done = self._simulate(plan)  # splits: merges always free memory
        return done.vmemmap_restored - done.vmemmap_freed <= self.vm.kvm.hugetlb.memory.free_bytes

    def _restructure(self, plan: list[tuple[int, int, int]], merge: bool = False) -> None:
        """Carry a plan out: splits (__split_folio_to_order) or, with `merge`, merges
        (prep_compound_page), each paying or freeing vmemmap, and counted."""
        pieces, done = self._simulate(plan, merge)
        r = self.restructure
        r.splits += done.splits
        r.merges += done.merges
        r.vmemmap_restored += done.vmemmap_restored
        r.vmemmap_freed += done.vmemmap_freed
        self.vm.kvm.hugetlb.memory.free_bytes -= done.vmemmap_restored - done.vmemmap_freed
        if self.spool is not None:
            self.spool.hstate.vmemmap_restored += done.vmemmap_restored - done.vmemmap_freed
        for a, b, piece in pieces.items():
            self.split.set(a, b, piece if piece < self.huge_pages else None)
            self._fit_leaves(a, b, piece)

    def _fit_leaves(self, first: int, last: int, piece: int) -> None:
        """Stage-2 leaves over folios split smaller than them are split to the new
        folio size first (the fixup "zap mappings before splitting" asks for: no
        mapping larger than its folio)."""
        for slot, g_lo, g_hi in list(self.bound_gfn_ranges(first, last)):
            mmu = slot.vm.mmu
            for lo, hi, level in list(mmu.levels.overlapping(g_lo, g_hi)):
                if level > piece:
                    mmu.levels.set(lo, hi, piece if piece > 1 else None)
                    mmu.leaf_splits += (hi - lo) // level

    def _unsplit_for_shared(self, runs: list[tuple[int, int]],
                            only_allocated: bool = True) -> list[tuple[int, int, int]]:
        """The splits that make the shared runs' pages 4 KiB folios: the whole huge
        pages they touch to order 0 (the WIP: no intermediate order), or, with
        `stepwise`, 1 GiB to 2 MiB and only the 2 MiB pieces they touch to 4 KiB."""
        if self.spool is None:
            return []
        plan = []
        touched = self._huge_pages_of(runs)
        if self.hugetlb_policy is HugetlbPolicy.STEPWISE and self.huge_pages > LEVEL_2M_PAGES:
            plan += [(a, b, LEVEL_2M_PAGES) for a, b in touched]
            touched = self._huge_pages_of(runs, LEVEL_2M_PAGES)
        plan += [(a, b, 1) for a, b in touched]
        if only_allocated:
            plan = [(x, y, piece) for a, b, piece in plan
                    for x, y in self._allocated_runs(a, b)]
        return [(a, b, piece) for a, b, piece in plan
                if any(old > piece for _, _, old in self._pieces(a, b))]

    def _allocated_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        """The allocated runs of [first, last), whatever the folios' states."""
        runs: list[tuple[int, int]] = []
        for a, b, _ in self.folios.overlapping(first, last):
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs

    def _merges_for_private(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """The merges of split folios around [first, last) that are private whole:
        2 MiB pieces first with `stepwise`, then whole huge pages."""
        if self.spool is None or not self.split.boundaries():
            return []
        lo, hi = self._huge_round_out(first, last)
        shared = _complement(self.private_ranges(lo, hi), lo, hi)
        plan = []
        sizes = [LEVEL_2M_PAGES] if (self.hugetlb_policy is HugetlbPolicy.STEPWISE
                                     and self.huge_pages > LEVEL_2M_PAGES) else []
        for size in sizes + [self.huge_pages]:
            mergeable: ExtentMap[bool] = ExtentMap()
            for a, b, piece in self.split.overlapping(lo, hi):
                if piece < size:
                    mergeable.set(a, b, True)
            for a, b in self._huge_pages_of(shared, size):  # a shared piece keeps it split
                mergeable.clear(a, b)
            plan += [(a, b, size) for a, b, _ in mergeable.items()]
        return plan

    def _huge_pages_of(self, runs: list[tuple[int, int]],
                       size: int | None = None) -> list[tuple[int, int]]:
        """The whole huge pages (or `size`-page pieces) the runs touch, merged."""
        unit = size or self.huge_pages
        out: list[tuple[int, int]] = []
        for lo, hi in runs:
            a, b = lo // unit * unit, min(-(-hi // unit) * unit, self.npages)
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out

    def _split_crossing_leaves(self, first: int, last: int) -> None:
        """kvm_split_cross_boundary_leafs: a huge stage-2 leaf crossing an end of
        [first, last) is split, as far as it takes for no leaf to cross it and none
        to exceed its folio: a 1 GiB leaf to 2 MiB leaves where the folio is at
        least 2 MiB there (stepwise's pieces, lazy's whole folio), the 2 MiB block
        around the boundary and split pieces to 4 KiB."""
        for slot, g_lo, g_hi in list(self.bound_gfn_ranges(first, last)):
            mmu, to_index = slot.vm.mmu, slot.gmem_pgoff - slot.base_gfn
            for point in (g_lo, g_hi):
                level = mmu.levels.get(point)
                if not level or not point % level or mmu.levels.get(point - 1) != level:
                    continue
                start = point // level * level
                leaves: list[tuple[int, int, int]] = []
                if level > LEVEL_2M_PAGES:
                    leaves = [(a - to_index, b - to_index, LEVEL_2M_PAGES) for a, b, piece
                              in self._pieces(start + to_index, start + level + to_index)
                              if piece >= LEVEL_2M_PAGES]
                mmu.split_leaf(start, level, leaves, point)

    def huge_mappable(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """kvm_gmem_mapping_order over the huge folios [first, last) touches: the
        ranges of folios that may be mapped whole at stage 2, with their size in
        base pages: allocated, at least 2 MiB (whole huge folios, or stepwise's
        2 MiB pieces) and private whole (the WIP maps a huge order only then;
        otherwise order 0)."""
        if self.spool is None:
            return []
        lo, hi = self._huge_round_out(first, last)
        shared = _complement(self.private_ranges(lo, hi), lo, hi)
        mappable: ExtentMap[int] = ExtentMap()
        for a, b, piece in self._pieces(lo, hi):
            if piece > 1:
                mappable.set(a, b, piece)
        for a, b in self.folios.gaps(lo, hi):
            mappable.clear(*self._huge_round_out(a, b))
        for piece in {piece for _, _, piece in mappable.items()}:  # per size, not per range
            for x, y in self._huge_pages_of(shared, piece):
                for a, b, size in list(mappable.overlapping(x, y)):
                    if size == piece:
                        mappable.clear(max(x, a), min(y, b))
        return list(mappable.items())

    def merge_for_truncate(self, first: int, last: int) -> None:
        """merge_truncate_range(require_merge=true) before PUNCH_HOLE: a split folio
        with a piece still referenced (pinned) cannot merge: EAGAIN, nothing done."""
        if self.spool is None or not self.split.boundaries():
            return
        ranges = [(a, b) for a, b, _ in self.split.overlapping(first, last)]
        for a, b in ranges:
            if self.pinned(*self._huge_round_out(a, b)):
                raise oserror(errno.EAGAIN, "fallocate(PUNCH_HOLE): a piece is pinned")
        self._restructure([(a, b, self.huge_pages) for a, b in ranges], merge=True)

    def guest_fault_restructure(self, first: int, last: int) -> None:
        """`lazy`: a guest fault merges the split folios of [first, last) that are
        private whole, so they can be mapped huge (merging at fault time, the
        RFC's TODO; our choice of where). Other policies merged at conversion."""
        if self.hugetlb_policy is HugetlbPolicy.LAZY:
            plan = self._merges_for_private(first, last)
            self._restructure(plan, merge=True)

    def memory_by_page_size(self) -> dict[int, int]:
        """Allocated bytes by folio size (4 KiB, 2 MiB, 1 GiB): what the pool's huge
        pages have become."""
        out = {PAGE: 0, LEVEL_2M_PAGES * PAGE: 0, (1 << 18) * PAGE: 0}
        for lo, hi, _ in self.folios.overlapping(0, self.npages):
            for a, b, piece in self._pieces(lo, hi):
                out[piece * PAGE] += (b - a) * PAGE
        return out

    def _initialised(self, first: int, last: int) -> list[tuple[int, int]]:
        """The runs of [first, last) whose folios are uptodate (hold anything)."""
        return [(lo, hi) for lo, hi, state in self.folios.overlapping(first, last)
                if state.uptodate]

    def _change_owner(self, first: int, last: int) -> None:
        """The series' arch callbacks kvm_arch_gmem_make_private / make_shared
        (v12, upstream-2026-11.md §1) on pages that changed owner: what the new
        owner reads is the VM type's Conversion (profile.py says what and why),
        or zero everywhere with seed 003's option. Only initialised folios hold
        anything; the rest are zeroed when first used (kvm_gmem_get_pfn)."""
        conversion = self.vm.kvm.profile.conversion_of(self.vm.vm_type_info)
        if conversion is Conversion.PRESERVE:
            return
        new = ZERO if conversion is Conversion.ZERO else Ciphertext(next(_conversion_keys))
        for lo, hi in self._initialised(first, last):
            self.store.set(lo, hi, new)
            if new is ZERO:
                self.restructure.zeroed += (hi - lo) * PAGE

    # --- memory errors (kvm_gmem_error_folio) ----------------------------------------------------
    def memory_failure(self, first: int, last: int) -> None:
        """Hardware memory errors in the folios of [first, last) (kvm_gmem_error_folio):
        zap their stage-2 mappings in every bound VM and their host PTEs, keep the
        folios (MF_DELAYED, no truncate) and mark them hwpoison; later guest faults
        get EHWPOISON, host faults SIGBUS, PUNCH_HOLE drops them (upstream.md §2.12).
        Indexes with no folio have no memory to fail: nothing happens there.
        On HugeTLB the unit is the folio (try_memory_failure_hugetlb poisons a
        hugetlb folio whole): one bad 4 KiB page costs the guest its whole 1 GiB
        folio, or only that page where a conversion split it. Our choice: no split
        on error (the WIP has none; splitting would need the vmemmap memory an
        error path cannot count on). The freed folio's fate: Hugetlb.gmem_free."""
        if self.spool is not None:  # HugeTLB poisons the folio the error is in
            first -= first % self._piece_at(first)
            last += -last % self._piece_at(last - 1)
        present = list(self.folios.overlapping(first, last))
        if not present:
            return
        vms = self._invalidate_begin(first, last)
        for m in self.mappings:
            m.zap(first, last)
        for lo, hi, state in present:
            self.folios.set(lo, hi, replace(state, hwpoison=True))
        for vm in vms:
            vm.mmu.invalidate_end()

    # --- host userspace faults (kvm_gmem_fault_user_mapping) ----------------------------------
    def fault(self, index: int, count: int, write: bool) -> str | None:
        if index + count > self.npages:
            return "beyond EOF"  # pgoff << PAGE_SHIFT >= i_size
        if self.private_ranges(index, index + count):  # ML: kvm_gmem_is_shared_mem
            return self._private_fault_reason()
        if self.poisoned(index, index + count) is not None:
            return "hwpoison"  # __do_fault: VM_FAULT_HWPOISON
        if not self.allocation_affordable(index, index + count, fault=True):
            return ("no clean huge page, or no memory for the vmemmap of a split "
                    "(our choice: SIGBUS)")
        plan = self._lazy_fault_plan(index, index + count)
        self.get_pages(index, index + count)  # fresh folios split as _fresh_plan says
        self._restructure(plan)
        if write:
            self.modified()
        return None

    def _lazy_fault_plan(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """`lazy`: a host fault on shared [first, last) splits the folios it maps
        into, as conversions did not."""
        if self.spool is None or self.hugetlb_policy is not HugetlbPolicy.LAZY:
            return []
        return self._unsplit_for_shared([(first, last)], only_allocated=False)

    def _private_fault_reason(self) -> str:
        """Why a host fault on private memory is SIGBUS, and what the VM type's
        hardware would have done had guest_memfd mapped the page (seed 001: on
        TDX "the guest could induce a #MC in the host")."""
        why = "KVM_SET_MEMORY_ATTRIBUTES2" if self.private or self.init_shared \
            else "no GUEST_MEMFD_FLAG_INIT_SHARED"
        access = self.vm.vm_type_info.host_private_access
        hardware = "" if access is HostPrivateAccess.SIGBUS else f"; in hardware: {access.value}"
        return f"private memory ({why}{hardware})"

    def modified(self) -> None:
        """file_update_time: mtime and ctime become now. kernel: guest_memfd.c
        kvm_gmem_fallocate (file_modified after any success) and mm/memory.c
        fault_dirty_shared_page (a write fault on a shared mapping without
        page_mkwrite). A read fault maps the page writable already (no write
        notify), so a later write does not fault: observed on 6.18.44, as is that
        guest writes and failed calls leave the times alone."""
        self.mtime_ns = time.time_ns()

    def remove(self, first: int, last: int) -> None:
        """MADV_REMOVE on a mapping: vfs_fallocate(PUNCH_HOLE|KEEP_SIZE) of the range
        (kvm_gmem_fallocate's checks: whole huge pages on HugeTLB, else EINVAL)."""
        if not self.huge_aligned(first, min(last, self.npages)):
            raise oserror(errno.EINVAL, "madvise(MADV_REMOVE): not whole huge pages")
        self.merge_for_truncate(first, last)
        for _ in self.punch_hole_path(first, last):
            pass
        self.modified()

    def unmapped(self, mapping: Mapping) -> None:
        self.mappings.discard(mapping)
        self._maybe_release()

    # --- PUNCH_HOLE (kvm_gmem_punch_hole) ---------------------------------------------------
    def punch_hole_path(self, first: int, last: int) -> Generator[str, None, None]:
        """invalidate_begin -> truncate -> invalidate_end, yielding where the kernel
        could be preempted between them (the explorer interleaves here)."""
        last = min(last, self.npages)
        if first >= last:
            return
        vms = self._invalidate_begin(first, last)
        yield "invalidate_begin"
        for m in self.mappings:  # truncate_inode_pages_range also zaps userspace PTEs
            m.zap(first, last)
        self._free(first, last)
        yield "truncated"
        for vm in vms:
            vm.mmu.invalidate_end()

    def _invalidate_begin(self, first: int, last: int) -> list[Vm]:
        """Zap stage-2 mappings of every memslot bound in [first, last): one
        invalidation and one TLB flush per VM, however many memslots the range
        spans (seed 000: batch TLB flushes across memslots)."""
        by_vm: dict[int, tuple[Vm, list[tuple[int, int]]]] = {}
        for lo, hi, slot in self.bindings.overlapping(first, last):
            gfn = slot.base_gfn + (lo - slot.gmem_pgoff)
            by_vm.setdefault(id(slot.vm), (slot.vm, []))[1].append((gfn, gfn + hi - lo))
        for vm, ranges in by_vm.values():
            vm.mmu.invalidate_begin(ranges)
        return [vm for vm, _ in by_vm.values()]

    def bound_gfn_ranges(self, first: int, last: int) -> Iterator[tuple[Any, int, int]]:
        for lo, hi, slot in self.bindings.overlapping(first, last):
            gfn = slot.base_gfn + (lo - slot.gmem_pgoff)
            yield slot, gfn, gfn + hi - lo

    # --- what the pages look like (memory_map) --------------------------------------------------
    def memory_map(self, first: int, last: int) -> MemoryMap:
        """Runs of alike pages in [first, last), from the extent maps (per range)."""
        flags: dict[str, list[tuple[int, int]]] = {p: [] for p in memmap.PROPERTIES}
        nodes = []
        for lo, hi, state in self.folios.overlapping(first, last):
            flags[memmap.ALLOCATED].append((lo, hi))
            if state.uptodate:
                flags[memmap.UPTODATE].append((lo, hi))
            if state.hwpoison:
                flags[memmap.HWPOISON].append((lo, hi))
            nodes.append((lo, hi, _describe_placement(state.placement, hi - lo)))
        flags[memmap.PINNED] = [(lo, hi) for lo, hi, _ in self.pins.overlapping(first, last)]
        for m in self.mappings:
            flags[memmap.HOST_MAPPED] += [(m.pgoff + lo, m.pgoff + hi)
                                          for lo, hi, _ in m.ptes.items()]
        in_place = self.vm.kvm.profile.gmem_in_place_conversion
        if in_place:  # the file's own attributes, bound or not (kvm_gmem_is_private)
            flags[memmap.PRIVATE] = self.private_ranges(first, last)
        for slot, gfn_lo, gfn_hi in self.bound_gfn_ranges(first, last):
            to_index = slot.gmem_pgoff - slot.base_gfn
            vm = slot.vm
            for lo, hi, attrs in ([] if in_place else vm.attributes.overlapping(gfn_lo, gfn_hi)):
                if attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
                    flags[memmap.PRIVATE].append((lo + to_index, hi + to_index))
            for lo, hi, source in vm.mmu.mapped.overlapping(gfn_lo, gfn_hi):
                if source is slot:  # an SPTE to this file's page, not through userspace_addr
                    flags[memmap.STAGE2_MAPPED].append((lo + to_index, hi + to_index))
        return MemoryMap(self.size, first, last, memmap.runs_of(first, last, flags, nodes),
                         frozenset(memmap.PROPERTIES))

    # --- release (kvm_gmem_release) ------------------------------------------------------------
    def close_fd(self) -> None:
        self.file_open = False
        self._maybe_release()

    def _maybe_release(self) -> None:
        """The last file reference is gone: unbind every memslot (they stay, dead),
        zap their stage-2 mappings, drop the VM reference; the inode dies with it
        and its folios are freed."""
        if self.released or self.file_open or self.forked_refs or self.mappings:
            return
        self.released = True
        vms = self._invalidate_begin(0, self.npages)
        for _, _, slot in list(self.bindings.items()):
            slot.gmem = None
        self.bindings = ExtentMap()
        for vm in vms:
            vm.mmu.invalidate_end()
        # require_merge=false: what can merge does; a folio with a pinned piece
        # stays split and waits for it (orphan_freed).
        mergeable: ExtentMap[bool] = ExtentMap()
        for a, b, _ in self.split.items():
            mergeable.set(a, b, True)
        for a, b, _ in self.pins.items():
            mergeable.clear(*self._huge_round_out(a, b))
        self._restructure([(a, b, self.huge_pages) for a, b, _ in mergeable.items()],
                          merge=True)
        self._free(0, self.npages)
        if self.spool is not None:
            self.vm.kvm.hugetlb.gmem_release(self.spool)
        self.process.backings.discard(self)
        self.vm.put_ref()


def _describe_placement(placement: Placement, pages: int) -> str:
    """"0", or "0,1 interleaved" when the range's pages cycle over several nodes."""
    nodes = placement.nodes if pages > 1 else placement.nodes[:1]
    if len(set(nodes)) == 1:
        return str(nodes[0])
    return ",".join(map(str, sorted(set(nodes)))) + " interleaved"


def _file_mmap_ok(pgoff: int, length: int) -> bool:
    """kernel: mm/mmap.c file_mmap_ok: the mapping must end within the largest
    file size (MAX_LFS_FILESIZE for a regular file such as guest_memfd's)."""
    if length > MAX_LFS_FILESIZE:
        return False
    return pgoff <= (MAX_LFS_FILESIZE - length) // PAGE


def _complement(runs: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """[first, last) minus the sorted, disjoint runs."""
    out, pos = [], first
    for lo, hi in runs:
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < last:
        out.append((pos, last))
    return out


def _with_gaps(items: Iterator[tuple[int, int, MemPolicy]], first: int,
               last: int) -> list[tuple[int, int, MemPolicy | None]]:
    """The extents of [first, last) in order, gaps as None (no policy)."""
    out: list[tuple[int, int, MemPolicy | None]] = []
    pos = first
    for lo, hi, policy in items:
        if lo > pos:
            out.append((pos, lo, None))
        out.append((lo, hi, policy))
        pos = hi
    if pos < last:
        out.append((pos, last, None))
    return out


_VFS_MODES = (uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_COLLAPSE_RANGE | uapi.FALLOC_FL_ZERO_RANGE
              | uapi.FALLOC_FL_INSERT_RANGE | uapi.FALLOC_FL_UNSHARE_RANGE
              | uapi.FALLOC_FL_WRITE_ZEROES)


def _vfs_mode_valid(mode: int) -> bool:
    """vfs_fallocate's mode switch (fs/open.c), as observed on 6.18: unknown bits,
    several modes at once, PUNCH_HOLE without KEEP_SIZE, or COLLAPSE/INSERT/
    WRITE_ZEROES with KEEP_SIZE are EOPNOTSUPP, before the EFBIG check."""
    if mode & ~(_VFS_MODES | uapi.FALLOC_FL_KEEP_SIZE):
        return False
    op, keep = mode & _VFS_MODES, bool(mode & uapi.FALLOC_FL_KEEP_SIZE)
    if op in (0, uapi.FALLOC_FL_UNSHARE_RANGE, uapi.FALLOC_FL_ZERO_RANGE):
        return True
    if op == uapi.FALLOC_FL_PUNCH_HOLE:
        return keep
    if op in (uapi.FALLOC_FL_COLLAPSE_RANGE, uapi.FALLOC_FL_INSERT_RANGE,
              uapi.FALLOC_FL_WRITE_ZEROES):
        return not keep
    return False  # more than one mode


@_args.checked
class GuestMemfd:
    """The file: what KVM_CREATE_GUEST_MEMFD returns (a model fd)."""

    def __init__(self, vm: Vm, inode: GmemInode) -> None:
        self.vm = vm
        self.inode = inode
        self._fd = vm.kvm.process.install(self, inode.close_fd)
        self.closed = False

    @property
    def fd(self) -> int:
        """The fd number; a closed object has none (as the host backend's _Fd)."""
        if self.closed:
            raise oserror(errno.EBADF, "closed")
        return self._fd

    def _live(self) -> GmemInode:
        if self.closed:  # as the host backend's _Fd: a closed object has no fd
            raise oserror(errno.EBADF, "closed")
        return self.inode

    def stat(self) -> os.stat_result:
        """fstat: what the kernel's inode says (kernel: fs/stat.c generic_fillattr
        of the guest_memfd inode). Observed on 6.18.44: a regular file, mode 0600,
        one link, the creator's uid/gid, st_blocks 0 whatever is allocated or
        faulted (guest_memfd never accounts i_blocks), atime fixed at creation,
        mtime = ctime moved by GmemInode.modified()."""
        inode = self._live()
        a, m = inode.created_ns, inode.mtime_ns
        return os.stat_result(
            (0o100600, inode.ino, ANON_INODE_DEV, 1, os.geteuid(), os.getegid(), inode.size,
             a // 10**9, m // 10**9, m // 10**9),
            {"st_atime": a / 1e9, "st_mtime": m / 1e9, "st_ctime": m / 1e9,
             "st_atime_ns": a, "st_mtime_ns": m, "st_ctime_ns": m,
             "st_blksize": PAGE, "st_blocks": 0, "st_rdev": 0})

    @property
    def size(self) -> int:
        """st_size: fixed at creation (kvm_gmem_setattr refuses changes)."""
        return self._live().size

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """vfs_fallocate then kvm_gmem_fallocate, checks in their order (upstream.md §2.4)."""
        inode = self._live()
        keep, punch = uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE
        if offset < 0 or length <= 0:
            raise oserror(errno.EINVAL, "fallocate")  # vfs_fallocate
        if not _vfs_mode_valid(mode):
            raise oserror(errno.EOPNOTSUPP, "fallocate")
        if offset + length > MAX_LFS_FILESIZE:
            raise oserror(errno.EFBIG, "fallocate")  # vfs: beyond s_maxbytes
        if not mode & keep or mode & ~(keep | punch):
            raise oserror(errno.EOPNOTSUPP, "fallocate")  # kvm_gmem_fallocate
        if offset % PAGE or length % PAGE:
            raise oserror(errno.EINVAL, "fallocate")  # kvm_gmem_fallocate: PAGE_ALIGNED
        first, last = offset // PAGE, (offset + length) // PAGE
        if not inode.huge_aligned(first, last):
            raise oserror(errno.EINVAL, "fallocate: not whole huge pages")  # the WIP branch
        if mode & punch:
            inode.merge_for_truncate(first, last)
            for _ in inode.punch_hole_path(first, last):  # run to completion
                pass
        elif offset + length > inode.size:  # kvm_gmem_allocate: "immutable by default"
            raise oserror(errno.EINVAL, "fallocate")
        elif not inode.allocation_affordable(first, last):  # a page, eager-4k's splits
            raise oserror(errno.ENOMEM, "fallocate: no clean huge page or no vmemmap")
        else:
            inode._allocate(first, last)  # allocation does not zero (upstream.md §2.11)
        inode.modified()

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE) (kvm_gmem_allocate)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) (kvm_gmem_punch_hole)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, offset, length)

    # File operations guest_memfd does not have (upstream.md §2.3).
    def read(self, n: int) -> bytes:
        """read(2): EINVAL (kvm_gmem_fops has no read_iter)."""
        self._live()
        raise oserror(errno.EINVAL, "read")  # no read_iter

    def write(self, data: bytes) -> int:
        """write(2): EINVAL (kvm_gmem_fops has no write_iter)."""
        self._live()
        raise oserror(errno.EINVAL, "write")  # no write_iter

    def pread(self, n: int, offset: int) -> bytes:
        """ksys_pread64: a negative pos is EINVAL before the file is asked; then
        no FMODE_PREAD (guest_memfd has no llseek) is ESPIPE."""
        self._live()
        raise oserror(errno.EINVAL if offset < 0 else errno.ESPIPE, "pread64")

    def pwrite(self, data: bytes, offset: int) -> int:
        """ksys_pwrite64: as pread."""
        self._live()
        raise oserror(errno.EINVAL if offset < 0 else errno.ESPIPE, "pwrite64")

    def lseek(self, offset: int, whence: int) -> int:
        """ksys_lseek: whence beyond SEEK_MAX is EINVAL; vfs_llseek: no FMODE_LSEEK
        (no llseek in kvm_gmem_fops) is ESPIPE, whatever the offset (observed)."""
        self._live()
        raise oserror(errno.EINVAL if not 0 <= whence <= SEEK_MAX else errno.ESPIPE, "lseek")

    def ftruncate(self, length: int) -> None:
        """ftruncate(2): EINVAL (kvm_gmem_setattr: the size is immutable)."""
        self._live()
        raise oserror(errno.EINVAL, "ftruncate")  # kvm_gmem_setattr: size is immutable

    def ioctl(self, request: int, arg: int = 0) -> int:
        """ioctl(2) on the file: ENOTTY (mainline kvm_gmem_fops has no unlocked_ioctl;
        the series' kvm_gmem_ioctl knows only KVM_SET_MEMORY_ATTRIBUTES2). That one,
        by number, reads its struct from `arg`, which the model has no user memory
        behind: EFAULT (copy_from_user); set_memory_attributes2 is the way in."""
        self._live()
        if request == uapi.KVM_SET_MEMORY_ATTRIBUTES2 and \
                self.vm.kvm.profile.gmem_in_place_conversion:
            raise oserror(errno.EFAULT, "KVM_SET_MEMORY_ATTRIBUTES2")
        raise oserror(errno.ENOTTY, "ioctl")

    def set_memory_attributes2(self, offset: int, size: int, attributes: int,
                               flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 (kernel: the in-place conversion series'
        kvm_gmem_ioctl and kvm_gmem_set_attributes, upstream.md §7.1): ENOTTY before
        the struct is read while in-place conversion is off (and on mainline, which
        has no unlocked_ioctl); then EINVAL checks in the kernel's order. A failure
        carries error_offset (EAGAIN: the first pinned page; else 0, as passed)."""
        inode = self._live()
        name = "KVM_SET_MEMORY_ATTRIBUTES2"
        if not self.vm.kvm.profile.gmem_in_place_conversion:
            raise oserror(errno.ENOTTY, name)
        if flags:
            reason = "flags"
        elif not self.vm.vm_type_info.has_private_mem:  # kvm_arch_has_private_mem(f->kvm)
            reason = "VM without private memory"
        elif attributes & ~uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            reason = "attributes"
        elif size == 0 or offset + size >= 1 << 64:
            reason = "range"
        elif offset % PAGE or size % PAGE:
            reason = "alignment"
        elif offset >= inode.size or offset + size > inode.size:
            reason = "beyond i_size"
        else:
            inode.set_private(offset // PAGE, (offset + size) // PAGE, bool(attributes))
            return
        error = oserror(errno.EINVAL, f"{name} {reason}")
        error.error_offset = 0  # type: ignore[attr-defined]
        raise error

    def set_hugetlb_policy(self, policy: str) -> None:
        """Select when this HugeTLB file splits and merges its folios (HugetlbPolicy:
        "dynamic", "eager-4k", "stepwise", "lazy"); a model extension, with no
        kernel call. EINVAL on a file without HugeTLB backing, EBUSY once it has
        folios (our choices: a policy holds from the first allocation)."""
        inode = self._live()
        chosen = HugetlbPolicy(policy)  # ValueError names an unknown one
        if inode.spool is None:
            raise oserror(errno.EINVAL, "HugeTLB policy of a guest_memfd without HugeTLB")
        if inode.folios.boundaries():
            raise oserror(errno.EBUSY, "HugeTLB policy of a guest_memfd with folios")
        inode.hugetlb_policy = chosen

    def set_conversion_policy(self, policy: str) -> None:
        """Select seed 004's design for this file (ConversionPolicy: "per-page",
        "whole-file", "no-get-pfn-while-mapped", "rmap-switch"); a model extension,
        with no kernel call. Only while nothing maps or pins it (EBUSY), and only
        where conversion is in place (ENOTTY, as KVM_SET_MEMORY_ATTRIBUTES2)."""
        inode = self._live()
        chosen = ConversionPolicy(policy)  # ValueError names an unknown one
        if not self.vm.kvm.profile.gmem_in_place_conversion:
            raise oserror(errno.ENOTTY, "conversion policy without in-place conversion")
        if inode.mappings or inode.pins.boundaries():
            raise oserror(errno.EBUSY, "conversion policy of a mapped or pinned guest_memfd")
        inode.conversion_policy = chosen

    def mmap(self, length: int | None = None, offset: int = 0, prot: int = 3,
             shared: bool = True, align: int = 0) -> Mapping:
        """mmap(2) of the file, checks in the kernel's order: sys_mmap (offset),
        do_mmap (length, placement, file_mmap_ok, noexec), kvm_gmem_mmap; `align`
        places it at a multiple of align (api.GuestMemfd.mmap)."""
        inode = self._live()
        length = inode.size if length is None else length
        if offset % PAGE:
            raise oserror(errno.EINVAL, "mmap")  # arch sys_mmap: off & ~PAGE_MASK
        process = self.vm.kvm.process
        addr = process.get_unmapped_area(length, align)
        if not _file_mmap_ok(offset // PAGE, page_align(length)):
            raise oserror(errno.EOVERFLOW, "mmap")
        if prot & PROT_EXEC:
            raise oserror(errno.EPERM, "mmap")  # do_mmap: the mount is noexec
        accountable = not shared and prot & PROT_WRITE  # mmap_region: accountable_mapping
        if accountable and not process.vm_enough_memory(page_align(length) // PAGE):
            raise oserror(errno.ENOMEM, "mmap: overcommit")
        if not inode.mmap_supported:
            raise oserror(errno.ENODEV, "mmap")  # kvm_gmem_mmap
        if not shared:
            raise oserror(errno.EINVAL, "mmap")  # "Copy-on-write not allowed"
        if inode.whole_file:  # seed 004 item 1: all or nothing, at most one mapping
            if offset or page_align(length) != inode.size:
                raise oserror(errno.EINVAL, "mmap: whole-file guest_memfd")
            if inode.mappings:
                raise oserror(errno.EBUSY, "mmap: whole-file guest_memfd is mapped")
        return process.map(addr, length, inode, offset, prot)

    def memory_map(self, offset: int = 0, length: int | None = None) -> MemoryMap:
        """What the pages of [offset, offset+length) look like (guestmem's view;
        the kernel has no one call for it): runs of alike pages."""
        inode = self._live()
        length = inode.size - offset if length is None else length
        if offset < 0 or length < 0 or offset % PAGE or length % PAGE \
                or offset + length > inode.size:
            raise ValueError(f"[{offset:#x}, +{length:#x}) is not a page-aligned range of "
                             f"the {inode.size:#x}-byte file")
        return inode.memory_map(offset // PAGE, (offset + length) // PAGE)

    def inherit(self) -> Callable[[], None]:
        """fork(2) gives the child this fd (dup_fd: get_file); the returned call is
        the child's fput when it exits."""
        inode = self.inode
        inode.forked_refs += 1

        def fput() -> None:
            inode.forked_refs -= 1
            inode._maybe_release()
        return fput

    def close(self) -> None:
        """close(2) of the file (kvm_gmem_release once its mappings are gone too)."""
        if not self.closed:
            self.closed = True
            self.vm.kvm.process.release_fd(self._fd)
            self.inode.close_fd()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
