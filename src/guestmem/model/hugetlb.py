"""HugeTLB pools and hugetlbfs, as the kernel keeps them (mm/hugetlb.c, fs/hugetlbfs/inode.c).

Physical memory below guest_memfd (issue 10): per page size an hstate with the
counters of /sys/kernel/mm/hugepages/hugepages-<size>kB/, subpools of hugetlbfs
mounts (size=, min_size=), and files whose reservations live in a resv_map per
inode. Everything is kept per range of huge page indexes (ExtentMap), never per
page. Only MAP_SHARED mappings exist here (what guest memory uses); MAP_PRIVATE's
per-VMA reservations and COW are not modelled.

Where the kernel's counters move, the function that moves them is named; the
differential test (tests/test_hugetlb_differential.py) holds the model to this
host's kernel, step by step.
"""

from __future__ import annotations

import errno
import itertools
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from guestmem import _args, uapi
from guestmem.api import HugetlbCounters
from guestmem.exits import HostSigbus, oserror
from guestmem.extents import ExtentMap

PAGE = 4096
SIZE_2M, SIZE_1G = 2 << 20, 1 << 30
STRUCT_PAGE = 64  # sizeof(struct page): what vmemmap holds per base page
MADV_DONTNEED, MADV_REMOVE = 4, 9
PROT_RW = 3
_ULONG = (1 << 64) - 1
_END = 1 << 62  # "to the end of the file" (LLONG_MAX in huge pages, for extent maps)
_addresses = itertools.count(0x7F00_0000_0000, SIZE_1G)  # each mapping its own 1 GiB slot


@dataclass
class Hstate:
    """One huge page size's pool (struct hstate): its counters, and how many more
    pages the buddy allocator could still give it (None: as many as memory allows)."""

    page_size: int
    nr: int = 0
    free: int = 0
    resv: int = 0
    surplus: int = 0
    overcommit: int = 0
    # Free pages with hwpoison: counted in free, never dequeued again
    # (dequeue_hugetlb_folio_node_exact skips them) until the pool shrinks.
    hwpoisoned: int = 0
    # Vmemmap bytes splits of in-use folios restored (hugetlb_vmemmap_restore_folio)
    # and merges have not freed again.
    vmemmap_restored: int = 0

    @property
    def gigantic(self) -> bool:
        """hstate_is_gigantic: above MAX_PAGE_ORDER, no surplus pages at runtime."""
        return self.page_size > SIZE_2M

    @property
    def persistent(self) -> int:
        """persistent_huge_pages: the pool without its surplus."""
        return self.nr - self.surplus

    def available(self) -> int:
        """available_huge_pages: free pages no reservation has claimed."""
        return self.free - self.resv

    def counters(self) -> HugetlbCounters:
        return HugetlbCounters(self.nr, self.free, self.resv, self.surplus, self.overcommit)


@dataclass
class Subpool:
    """struct hugepage_subpool of a hugetlbfs mount: max_hpages (size=), min_hpages
    (min_size=), -1 where not given; used_hpages, rsv_hpages."""

    hstate: Hstate
    max: int
    min: int
    used: int = 0
    rsv: int = 0
    handle: bool = True  # spool->count: the mount or inode still holds it

    def get_pages(self, delta: int) -> int | None:
        """hugepage_subpool_get_pages: charge delta pages; how many of them need a
        global reservation (the subpool's own minimum covers the rest); None when
        max_hpages would be exceeded (-ENOMEM)."""
        if self.max != -1:
            if self.used + delta > self.max:
                return None
            self.used += delta
        if self.min != -1 and self.rsv:
            if delta > self.rsv:
                need, self.rsv = delta - self.rsv, 0
                return need
            self.rsv -= delta
            return 0
        return delta

    def is_free(self) -> bool:
        """subpool_is_free (the mount's own handle gone): no page used where size=
        bounds it, else its reserve back at the minimum."""
        if self.max != -1:
            return self.used == 0
        if self.min != -1:
            return self.rsv == self.min
        return True

    def put_pages_each(self, pages: int) -> int:
        """put_pages(1) `pages` times, in closed form (free_huge_folio's per page):
        the ones freed while used stays at or above the minimum drop their global
        reservation each; the rest go back to the minimum as put_pages(n) does."""
        above = 0
        if self.max != -1 and self.min != -1:
            above = max(0, min(pages, self.used - self.min))
        return (self.put_pages(above) if above else 0) + self.put_pages(pages - above)

    def put_pages(self, delta: int) -> int:
        """hugepage_subpool_put_pages: uncharge delta pages; how many global
        reservations to drop (those the subpool's minimum does not keep)."""
        ret = delta
        if self.max != -1:
            self.used -= delta
        if self.min != -1 and self.used < self.min:
            ret = 0 if self.rsv + delta <= self.min else self.rsv + delta - self.min
            self.rsv = min(self.rsv + delta, self.min)
        return ret


