"""The model's HugeTLB pools and hugetlbfs (guestmem.model.hugetlb), on their own:
what the differential test cannot reach on this host (1 GiB pages, finite
memory, HVO, terabyte files)."""

from __future__ import annotations

import errno

import pytest

from guestmem import uapi
from guestmem.api import HugetlbCounters
from guestmem.exits import HostSigbus
from guestmem.model.hugetlb import SIZE_1G, SIZE_2M, Hugetlb, PhysicalMemory

S = SIZE_2M


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def test_the_pool_grows_only_as_far_as_memory_goes():
    hugetlb = Hugetlb(PhysicalMemory(5 * S))
    assert hugetlb.set_nr_hugepages(S, 8) == 5
    assert hugetlb.counters(S) == HugetlbCounters(5, 5, 0, 0, 0)
    assert hugetlb.set_nr_hugepages(S, 2) == 2
    assert hugetlb.memory.free_bytes == 3 * S, "freed pages go back to the buddy allocator"


def test_a_gigantic_pool_gets_what_fragmentation_allows_and_never_surplus():
    hugetlb = Hugetlb(PhysicalMemory(64 << 30, {SIZE_1G: 1}))
    assert hugetlb.set_nr_hugepages(SIZE_1G, 4) == 1
    assert errno_of(hugetlb.set_nr_overcommit_hugepages, SIZE_1G, 0) == errno.EINVAL
    f = hugetlb.memfd_create(SIZE_1G)
    assert errno_of(f.mmap, 2 * SIZE_1G) == errno.ENOMEM, "alloc_surplus: never gigantic"
    assert hugetlb.counters(SIZE_1G) == HugetlbCounters(1, 1, 0, 0, 0), "nothing kept"


def test_shrinking_below_what_is_in_use_makes_surplus_that_leaves_when_freed():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 3)
    f = hugetlb.memfd_create(S)
    f.fallocate(0, 0, 2 * S)
    assert hugetlb.set_nr_hugepages(S, 0) == 2
    assert hugetlb.counters(S) == HugetlbCounters(2, 0, 0, 2, 0)
    f.close()
    assert hugetlb.counters(S) == HugetlbCounters(0, 0, 0, 0, 0)


def test_a_reservation_beyond_the_pool_takes_surplus_pages_all_or_none():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 1)
    hugetlb.set_nr_overcommit_hugepages(S, 1)
    f = hugetlb.memfd_create(S)
    assert errno_of(f.mmap, 3 * S) == errno.ENOMEM
    assert hugetlb.counters(S) == HugetlbCounters(1, 1, 0, 0, 1)
    m = f.mmap(2 * S)
    assert hugetlb.counters(S) == HugetlbCounters(2, 2, 2, 1, 1)
    m.munmap()
    f.close()
    assert hugetlb.counters(S) == HugetlbCounters(1, 1, 0, 0, 1)


def test_a_subpool_minimum_is_reserved_at_mount_and_returned_at_unmount():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 4)
    assert errno_of(hugetlb.mount, S, S, 2 * S) == errno.EINVAL, "min_size > size"
    assert errno_of(hugetlb.mount, S, None, 5 * S) == errno.ENOMEM
    mount = hugetlb.mount(S, 3 * S, 2 * S)
    assert hugetlb.counters(S).resv == 2
    f = mount.create()
    m = f.mmap(2 * S)
    assert hugetlb.counters(S).resv == 2, "the subpool's minimum covers the mapping"
    m.touch(0)
    m.touch(S)
    try:
        f.mmap(2 * S, 2 * S)
    except OSError as e:
        assert e.errno == errno.ENOMEM, "size=: three pages at most"
    else:
        pytest.fail("the subpool's maximum was exceeded")
    assert errno_of(mount.close) == errno.EBUSY
    m.munmap()
    f.close()
    assert hugetlb.counters(S).resv == 2, "the minimum stays while mounted"
    mount.close()
    assert hugetlb.counters(S) == HugetlbCounters(4, 4, 0, 0, 0)


