"""The host process's address space: where mmap places a mapping, and which
mapping an address falls in (mm/mmap.c, mm/vma.c, arch/x86/mm/mmap.c).

The mappings are kept in address order (find_vma in O(log n)), and the free
gaps between them in a treap keyed by address in which every node knows the
largest gap of its subtree, so the highest (or lowest) gap that is large enough
is found in O(log n). The kernel keeps the same per-subtree maximum gap in its
maple tree (mas_empty_area_rev), as it did in the augmented rbtree before it
(rb_subtree_gap). Placement is top-down below mmap_base, falling back to
bottom-up above TASK_UNMAPPED_BASE, as arch_get_unmapped_area_topdown does.

Not modelled (choices): address randomisation (mmap_base is one fixed point of
the kernel's random range), VMA merging (each mapping is one VMA), THP
alignment (this host's shmem_enabled is "never", and guest_memfd has no
get_unmapped_area), MAP_FIXED and address hints (the API has neither). An
explicit alignment is placed as vm_unmapped_area places one (align_mask).
"""

from __future__ import annotations

import errno
import random
from typing import Any

from sortedcontainers import SortedDict

from guestmem.exits import oserror

PAGE = 4096
TASK_SIZE = (1 << 47) - PAGE  # x86-64, 4-level paging: TASK_SIZE_MAX
MMAP_MIN_ADDR = PAGE  # vm.mmap_min_addr on this project's host (many distributions: 65536)
# mmap_base() is TASK_SIZE - gap - rnd: gap = RLIMIT_STACK + stack_guard_gap + the stack's
# random range (about 16 GiB), rnd < 2**28 pages. Ours is one fixed point of that range.
MMAP_BASE = 0x7F00_0000_0000
TASK_UNMAPPED_BASE = -(-(TASK_SIZE // 3) // PAGE) * PAGE  # mmap_legacy_base() without rnd
MAX_MAP_COUNT = 65530  # DEFAULT_MAX_MAP_COUNT, vm.max_map_count on this host
_priority = random.Random(0x9E3779B9).random  # treap shape only; a private stream keeps
# the model deterministic and leaves the global random state alone


def page_align(length: int) -> int:
    """PAGE_ALIGN on an unsigned long: wraps to 0 near 2**64."""
    return (length + PAGE - 1) & ~(PAGE - 1) & ((1 << 64) - 1)


class _Gap:
    """A free range [start, end), a treap node."""

    __slots__ = ("start", "end", "prio", "left", "right", "big")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.prio = _priority()
        self.left: _Gap | None = None
        self.right: _Gap | None = None
        self.big = end - start  # the largest gap in this subtree

    def pull(self) -> None:
        big = self.end - self.start
        for child in (self.left, self.right):
            if child is not None and child.big > big:
                big = child.big
        self.big = big


def _split(t: _Gap | None, key: int) -> tuple[_Gap | None, _Gap | None]:
    """(gaps starting below key, gaps starting at or above key)."""
    if t is None:
        return None, None
    if t.start < key:
        t.right, rest = _split(t.right, key)
        t.pull()
        return t, rest
    below, t.left = _split(t.left, key)
    t.pull()
    return below, t


def _merge(a: _Gap | None, b: _Gap | None) -> _Gap | None:
    """Join two treaps, every gap of a below every gap of b."""
    if a is None or b is None:
        return a or b
    if a.prio > b.prio:
        a.right = _merge(a.right, b)
        a.pull()
        return a
    b.left = _merge(a, b.left)
    b.pull()
    return b


def _rightmost(t: _Gap | None, length: int, key: int) -> _Gap | None:
    """The highest gap starting below key with room for length. Off the search
    path for key, a subtree is entered only if it holds such a gap: O(depth)."""
    while t is not None and t.big >= length:
        if t.start >= key:
            t = t.left
            continue
        found = _rightmost(t.right, length, key)
        if found is not None:
            return found
        if t.end - t.start >= length:
            return t
        t = t.left
    return None


def _leftmost(t: _Gap | None, length: int, key: int) -> _Gap | None:
    """The lowest gap starting at or above key with room for length."""
    while t is not None and t.big >= length:
        if t.start < key:
            t = t.right
            continue
        found = _leftmost(t.left, length, key)
        if found is not None:
            return found
        if t.end - t.start >= length:
            return t
        t = t.right
    return None


class FreeSpace:
    """The gaps of [0, TASK_SIZE) between mappings."""

    def __init__(self) -> None:
        self.root: _Gap | None = _Gap(0, TASK_SIZE)

    def _floor(self, key: int) -> _Gap | None:
        """The gap with the greatest start <= key."""
        t, best = self.root, None
        while t is not None:
            if t.start <= key:
                best, t = t, t.right
            else:
                t = t.left
        return best

    def _insert(self, start: int, end: int) -> None:
        if start < end:
            below, above = _split(self.root, start)
            self.root = _merge(_merge(below, _Gap(start, end)), above)

    def _remove(self, start: int) -> None:
        below, rest = _split(self.root, start)
        _, above = _split(rest, start + 1)
        self.root = _merge(below, above)

    def take(self, start: int, end: int) -> None:
        """[start, end) is mapped: it lies inside one gap, which shrinks or splits."""
        gap = self._floor(start)
        assert gap is not None and gap.end >= end, "mapping over a mapping"
        lo, hi = gap.start, gap.end
        self._remove(lo)
        self._insert(lo, start)
        self._insert(end, hi)

    def give(self, start: int, end: int) -> None:
        """[start, end) is unmapped: merged with the gaps on either side."""
        below = self._floor(start - 1) if start else None
        if below is not None and below.end == start:
            start = below.start
            self._remove(start)
        above = self._floor(end)
        if above is not None and above.start == end:
            end = above.end
            self._remove(above.start)
        self._insert(start, end)

    def highest(self, length: int, low: int, high: int) -> int | None:
        """unmapped_area_topdown: the top of the highest gap in [low, high) that
        holds length, or None."""
        top = self._floor(high - 1)
        key = high
        if top is not None and top.end > high:  # the gap reaches above high: clip it
            if high - max(top.start, low) >= length:
                return high - length
            key = top.start
        found = _rightmost(self.root, length, key)
        if found is None or found.end - max(found.start, low) < length:
            return None  # any gap further down starts below low
        return found.end - length

    def lowest(self, length: int, low: int, high: int) -> int | None:
        """unmapped_area: the bottom of the lowest gap in [low, high) that holds
        length, or None."""
        bottom = self._floor(low)
        key = low
        if bottom is not None and bottom.end > low:  # the gap reaches below low: clip it
            if min(bottom.end, high) - low >= length:
                return low
            key = bottom.start + 1
        found = _leftmost(self.root, length, key)
        if found is None or min(found.end, high) - found.start < length:
            return None  # any gap further up starts above high
        return found.start


class AddressSpace:
    """The VMAs of one process (mm_struct: mm_mt and map_count)."""

    def __init__(self) -> None:
        self.vmas: SortedDict = SortedDict()  # start -> (end, mapping)
        self.free = FreeSpace()

    def __len__(self) -> int:
        return len(self.vmas)

    def values(self) -> list[Any]:
        return [mapping for _, mapping in self.vmas.values()]

    def get_unmapped_area(self, length: int, align: int = 0) -> int:
        """do_mmap's length checks, then where a new mapping of length bytes goes
        (kernel: mm/mmap.c do_mmap, __get_unmapped_area; arch/x86/mm/mmap.c
        arch_get_unmapped_area_topdown, falling back to arch_get_unmapped_area).
        length is the syscall's size_t; align (a power of two) asks for an address
        that is a multiple of it, as vm_unmapped_area's align_mask does: the search
        asks for length + align - PAGE, and the address is rounded within the gap."""
        if length == 0:
            raise oserror(errno.EINVAL, "mmap")
        size = page_align(length)
        if size == 0:  # "Careful about overflows.."
            raise oserror(errno.ENOMEM, "mmap")
        if len(self.vmas) > MAX_MAP_COUNT:
            raise oserror(errno.ENOMEM, "mmap: vm.max_map_count")
        if size > TASK_SIZE:
            raise oserror(errno.ENOMEM, "mmap")
        slack = align - PAGE if align > PAGE else 0
        top = self.free.highest(size + slack, MMAP_MIN_ADDR, MMAP_BASE)
        if top is not None:
            return (top + slack) & ~(align - 1) if slack else top  # the gap's top, aligned down
        # "A failed mmap() very likely causes application failure": bottom-up
        bottom = self.free.lowest(size + slack, TASK_UNMAPPED_BASE, TASK_SIZE)
        if bottom is None:
            raise oserror(errno.ENOMEM, "mmap: no room in the address space")
        return -(-bottom // align) * align if slack else bottom

    def insert(self, addr: int, length: int, mapping: Any) -> None:
        end = addr + page_align(length)
        self.free.take(addr, end)
        self.vmas[addr] = (end, mapping)

    def remove(self, addr: int) -> None:
        end, _ = self.vmas.pop(addr)
        self.free.give(addr, end)

    def find(self, addr: int) -> tuple[Any, int] | None:
        """find_vma: the mapping that contains addr, and addr's offset in it."""
        i = self.vmas.bisect_right(addr) - 1
        if i < 0:
            return None
        start, (end, mapping) = self.vmas.peekitem(i)
        return (mapping, addr - start) if addr < end else None