class PhysicalMemory:
    """The buddy allocator as HugeTLB sees it: bytes free to become huge pages, and
    per size how many pages fragmentation still lets it assemble (this host: no
    1 GiB page at all)."""

    def __init__(self, free_bytes: int, obtainable: dict[int, int | None] | None = None) -> None:
        self.free_bytes = free_bytes
        self.obtainable = dict(obtainable or {})

    def take(self, page_size: int, pages: int = 1) -> int:
        """alloc_fresh_hugetlb_folio / alloc_surplus_hugetlb_folio's buddy allocation,
        up to `pages` of them: how many it could have."""
        got = max(0, min(pages, self.free_bytes // page_size))
        left = self.obtainable.get(page_size)
        if left is not None:
            got = min(got, left)
            self.obtainable[page_size] = left - got
        self.free_bytes -= got * page_size
        return got

    def give(self, page_size: int, pages: int = 1) -> None:
        """update_and_free_hugetlb_folio: the pages go back to the buddy allocator."""
        self.free_bytes += pages * page_size
        left = self.obtainable.get(page_size)
        if left is not None:
            self.obtainable[page_size] = left + pages


@_args.checked
class Hugetlb:
    """The model's HugeTLB (api.Hugetlb): pools of 2 MiB and 1 GiB pages over
    `memory`. By default: 24 GiB free, 1 GiB pages as obtainable as any."""

    def __init__(self, memory: PhysicalMemory | None = None) -> None:
        self.memory = memory or PhysicalMemory(24 << 30)
        self.hstates = {size: Hstate(size) for size in (SIZE_2M, SIZE_1G)}
        self.hvo = False  # vm.hugetlb_optimize_vmemmap
        # Work queued for later (the WIP's "hugetlb_restructuring" workqueue): the
        # counters lag until settle() runs it.
        self.deferred: list[Callable[[], None]] = []

    @property
    def page_sizes(self) -> tuple[int, ...]:
        """The sizes with a pool (hugetlb_add_hstate at boot)."""
        return tuple(self.hstates)

    def hstate(self, page_size: int) -> Hstate:
        h = self.hstates.get(page_size)
        if h is None:
            raise oserror(errno.EINVAL, f"no hstate of {page_size:#x} bytes")
        return h

    def counters(self, page_size: int) -> HugetlbCounters:
        """The sysfs counters of one size (hugepages-<size>kB)."""
        return self.hstate(page_size).counters()

    def adopt(self, page_size: int, counters: HugetlbCounters) -> None:
        """Start the pool from another machine's counters (the differential test
        begins where the host's pool is): free pages are taken from memory."""
        h = self.hstate(page_size)
        need = counters.nr - h.nr
        if need > 0 and self.memory.take(page_size, need) < need:
            raise oserror(errno.ENOMEM, "adopt: not enough model memory")
        h.nr, h.free, h.resv = counters.nr, counters.free, counters.resv
        h.surplus, h.overcommit = counters.surplus, counters.overcommit

    # --- the pool ---------------------------------------------------------------------------
    def set_nr_hugepages(self, page_size: int, count: int) -> int:
        """set_max_huge_pages: grow by turning surplus pages persistent, then from the
        buddy allocator while it gives; shrink by freeing free pages (never the ones
        in use or reserved), and turn what must stay into surplus."""
        h = self.hstate(page_size)
        if count < 0:
            raise oserror(errno.EINVAL, "nr_hugepages")
        if count > h.persistent:  # adjust_pool_surplus(h, nodes, -1), page by page
            h.surplus -= min(h.surplus, count - h.persistent)
        if count > h.persistent:  # alloc_pool_huge_folio while the buddy gives
            got = self.memory.take(page_size, count - h.persistent)
            h.nr += got
            h.free += got
        # unsigned long arithmetic: a resv an accounting slip took below zero makes
        # this huge, and the pool cannot shrink (seen on this host).
        min_count = max(count, (h.resv + h.nr - h.free) & _ULONG)
        if min_count < h.persistent:  # remove_pool_hugetlb_folio while one is free
            self._remove_free_pages(h, min(h.persistent - min_count, h.free))
        if count < h.persistent:  # adjust_pool_surplus(h, nodes, +1): freed later
            h.surplus += h.persistent - count
        return h.nr

    def set_nr_overcommit_hugepages(self, page_size: int, count: int) -> None:
        """nr_overcommit_hugepages_store: EINVAL for a gigantic size (no surplus
        there, even a 0 is refused: observed) or a negative count."""
        h = self.hstate(page_size)
        if count < 0 or h.gigantic:
            raise oserror(errno.EINVAL, "nr_overcommit_hugepages")
        h.overcommit = count

    def _remove_free_pages(self, h: Hstate, pages: int) -> None:
        """remove_pool_hugetlb_folio + update_and_free_hugetlb_folio, `pages` times;
        poisoned pages first (our choice of order: enqueue puts a freed page at the
        head of its list), each dissolved with its bad base page kept out of the
        buddy allocator."""
        poisoned = min(pages, h.hwpoisoned)
        h.hwpoisoned -= poisoned
        h.nr -= pages
        h.free -= pages
        self.memory.give(h.page_size, pages - poisoned)
        self.memory.free_bytes += poisoned * (h.page_size - PAGE)

    def _alloc_surplus(self, h: Hstate, pages: int = 1) -> int:
        """alloc_surplus_hugetlb_folio up to `pages` times: never gigantic, never beyond
        the overcommit, only while the buddy gives; how many it made."""
        if h.gigantic or h.surplus >= h.overcommit:
            return 0
        got = self.memory.take(h.page_size, min(pages, h.overcommit - h.surplus))
        h.nr += got
        h.surplus += got
        return got

    def acct_memory(self, h: Hstate, delta: int) -> bool:
        """hugetlb_acct_memory: reserve delta pages (gather_surplus_pages: surplus
        pages from the buddy for what the free pages lack, all or none; then
        refused if delta exceeds the free pages, allowed_mems_nr, whatever the
        reservations: found by reserving past a resv below zero on this host), or
        release -delta (return_unused_surplus_pages: free surplus pages go back)."""
        if delta > 0:
            needed = h.resv + delta - h.free
            if needed > 0:
                gathered = self._alloc_surplus(h, needed)
                h.free += gathered  # enqueued in the pool
                if gathered < needed:  # all or none: they go back
                    h.surplus -= gathered
                    self._remove_free_pages(h, gathered)
                    return False
            h.resv += delta
            if delta > h.free:  # allowed_mems_nr: never more than the free pages at once
                self.acct_memory(h, -delta)  # return_unused_surplus_pages
                return False
        elif delta < 0:
            h.resv += delta
            back = min(-delta, h.surplus, h.free)
            h.surplus -= back
            self._remove_free_pages(h, back)
        return True

    def alloc_page(self, h: Hstate, reserved: bool) -> bool:
        """alloc_hugetlb_folio's pool side: a reserved page takes a free one and its
        reservation (resv--); an unreserved one needs a free page no reservation
        claims, else a surplus page straight from the buddy allocator."""
        if reserved:
            return self.take_reserved(h, 1) == 1
        if h.available() > 0 and h.free > h.hwpoisoned:  # dequeue_hugetlb_folio_vma
            h.free -= 1
            return True
        return self._alloc_surplus(h) == 1

    def take_reserved(self, h: Hstate, pages: int) -> int:
        """`pages` allocations that each consume a reservation (resv--): a clean free
        page (dequeue_hugetlb_folio_vma skips hwpoison), else a surplus page from
        the buddy allocator (alloc_buddy_hugetlb_folio_with_mpol, within the
        overcommit), which a reservation whose page went away needs (a surplus
        page freed under a subpool's minimum: seen on this host). How many."""
        clean = max(0, min(pages, h.free - h.hwpoisoned))
        h.free -= clean
        done = clean + self._alloc_surplus(h, pages - clean) if pages > clean else clean
        h.resv -= done
        return done

    def free_pages(self, h: Hstate, spool: Subpool | None, pages: int) -> None:
        """free_huge_folio of `pages` page-cache pages: the subpool gets each back (its
        minimum may turn it into a reservation again: restore_reserve), and a
        surplus page leaves the pool, the rest are free in it."""
        if spool is not None:
            h.resv += pages - spool.put_pages_each(pages)
        gone = min(pages, h.surplus)
        h.surplus -= gone
        h.nr -= gone
        self.memory.give(h.page_size, gone)
        h.free += pages - gone

    # --- guest_memfd's subpools (the HugeTLB WIP branch, upstream-2026-11.md §2) ------------
    def hstate_of_order(self, order: int) -> Hstate | None:
        """gmem_hugetlb_valid_order: the hstate of 2**order base pages, if any."""
        return self.hstates.get(PAGE << order)

    def gmem_subpool(self, h: Hstate, pages: int) -> Subpool:
        """kvm_gmem_create: a subpool with min = max = the file's huge pages, all
        reserved now, never from surplus (RFC patch 10: "create new subpool without
        using surplus"); ENOMEM, nothing reserved, if the pool lacks them."""
        if h.available() < pages:
            raise oserror(errno.ENOMEM, "KVM_CREATE_GUEST_MEMFD: HugeTLB pool")
        h.resv += pages
        return Subpool(h, pages, pages, rsv=pages)

    def gmem_obtainable(self, spool: Subpool) -> int:
        """How many folios alloc_hugetlb_folio can give a guest_memfd now: free pages
        without hwpoison (dequeue_hugetlb_folio_vma), then surplus pages from the
        buddy allocator (alloc_buddy_hugetlb_folio_with_mpol; none for gigantic
        sizes or beyond the overcommit)."""
        h = spool.hstate
        left = self.memory.obtainable.get(h.page_size)  # what fragmentation still allows
        surplus = 0 if h.gigantic else max(0, min(
            h.overcommit - h.surplus, self.memory.free_bytes // h.page_size,
            left if left is not None else h.overcommit))
        return h.free - h.hwpoisoned + surplus

    def gmem_alloc(self, spool: Subpool, pages: int) -> None:
        """alloc_hugetlb_folio from a guest_memfd's subpool, `pages` at once: its
        minimum covers every one (gbl_chg 0), so each takes a reservation and a
        clean free page, or a surplus one where only poisoned pages are free (the
        caller checked gmem_obtainable)."""
        assert spool.get_pages(pages) == 0, "a guest_memfd's subpool reserves every page"
        h = spool.hstate
        clean = min(pages, h.free - h.hwpoisoned)
        h.resv -= pages
        h.free -= clean
        if pages > clean:
            assert self._alloc_surplus(h, pages - clean) == pages - clean

    def gmem_free(self, spool: Subpool, pages: int, poisoned: int = 0) -> None:
        """free_huge_folio of `pages` of a guest_memfd's folios: the subpool's minimum
        takes each back as a reservation (restore_reserve), the page is free again
        (free_huge_folio does not look at hwpoison: a poisoned page is enqueued
        and counted free, but never handed out again); the last one out releases a
        subpool its inode let go."""
        h = spool.hstate
        h.resv += pages - spool.put_pages_each(pages)
        h.free += pages
        h.hwpoisoned += poisoned
        if not spool.handle and spool.used == 0:
            self.acct_memory(h, -spool.min)

    def gmem_release(self, spool: Subpool) -> None:
        """The inode lets its subpool go (hugepage_put_subpool): released, with the
        reservations its minimum held, once no folio of it is in use
        (unlock_or_release_subpool, subpool_is_free: used_hpages == 0); a folio
        whose pieces outlive the inode keeps it until it comes back."""
        spool.handle = False
        if spool.used == 0:
            self.acct_memory(spool.hstate, -spool.min)

    def defer(self, work: Callable[[], None]) -> None:
        """queue_work on the restructuring workqueue."""
        self.deferred.append(work)

    def settle(self) -> None:
        """Run the deferred work (api.Hugetlb.settle): the worker's merges and
        frees; the counters stop moving."""
        while self.deferred:
            self.deferred.pop(0)()

    # --- files ----------------------------------------------------------------------------------
    def memfd_create(self, page_size: int) -> HugetlbFile:
        """memfd_create(MFD_HUGETLB | MFD_HUGE_*): a file on the size's internal
        hugetlbfs mount, which has no subpool (hugetlb_file_setup)."""
        return HugetlbFile(self, self.hstate(page_size), None)

    def mount(self, page_size: int, size: int | None = None,
              min_size: int | None = None) -> HugetlbMount:
        """mount -t hugetlbfs -o pagesize=,size=,min_size= (hugetlbfs_fill_super):
        min above max is EINVAL; a subpool with a minimum reserves it now, ENOMEM
        when the pool cannot (hugepage_new_subpool)."""
        h = self.hstate(page_size)
        max_pages = -1 if size is None else size // page_size  # hugetlbfs_size_to_hpages
        min_pages = -1 if min_size is None else min_size // page_size
        if max_pages != -1 and min_pages > max_pages:
            raise oserror(errno.EINVAL, "mount hugetlbfs: min_size > size")
        spool = None
        if max_pages != -1 or min_pages != -1:
            if min_pages != -1 and not self.acct_memory(h, min_pages):
                raise oserror(errno.ENOMEM, "mount hugetlbfs: min_size")
            spool = Subpool(h, max_pages, min_pages, rsv=max(min_pages, 0))
        return HugetlbMount(self, h, spool)

    def report(self) -> dict[str, dict[str, int]]:
        """The counters by sysfs directory name, and /proc/meminfo's HugeTLB lines."""
        out = {f"hugepages-{size // 1024}kB": vars(h.counters()) for size, h in
               self.hstates.items()}
        h2m = self.hstates[SIZE_2M]
        out["meminfo"] = {"HugePages_Total": h2m.nr, "HugePages_Free": h2m.free,
                          "HugePages_Rsvd": h2m.resv, "HugePages_Surp": h2m.surplus,
                          "Hugepagesize": SIZE_2M // 1024,
                          "Hugetlb": sum(h.nr * h.page_size for h in self.hstates.values())
                          // 1024}
        return out

    def vmemmap_bytes(self, page_size: int) -> int:
        """The struct pages behind the pool's pages: page_size/4096 * 64 bytes each;
        with HVO (hugetlb_optimize_vmemmap) all but one vmemmap page per huge page
        are freed: 7 of 8 for 2 MiB, 4095 of 4096 for 1 GiB (vmemmap_dedup.rst);
        plus what splitting guest_memfd folios restored."""
        h = self.hstate(page_size)
        per_page = page_size // PAGE * STRUCT_PAGE
        return h.nr * (PAGE if self.hvo else per_page) + h.vmemmap_restored


@_args.checked
class HugetlbMount:
    """A hugetlbfs mount (api.HugetlbMount): its subpool; close() unmounts."""

    def __init__(self, hugetlb: Hugetlb, h: Hstate, spool: Subpool | None) -> None:
        self.hugetlb, self.h, self.spool = hugetlb, h, spool
        self.files: set[HugetlbFile] = set()
        self.mounted = True

    def create(self) -> HugetlbFile:
        """open(O_CREAT) of a new file on the mount (unlinked at once)."""
        if not self.mounted:
            raise oserror(errno.ENOENT, "open: not mounted")
        file = HugetlbFile(self.hugetlb, self.h, self.spool, self)
        self.files.add(file)
        return file

    def close(self) -> None:
        """umount(2): EBUSY while a file on it is open or mapped; then the subpool
        goes, with its minimum's reservation, if it is free (unlock_or_release_subpool,
        subpool_is_free); a subpool that is not stays, and so does that reservation."""
        if not self.mounted:
            return
        if any(not f.evicted for f in self.files):
            raise oserror(errno.EBUSY, "umount hugetlbfs")
        self.mounted = False
        if self.spool is not None and self.spool.min != -1 and self.spool.is_free():
            # Releases all of min_hpages, whatever rsv_hpages holds: after a failed
            # hugetlb_reserve_pages on a size=+min_size= mount rsv can be below the
            # minimum, and resv_huge_pages goes below zero (reproduced on this host:
            # tests/test_model_hugetlb.py, README "HugeTLB").
            self.hugetlb.acct_memory(self.h, -self.spool.min)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@_args.checked
class HugetlbFile:
    """A hugetlbfs inode and its one fd (api.HugetlbFile). `pages`: huge page
    indexes in the page cache; `resv_map`: indexes with a reservation, used or not
    (the inode's resv_map regions)."""

    def __init__(self, hugetlb: Hugetlb, h: Hstate, spool: Subpool | None,
                 mount: HugetlbMount | None = None) -> None:
        self.hugetlb, self.h, self.spool, self.mount = hugetlb, h, spool, mount
        self.i_size = 0
        self.pages: ExtentMap[bool] = ExtentMap()
        self.resv_map: ExtentMap[bool] = ExtentMap()
        self.mappings: set[HugetlbMapping] = set()
        self.fd_open = True
        self.evicted = False

    @property
    def size(self) -> int:
        """st_size (i_size)."""
        return self.i_size

    def _live(self, what: str) -> None:
        if not self.fd_open:
            raise oserror(errno.EBADF, what)

    @property
    def npages(self) -> int:
        """Whole huge pages below i_size: what a fault may reach (hugetlb_fault)."""
        return self.i_size // self.h.page_size

    # --- reservations and pages ------------------------------------------------------------
    def reserve(self, first: int, last: int) -> bool:
        """hugetlb_reserve_pages for a shared mapping: what [first, last) lacks in the
        resv_map is charged to the subpool and reserved globally, or nothing is."""
        chg = (last - first) - self.resv_map.covered(first, last)
        gbl = chg if self.spool is None else self.spool.get_pages(chg)
        if gbl is None:
            return False
        if not self.hugetlb.acct_memory(self.h, gbl):
            if self.spool is not None:
                self._put_back(self.spool, chg, gbl)
            return False
        self.resv_map.set(first, last, True)  # region_add
        return True

    def _put_back(self, spool: Subpool, chg: int, gbl: int) -> None:
        """hugetlb_reserve_pages' out_put_pages: the pages the subpool's minimum
        covered go back to it (a833a693a490, "fix incorrect fallback for
        subpool"), and used_hpages forgets the ones the global reservation refused
        ("restore failed global reservations to subpool", a stable fix)."""
        if chg - gbl:
            self.hugetlb.acct_memory(self.h, -spool.put_pages(chg - gbl))
        if gbl and spool.max != -1:
            spool.used -= gbl

    def allocate(self, index: int) -> bool:
        """alloc_hugetlb_folio for page index, then hugetlb_add_to_page_cache."""
        return self.allocate_run(index, index + 1) == 1

    def allocate_run(self, first: int, last: int) -> int:
        """alloc_hugetlb_folio for each missing page of [first, last) in order, as
        hugetlbfs_fallocate does, in closed form per run: how many pages from
        `first` on are in the page cache afterwards (it stops at the first failure).
        A reservation in the resv_map is consumed; else the subpool is charged and
        an unclaimed free or surplus page taken, the region committed."""
        runs = sorted([(lo, hi, True) for lo, hi, _ in self.resv_map.overlapping(first, last)]
                      + [(lo, hi, False) for lo, hi in self.resv_map.gaps(first, last)])
        for lo, hi, reserved in runs:
            for a, b in list(self.pages.gaps(lo, hi)):
                done = (self.hugetlb.take_reserved(self.h, b - a) if reserved
                        else self._allocate_unreserved(b - a))
                self.pages.set(a, a + done, True)
                self.resv_map.set(a, a + done, True)  # vma_commit_reservation: region_add
                if done < b - a:
                    return a + done - first
        return last - first

    def _allocate_unreserved(self, pages: int) -> int:
        """`pages` allocations with no reservation in the resv_map, one after another
        (alloc_hugetlb_folio with map_chg): the subpool is charged per page; what
        its minimum covers takes a reserved page, the rest an unclaimed free page,
        then a surplus one. How many succeed; the page that fails stays charged to
        the subpool unless its minimum had covered it (out_subpool_put)."""
        h, spool = self.h, self.spool
        room = pages if spool is None or spool.max == -1 else min(pages, spool.max - spool.used)
        covered = 0
        if spool is not None and spool.min != -1:
            covered = min(room, spool.rsv)  # gbl_chg 0: reserved by the minimum
            spool.get_pages(covered)
            got = self.hugetlb.take_reserved(h, covered)
            if got < covered:  # out_subpool_put: the failing page goes back
                spool.put_pages(covered - got)
                return got
        want = room - covered
        from_free = min(want, max(0, min(h.available(), h.free)))
        h.free -= from_free
        done = from_free + self.hugetlb._alloc_surplus(h, want - from_free)
        if spool is not None:  # charged for each page tried (the failing one too)
            spool.get_pages(min(done + 1, want))
        return covered + done
    def _free_pages(self, first: int, last: int) -> int:
        """Free the page-cache pages of [first, last) (after unmapping them)."""
        for m in self.mappings:
            m.zap(first, last)
        freed = self.pages.take(first, last)
        self.hugetlb.free_pages(self.h, self.spool, freed)
        return freed

    def remove_pages(self, first: int, last: int | None) -> None:
        """remove_inode_hugepages: a hole (last given) drops each present page and its
        region, leaving the reservations of pages never faulted; a truncation (last
        None) drops every page and region from first on and returns the unused
        reservations (hugetlb_unreserve_pages)."""
        if last is not None:
            for lo, hi, _ in list(self.pages.overlapping(first, last)):
                self._free_pages(lo, hi)
                self.resv_map.clear(lo, hi)  # per page: hugetlb_unreserve_pages(i, i+1, 1)
            return
        freed = self._free_pages(first, _END)
        unused = self.resv_map.take(first, _END) - freed
        gbl = unused if self.spool is None else self.spool.put_pages(unused)
        self.hugetlb.acct_memory(self.h, -gbl)

    # --- file operations ----------------------------------------------------------------------
    def ftruncate(self, length: int) -> None:
        """hugetlbfs_setattr: a size that is not whole huge pages is EINVAL; any other
        size, larger, smaller or the same, goes through hugetlb_vmtruncate, which
        sets i_size and removes every page and reservation beyond it (pages a
        KEEP_SIZE fallocate put there included)."""
        self._live("ftruncate")
        if length < 0:
            raise oserror(errno.EINVAL, "ftruncate")
        if length % self.h.page_size:
            raise oserror(errno.EINVAL, "ftruncate: not a multiple of the huge page size")
        self.i_size = length
        self.remove_pages(length // self.h.page_size, None)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the fd."""
        self._live("fallocate")
        self.vfs_fallocate(mode, offset, length)

    def vfs_fallocate(self, mode: int, offset: int, length: int) -> None:
        """vfs_fallocate + hugetlbfs_fallocate (also reached by MADV_REMOVE through a
        mapping, with no fd): KEEP_SIZE and PUNCH_HOLE only (EOPNOTSUPP); a hole is
        rounded inward to whole pages (hugetlbfs_punch_hole), an allocation outward;
        a page that cannot be had is ENOSPC, the pages before it stay; i_size grows
        to offset+length without KEEP_SIZE."""
        keep, punch = uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE
        if offset < 0 or length <= 0:
            raise oserror(errno.EINVAL, "fallocate")  # vfs_fallocate
        if mode & ~(keep | punch) or (mode & punch and not mode & keep):
            raise oserror(errno.EOPNOTSUPP, "fallocate")
        ps = self.h.page_size
        if mode & punch:
            first, last = -(-offset // ps), (offset + length) // ps
            if first < last:
                self.remove_pages(first, last)
            return
        first, last = offset // ps, -(-(offset + length) // ps)
        if self.allocate_run(first, last) < last - first:
            raise oserror(errno.ENOSPC, "fallocate")
        if not mode & keep and offset + length > self.i_size:
            self.i_size = offset + length

    def mmap(self, length: int, offset: int = 0) -> HugetlbMapping:
        """ksys_mmap_pgoff rounds the length up to whole huge pages; hugetlbfs_file_mmap
        refuses an offset that is not (EINVAL), reserves the range (ENOMEM if it
        cannot be) and extends i_size to it (a writable mapping)."""
        self._live("mmap")
        ps = self.h.page_size
        if length <= 0 or offset % ps or offset < 0:
            raise oserror(errno.EINVAL, "mmap")
        length = -(-length // ps) * ps
        first, last = offset // ps, (offset + length) // ps
        if not self.reserve(first, last):
            raise oserror(errno.ENOMEM, "mmap: hugetlb_reserve_pages")
        if self.i_size < offset + length:
            self.i_size = offset + length
        mapping = HugetlbMapping(self, next(_addresses), length, first)
        self.mappings.add(mapping)
        return mapping

    def close(self) -> None:
        """close(2); the last reference (no fd, no mapping) evicts the inode
        (hugetlbfs_evict_inode: every page and reservation goes)."""
        if self.fd_open:
            self.fd_open = False
            self._maybe_evict()

    def _maybe_evict(self) -> None:
        if self.evicted or self.fd_open or self.mappings:
            return
        self.evicted = True
        self.remove_pages(0, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@_args.checked
@dataclass(eq=False)
class HugetlbMapping:
    """A MAP_SHARED mapping of a hugetlbfs file (api.HugetlbMapping); `ptes`: huge
    page indexes of the mapping with a PTE."""

    file: HugetlbFile
    addr: int
    length: int
    pgoff: int  # in huge pages
    ptes: ExtentMap[bool] = field(default_factory=ExtentMap)
    mapped: bool = True

    def _index(self, offset: int) -> int:
        if not self.mapped:
            raise OSError(errno.EBADF, "mapping was unmapped")
        if offset < 0 or offset >= self.length:
            raise ValueError(f"{offset:#x} outside a {self.length:#x} mapping")
        return offset // self.file.h.page_size

    def touch(self, offset: int) -> None:
        """A store: hugetlb_fault -> hugetlb_no_page for a page not in the page cache:
        beyond EOF or no page to allocate is SIGBUS."""
        index = self._index(offset)
        if self.ptes.get(index):
            return
        file_index = self.pgoff + index
        if file_index >= self.file.npages:
            raise HostSigbus(self.addr + offset, "beyond EOF")
        if not self.file.pages.get(file_index) and not self.file.allocate(file_index):
            raise HostSigbus(self.addr + offset, "no huge page (hugetlb_no_page: -ENOSPC)")
        self.ptes.set(index, index + 1, True)

    def touch_in_child(self, offset: int) -> int | None:
        """The signal a store in a child process would get (the model has no child
        to kill): SIGBUS where touch() raises HostSigbus."""
        try:
            self.touch(offset)
        except HostSigbus:
            return signal.SIGBUS
        return None

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2): DONTNEED needs a huge-aligned start and drops whole pages'
        PTEs (madvise_dontneed_free_valid_vma rounds the end down); REMOVE punches
        the file (vfs_fallocate PUNCH_HOLE|KEEP_SIZE)."""
        if not self.mapped:
            raise OSError(errno.EBADF, "mapping was unmapped")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {self.length:#x} mapping")
        ps = self.file.h.page_size
        if advice == MADV_DONTNEED:
            if offset % ps:
                raise oserror(errno.EINVAL, "madvise")
            end = (offset + length) // ps * ps
            self.ptes.clear(offset // ps, end // ps)
        elif advice == MADV_REMOVE:
            self.file.vfs_fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE,
                                    self.pgoff * ps + offset, length)
        else:
            raise oserror(errno.EINVAL, "madvise")

    def zap(self, first: int, last: int) -> None:
        """unmap the file's pages [first, last) here (hugetlb_vmdelete_list)."""
        lo, hi = max(first - self.pgoff, 0), last - self.pgoff
        if lo < hi:
            self.ptes.clear(lo, hi)

    def munmap(self) -> None:
        """munmap(2): a shared mapping's reservations stay with the inode."""
        if self.mapped:
            self.mapped = False
            self.ptes = ExtentMap()
            self.file.mappings.discard(self)
            self.file._maybe_evict()

    close = munmap

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.munmap()