def test_a_fault_with_no_reservation_and_no_page_is_sigbus_and_changes_nothing():
    """A punched page loses its region; once another file has the pool's last page,
    faulting it again finds neither a reservation nor a free page."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 1)
    f = hugetlb.memfd_create(S)
    m = f.mmap(S)
    m.touch(0)
    f.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, S)
    g = hugetlb.memfd_create(S)
    g.fallocate(0, 0, S)
    before = hugetlb.counters(S)
    assert before == HugetlbCounters(1, 0, 0, 0, 0)
    try:
        m.touch(0)
    except HostSigbus:
        pass
    else:
        pytest.fail("faulted a page the pool does not have")
    assert hugetlb.counters(S) == before
    assert errno_of(hugetlb.memfd_create(S).fallocate, 0, 0, S) == errno.ENOSPC


def test_punch_hole_frees_faulted_pages_but_keeps_unused_reservations():
    """remove_inode_hugepages for a hole drops present pages only; the reservations
    of pages never faulted stay until truncation or eviction."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 4)
    f = hugetlb.memfd_create(S)
    m = f.mmap(2 * S)
    m.touch(0)
    assert hugetlb.counters(S) == HugetlbCounters(4, 3, 1, 0, 0)
    f.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, 0, 2 * S)
    assert hugetlb.counters(S) == HugetlbCounters(4, 4, 1, 0, 0)
    f.ftruncate(0)
    assert hugetlb.counters(S) == HugetlbCounters(4, 4, 0, 0, 0)
    try:
        m.touch(0)
    except HostSigbus:
        pass
    else:
        pytest.fail("a fault beyond EOF succeeded")


def test_hvo_frees_all_but_one_vmemmap_page_per_huge_page():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 2)
    hugetlb.set_nr_hugepages(SIZE_1G, 1)
    assert hugetlb.vmemmap_bytes(S) == 2 * 8 * 4096
    assert hugetlb.vmemmap_bytes(SIZE_1G) == 4096 * 4096
    hugetlb.hvo = True
    assert hugetlb.vmemmap_bytes(S) == 2 * 4096, "7 of 8 pages freed per 2 MiB page"
    assert hugetlb.vmemmap_bytes(SIZE_1G) == 4096, "4095 of 4096 per 1 GiB page"


def test_a_terabyte_file_is_reserved_and_faulted_per_range():
    hugetlb = Hugetlb(PhysicalMemory(2 << 40))
    hugetlb.set_nr_hugepages(SIZE_1G, 1024)
    f = hugetlb.memfd_create(SIZE_1G)
    m = f.mmap(1 << 40)
    f.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 512 * SIZE_1G)
    assert hugetlb.counters(SIZE_1G) == HugetlbCounters(1024, 512, 512, 0, 0)
    m.munmap()
    f.close()
    assert hugetlb.counters(SIZE_1G) == HugetlbCounters(1024, 1024, 0, 0, 0)


def test_the_report_is_shaped_like_sysfs_and_meminfo():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 3)
    report = hugetlb.report()
    assert report["hugepages-2048kB"] == {"nr": 3, "free": 3, "resv": 0, "surplus": 0,
                                          "overcommit": 0}
    assert report["meminfo"]["HugePages_Total"] == 3
    assert report["meminfo"]["Hugetlb"] == 3 * 2048


def test_half_a_million_2m_pages_are_sized_reserved_and_freed_per_range():
    """No per-page loop anywhere: pool sizing, reservation, allocation, freeing."""
    hugetlb = Hugetlb(PhysicalMemory(2 << 40))
    assert hugetlb.set_nr_hugepages(S, 1 << 19) == 1 << 19
    f = hugetlb.memfd_create(S)
    m = f.mmap(1 << 40)
    f.fallocate(uapi.FALLOC_FL_KEEP_SIZE, 0, 1 << 40)
    assert hugetlb.counters(S) == HugetlbCounters(1 << 19, 0, 0, 0, 0)
    hugetlb.set_nr_hugepages(S, 0)
    assert hugetlb.counters(S) == HugetlbCounters(1 << 19, 0, 0, 1 << 19, 0), "all in use"
    m.munmap()
    f.close()
    assert hugetlb.counters(S) == HugetlbCounters(0, 0, 0, 0, 0)
    assert hugetlb.memory.free_bytes == 2 << 40


def test_adopt_starts_the_model_where_another_pool_is():
    """The differential test's starting point: the host's counters, pages taken
    from the model's memory."""
    hugetlb = Hugetlb(PhysicalMemory(4 * S))
    hugetlb.adopt(S, HugetlbCounters(3, 2, 1, 1, 2))
    assert hugetlb.counters(S) == HugetlbCounters(3, 2, 1, 1, 2)
    assert hugetlb.memory.free_bytes == S
    assert errno_of(Hugetlb(PhysicalMemory(S)).adopt, S,
                    HugetlbCounters(2, 2, 0, 0, 0)) == errno.ENOMEM


