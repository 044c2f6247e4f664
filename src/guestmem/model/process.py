"""The host process of the model: its fd table, address space, mappings, memory.

Model fds are real fd numbers (each model file holds an open /dev/null), so a
model fd never collides with a real file of this process and `fget()` on any
other open fd finds "a file that is not a guest_memfd", as in the kernel.
The fd table holds its objects weakly: an object dropped without close() has
its fd closed when Python collects it, as the kvm backend's _Fd.__del__ does.
"""

from __future__ import annotations

import errno
import os
import signal
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from guestmem import _args, api, uapi
from guestmem.exits import HostSigbus, HostSigsegv, oserror
from guestmem.extents import ExtentMap
from guestmem.model.addrspace import TASK_SIZE, AddressSpace
from guestmem.model.content import PAGE, ZERO, PageStore, Stale, to_runs, write_runs
from guestmem.model.mempolicy import (
    DEFAULT_REPORT,
    MAXNODE,
    MemPolicy,
    NodeChooser,
    mbind_policy,
)

TASK_SIZE_MAX = TASK_SIZE  # x86-64 4-level user address space (access_ok)
PROT_READ, PROT_WRITE, PROT_EXEC, PROT_SEM = 1, 2, 4, 8
MADV_DONTNEED, MADV_REMOVE, MADV_HUGEPAGE, MADV_COLLAPSE, MADV_HWPOISON = 4, 9, 14, 25, 100
MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_DONTNEED_LOCKED = 22, 23, 24
MADV_DONTFORK, MADV_DOFORK = 10, 11
# Advice a shared guest_memfd mapping accepts with nothing observable changing
# (observed on 6.18: NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTFORK, DOFORK,
# MERGEABLE, UNMERGEABLE, HUGEPAGE, NOHUGEPAGE, DONTDUMP, DODUMP, KEEPONFORK,
# COLD, PAGEOUT). FREE (8), WIPEONFORK (18), COLLAPSE (25), newer and unknown
# values are EINVAL (madvise_behavior_valid and the VMA checks).
# The memory of the host the model stands for (this project's: MemTotal 24731708 kB,
# no swap), for the overcommit check. vm.overcommit_memory = 0 (OVERCOMMIT_GUESS) there.
TOTAL_RAM_PAGES = 24731708 * 1024 // PAGE
TOTAL_SWAP_PAGES = 0
_MADV_NO_EFFECT = frozenset({0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 19, 20, 21})
# Advice that changes vm_flags, so a range of part of a VMA splits it (madvise_update_vma).
_MADV_SPLITS = frozenset({0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 19})


class Backing(Protocol):
    """What a mapping maps: a guest_memfd inode or anonymous memory."""

    def fault(self, index: int, count: int, write: bool) -> str | None:
        """Make pages [index, index+count) present for a host access; None or
        the reason for SIGBUS."""

    store: PageStore
    mappings: set[Mapping]  # every VMA on it, in every process (i_mmap)


class FOREIGN:
    """fget() found an open fd that is not a model object."""


@dataclass
class Stats:
    pages_allocated: int = 0  # pages with a folio behind them, all backings
    orphaned: int = 0  # of those, truncated from their file but still pinned
    ptes_zapped: int = 0  # host userspace PTEs removed by unmap_mapping_range (Mapping.zap)

    def allocate(self, n: int) -> None:
        self.pages_allocated += n

    def free(self, n: int) -> None:
        self.pages_allocated -= n
        if self.pages_allocated < 0:
            raise AssertionError("freed more pages than were allocated")


