import pytest

from guestmem import uapi
from guestmem.vmm.tracker import SharedRegionTracker, Sharing, validate_map_gpa_range

ENC = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
SZ2M = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M


@pytest.mark.parametrize(
    ("gpa", "npages", "attrs"),
    [
        (1, 1, 0),  # unaligned gpa
        (0x1000, 0, 0),  # no pages
        ((1 << 52) - 4096, 2, 0),  # beyond 52-bit physical addresses
        (0, 1, 0x3),  # undefined page-size encoding
        (0, 1, 0x100),  # unknown attribute bit
    ],
)
def test_bad_requests_get_kvm_einval_and_change_nothing(gpa, npages, attrs):
    t = SharedRegionTracker()
    assert validate_map_gpa_range(gpa, npages, attrs) == -uapi.KVM_EINVAL
    assert t.record(gpa, npages, attrs) == -uapi.KVM_EINVAL
    assert t.shared_ranges(0, 1 << 40) == [(0, 1 << 40)]
    assert t.requests[-1].ret == -uapi.KVM_EINVAL


def test_conversions_are_tracked_as_ranges():
    t = SharedRegionTracker(initial=Sharing.SHARED)
    assert t.record(1 << 32, 512, ENC | SZ2M) == 0
    assert t.state(1 << 32) is Sharing.PRIVATE
    assert t.state((1 << 32) + 512 * 4096) is Sharing.SHARED
    assert t.ranges(Sharing.PRIVATE) == [(1 << 32, 2 << 20)]
    # converting the middle page back to shared splits the private range
    assert t.record((1 << 32) + 4096, 1, 0) == 0
    assert t.ranges(Sharing.PRIVATE) == [(1 << 32, 4096), ((1 << 32) + 8192, (2 << 20) - 8192)]
    req = t.requests[0]
    assert (req.gpa, req.npages, req.page_size, req.encrypted) == (1 << 32, 512, 2 << 20, True)


def test_private_initial_state_tracks_the_shared_list():
    t = SharedRegionTracker(initial=Sharing.PRIVATE)
    t.record(0x10000, 4, 0)
    assert t.shared_ranges() == [(0x10000, 4 * 4096)]
    t.record(0x10000, 4, ENC)
    assert t.shared_ranges() == []


def test_a_terabyte_conversion_costs_one_range():
    t = SharedRegionTracker()
    t.record(0, (1 << 40) >> 12, ENC)
    assert t.ranges(Sharing.PRIVATE) == [(0, 1 << 40)]
    assert len(t._changed) == 1