def test_the_models_child_touch_reports_the_signal_touch_raises():
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 2)
    f = hugetlb.memfd_create(S)
    m = f.mmap(2 * S)
    f.ftruncate(S)  # page 1 is beyond EOF now
    assert m.touch_in_child(0) is None
    assert m.touch_in_child(S) == 7  # SIGBUS


# --- the resv_hugepages underflow this host showed (README "HugeTLB") --------------------
def _fill_pool(hugetlb):
    """Reserve every unreserved free page through a memfd (no unclaimed page left)."""
    c = hugetlb.counters(S)
    g = hugetlb.memfd_create(S)
    return g, g.mmap((c.free - c.resv) * S)


def test_a_failed_reservation_on_a_size_and_min_size_mount_takes_resv_below_zero():
    """hugetlb_reserve_pages' error path after a833a693 and "restore failed global
    reservations to subpool": the pages taken from the minimum go back with
    put_pages while used still counts the refused ones, so they are returned
    globally instead of to the subpool's reserve; umount then releases the whole
    minimum (unlock_or_release_subpool). Reproduced on this host's 6.18.44: one
    run takes resv_hugepages from -2 to -3. The model does the same."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 4)
    mount = hugetlb.mount(S, 2 * S, S)
    g, fill = _fill_pool(hugetlb)
    f = mount.create()
    assert errno_of(f.mmap, 2 * S) == errno.ENOMEM
    assert mount.spool.rsv == 0 and mount.spool.used == 0, "the minimum is not restored"
    f.close()
    mount.close()
    fill.munmap()
    g.close()
    assert hugetlb.counters(S) == HugetlbCounters(4, 4, -1, 0, 0)


def test_a_subpool_still_charged_at_umount_is_not_released():
    """alloc_hugetlb_folio's failure path (a833a693) leaves used_hpages charged
    after a fault that finds no page; subpool_is_free is then false at umount, so
    the subpool and its minimum's reservation stay (observed on this host: resv
    unchanged across the umount)."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 4)
    mount = hugetlb.mount(S, 2 * S, S)
    f = mount.create()
    m = f.mmap(2 * S)
    m.touch(0)
    m.madvise(0, S, 9)  # MADV_REMOVE: page 0 loses its reservation
    g, fill = _fill_pool(hugetlb)
    try:
        m.touch(0)
    except HostSigbus:
        pass
    else:
        pytest.fail("faulted a page the pool does not have")
    fill.munmap()
    g.close()
    m.munmap()
    f.close()
    before = hugetlb.counters(S).resv
    assert not mount.spool.is_free()
    mount.close()
    assert hugetlb.counters(S).resv == before, "the minimum stays reserved"


def test_one_reservation_never_exceeds_the_free_pages_even_with_resv_below_zero():
    """hugetlb_acct_memory refuses delta > allowed_mems_nr (the free pages) after
    gathering. On a sound pool gathering already makes room; with resv below
    zero it does not: 1 free page and resv -3 leave 4 pages "available", yet a
    4-page reservation is ENOMEM and changes nothing (seen on this host)."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_hugepages(S, 1)
    hugetlb.hstates[S].resv = -3  # the accounting slip this host showed
    f = hugetlb.memfd_create(S)
    before = hugetlb.counters(S)
    assert errno_of(f.mmap, 4 * S) == errno.ENOMEM
    assert hugetlb.counters(S) == before
    m = f.mmap(S)
    assert hugetlb.counters(S).resv == -2
    m.munmap()


def test_a_reservation_whose_page_went_away_takes_a_surplus_page():
    """A subpool's minimum restores its reservation when a page is freed
    (free_huge_folio's restore_reserve) even where that page was surplus and
    leaves the pool: resv 1, free 0. The next allocation under that reservation
    finds no free page and takes a surplus one from the buddy allocator
    (alloc_buddy_hugetlb_folio_with_mpol). Found by the differential; the kernel
    here ended at nr 2, free 0, surplus 2 where the model once said free -1."""
    hugetlb = Hugetlb()
    hugetlb.set_nr_overcommit_hugepages(S, 2)
    mount = hugetlb.mount(S, None, S)
    f = mount.create()
    f.fallocate(0, S // 2, S + 4096)  # pages 0 and 1
    f.ftruncate(0)
    assert hugetlb.counters(S) == HugetlbCounters(0, 0, 1, 0, 2)
    f.fallocate(0, S // 2, S + 4096)
    assert hugetlb.counters(S) == HugetlbCounters(2, 0, 0, 2, 2)
    f.close()
    mount.close()
    assert hugetlb.counters(S) == HugetlbCounters(0, 0, 0, 0, 2)
