"""HugeTLB-backed guest_memfd, stateful (issue 10 part 5): one machine, run per
configuration (split/merge policy x page order x HVO x VM type).

A small HugeTLB guest_memfd (four 2 MiB or two 1 GiB pages, MMAP, bound by one
aligned memslot or by two, the second misaligned) takes random steps: conversions
of 4 KiB/2 MiB/1 GiB-aligned ranges either way, host stores and loads through
its mapping, pins and unpins, guest faults on private pages, fallocate and
PUNCH_HOLE (or MADV_REMOVE) of whole huge pages, memory pressure (free memory
taken away and given back), close of the file with pins outstanding, a new file
after it, and the restructuring worker (settle). The test keeps its own account
(which pages are private, which huge pages hold a folio, which pins are where,
which folios wait for pins after close, what word each shared page holds) and,
after every step, holds the model to it and to the invariants issue 10 names:
counters conserve pages, the vmemmap spent is what the current pieces need,
memory is conserved, folios are whole and aligned, no private page is host
mapped, stage-2 leaves fit their folio and TDX's 2 MiB cap. At the end everything
is closed and unpinned, the worker runs, and the pool must be where it started
(the reporting selftest wrapper's no-leak check).

A failing call (EAGAIN, ENOMEM, SIGBUS, EFAULT) must be one the kernel would
return and must change nothing (a snapshot of the whole model before and after).

CI runs a pairwise-covering subset of the 32 configurations, a few examples
each; `GUESTMEM_HUGETLB_CONFIGS=all` runs all of them, and GUESTMEM_MODEL_EXAMPLES
scales the examples (the README's HugeTLB section has the long run).

Memory pressure is a state (squeeze, then release some steps later), so that a
run of calls meets it. The second memslot is misaligned by 2 MiB on 1 GiB pages
(2 MiB leaves only) and by 4 KiB on 2 MiB pages (where 2 MiB would change nothing).

The model bugs this machine found are reproduced at the end of the file, as
regression tests: 1, 2, 4 and 7 fixed in c1cacff, 3, 5, 6, 8 and 9 in 66bebc3.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from guestmem import memmap, uapi
from guestmem.exits import HostSigbus
from guestmem.extents import ExtentMap
from guestmem.model import PROFILES, Kvm
from guestmem.model.invariants import leaks_after_close, violations
from guestmem.model.paths import complete, gmem_fault_path
from guestmem.model.snapshot import snapshot

HUGETLB_PROFILE = replace(PROFILES["inplace"], name="hugetlb", gmem_hugetlb=True)
PAGE = 4096
S2M, S1G = 2 << 20, 1 << 30
L2M, L1G = S2M // PAGE, S1G // PAGE  # base pages per 2 MiB / 1 GiB
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
HUGETLB, MMAP = uapi.GUEST_MEMFD_FLAG_HUGETLB, uapi.GUEST_MEMFD_FLAG_MMAP
SW, TDX = uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_TDX_VM
MADV_REMOVE = 9
WORD = 8  # each page is checked through the word at this offset
BASE, BASE2 = 4 << 30, 16 << 30  # GPAs of the two memslots
# vmemmap pages HVO frees and a split must restore (Documentation/mm/vmemmap_dedup.rst:
# 4096 struct-page pages per 1 GiB folio, 8 per 2 MiB, one kept per huge folio).
VMEMMAP_1G_TO_4K, VMEMMAP_2M_TO_4K, VMEMMAP_1G_TO_2M = 4095, 7, 511
EXAMPLES = int(os.environ.get("GUESTMEM_MODEL_EXAMPLES", "1000"))
POLICIES = ("dynamic", "eager-4k", "stepwise", "lazy")
ORDERS = (uapi.HUGETLB_PAGE_ORDER_2M, uapi.HUGETLB_PAGE_ORDER_1G)


@dataclass(frozen=True)
class Config:
    policy: str
    order: int
    hvo: bool
    vm_type: int

    def __str__(self) -> str:
        size = "2M" if self.order == uapi.HUGETLB_PAGE_ORDER_2M else "1G"
        vm = "tdx" if self.vm_type == TDX else "sw"
        return f"{self.policy}-{size}-{'hvo' if self.hvo else 'nohvo'}-{vm}"


def _pairwise() -> list[Config]:
    """Every policy at both orders, with HVO and VM type flipped between the two,
    chosen so that every pair of values of any two factors occurs once at least."""
    out = []
    for i, policy in enumerate(POLICIES):
        hvo, tdx = bool(i // 2), bool(i % 2)
        out.append(Config(policy, ORDERS[0], hvo, TDX if tdx else SW))
        out.append(Config(policy, ORDERS[1], not hvo, SW if tdx else TDX))
    return out


ALL_CONFIGS = [Config(p, o, h, v) for p, o, h, v in
               itertools.product(POLICIES, ORDERS, (False, True), (SW, TDX))]
CONFIGS = ALL_CONFIGS if os.environ.get("GUESTMEM_HUGETLB_CONFIGS") == "all" else _pairwise()

# Range pickers: a huge page, a 2 MiB piece in it and a 4 KiB page in that, with
# the edges drawn often (a piece or page index beyond the folio wraps around).
edges = st.one_of(st.sampled_from([0, 1, 255, 510, 511]), st.integers(0, 511))
huges = st.integers(0, 3)
mostly = st.sampled_from([True, True, True, False])  # aim host accesses at shared pages


@dataclass(eq=False)
class File:
    """One guest_memfd, as the test accounts for it."""

    gmem: object
    inode: object
    slots: list[object]
    view: object | None
    npages: int
    private: ExtentMap[bool] = field(default_factory=ExtentMap)
    allocated: set[int] = field(default_factory=set)  # huge pages holding a folio
    words: dict[int, int] = field(default_factory=dict)  # page -> its word (absent: 0)
    open: bool = True
    waiting: dict[int, int] = field(default_factory=dict)  # closed: huge page -> pins in it
    pending: set[int] = field(default_factory=set)  # closed: pins gone, the worker has not run


@dataclass(eq=False)
class PinRecord:
    pin: object
    file: File
    first: int
    last: int
    huge: frozenset[int]


class HugetlbGuestMemfd(RuleBasedStateMachine):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.cfg = config
        self.hp = 1 << config.order
        self.size = self.hp * PAGE
        self.nhuge = 2 if self.hp == L1G else 4
        self.npages = self.nhuge * self.hp
        self.kvm = Kvm(HUGETLB_PROFILE)
        self.hugetlb = self.kvm.hugetlb
        self.hugetlb.hvo = config.hvo
        self.pool = 2 * self.nhuge  # room for a second file while the first one's folios wait
        assert self.hugetlb.set_nr_hugepages(self.size, self.pool) == self.pool
        self.baseline = {s: self.hugetlb.counters(s) for s in self.hugetlb.page_sizes}
        self.free_at_start = self.hugetlb.memory.free_bytes
        self.files: list[File] = []
        self.stolen = 0  # bytes of free memory taken away (pressure)
        self.total = self.memory_total()
        self.vm = self.kvm.create_vm(config.vm_type)
        self.cur: File | None = None
        self.pins: list[PinRecord] = []
        self.two_slots = False

    # --- set-up and tear-down -------------------------------------------------------------
    @initialize(two_slots=st.booleans(), huge=huges, shared=st.sampled_from([0, 1, 3, L2M + 1]))
    def start(self, two_slots, huge, shared):
        """The file, and `shared` pages from the start of a huge page made shared
        before anything is allocated (the host has something to reach)."""
        self.two_slots = two_slots
        assert self.open_file()
        if shared:
            first = huge % self.nhuge * self.hp
            self.convert_range(first, min(first + shared, self.npages), False)

    def layout(self) -> list[tuple[int, int, int, int]]:
        """(slot id, GPA, file offset, bytes) of the memslots binding the file: one
        aligned memslot over all of it, or an aligned one and one misaligned by
        2 MiB (1 GiB pages: 2 MiB leaves only there; its cut falls inside the second
        folio) or by 4 KiB (2 MiB pages: 4 KiB leaves only)."""
        file_bytes = self.npages * PAGE
        if not self.two_slots:
            return [(0, BASE, 0, file_bytes)]
        cut, skew = (S1G + S1G // 2, S2M) if self.hp == L1G else (file_bytes // 2, PAGE)
        return [(0, BASE, 0, cut), (1, BASE2 + skew, cut, file_bytes - cut)]

    def open_file(self) -> bool:
        """A new guest_memfd under the policy, bound and mapped; False on ENOMEM (the
        pool's unreserved free pages cannot cover it: nothing reserved)."""
        h = self.hugetlb.hstates[self.size]
        before = snapshot(self.kvm)
        try:
            gmem = self.vm.create_guest_memfd(self.npages * PAGE, HUGETLB | MMAP, self.cfg.order)
        except OSError as e:
            assert e.errno == errno.ENOMEM, e
            assert h.free - h.resv < self.nhuge, "ENOMEM with the pages available"
            assert snapshot(self.kvm) == before
            event("create: ENOMEM (waiting folios hold the pool)")
            return False
        gmem.set_hugetlb_policy(self.cfg.policy)
        for slot_id, gpa, offset, length in self.layout():
            self.vm.set_user_memory_region2(slot_id, uapi.KVM_MEM_GUEST_MEMFD, gpa, length, 0,
                                            gmem, offset)
        slots = [self.vm.memslots[(0, slot_id)] for slot_id, *_ in self.layout()]
        f = File(gmem, gmem.inode, slots, gmem.mmap(), self.npages)
        f.private.set(0, self.npages, True)  # HUGETLB: no INIT_SHARED, all private
        self.files.append(f)
        self.cur = f
        return True

    def teardown(self):
        """Close everything, unpin, let the worker run: nothing leaks and the pool
        and memory are back where they started."""
        self.hugetlb.memory.free_bytes += self.stolen
        self.stolen = 0
        f = self.cur
        if f is not None:
            self.close_file(munmap_first=True)
        for record in self.pins:
            record.pin.unpin()
        self.pins = []
        self.vm.close()
        self.hugetlb.settle()
        assert leaks_after_close(self.kvm) == []
        assert {s: self.hugetlb.counters(s) for s in self.hugetlb.page_sizes} == self.baseline
        assert self.hugetlb.memory.free_bytes == self.free_at_start
        self.kvm.close()

    # --- what the test knows ---------------------------------------------------------------
    def huge_of(self, first: int, last: int) -> range:
        return range(first // self.hp, -(-last // self.hp))

    def all_private(self, f: File, first: int, last: int) -> bool:
        return f.private.all_equal(first, last, True)

    def pick(self, huge: int, piece: int, page: int) -> int:
        """A page index of the file from a huge page, a 2 MiB piece and a page."""
        return (huge % self.nhuge) * self.hp + (piece * L2M + page) % self.hp

    def aim(self, f: File, index: int, shared: bool) -> int:
        """`index`, or with `shared` a shared page chosen by it (if there is one): most
        host accesses should reach memory, and every page starts private."""
        runs = list(f.private.gaps(0, self.npages)) if shared else []
        if not runs:
            return index
        lo, hi = runs[index % len(runs)]
        return lo + index % (hi - lo)

    def full_split(self, folios: int) -> int:
        """Bytes of vmemmap splitting `folios` whole folios to 4 KiB restores: an
        upper bound on any split or sequence of splits of them."""
        if not self.cfg.hvo:
            return 0
        per = VMEMMAP_1G_TO_4K if self.hp == L1G else VMEMMAP_2M_TO_4K
        return folios * per * PAGE

    def alloc_split_cost(self, f: File, folios) -> int:
        """Bytes of vmemmap the splits of fresh `folios` cost as they are allocated:
        eager-4k splits each to 4 KiB; dynamic one whose range has a shared page
        to 4 KiB, stepwise to 2 MiB and the 2 MiB pieces holding shared pages to
        4 KiB (the WIP's __maybe_split_fresh_folio); lazy none."""
        if not self.cfg.hvo or self.cfg.policy == "lazy":
            return 0
        pages = 0
        for h in folios:
            lo, hi = h * self.hp, (h + 1) * self.hp
            if self.cfg.policy != "eager-4k" and self.all_private(f, lo, hi):
                continue
            if self.cfg.policy == "stepwise" and self.hp == L1G:
                cut = {p // L2M for a, b in f.private.gaps(lo, hi) for p in range(a, b, L2M)}
                cut |= {(b - 1) // L2M for a, b in f.private.gaps(lo, hi)}
                pages += VMEMMAP_1G_TO_2M + VMEMMAP_2M_TO_4K * len(cut)
            else:
                pages += VMEMMAP_1G_TO_4K if self.hp == L1G else VMEMMAP_2M_TO_4K
        return pages * PAGE

    def may_lack_memory(self, folios: int) -> bool:
        """Could splitting up to `folios` folios fail for memory now?"""
        return self.hugetlb.memory.free_bytes < self.full_split(folios)

    def must_lack_memory(self) -> bool:
        """Is free memory below the cheapest split there is (2 MiB -> 4 KiB)?"""
        return self.cfg.hvo and self.hugetlb.memory.free_bytes < VMEMMAP_2M_TO_4K * PAGE

    def live_pins(self, f: File, first: int, last: int) -> list[PinRecord]:
        return [p for p in self.pins if p.file is f and p.first < last and first < p.last]

    # --- invariants --------------------------------------------------------------------------
    def memory_total(self) -> int:
        """Free memory, what was taken away, the pools, and the vmemmap splits hold."""
        pools = sum(h.nr * h.page_size for h in self.hugetlb.hstates.values())
        vmemmap = sum(f.inode.restructure.vmemmap_restored - f.inode.restructure.vmemmap_freed
                      for f in self.files)
        return self.hugetlb.memory.free_bytes + self.stolen + pools + vmemmap

    @invariant()
    def model_invariants_hold(self):
        assert violations(self.kvm) == []


    @invariant()
    def counters_conserve_pages(self):
        """nr = free + folios the file holds + folios waiting for pinned pieces +
        folios the worker has yet to merge; resv = the unused reservations of the
        subpools still alive; memory is conserved."""
        h = self.hugetlb.hstates[self.size]
        held = waiting = pending = unused = 0
        for f in self.files:
            out = len(f.allocated) + len(f.waiting) + len(f.pending)
            held += len(f.allocated)
            waiting += len(f.waiting)
            pending += len(f.pending)
            if f.open or out:  # the subpool lives while the inode or a folio of it does
                unused += self.nhuge - out
        assert (h.nr, h.surplus, h.overcommit) == (self.pool, 0, 0)
        assert h.free == h.nr - held - waiting - pending, (h, held, waiting, pending)
        assert h.resv == unused, (h, unused)
        other = [s for s in self.hugetlb.page_sizes if s != self.size]
        assert all(self.hugetlb.counters(s) == self.baseline[s] for s in other)
        assert bool(self.hugetlb.deferred) == bool(pending), "the worker's queue"
        assert self.hugetlb.memory.free_bytes >= 0
        assert self.memory_total() == self.total, "memory not conserved"

    @invariant()
    def folios_are_whole_and_pieces_pay_their_vmemmap(self):
        """An allocated huge folio is whole and aligned in the file; split pieces lie
        only on folios held or waiting; the vmemmap restored minus freed is what
        the current pieces need (4095 pages per 1 GiB folio at 4 KiB, 511 per 1 GiB
        at 2 MiB plus 7 per 2 MiB piece at 4 KiB, 7 per 2 MiB folio at 4 KiB)."""
        for f in self.files:
            inode = f.inode
            need = 0
            for h in range(self.nhuge):
                lo, hi = h * self.hp, (h + 1) * self.hp
                present = inode.folios.covered(lo, hi)
                assert present == (self.hp if h in f.allocated else 0), (h, present)
                pieces = list(inode.split.overlapping(lo, hi))
                if not pieces:
                    continue
                assert h in f.allocated or h in f.waiting or h in f.pending, "pieces of no folio"
                assert sum(b - a for a, b, _ in pieces) == self.hp, "a folio split in part"
                small = [(a, b) for a, b, piece in pieces if piece == 1]
                assert all(piece in (1, L2M) and piece < self.hp for _, _, piece in pieces)
                assert all(a % L2M == 0 and b % L2M == 0 for a, b in small)
                if self.hp == L2M:
                    need += VMEMMAP_2M_TO_4K
                else:
                    small_pieces = sum(b - a for a, b in small) // L2M
                    need += VMEMMAP_1G_TO_2M + VMEMMAP_2M_TO_4K * small_pieces
            spent = inode.restructure.vmemmap_restored - inode.restructure.vmemmap_freed
            assert spent == (need * PAGE if self.cfg.hvo else 0), (spent, need)
            by_size = inode.memory_by_page_size()
            assert sum(by_size.values()) == len(f.allocated) * self.size
            if self.cfg.policy == "eager-4k":
                assert by_size[PAGE] == len(f.allocated) * self.size, "eager-4k left a huge folio"

    @invariant()
    def restructuring_follows_the_policy(self):
        """dynamic and stepwise merge a folio as soon as it is private whole, and
        stepwise a 2 MiB piece too: no private-whole unit of the open file stays
        split (eager-4k never merges, lazy merges at guest faults)."""
        f = self.cur
        if f is None or self.cfg.policy not in ("dynamic", "stepwise"):
            return
        units = [self.hp] + ([L2M] if self.cfg.policy == "stepwise" and self.hp == L1G else [])
        for h in f.allocated:
            for unit in units:
                for lo in range(h * self.hp, (h + 1) * self.hp, unit):
                    if self.all_private(f, lo, lo + unit):
                        assert (f.inode.split.get(lo) or self.hp) >= unit, \
                            f"a private {unit}-page piece at {lo} left split"

    @invariant()
    def pin_counts_balance(self):
        """The open file's pin count per page is the number of the test's pins on it;
        every pinned page is a 4 KiB folio (its huge folio stays split, even after
        close); the process's allocated pages are what the files hold plus the
        pinned pages of closed ones (their folios wait)."""
        f = self.cur
        if f is not None:
            counts: ExtentMap[int] = ExtentMap()
            for record in self.pins:
                if record.file is f:
                    for lo, hi in list(counts.gaps(record.first, record.last)):
                        counts.set(lo, hi, 0)
                    for lo, hi, n in list(counts.overlapping(record.first, record.last)):
                        counts.set(lo, hi, n + 1)
            assert list(f.inode.pins.items()) == list(counts.items())
        for record in self.pins:  # a pinned page is a 4 KiB folio: its folio cannot merge
            assert record.file.inode.split.all_equal(record.first, record.last, 1), \
                "a pinned piece was merged"
        held = sum(len(g.allocated) for g in self.files) * self.hp
        for g in self.files:
            if not g.open:
                pinned: ExtentMap[bool] = ExtentMap()
                for record in self.pins:
                    if record.file is g:
                        pinned.set(record.first, record.last, True)
                held += pinned.covered(0, g.npages)
        assert self.kvm.process.stats.pages_allocated == held

    @invariant()
    def no_private_page_is_host_mapped(self):
        """The file's memory map: its PRIVATE runs are the test's, and no run is both
        PRIVATE and HOST_MAPPED."""
        for f in self.files:
            if f.inode.released:
                continue
            runs = f.inode.memory_map(0, f.npages).runs
            assert not [r for r in runs if {memmap.PRIVATE, memmap.HOST_MAPPED} <= r.state]
            private = [(r.first, r.last) for r in runs if memmap.PRIVATE in r.state]
            merged: list[tuple[int, int]] = []
            for lo, hi in private:
                if merged and merged[-1][1] == lo:
                    merged[-1] = (merged[-1][0], hi)
                else:
                    merged.append((lo, hi))
            assert merged == [(lo, hi) for lo, hi, _ in f.private.items()]

    @invariant()
    def stage2_leaves_are_capped(self):
        """TDX never maps 1 GiB; eager-4k maps nothing huge; the misaligned memslot
        gets leaves no larger than its alignment allows."""
        by_level = self.vm.mmu.pages_by_level()
        if self.cfg.vm_type == TDX:
            assert by_level[L1G] == 0
        if self.cfg.policy == "eager-4k":
            assert by_level[L2M] == by_level[L1G] == 0
        if self.two_slots:
            _, gpa, _, length = self.layout()[1]
            cap = L2M if self.hp == L1G else 1
            g0 = gpa // PAGE
            assert all(level <= cap for _, _, level in
                       self.vm.mmu.levels.overlapping(g0, g0 + length // PAGE))

    # --- conversions ---------------------------------------------------------------------------
    @precondition(lambda self: self.cur is not None)
    @rule(huge=huges, piece=edges, page=edges, unit=st.sampled_from([1, L2M, L1G]),
          count=st.integers(1, 3), to_private=st.booleans())
    def convert(self, huge, piece, page, unit, count, to_private):
        """KVM_SET_MEMORY_ATTRIBUTES2: to private fails with EAGAIN at the first pinned
        page (host PTEs of the range are zapped first, nothing else changes); to
        shared may fail with ENOMEM, changing nothing, only where splitting could
        cost more than the free memory (HVO)."""
        first = self.pick(huge, piece, page) // unit * unit
        self.convert_range(first, min(first + count * unit, self.npages), to_private)

    def convert_range(self, first: int, last: int, to_private: bool) -> None:
        f = self.cur
        noop = (self.all_private(f, first, last) if to_private
                else f.private.covered(first, last) == 0)
        pinned = self.live_pins(f, first, last)
        changing_huge = {h for lo, hi, _ in f.private.overlapping(first, last)
                         for h in self.huge_of(lo, hi)} if not to_private else set()
        splits_possible = (not to_private and self.cfg.policy in ("dynamic", "stepwise")
                           and bool(changing_huge & f.allocated))
        must_split = splits_possible and any(
            self.all_private(f, h * self.hp, (h + 1) * self.hp)
            for h in changing_huge & f.allocated)
        lacking = self.must_lack_memory()
        before = snapshot(self.kvm)
        try:
            f.gmem.set_memory_attributes2(first * PAGE, (last - first) * PAGE,
                                          PRIVATE if to_private else 0)
        except OSError as e:
            note(f"convert [{first}, {last}) to {'private' if to_private else 'shared'}: {e}")
            if e.errno == errno.EAGAIN:
                assert to_private and not noop and pinned, e
                assert e.error_offset == max(first, min(p.first for p in pinned)) * PAGE
                assert f.view is None or f.view.ptes.covered(first, last) == 0, "not zapped"
                assert _without_ptes(snapshot(self.kvm)) == _without_ptes(before)
                event("convert: EAGAIN")
                return
            assert e.errno == errno.ENOMEM, e
            assert splits_possible and self.may_lack_memory(len(changing_huge & f.allocated))
            assert snapshot(self.kvm) == before
            event("convert: ENOMEM")
            return
        assert noop or not to_private or not pinned, "converted a pinned page to private"
        assert not (must_split and lacking), "split without memory for it"
        if self.cfg.vm_type == TDX:  # TDX zeroes the pages that change owner
            for p in [p for p in f.words if first <= p < last
                      and self.all_private(f, p, p + 1) != to_private]:
                del f.words[p]
        f.private.set(first, last, True if to_private else None)

    # --- the host ------------------------------------------------------------------------------
    def host_fault_may_fail(self, f: File, page: int) -> bool:
        """A host fault on shared `page` needs a split of its folio when the folio is
        fresh (every policy splits a fresh folio of a range not all private) or,
        under lazy, still whole."""
        h = page // self.hp
        fresh = h not in f.allocated
        lazy_whole = self.cfg.policy == "lazy" and (f.inode.split.get(page) or self.hp) > 1
        return (fresh or lazy_whole) and self.may_lack_memory(1)

    @precondition(lambda self: self.cur is not None and self.cur.view is not None)
    @rule(huge=huges, piece=edges, page=edges, shared=mostly,
          value=st.integers(1, 2**64 - 1))
    def host_writes(self, huge, piece, page, shared, value):
        """A store: SIGBUS on a private page; on a shared one only where the split of
        a fresh (or, lazy, whole) folio lacks memory, and then nothing changes."""
        f = self.cur
        index = self.aim(f, self.pick(huge, piece, page), shared)
        private = self.all_private(f, index, index + 1)
        may_fail = self.host_fault_may_fail(f, index)
        before = snapshot(self.kvm)
        try:
            f.view.write(index * PAGE + WORD, value.to_bytes(8, "little"))
        except HostSigbus as e:
            assert private or may_fail, e
            assert snapshot(self.kvm) == before
            event("host store: SIGBUS " + ("(private)" if private else "(no memory to split)"))
            return
        assert not private, "a host store reached a private page"
        f.words[index] = value
        f.allocated.add(index // self.hp)

    @precondition(lambda self: self.cur is not None and self.cur.view is not None)
    @rule(huge=huges, piece=edges, page=edges, shared=mostly)
    def host_reads(self, huge, piece, page, shared):
        """A load: SIGBUS on a private page, else the page's word (0 if never
        written, kept across SW_PROTECTED conversions, zeroed by TDX's)."""
        f = self.cur
        index = self.aim(f, self.pick(huge, piece, page), shared)
        private = self.all_private(f, index, index + 1)
        may_fail = self.host_fault_may_fail(f, index)
        before = snapshot(self.kvm)
        try:
            seen = f.view.read(index * PAGE + WORD, 8)
        except HostSigbus as e:
            assert private or may_fail, e
            assert snapshot(self.kvm) == before
            return
        assert not private, "a host load reached a private page"
        assert int.from_bytes(seen, "little") == f.words.get(index, 0)
        f.allocated.add(index // self.hp)

    @precondition(lambda self: self.cur is not None and self.cur.view is not None)
    @rule(huge=huges, piece=edges, page=edges, shared=mostly, count=st.integers(1, 4))
    def pin(self, huge, piece, page, shared, count):
        """pin_user_pages on shared pages (within one huge page): EFAULT on a private
        page, or where the fault's split lacks memory, changing nothing."""
        f = self.cur
        first = self.aim(f, self.pick(huge, piece, page), shared)
        last = min(first + count, (first // self.hp + 1) * self.hp)
        if f.private.covered(first, last):
            last = first + 1  # one page, private or not: all or nothing
        private = f.private.covered(first, last) > 0
        may_fail = self.host_fault_may_fail(f, first)
        before = snapshot(self.kvm)
        try:
            pin = f.view.pin(first * PAGE, (last - first) * PAGE)
        except OSError as e:
            assert e.errno == errno.EFAULT and (private or may_fail), e
            assert snapshot(self.kvm) == before
            event("pin: EFAULT " + ("(private)" if private else "(no memory to split)"))
            return
        assert not private, "pinned a private page"
        event("pin: pinned")
        self.pins.append(PinRecord(pin, f, first, last, frozenset(self.huge_of(first, last))))
        f.allocated.add(first // self.hp)

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin(self, data):
        """unpin_user_pages; after close, a folio's last pin sends it to the worker."""
        record = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        record.pin.unpin()
        f = record.file
        if f.open:
            return
        event("unpin after close")
        for h in record.huge:
            f.waiting[h] -= 1
            if not f.waiting[h]:
                del f.waiting[h]
                f.pending.add(h)

    @precondition(lambda self: self.cur is not None)
    @rule()
    def map_or_unmap(self):
        """munmap the file's mapping, or mmap it again."""
        f = self.cur
        if f.view is None:
            f.view = f.gmem.mmap()
        else:
            f.view.munmap()
            f.view = None

    # --- the guest -----------------------------------------------------------------------------
    @precondition(lambda self: self.cur is not None)
    @rule(second=st.booleans(), huge=huges, piece=edges, page=edges, count=st.integers(1, 1024))
    def guest_faults(self, second, huge, piece, page, count):
        """A guest fault on private pages of one memslot (kvm_gmem_get_pfn then the
        stage-2 map): where the splits of fresh folios cannot be paid for,
        kvm_gmem_get_pfn's -ENOMEM (allocation_affordable) and nothing happens."""
        f = self.cur
        slot = f.slots[1 if second and len(f.slots) > 1 else 0]
        lo = slot.gmem_pgoff + self.pick(huge, piece, page) % slot.npages
        hi = min(lo + count, slot.gmem_pgoff + slot.npages)
        runs = [(a, b) for a, b, _ in f.private.overlapping(lo, hi)]
        if not runs or runs[0][0] != lo:
            return  # not a private page: the brief's guest faults are private
        hi = runs[0][1]
        gfn = slot.base_gfn + lo - slot.gmem_pgoff
        fresh = [h for h in self.huge_of(lo, hi) if h not in f.allocated]
        affordable = self.alloc_split_cost(f, fresh) <= self.hugetlb.memory.free_bytes
        assert f.inode.allocation_affordable(lo, hi) == affordable, "kvm_gmem_get_pfn's ENOMEM"
        if not affordable:
            event("guest fault: ENOMEM (no memory to split fresh folios)")
            return
        assert complete(gmem_fault_path(self.vm, slot, gfn, gfn + hi - lo))
        assert self.vm.mmu.mapped.all_equal(gfn, gfn + hi - lo, slot)
        f.allocated.update(self.huge_of(lo, hi))

    # --- fallocate and PUNCH_HOLE --------------------------------------------------------------
    def huge_range(self, huge: int, count: int) -> tuple[int, int]:
        first = huge % self.nhuge
        return first * self.hp, min(first + count, self.nhuge) * self.hp

    @precondition(lambda self: self.cur is not None)
    @rule(huge=huges, count=st.integers(1, 2))
    def fallocate(self, huge, count):
        """fallocate(KEEP_SIZE) of whole huge pages: ENOMEM, changing nothing, exactly
        where the splits of the fresh folios cost more than the free memory."""
        f = self.cur
        first, last = self.huge_range(huge, count)
        fresh = [h for h in self.huge_of(first, last) if h not in f.allocated]
        short = self.alloc_split_cost(f, fresh) > self.hugetlb.memory.free_bytes
        before = snapshot(self.kvm)
        try:
            f.gmem.allocate(first * PAGE, (last - first) * PAGE)
        except OSError as e:
            assert e.errno == errno.ENOMEM and short, e
            assert snapshot(self.kvm) == before
            event("fallocate: ENOMEM")
            return
        assert not short, "split fresh folios without the memory for it"
        f.allocated.update(self.huge_of(first, last))

    @precondition(lambda self: self.cur is not None)
    @rule(huge=huges, count=st.integers(1, 2), madvise=st.booleans())
    def punch(self, huge, count, madvise):
        """PUNCH_HOLE (or MADV_REMOVE) of whole huge pages: EAGAIN, changing nothing,
        while a piece is pinned; else the folios go back to the pool, the attributes
        stay and the pages read 0."""
        f = self.cur
        first, last = self.huge_range(huge, count)
        pinned = self.live_pins(f, first, last)
        before = snapshot(self.kvm)
        try:
            if madvise and f.view is not None:
                f.view.madvise(first * PAGE, (last - first) * PAGE, MADV_REMOVE)
            else:
                f.gmem.punch_hole(first * PAGE, (last - first) * PAGE)
        except OSError as e:
            assert e.errno == errno.EAGAIN and pinned, e
            assert snapshot(self.kvm) == before
            event("punch: EAGAIN")
            return
        assert not pinned, "punched a pinned piece"
        f.allocated.difference_update(self.huge_of(first, last))
        for p in [p for p in f.words if first <= p < last]:
            del f.words[p]

    # --- pressure, close, the worker -----------------------------------------------------------
    @precondition(lambda self: self.stolen == 0)
    @rule(left=st.sampled_from([0, VMEMMAP_2M_TO_4K * PAGE - 1, VMEMMAP_2M_TO_4K * PAGE,
                                VMEMMAP_1G_TO_2M * PAGE, VMEMMAP_1G_TO_4K * PAGE - 1,
                                VMEMMAP_1G_TO_4K * PAGE]))
    def squeeze(self, left):
        """Memory pressure: leave only `left` bytes free until release()."""
        memory = self.hugetlb.memory
        self.stolen = max(0, memory.free_bytes - left)
        memory.free_bytes -= self.stolen

    @precondition(lambda self: self.stolen > 0)
    @rule()
    def release(self):
        """The memory squeeze() took comes back."""
        self.hugetlb.memory.free_bytes += self.stolen
        self.stolen = 0

    @precondition(lambda self: self.cur is not None)
    @rule(munmap_first=st.booleans())
    def close(self, munmap_first):
        """close() of the file (and munmap, in either order): the inode goes with the
        last reference; folios with a pinned piece stay split and wait for it, the
        rest return to the pool (merged: close merges unconditionally)."""
        self.close_file(munmap_first)

    def close_file(self, munmap_first: bool) -> None:
        f = self.cur
        if munmap_first and f.view is not None:
            f.view.munmap()
            f.view = None
        f.gmem.close()
        if f.view is not None:
            assert not f.inode.released, "released while mapped"
            f.view.munmap()
            f.view = None
        assert f.inode.released
        for record in self.pins:
            if record.file is f:
                for h in record.huge:
                    f.waiting[h] = f.waiting.get(h, 0) + 1
        if f.waiting:
            event("close with pins outstanding")
        f.allocated = set()
        f.open = False
        self.cur = None

    @precondition(lambda self: self.cur is None)
    @rule()
    def reopen(self):
        """A new file where the last one was: its memslots (dead since the release)
        are deleted first; ENOMEM while waiting folios keep the pool short."""
        for slot_id, *_ in self.layout():
            if (0, slot_id) in self.vm.memslots:
                self.vm.delete_memslot(slot_id)
        self.open_file()

    @rule()
    def settle(self):
        """The restructuring worker runs: pending folios merge and go back."""
        if self.hugetlb.deferred:
            event("settle: the worker merges")
        self.hugetlb.settle()
        for f in self.files:
            f.pending = set()


def _without_ptes(state: dict) -> dict:
    """A snapshot without host PTEs (a to-private conversion zaps them before its
    EAGAIN, as kvm_gmem_set_attributes unmaps before checking references)."""
    out = dict(state)
    out["mappings"] = [m[:5] + m[6:] for m in state["mappings"]]
    out["children"] = [(pid, [m[:5] + m[6:] for m in maps], n)
                       for pid, maps, n in state["children"]]
    return out


SETTINGS = settings(max_examples=max(EXAMPLES // 50, 5), stateful_step_count=30,
                    deadline=None)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_hugetlb_guest_memfd_holds_every_invariant(config):
    run_state_machine_as_test(lambda: HugetlbGuestMemfd(config), settings=SETTINGS)


# --- model bugs this machine found, kept as regression tests -----------------------------
def _file(policy, order=uapi.HUGETLB_PAGE_ORDER_1G, hvo=True, vm_type=SW, huge_pages=2,
          slot=True):
    """A HugeTLB guest_memfd of `huge_pages` pages under `policy`, bound at GPA 4 GiB."""
    size = PAGE << order
    kvm = Kvm(HUGETLB_PROFILE)
    kvm.hugetlb.hvo = hvo
    kvm.hugetlb.set_nr_hugepages(size, 2 * huge_pages)
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(huge_pages * size, HUGETLB | MMAP, order)
    gmem.set_hugetlb_policy(policy)
    if slot:
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, BASE, huge_pages * size, 0,
                                   gmem, 0)
    return kvm, vm, gmem


def _guest_fault(vm, first, last):
    slot = vm.memslots[(0, 0)]
    assert complete(gmem_fault_path(vm, slot, slot.base_gfn + first, slot.base_gfn + last))


@pytest.mark.parametrize("policy", ["dynamic", "stepwise"])
@pytest.mark.parametrize("allocate", ["fallocate", "guest fault"])
def test_bug1_every_fresh_folio_of_a_range_not_all_private_is_split(policy, allocate):
    """The WIP's kvm_gmem_get_folio splits every fresh huge folio whose range is not
    all private (__maybe_split_fresh_folio), whoever allocates it: fallocate
    (kvm_gmem_allocate) and kvm_gmem_get_pfn as much as the host fault. Bug 1
    (fixed in c1cacff): the model split only at the host fault, so a folio with
    a shared page stayed whole (its own uniform-folio invariant said so)."""
    kvm, vm, gmem = _file(policy)
    gmem.set_memory_attributes2(PAGE, PAGE, 0)  # nothing allocated yet
    if allocate == "fallocate":
        gmem.allocate(0, S1G)
    else:
        _guest_fault(vm, 5, 6)  # a private page of the same folio
    assert violations(kvm) == []


def test_bug2_stepwise_host_fault_splits_every_piece_holding_shared_pages():
    """stepwise, a fresh 1 GiB folio with shared pages in two 2 MiB pieces. Bug 2
    (fixed in c1cacff): the host fault on one split 1G -> 2M and that piece to
    4 KiB, and left the other piece whole although it holds a shared page."""
    kvm, vm, gmem = _file("stepwise", slot=False)
    gmem.set_memory_attributes2(0, PAGE, 0)
    gmem.set_memory_attributes2(2 * S2M, PAGE, 0)
    gmem.mmap(S1G).write(0, b"host")
    assert violations(kvm) == []



def test_bug3_a_folio_waits_for_every_pin_of_its_pieces():
    """Two pins on adjacent pages make one pins extent of count 1; at close _free
    makes one Orphan(refs=1) for both, so the first unpin frees both pages and
    the worker returns the huge folio to the pool while the second pin still
    holds its page (for any guest_memfd: the pages are freed under the pin)."""
    kvm, vm, gmem = _file("dynamic", uapi.HUGETLB_PAGE_ORDER_2M, huge_pages=1, slot=False)
    gmem.set_memory_attributes2(0, 2 * PAGE, 0)
    view = gmem.mmap()
    first, second = view.pin(0, PAGE), view.pin(PAGE, PAGE)
    free = kvm.hugetlb.counters(S2M).free
    view.munmap()
    gmem.close()
    first.unpin()
    kvm.hugetlb.settle()
    assert kvm.process.stats.pages_allocated == 1, "the page the second pin holds was freed"
    assert kvm.hugetlb.counters(S2M).free == free, "the folio went back with a piece pinned"
    second.unpin()
    kvm.hugetlb.settle()
    assert (kvm.process.stats.pages_allocated, kvm.hugetlb.counters(S2M).free) == (0, free + 1)


@pytest.mark.parametrize("policy", ["dynamic", "lazy"])
def test_bug4_no_stage2_leaf_outlives_the_folio_it_maps(policy):
    """TDX maps a 1 GiB folio with 2 MiB leaves; a page in another 2 MiB of it is
    shared, and the folio is split to 4 KiB (dynamic at the conversion, lazy at
    the host fault). Bug 4 (fixed in c1cacff): only the leaves crossing the
    range's ends were demoted, so the leaf over [0, 2 MiB) stayed over 4 KiB
    folios (Yan Zhao's "mapping size <= folio size")."""
    kvm, vm, gmem = _file(policy, vm_type=TDX)
    _guest_fault(vm, 0, 1)
    assert vm.mmu.pages_by_level()[L2M] == L2M
    gmem.set_memory_attributes2(S2M, PAGE, 0)
    gmem.mmap(S1G).write(S2M, b"host")  # lazy splits here
    assert gmem.inode.split.get(0) == 1, "the folio is 4 KiB pieces now"
    assert vm.mmu.pages_by_level()[L2M] == 0, "a 2 MiB leaf over 4 KiB folios"



@pytest.mark.parametrize("allocate", ["fallocate", "guest fault"])
def test_bug5_eager_4k_allocation_of_a_partly_fresh_range_pays_for_its_splits(allocate):
    """allocation_affordable merges the range's huge pages before asking which are
    fresh, so a range over a held folio and a fresh one counts none fresh:
    eager-4k then splits the fresh folio with no memory for its vmemmap."""
    kvm, vm, gmem = _file("eager-4k", uapi.HUGETLB_PAGE_ORDER_2M)
    gmem.allocate(0, S2M)
    kvm.hugetlb.memory.free_bytes = 0
    if allocate == "fallocate":
        with pytest.raises(OSError) as raised:
            gmem.allocate(0, 2 * S2M)
        assert raised.value.errno == errno.ENOMEM
    else:
        assert not gmem.inode.allocation_affordable(0, L2M + 1), "kvm_gmem_get_pfn's ENOMEM"
    assert kvm.hugetlb.memory.free_bytes == 0



@pytest.mark.parametrize("hvo", [True, False])
@pytest.mark.parametrize("case", ["stepwise straight merge", "split plan cut by uptodate"])
def test_bug6_splits_and_merges_pay_exactly_their_vmemmap(hvo, case):
    """_simulate costs each plan extent as (b - a) // piece whole pieces. (a) A
    stepwise 1 GiB folio of 2 MiB and 4 KiB pieces merged straight to 1 GiB
    (PUNCH_HOLE, close, the worker): no merge counted and the merged folio's own
    vmemmap page never kept. (b) A split plan cut at a folio-state boundary (one
    page made uptodate by a host store while split, then merged): the second
    split restores 4096 pages, not 4095, and is not counted. Either way memory
    appears or vanishes (without HVO a split should cost nothing at all)."""
    kvm, vm, gmem = _file("stepwise" if case.startswith("stepwise") else "dynamic", hvo=hvo,
                          slot=False)
    free = kvm.hugetlb.memory.free_bytes
    gmem.allocate(0, S1G)
    gmem.set_memory_attributes2(0, PAGE, 0)
    r = gmem.inode.restructure
    if case.startswith("stepwise"):  # 1G -> 2M, the first 2M -> 4K; then punch
        gmem.punch_hole(0, S1G)
        assert r.splits == 2 and r.merges > 0, "the merge back to 1 GiB is not counted"
    else:  # split, store, merge, split again, merge again
        gmem.mmap(S1G).write(0, b"host")
        gmem.set_memory_attributes2(0, PAGE, PRIVATE)
        gmem.set_memory_attributes2(0, PAGE, 0)
        gmem.set_memory_attributes2(0, PAGE, PRIVATE)
        assert (r.splits, r.merges) == (2, 2), "the second split is not counted"
    assert r.vmemmap_restored == r.vmemmap_freed, "vmemmap restored != freed, all merged"
    assert kvm.hugetlb.memory.free_bytes == free, "memory appeared or vanished"


def test_bug7_two_fitting_2m_leaves_side_by_side_are_no_violation():
    """stepwise on TDX: a 2 MiB leaf on the last 2 MiB piece of a split 1 GiB folio
    and one on the first 2 MiB of the next, whole folio, each fit. Bug 7 (in the
    leaf invariant, fixed in c1cacff): it took the run of both for one leaf that
    no single folio covers."""
    kvm, vm, gmem = _file("stepwise", vm_type=TDX)
    _guest_fault(vm, L1G - 1, L1G + 1)
    gmem.set_memory_attributes2(0, PAGE, 0)  # folio 0: 2 MiB pieces, the first at 4 KiB
    assert vm.mmu.pages_by_level()[L2M] == 2 * L2M
    assert violations(kvm) == []



def test_bug8_a_to_shared_conversion_merges_nothing():
    """stepwise, two 1 GiB folios: page 0 shared (folio 0: 2 MiB pieces, the first
    at 4 KiB), then the two pages around the folios' boundary: the plan's 1G -> 2M
    step covers both folios as one range and turns folio 0's first piece back
    into a whole 2 MiB piece, though page 0 in it is shared."""
    kvm, vm, gmem = _file("stepwise", slot=False)
    gmem.allocate(0, 2 * S1G)
    gmem.set_memory_attributes2(0, PAGE, 0)
    gmem.set_memory_attributes2(S1G - PAGE, 2 * PAGE, 0)
    assert gmem.inode.restructure.merges == 0, "a to-shared conversion merged"
    assert violations(kvm) == []



def test_bug9_a_guest_fault_under_a_huge_leaf_keeps_the_leaves_aligned():
    """lazy, SW, a 1 GiB leaf over a private folio; page 0 of it is shared, so the
    leaf is cut into 2 MiB leaves (the first 2 MiB at 4 KiB) and the folio stays
    whole. huge_mappable offers no huge leaf on a folio with a shared page, so a
    guest fault on page 512, which a 2 MiB leaf maps, maps it at 4 KiB over the
    leaf: the run of 2 MiB leaves starts at 513 (the vCPU's accesses and
    KVM_PRE_FAULT_MEMORY fault through the same path)."""
    kvm, vm, gmem = _file("lazy")
    _guest_fault(vm, L1G, L1G + 1)
    gmem.set_memory_attributes2(S1G, PAGE, 0)
    assert vm.mmu.pages_by_level()[L2M] == L1G - L2M
    _guest_fault(vm, L1G + L2M, L1G + L2M + 1)
    assert violations(kvm) == []
