"""The VMM's record of which guest memory is shared and which is private.

Seed 001 (Sean Christopherson, KVM_GET_SHARED_PAGES_LIST review): KVM should not
keep the list; the guest's KVM_HC_MAP_GPA_RANGE exits to userspace, and the VMM
keeps the "shared regions list" that live migration consults. This is that list:
an extent map over gfns, plus a log of every request as the guest made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from guestmem import hypercall, uapi
from guestmem.extents import ExtentMap

_PAGE_SIZE_BITS = hypercall.PAGE_SIZE_BITS
_PAGE_SIZE_MASK = hypercall.PAGE_SIZE_MASK
_ENC_MASK = hypercall.ENC_MASK
_GFN_LIMIT = hypercall.GFN_LIMIT


class Sharing(Enum):
    SHARED = "shared"
    PRIVATE = "private"


@dataclass(frozen=True)
class MapGpaRequest:
    """One KVM_HC_MAP_GPA_RANGE as the guest issued it, and what the VMM answered."""

    gpa: int
    npages: int  # always in 4 KiB pages, whatever the page-size hint
    attrs: int
    ret: int
    # a failed in-place conversion: the GPA of KVM_SET_MEMORY_ATTRIBUTES2's
    # error_offset (the first page with an elevated refcount), where known
    failed_gpa: int | None = None

    @property
    def page_size(self) -> int | None:
        return _PAGE_SIZE_BITS.get(self.attrs & _PAGE_SIZE_MASK)

    @property
    def encrypted(self) -> bool:
        return bool(self.attrs & _ENC_MASK)


def validate_map_gpa_range(gpa: int, npages: int, attrs: int) -> int:
    """0 if the request is well formed, else the negative guest error code: KVM's
    checks, then the VMM's (guestmem.hypercall)."""
    return hypercall.kvm_check(gpa, npages) or hypercall.vmm_check(attrs)


class SharedRegionTracker:
    """Shared/private state per gfn, kept as ranges; `initial` is what memory the
    guest has not yet converted is (SEV/TDX guests start private; default VMs shared)."""

    def __init__(self, initial: Sharing = Sharing.SHARED) -> None:
        self.initial = initial
        self.requests: list[MapGpaRequest] = []
        self._changed: ExtentMap[Sharing] = ExtentMap()
        # gfns whose state a request set since the last harvest_changed(): a
        # conversion without a write is still a change to migrate ("classification
        # dirty", ecosystem.md §3.3's inference).
        self._reclassified: ExtentMap[bool] = ExtentMap()

    def record(self, gpa: int, npages: int, attrs: int) -> int:
        """Validate and apply one guest request; returns the value for the guest's
        RAX. A rejected request is logged but changes no state."""
        return self.apply(gpa, npages, attrs, validate_map_gpa_range(gpa, npages, attrs))

    def apply(self, gpa: int, npages: int, attrs: int, ret: int,
              failed_gpa: int | None = None) -> int:
        """Log a request with the answer it got (and, for a failed conversion, the
        page that stopped it); only a successful one (ret 0) changes the
        shared/private state."""
        self.requests.append(MapGpaRequest(gpa, npages, attrs, ret, failed_gpa))
        if ret == 0:
            gfn = gpa >> uapi.PAGE_SHIFT
            state = Sharing.PRIVATE if attrs & _ENC_MASK else Sharing.SHARED
            # Store only what differs from the initial state: ranges stay few.
            self._changed.set(gfn, gfn + npages, None if state == self.initial else state)
            self._reclassified.set(gfn, gfn + npages, True)
        return ret

    def harvest_changed(self) -> list[tuple[int, int]]:
        """The gfn ranges requests set since the last harvest (set to their state
        or not), cleared as they are read, as KVM_GET_DIRTY_LOG clears its bitmap."""
        ranges = [(s, e) for s, e, _ in self._reclassified.items()]
        self._reclassified = ExtentMap()
        return ranges

    def private_gfns(self) -> list[tuple[int, int]]:
        """The private gfn ranges below GFN_LIMIT, as [first, last) pairs (ranges,
        never pages; for a tracker that starts private, the gaps between the
        shared ranges)."""
        if self.initial == Sharing.PRIVATE:
            return list(self._changed.gaps(0, _GFN_LIMIT))
        return [(s, e) for s, e, v in self._changed.items() if v == Sharing.PRIVATE]

    def replace(self, private: list[tuple[int, int]]) -> None:
        """Take a migrated list: exactly `private` is private (a destination's start)."""
        self._changed = ExtentMap()
        if self.initial == Sharing.PRIVATE:
            self._changed.set(0, _GFN_LIMIT, Sharing.SHARED)
        for s, e in private:
            self._changed.set(s, e, None if self.initial == Sharing.PRIVATE else Sharing.PRIVATE)

    def state(self, gpa: int) -> Sharing:
        return self._changed.get(gpa >> uapi.PAGE_SHIFT) or self.initial

    def ranges(self, state: Sharing, start: int = 0, end: int = _GFN_LIMIT << 12) -> list[
        tuple[int, int]
    ]:
        """(gpa, size) of every region in [start, end) that is in `state`."""
        s, e = start >> uapi.PAGE_SHIFT, -(-end // uapi.PAGE_SIZE)
        if state == self.initial:
            spans = list(self._changed.gaps(s, e))
        else:
            spans = [(a, b) for a, b, _ in self._changed.overlapping(s, e)]
        return [(a << uapi.PAGE_SHIFT, (b - a) << uapi.PAGE_SHIFT) for a, b in spans]

    def shared_ranges(self, start: int = 0, end: int = _GFN_LIMIT << 12) -> list[tuple[int, int]]:
        return self.ranges(Sharing.SHARED, start, end)