class HostProcess:
    def __init__(self, numa_nodes: int = 1) -> None:
        self.numa_nodes = numa_nodes  # nodes 0..n-1, all online with memory
        self.node_chooser = NodeChooser()
        self.fds: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._finalizers: dict[int, weakref.finalize[Any, Any]] = {}
        self.memory_failure = False  # CONFIG_MEMORY_FAILURE: MADV_HWPOISON available
        self.total_ram_pages = TOTAL_RAM_PAGES
        self.mappings = AddressSpace()
        self.stats = Stats()
        self.backings: set[Any] = set()  # live guest_memfd inodes and anonymous memory
        self._owners = 0  # allocations so far: whose data a new page holds (Stale)
        self.children: set[ChildProcess] = set()  # fork()ed and not yet exited

    # --- physical memory --------------------------------------------------------------------
    def new_pages(self, n: int) -> Stale:
        """n pages off the free lists, as they were left (kernel: mm/page_alloc.c
        without __GFP_ZERO): what they hold is a previous owner's data, until a
        zeroing path clears them."""
        self.stats.allocate(n)
        self._owners += 1
        return Stale(self._owners)

    # --- fds ----------------------------------------------------------------------------------
    def install(self, obj: Any, on_drop: Callable[[], None] | None = None) -> int:
        """A new fd for obj. If obj is collected unclosed, its fd is closed and
        on_drop (what its close() would do to the rest of the model) runs; on_drop
        must not refer to obj."""
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.fds[fd] = obj
        finalizer = weakref.finalize(obj, self._dropped, fd, on_drop)
        # At exit the OS closes the fds; no model code runs then. (typeshed lists
        # finalize's __slots__ without its documented, settable atexit.)
        finalizer.atexit = False  # type: ignore[misc]
        self._finalizers[fd] = finalizer
        return fd

    def release_fd(self, fd: int) -> None:
        """close(fd) by its owner."""
        finalizer = self._finalizers.pop(fd, None)
        if finalizer is not None:
            finalizer.detach()
            self.fds.pop(fd, None)
            os.close(fd)

    def _dropped(self, fd: int, on_drop: Callable[[], None] | None) -> None:
        """The owner of fd was collected without closing it: the last fput."""
        self._finalizers.pop(fd, None)
        self.fds.pop(fd, None)
        os.close(fd)
        if on_drop is not None:
            on_drop()

    def fget(self, fd: int) -> Any:
        """The object behind fd; FOREIGN for a real file; EBADF if nothing is open."""
        obj = self.fds.get(fd)
        if obj is not None:
            return obj
        if not 0 <= fd < 1 << 31:  # an unsigned int fd beyond any fd table (nr_open)
            raise oserror(errno.EBADF, "fget")
        try:
            os.fstat(fd)
        except OSError as e:  # fget() found no file: every ioctl taking an fd says EBADF
            raise oserror(errno.EBADF, "fget") from e
        return FOREIGN

    # --- address space ---------------------------------------------------------------------------
    def get_unmapped_area(self, length: int, align: int = 0) -> int:
        """Where a new mapping of length bytes goes (at a multiple of align, a
        power of two, if given); EINVAL/ENOMEM as do_mmap."""
        return self.mappings.get_unmapped_area(length, align)

    def map(self, addr: int, length: int, backing: Backing, offset: int, prot: int) -> Mapping:
        """Install a mapping at addr, from get_unmapped_area (mmap_region)."""
        mapping = Mapping(self, addr, length, backing, offset // PAGE, prot)
        self.mappings.insert(addr, length, mapping)
        backing.mappings.add(mapping)
        return mapping

    def mapping_at(self, addr: int) -> tuple[Mapping, int] | None:
        return self.mappings.find(addr)

    def all_mappings(self) -> list[Mapping]:
        """Every mapping of this process and of its live descendants."""
        out = list(self.mappings.values())
        for child in self.children:
            out += child.all_mappings()
        return out

    def fork(self) -> ChildProcess:
        """fork(2): the child gets every mapping but those marked MADV_DONTFORK,
        without PTEs (kernel: mm/memory.c vma_needs_copy is false for shared file
        and shmem mappings: they fault in again), and a reference to every open
        file (dup_fd): a guest_memfd and its VM live until the child exits too."""
        child = ChildProcess(self)
        for mapping in list(self.mappings.values()):
            mapping.copy_to(child)
        for obj in list(self.fds.values()):
            inherit = getattr(obj, "inherit", None)
            if inherit is not None:
                child.files.append(inherit())
        self.children.add(child)
        return child

    def vm_enough_memory(self, pages: int) -> bool:
        """kernel: mm/util.c __vm_enough_memory under OVERCOMMIT_GUESS, which
        mmap_region asks for an accountable (private, writable) mapping: only one
        larger than all RAM and swap is refused."""
        return pages <= self.total_ram_pages + TOTAL_SWAP_PAGES


@_args.checked
class ChildProcess(HostProcess):
    """A fork()ed child of the model's process: its own address space, the same
    physical memory; model code cannot issue ioctls from it, only touch memory."""

    _pids = 1000

    def __init__(self, parent: HostProcess) -> None:
        super().__init__(parent.numa_nodes)
        self.parent = parent
        self.stats = parent.stats  # one machine's memory
        self.node_chooser = parent.node_chooser
        self.memory_failure = parent.memory_failure
        self.files: list[Callable[[], None]] = []  # what dropping each inherited fd does
        ChildProcess._pids += 1
        self.pid = ChildProcess._pids
        self.exited = False

    def _mapping(self, mapping: Any, offset: int, length: int) -> Mapping:
        """The child's VMA at the parent mapping's address: none (MADV_DONTFORK,
        or unmapped in the child) is SIGSEGV, as is an address in a DONTFORK hole."""
        if offset < 0 or length < 0 or offset + length > mapping.length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {mapping.length:#x} "
                             "mapping")
        if self.exited:
            raise oserror(errno.ESRCH, f"child {self.pid} has exited")
        found = self.mappings.find(mapping.addr + offset)
        if found is None:
            raise HostSigsegv(mapping.addr + offset, "no VMA in the child (MADV_DONTFORK)")
        mine: Mapping = found[0]
        return mine

    def read(self, mapping: Any, offset: int, length: int) -> bytes:
        """A load in the child at the address `mapping` has in the parent."""
        mine = self._mapping(mapping, offset, length)
        return mine.read(mapping.addr + offset - mine.addr, length)

    def write(self, mapping: Any, offset: int, data: bytes) -> None:
        """A store in the child at the address `mapping` has in the parent."""
        mine = self._mapping(mapping, offset, len(data))
        mine.write(mapping.addr + offset - mine.addr, data)

    def touch(self, mapping: Any, offset: int, write: bool = False, length: int = 1) -> int | None:
        """The signal a load (or store) in the child gets, or None."""
        try:
            mine = self._mapping(mapping, offset, length)
        except HostSigsegv:
            return signal.SIGSEGV
        return mine.touch_in_child(mapping.addr + offset - mine.addr, write, length)

    def exit(self) -> None:
        """exit(2): the child's mappings go (exit_mmap) and its fds close (exit_files)."""
        if self.exited:
            return
        self.exited = True
        for mapping in list(self.mappings.values()):
            mapping.munmap()
        for drop in self.files:
            drop()
        self.files = []
        self.parent.children.discard(self)

    close = exit

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()


class AnonymousPin:
    """A pin on anonymous memory (AnonymousMemory.pin)."""

    def __init__(self) -> None:
        self.active = True

    def unpin(self) -> None:
        """unpin_user_pages."""
        self.active = False


class AnonymousMemory:
    """MAP_SHARED|MAP_ANONYMOUS memory: pages appear zeroed on first touch."""

    def __init__(self, process: HostProcess, npages: int) -> None:
        self.process = process
        self.npages = npages
        self.store = PageStore()
        self.present: ExtentMap[bool] = ExtentMap()
        self.mappings: set[Mapping] = set()  # the parent's and forked children's
        process.backings.add(self)

    def fault(self, index: int, count: int, write: bool) -> str | None:
        """shmem_fault: a missing page is allocated and zeroed (shmem_get_folio_gfp:
        clear_highpage of a new folio) before it is mapped."""
        if index + count > self.npages:
            return "beyond the end of the mapping"
        for lo, hi in list(self.present.gaps(index, index + count)):
            self.store.set(lo, hi, self.process.new_pages(hi - lo))
            self.store.set(lo, hi, ZERO)
        self.present.set(index, index + count, True)
        return None

    def pin(self, first: int, last: int) -> AnonymousPin:
        """pin_user_pages on shmem pages. Our choice: the pin is recorded and
        released, but nothing in the model depends on it (a removed pinned shmem
        page is freed at once; the kernel would keep it until the unpin)."""
        return AnonymousPin()

    def remove(self, first: int, last: int) -> None:
        """MADV_REMOVE: shmem punches the hole, freeing the pages (observed)."""
        last = min(last, self.npages)
        if first < last:
            self.process.stats.free(self.present.take(first, last))
            self.store.clear(first, last)

    def unmapped(self, mapping: Mapping) -> None:
        """A mapping is gone; with the last one the memory is freed."""
        self.mappings.discard(mapping)
        if self.mappings:
            return
        self.process.stats.free(self.present.covered(0, self.npages))
        self.present = ExtentMap()
        self.store = PageStore()
        self.process.backings.discard(self)


@_args.checked
@dataclass(eq=False)
class Mapping:
    """A host VMA. `ptes` records which pages have a userspace PTE (present)."""

    process: HostProcess
    addr: int
    length: int
    backing: Any
    pgoff: int
    prot: int
    ptes: ExtentMap[bool] = field(default_factory=ExtentMap)
    mapped: bool = True
    # vma->vm_policy by page of the mapping (mbind_range splits the VMA; we keep
    # ranges): used where the backing keeps no shared policy of its own.
    policy: ExtentMap[MemPolicy] = field(default_factory=ExtentMap)
    # Pages marked MADV_DONTFORK (VM_DONTCOPY: a fork leaves them out of the child).
    dontfork: ExtentMap[bool] = field(default_factory=ExtentMap)
    # In a forked child: the pages its parent had marked DONTFORK, which the child
    # does not have (an access there is SIGSEGV).
    holes: ExtentMap[bool] = field(default_factory=ExtentMap)

    def _check(self, offset: int, length: int) -> None:
        if not self.mapped:
            raise OSError(errno.EBADF, "mapping was unmapped")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {self.length:#x} mapping")
        if self.holes.boundaries():
            first, last = offset // PAGE, -(-(offset + length) // PAGE)
            for lo, _, _ in self.holes.overlapping(first, max(last, first + 1)):
                raise HostSigsegv(self.addr + max(lo * PAGE, offset), "no VMA (MADV_DONTFORK)")

    def _may_split(self, first: int, last: int) -> None:
        """vm_ops->may_split: a whole-file guest_memfd refuses to split its VMA
        (seed 004 item 4), so an operation on part of it is EINVAL."""
        if getattr(self.backing, "whole_file", False) and (
                first > 0 or last < -(-self.length // PAGE)):
            raise oserror(errno.EINVAL, "VMA split refused (whole-file guest_memfd)")

    def copy_to(self, child: ChildProcess) -> None:
        """dup_mmap for this VMA: skipped where VM_DONTCOPY, without PTEs (shared
        mappings fault in again: vma_needs_copy), with its policy."""
        pages = -(-self.length // PAGE)
        if self.dontfork.covered(0, pages) == pages or getattr(self.backing, "whole_file", False):
            return
        copy = Mapping(child, self.addr, self.length, self.backing, self.pgoff, self.prot)
        for lo, hi, policy in self.policy.items():
            copy.policy.set(lo, hi, policy)
        for lo, hi, _ in self.dontfork.items():
            copy.holes.set(lo, hi, True)
        child.mappings.insert(self.addr, self.length, copy)
        self.backing.mappings.add(copy)

    def _fault(self, offset: int, length: int, write: bool) -> None:
        """The host page fault for [offset, offset+length): SIGBUS or present PTEs."""
        first, last = offset // PAGE, -(-(offset + length) // PAGE)
        for lo, hi in list(self.ptes.gaps(first, last)):
            reason = self.backing.fault(self.pgoff + lo, hi - lo, write)
            if reason is not None:
                bad = self._first_bad(lo, hi, write)
                raise HostSigbus(self.addr + max(bad * PAGE, offset), reason)
            self.ptes.set(lo, hi, True)

    def _first_bad(self, lo: int, hi: int, write: bool) -> int:
        """The first page of [lo, hi) whose fault fails (binary search over ranges)."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.backing.fault(self.pgoff + lo, mid - lo, write) is None:
                self.ptes.set(lo, mid, True)
                lo = mid
            else:
                hi = mid
        return lo

    def _allowed(self, offset: int, write: bool) -> None:
        """An access the VMA's protection forbids is SIGSEGV (no fault is taken)."""
        if not self.prot & (PROT_WRITE if write else PROT_READ):
            raise HostSigsegv(self.addr + offset, "protection")

    def mprotect(self, prot: int) -> None:
        """mprotect(2) of the whole mapping, checks in do_mprotect_pkey's order:
        unknown bits (arch_validate_prot) EINVAL, then PROT_EXEC on a file from a
        noexec mount (guest_memfd's: no VM_MAYEXEC) EACCES."""
        self._check(0, 0)
        if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
            raise oserror(errno.EINVAL, "mprotect")
        if prot & PROT_EXEC and not isinstance(self.backing, AnonymousMemory):
            raise oserror(errno.EACCES, "mprotect")
        self.prot = prot

    def read(self, offset: int, length: int) -> bytes:
        """A host load; HostSigbus/HostSigsegv where the kernel would signal."""
        self._check(offset, length)
        self._allowed(offset, False)
        self._fault(offset, length, False)
        data: bytes = self.backing.store.read(self.pgoff * PAGE + offset, length)
        return data

    def write(self, offset: int, data: bytes) -> None:
        """Like the host backend's write: the pages before a faulting one are
        written (the kernel's copy stops at the fault), then SIGBUS."""
        self._check(offset, len(data))
        self._allowed(offset, True)
        try:
            self._fault(offset, len(data), True)
        except HostSigbus as e:
            good = e.addr - self.addr - offset
            if good > 0:
                self.backing.store.write_bytes(self.pgoff * PAGE + offset, data[:good])
            raise
        self.backing.store.write_bytes(self.pgoff * PAGE + offset, data)

    def content_runs(self, offset: int, length: int) -> list[api.Run]:
        """api.ContentRuns: a host read of [offset, +length) as runs (read()'s
        faults and signals), their offsets relative to `offset`."""
        self._check(offset, length)
        self._allowed(offset, False)
        self._fault(offset, length, False)
        return [api.Run(*run) for run in
                to_runs(self.backing.store, self.pgoff * PAGE + offset, length)]

    def write_runs(self, offset: int, runs: list[api.Run]) -> None:
        """api.ContentRuns: host writes of runs, their offsets relative to `offset`."""
        for run in runs:
            self._check(offset + run.start, run.end - run.start)
            self._allowed(offset + run.start, True)
            self._fault(offset + run.start, run.end - run.start, True)
        write_runs(self.backing.store, self.pgoff * PAGE + offset,
                   [(r.start, r.end, r.data, r.word, r.step) for r in runs])

    def fill(self, offset: int, byte: int, length: int) -> None:
        """memset(3) over [offset, offset+length), faulting pages in for writing."""
        self._check(offset, length)
        self._allowed(offset, True)
        self._fault(offset, length, True)
        self.backing.store.fill(self.pgoff * PAGE + offset, length, byte)

    def touch_in_child(self, offset: int, write: bool = False, length: int = 1) -> int | None:
        """The signal a real access would get (the model has no child to kill)."""
        try:
            self._check(offset, length)
            self._allowed(offset, write)
            self._fault(offset, length, write)
        except HostSigbus:
            return signal.SIGBUS
        except HostSigsegv:
            return signal.SIGSEGV
        return None

    def pin(self, offset: int, length: int) -> Any:
        """pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) on [offset, offset+length), as an
        io_uring registered buffer does (kernel: mm/gup.c check_vma_flags: FOLL_WRITE
        on a mapping without VM_WRITE is EFAULT; faultin_page: a fault that would
        SIGBUS is EFAULT, and the pages before it stay faulted in)."""
        self._check(offset, length)
        if not self.prot & PROT_WRITE or getattr(self.backing, "gup_refused", False):
            raise oserror(errno.EFAULT, "pin")
        try:
            self._fault(offset, length, True)
        except HostSigbus as e:
            raise oserror(errno.EFAULT, "pin") from e
        first, last = offset // PAGE, -(-(offset + length) // PAGE)
        return self.backing.pin(self.pgoff + first, self.pgoff + last)

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) (madvise_behavior_valid; DONTNEED, REMOVE, POPULATE_*, HWPOISON act)."""
        self._check(offset, length)
        first, last = offset // PAGE, -(-(offset + length) // PAGE)
        if advice in _MADV_SPLITS:
            self._may_split(first, last)
        if advice in _MADV_NO_EFFECT:
            return
        if advice in (MADV_DONTFORK, MADV_DOFORK):  # madvise_vma_behavior: VM_DONTCOPY
            self.dontfork.set(first, last, True if advice == MADV_DONTFORK else None)
            return
        if advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED):  # drops PTEs; the shared
            self.ptes.clear(first, last)  # file keeps its pages
        elif advice == MADV_REMOVE:  # vfs_fallocate(PUNCH_HOLE|KEEP_SIZE) on the file range
            self.backing.remove(self.pgoff + first, self.pgoff + last)
        elif advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
            write = advice == MADV_POPULATE_WRITE
            if not self.prot & (PROT_WRITE if write else PROT_READ):
                # mm/gup.c faultin_page_range: check_vma_flags fails -> "-EINVAL
                # instead of -EFAULT for any permission problems", before any fault
                raise oserror(errno.EINVAL, "madvise")
            try:  # madvise_populate: a fault that would SIGBUS is EFAULT
                self._fault(offset, length, write)
            except HostSigbus as e:
                raise oserror(errno.EFAULT, "madvise") from e
        elif advice == MADV_HWPOISON and self.process.memory_failure:
            self._inject_memory_error(offset, length)
        else:  # COLLAPSE: guest_memfd refuses khugepaged (test_collapse); the rest above
            raise oserror(errno.EINVAL, "madvise")

    def _inject_memory_error(self, offset: int, length: int) -> None:
        """madvise_inject_error (CAP_SYS_ADMIN): GUP each page, then memory_failure();
        a page GUP cannot fault is EFAULT, and the pages before it stay poisoned.
        Our choice: memory_failure() is modelled for guest_memfd folios only, so
        anonymous memory answers EINVAL (the kernel would poison it)."""
        failure = getattr(self.backing, "memory_failure", None)
        if failure is None:
            raise oserror(errno.EINVAL, "madvise")
        first = offset // PAGE
        try:
            self._fault(offset, length, False)
        except HostSigbus as e:
            bad = (e.addr - self.addr) // PAGE
            failure(self.pgoff + first, self.pgoff + bad)
            raise oserror(errno.EFAULT, "madvise") from e
        failure(self.pgoff + first, self.pgoff + -(-(offset + length) // PAGE))

    def zap(self, first: int, last: int) -> None:
        """unmap_mapping_range for backing indexes [first, last)."""
        lo, hi = max(first - self.pgoff, 0), last - self.pgoff
        if lo < hi and self.ptes.boundaries():
            self.process.stats.ptes_zapped += self.ptes.covered(lo, hi)
            self.ptes.clear(lo, hi)

    # --- NUMA memory policy (mm/mempolicy.c) ------------------------------------------------
    def _shared_policy(self) -> ExtentMap[MemPolicy] | None:
        """The backing's shared policy (vm_ops->set_policy), if it has one."""
        return getattr(self.backing, "policy", None)

    def mbind(self, offset: int, length: int, mode: int, nodes: int | None = None,
              flags: int = 0, maxnode: int = MAXNODE) -> None:
        """mbind(2) on [offset, offset+length), checks in kernel_mbind/do_mbind's
        order; the policy goes to the inode (shared) or stays on the VMA."""
        self._check(offset, length)
        online = (1 << self.process.numa_nodes) - 1
        policy = mbind_policy(mode, nodes, maxnode, flags, offset, length, online)
        if policy is False:
            return
        first, last = offset // PAGE, -(-(offset + length) // PAGE)  # len = PAGE_ALIGN(len)
        self._may_split(first, last)  # mbind_range: vma_modify_policy splits the VMA
        if flags & uapi.MPOL_MF_STRICT and policy is not None:
            self._strict(first, last, policy)
        shared = self._shared_policy()
        if shared is not None:  # kvm_gmem_set_policy: mpol_set_shared_policy by file index
            shared.set(self.pgoff + first, self.pgoff + last, policy)
        else:
            self.policy.set(first, last, policy)

    def _strict(self, first: int, last: int, policy: MemPolicy) -> None:
        """MPOL_MF_STRICT: a page mapped here on a node the policy forbids is EIO
        (queue_folios_pte_range); guest_memfd folios cannot migrate (MOVE does not help).
        Only BIND-like masks forbid nodes (queue_folio_required)."""
        nodes_in = getattr(self.backing, "nodes_in", None)
        if nodes_in is None or policy.mode not in (uapi.MPOL_BIND, uapi.MPOL_INTERLEAVE,
                                                   uapi.MPOL_WEIGHTED_INTERLEAVE,
                                                   uapi.MPOL_PREFERRED_MANY):
            return
        for lo, hi, _ in self.ptes.overlapping(first, last):  # pages present here only
            if nodes_in(self.pgoff + lo, self.pgoff + hi) & ~policy.nodes:
                raise oserror(errno.EIO, "mbind: MPOL_MF_STRICT")

    def get_mempolicy(self, offset: int) -> tuple[int, int]:
        """get_mempolicy(2) with MPOL_F_ADDR: (mode | mode flags, nodemask)."""
        self._check(offset, 0)
        shared = self._shared_policy()
        page = offset // PAGE
        policy = shared.get(self.pgoff + page) if shared is not None else self.policy.get(page)
        return policy.reported() if policy is not None else DEFAULT_REPORT

    def move_pages(self, offset: int, count: int) -> list[int]:
        """move_pages(2) with nodes=NULL: the node of each page this mapping has a
        PTE for, -ENOENT elsewhere (do_pages_stat_array walks the page tables)."""
        self._check(offset, count * PAGE)
        node_of = getattr(self.backing, "node_of", lambda index: 0)
        first = offset // PAGE
        out = []
        for page in range(first, first + count):  # one entry per page asked for
            node = node_of(self.pgoff + page) if self.ptes.get(page) else None
            out.append(node if node is not None else -errno.ENOENT)
        return out

    def munmap(self) -> None:
        """munmap(2): the VMA and its PTEs go; the last mapping of a closed file releases it."""
        may_unmap = getattr(self.backing, "may_unmap", None)
        if self.mapped and may_unmap is not None:
            may_unmap(self)
        if self.mapped:
            self.mapped = False
            self.ptes = ExtentMap()
            self.process.mappings.remove(self.addr)
            detach = getattr(self.backing, "unmapped", None)
            if detach:
                detach(self)

    close = munmap

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.munmap()
