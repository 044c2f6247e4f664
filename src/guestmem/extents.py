"""An extent map: values over half-open integer ranges, adjacent equal ranges merged.

The building block DESIGN.md asks for ("Scale is part of correctness"): the
kernel keeps per-index state in maple trees and multi-index xarrays, and so do
we, so that an operation costs in the number of ranges it touches, never in the
number of pages. Unset points have no value (None).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from sortedcontainers import SortedDict

V = TypeVar("V")


class ExtentMap(Generic[V]):
    """start -> (end, value), non-overlapping; equal neighbours are merged."""

    def __init__(self) -> None:
        self._map: SortedDict = SortedDict()

    def __len__(self) -> int:
        """Number of stored extents (not points)."""
        return len(self._map)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExtentMap) and list(self.items()) == list(other.items())

    def __repr__(self) -> str:
        body = ", ".join(f"[{s:#x},{e:#x})={v!r}" for s, e, v in self.items())
        return f"ExtentMap({body})"

    def copy(self) -> ExtentMap[V]:
        new: ExtentMap[V] = ExtentMap()
        new._map = self._map.copy()
        return new

    def items(self) -> Iterator[tuple[int, int, V]]:
        for start, (end, value) in self._map.items():
            yield start, end, value

    def get(self, point: int) -> V | None:
        i = self._map.bisect_right(point) - 1
        if i < 0:
            return None
        start = self._map.keys()[i]
        end, value = self._map[start]
        return value if point < end else None

    def overlapping(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        """Stored extents clipped to [start, end)."""
        if start >= end:
            return
        keys = self._map.keys()
        i = max(self._map.bisect_right(start) - 1, 0)
        while i < len(keys):
            s = keys[i]
            if s >= end:
                break
            e, value = self._map[s]
            if e > start:
                yield max(s, start), min(e, end), value
            i += 1

    def covered(self, start: int, end: int) -> int:
        """How many points of [start, end) have a value."""
        return sum(e - s for s, e, _ in self.overlapping(start, end))

    def all_equal(self, start: int, end: int, value: V | None) -> bool:
        """Does every point of [start, end) hold `value` (None: no value at all)?"""
        if value is None:
            return not any(True for _ in self.overlapping(start, end))
        pos = start
        for s, e, v in self.overlapping(start, end):
            if s != pos or v != value:
                return False
            pos = e
        return pos >= end

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Sub-ranges of [start, end) with no value."""
        pos = start
        for s, e, _ in self.overlapping(start, end):
            if s > pos:
                yield pos, s
            pos = e
        if pos < end:
            yield pos, end

    def set(self, start: int, end: int, value: V | None) -> None:
        """Give [start, end) `value` (None clears it)."""
        if start >= end:
            return
        self._cut(start)
        self._cut(end)
        for s in list(self._map.irange(start, end, inclusive=(True, False))):
            del self._map[s]
        if value is not None:
            self._map[start] = (end, value)
            self._merge_around(start)

    def clear(self, start: int, end: int) -> None:
        self.set(start, end, None)

    def _cut(self, point: int) -> None:
        """Split the extent containing `point` so that one starts exactly there."""
        i = self._map.bisect_right(point) - 1
        if i < 0:
            return
        s = self._map.keys()[i]
        e, value = self._map[s]
        if s < point < e:
            self._map[s] = (point, value)
            self._map[point] = (e, value)

    def _merge_around(self, start: int) -> None:
        end, value = self._map[start]
        nxt = self._map.get(end)
        if nxt is not None and nxt[1] == value:
            del self._map[end]
            end = nxt[0]
            self._map[start] = (end, value)
        i = self._map.index(start)
        if i > 0:
            ps = self._map.keys()[i - 1]
            pe, pv = self._map[ps]
            if pe == start and pv == value:
                del self._map[start]
                self._map[ps] = (end, value)
