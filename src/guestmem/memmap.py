"""What one guest_memfd's pages look like, as runs of alike pages (layer 1).

`GuestMemfd.memory_map()` returns a `MemoryMap` on both backends. The model sees
everything it keeps; the kernel backend sees what the kernel shows a process:
page-cache residency through mincore(2) on a mapping of the file, and which of
this process's mappings have the page mapped, through /proc/self/pagemap.
mincore reports a page cache folio only once it is uptodate (mm/mincore.c
mincore_page), so the kernel backend sees "uptodate", not "allocated": a page
fallocate allocated but nothing has touched is invisible to it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALLOCATED = "allocated"  # a folio is in the file
UPTODATE = "uptodate"  # ... and initialised, zeroed or written (PG_uptodate)
PRIVATE = "private"  # KVM_MEMORY_ATTRIBUTE_PRIVATE where bound; in place, the file's own
HOST_MAPPED = "host-mapped"  # a userspace PTE maps it
STAGE2_MAPPED = "stage2-mapped"  # an SPTE maps its gfn
PINNED = "pinned"  # GUP pins hold it
HWPOISON = "hwpoison"  # a memory error poisoned it
PROPERTIES = (ALLOCATED, UPTODATE, PRIVATE, HOST_MAPPED, STAGE2_MAPPED, PINNED, HWPOISON)


@dataclass(frozen=True)
class PageRun:
    """Pages [first, last) of the file (page indexes), all alike."""

    first: int
    last: int
    state: frozenset[str]
    nodes: str = ""  # NUMA placement, e.g. "0" or "0,1 interleaved"; "" if unknown or none

    @property
    def pages(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class MemoryMap:
    """A window [first, last) of a guest_memfd, as maximal runs of alike pages."""

    size: int  # the file's size in bytes
    first: int
    last: int
    runs: tuple[PageRun, ...]
    known: frozenset[str]  # the properties this backend can see

    def pages_with(self, prop: str) -> int:
        return sum(run.pages for run in self.runs if prop in run.state)

    def restricted(self, props: frozenset[str]) -> MemoryMap:
        """The same window seen through `props` only (and no NUMA nodes), runs merged
        again: what two backends that see different things can be compared on."""
        runs: list[PageRun] = []
        for run in self.runs:
            state = run.state & props
            if runs and runs[-1].state == state:
                runs[-1] = PageRun(runs[-1].first, run.last, state)
            else:
                runs.append(PageRun(run.first, run.last, state))
        return MemoryMap(self.size, self.first, self.last, tuple(runs), self.known & props)

    def as_json(self) -> dict[str, object]:
        return {"size": self.size, "first": self.first, "last": self.last,
                "known": sorted(self.known),
                "runs": [{"first": r.first, "last": r.last, "state": sorted(r.state),
                          "nodes": r.nodes} for r in self.runs]}


Intervals = list[tuple[int, int]]


def runs_of(first: int, last: int, flags: Mapping[str, Iterable[tuple[int, int]]],
            nodes: Iterable[tuple[int, int, str]] = ()) -> tuple[PageRun, ...]:
    """Maximal runs of [first, last) from per-property intervals: a sweep over
    their boundaries, so the cost follows the number of ranges, not of pages."""
    spans = {prop: _merged(first, last, ivs) for prop, ivs in flags.items()}
    placed = sorted((max(lo, first), min(hi, last), n) for lo, hi, n in nodes
                    if lo < last and hi > first)  # an extent map's: never overlapping
    starts = [lo for lo, _, _ in placed]
    cuts = {first, last}
    for ivs in spans.values():
        for lo, hi in ivs:
            cuts.update((lo, hi))
    for lo, hi, _ in placed:
        cuts.update((lo, hi))
    points = sorted(cuts)
    out: list[PageRun] = []
    for a, b in zip(points, points[1:], strict=False):
        state = frozenset(p for p, ivs in spans.items() if _inside(ivs, a))
        i = bisect.bisect_right(starts, a) - 1
        node = placed[i][2] if i >= 0 and a < placed[i][1] else ""
        if out and out[-1].state == state and out[-1].nodes == node and out[-1].last == a:
            out[-1] = PageRun(out[-1].first, b, state, node)
        else:
            out.append(PageRun(a, b, state, node))
    return tuple(out)


def _merged(first: int, last: int, intervals: Iterable[tuple[int, int]]) -> Intervals:
    clipped = sorted((max(lo, first), min(hi, last)) for lo, hi in intervals
                     if lo < last and hi > first)
    out: Intervals = []
    for lo, hi in clipped:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _inside(intervals: Intervals, point: int) -> bool:
    i = bisect.bisect_right(intervals, (point, float("inf"))) - 1
    return i >= 0 and intervals[i][0] <= point < intervals[i][1]


def intervals_of(first: int, bits: bytes) -> Intervals:
    """Page intervals from a per-page answer of the kernel (mincore, pagemap), one
    byte per page, nonzero where the property holds; found by re, in C."""
    return [(first + m.start(), first + m.end()) for m in re.finditer(rb"[^\x00]+", bits)]
