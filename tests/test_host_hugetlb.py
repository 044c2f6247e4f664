"""The host backend's HugeTLB (guestmem.host.hugetlb) on this machine's kernel: the
pool counters after each step, as the kernel gave them (measured on 6.18, 2M pages;
/tmp/notes/hugetlb-host.md of issue 10 has the probes). Each test runs on a pool
of POOL 2M pages, and the fixture puts both pools back as it found them."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator

import pytest

from guestmem import api, uapi
from guestmem.exits import HostSigbus
from guestmem.host import hugetlb, libc
from guestmem.host.hugetlb import Hugetlb

M2 = 2 << 20
G1 = 1 << 30
POOL = 4
KEEP, PUNCH = uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE
HVO = "/proc/sys/vm/hugetlb_optimize_vmemmap"


# --- no pools needed ---------------------------------------------------------------------------
def test_memfd_flags_encode_log2_of_the_page_size():
    assert hugetlb.memfd_flags(M2) == os.MFD_HUGETLB | os.MFD_CLOEXEC | (21 << 26)
    assert hugetlb.memfd_flags(G1) == os.MFD_HUGETLB | os.MFD_CLOEXEC | (30 << 26)
    with pytest.raises(ValueError):
        hugetlb.memfd_flags(3 << 20)


def test_mount_options_omit_what_is_not_given():
    assert hugetlb.mount_options(M2, None, None) == "pagesize=2M"
    assert hugetlb.mount_options(G1, 4 * M2, M2) == f"pagesize=1G,size={4 * M2},min_size={M2}"


def test_no_sysfs_means_no_page_sizes(tmp_path):
    assert Hugetlb(str(tmp_path / "absent")).page_sizes == ()
    with pytest.raises(ValueError, match="no HugeTLB pool"):
        Hugetlb(str(tmp_path / "absent")).counters(M2)


# --- on the host's pools -----------------------------------------------------------------------
def _skip_reason() -> str | None:
    if not os.path.isdir(hugetlb.SYSFS):
        return f"no {hugetlb.SYSFS}: the kernel has no HugeTLB"
    if os.geteuid() != 0:
        return "not root: cannot size the HugeTLB pools (nr_hugepages)"
    if M2 not in Hugetlb().page_sizes:
        return f"no 2M pool in {hugetlb.SYSFS}"
    return None


def _restore(h: Hugetlb, found: dict[int, api.HugetlbCounters]) -> None:
    for size, was in found.items():
        if h.counters(size).overcommit != was.overcommit:  # 1G: EINVAL even for 0
            h.set_nr_overcommit_hugepages(size, was.overcommit)
        h.set_nr_hugepages(size, was.nr)


@pytest.fixture
def host() -> Iterator[Hugetlb]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    h = Hugetlb()
    found = {size: h.counters(size) for size in h.page_sizes}
    was = found[M2]
    if was.resv < 0:
        pytest.skip(f"the 2M pool's resv_hugepages is below zero ({was}): an accounting "
                    "slip of the kernel earlier on this host, which only a reboot clears")
    if was.resv or was.surplus or was.free != was.nr:
        pytest.skip(f"the 2M pool is in use by someone else: {was}")
    try:
        got = h.set_nr_hugepages(M2, POOL)
        if got != POOL:
            pytest.skip(f"the kernel gave {got} of {POOL} 2M pages")
        yield h
    finally:
        _restore(h, found)


def counts(h: Hugetlb) -> tuple[int, int, int, int, int]:
    """(nr, free, resv, surplus, overcommit) of the 2M pool."""
    c = h.counters(M2)
    return c.nr, c.free, c.resv, c.surplus, c.overcommit


def test_memfd_reserves_at_mmap_faults_on_touch_and_gives_back_at_close(host):
    with host.memfd_create(M2) as f:
        f.ftruncate(2 * M2)
        assert counts(host) == (4, 4, 0, 0, 0)
        m = f.mmap(2 * M2)
        assert counts(host) == (4, 4, 2, 0, 0)
        m.touch(0)
        assert counts(host) == (4, 3, 1, 0, 0)  # the fault consumes its reservation
        m.madvise(0, 2 * M2, libc.MADV_DONTNEED)
        assert counts(host) == (4, 3, 1, 0, 0)  # the page stays in the page cache
        m.madvise(0, M2, libc.MADV_REMOVE)
        assert counts(host) == (4, 4, 1, 0, 0)  # freed; page 0 has no reservation now
        m.touch(0)
        m.touch(M2)
        assert counts(host) == (4, 2, 0, 0, 0)
        m.munmap()
        assert counts(host) == (4, 2, 0, 0, 0)  # shared: the pages are the file's
    assert counts(host) == (4, 4, 0, 0, 0)


def test_mapping_keeps_the_file_and_its_reservations_alive(host):
    f = host.memfd_create(M2)
    m = f.mmap(2 * M2)  # no ftruncate: the mmap extends i_size
    assert f.size == 2 * M2
    m.touch(0)
    f.close()
    assert counts(host) == (4, 3, 1, 0, 0)
    m.munmap()
    assert counts(host) == (4, 4, 0, 0, 0)


def test_unfaulted_reservations_outlive_munmap_until_close(host):
    with host.memfd_create(M2) as f:
        f.mmap(2 * M2).munmap()
        assert counts(host) == (4, 4, 2, 0, 0)  # the inode's resv_map holds them
        with f.mmap(2 * M2):
            assert counts(host) == (4, 4, 2, 0, 0)  # already reserved
    assert counts(host) == (4, 4, 0, 0, 0)


def test_mmap_beyond_the_pool_is_enomem_and_overcommit_makes_surplus(host):
    with host.memfd_create(M2) as f, f.mmap(4 * M2):
        with host.memfd_create(M2) as g:
            with pytest.raises(OSError, match=r"\(mmap\)") as e:
                g.mmap(M2)
            assert e.value.errno == errno.ENOMEM
            assert g.size == 0  # i_size grows only once the reservation is made
            host.set_nr_overcommit_hugepages(M2, 1)
            with g.mmap(M2) as m:
                assert counts(host) == (5, 5, 5, 1, 1)
                m.touch(0)
                assert counts(host) == (5, 4, 4, 1, 1)
            assert counts(host) == (5, 4, 4, 1, 1)  # munmap: the page is still the file's
        assert counts(host) == (4, 4, 4, 0, 1)  # close: the surplus page goes to the buddy
    assert counts(host) == (4, 4, 0, 0, 1)


def test_a_fault_with_no_page_to_allocate_is_sigbus_in_a_child_and_here(host):
    with host.memfd_create(M2) as f, f.mmap(2 * M2) as m:
        m.touch(0)
        m.madvise(0, M2, libc.MADV_REMOVE)  # page 0 freed and unreserved
        with host.memfd_create(M2) as g, g.mmap(3 * M2):
            assert counts(host) == (4, 4, 4, 0, 0)  # free - resv = 0
            assert m.touch_in_child(0) == signal.SIGBUS
            with pytest.raises(HostSigbus):  # pwrite of /proc/self/mem: EIO
                m.touch(0)
            assert counts(host) == (4, 4, 4, 0, 0)
            m.touch(M2)  # reserved: fine
            assert counts(host) == (4, 3, 3, 0, 0)


def test_a_touch_beyond_eof_is_sigbus(host):
    with host.memfd_create(M2) as f, f.mmap(2 * M2) as m:
        f.ftruncate(M2)
        assert m.touch_in_child(M2) == signal.SIGBUS
        with pytest.raises(HostSigbus):
            m.touch(M2)


def test_fallocate_modes(host):
    with host.memfd_create(M2) as f:
        f.fallocate(0, 4096, 4096)
        assert (f.size, counts(host)) == (8192, (4, 3, 0, 0, 0))  # i_size not rounded
        f.fallocate(KEEP, M2 - 4096, 8192)  # touches pages 0 and 1
        assert (f.size, counts(host)) == (8192, (4, 2, 0, 0, 0))
        f.fallocate(PUNCH | KEEP, 4096, 2 * M2)  # only page 1 is inside: page 0 stays
        assert counts(host) == (4, 3, 0, 0, 0)
        f.fallocate(PUNCH | KEEP, 0, M2)
        assert counts(host) == (4, 4, 0, 0, 0)
        for mode in (PUNCH, uapi.FALLOC_FL_ZERO_RANGE, uapi.FALLOC_FL_COLLAPSE_RANGE,
                     uapi.FALLOC_FL_INSERT_RANGE, uapi.FALLOC_FL_UNSHARE_RANGE):
            with pytest.raises(OSError, match=r"\(fallocate\)") as e:
                f.fallocate(mode, 0, M2)
            assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            f.fallocate(0, 0, 0)
        assert e.value.errno == errno.EINVAL


def test_fallocate_beyond_the_pool_is_enospc_and_keeps_what_it_allocated(host):
    with host.memfd_create(M2) as f:
        with pytest.raises(OSError) as e:
            f.fallocate(0, 0, 6 * M2)
        assert e.value.errno == errno.ENOSPC
        assert (f.size, counts(host)) == (0, (4, 0, 0, 0, 0))
    assert counts(host) == (4, 4, 0, 0, 0)


def test_fallocate_consumes_the_mapping_reservation(host):
    with host.memfd_create(M2) as f, f.mmap(2 * M2):
        f.fallocate(KEEP, 0, 2 * M2)
        assert counts(host) == (4, 2, 0, 0, 0)


def test_ftruncate_takes_whole_huge_pages_and_shrinking_frees(host):
    with host.memfd_create(M2) as f:
        for length in (4096, M2 + 4096):
            with pytest.raises(OSError, match=r"\(ftruncate\)") as e:
                f.ftruncate(length)
            assert e.value.errno == errno.EINVAL
        f.ftruncate(3 * M2)
        with f.mmap(3 * M2) as m:
            m.touch(0)
            m.touch(M2)
            assert counts(host) == (4, 2, 1, 0, 0)
            f.ftruncate(M2)  # page 1 freed, page 2's reservation dropped
            assert counts(host) == (4, 3, 0, 0, 0)
            f.ftruncate(3 * M2)  # growing reserves nothing
            assert counts(host) == (4, 3, 0, 0, 0)


def test_mount_size_limits_reservations_and_faults(host):
    with host.mount(M2, size=2 * M2) as mount, mount.create() as a, mount.create() as b:
        a.ftruncate(3 * M2)
        with pytest.raises(OSError) as e:
            a.mmap(3 * M2)
        assert e.value.errno == errno.ENOMEM
        with a.mmap(2 * M2) as m:
            with pytest.raises(OSError) as e:
                a.fallocate(KEEP, 2 * M2, M2)
            assert e.value.errno == errno.ENOSPC
            m.touch(0)
            m.madvise(0, M2, libc.MADV_REMOVE)  # page 0 freed and unreserved
            with b.mmap(M2):
                assert counts(host) == (4, 4, 2, 0, 0)
                assert m.touch_in_child(0) == signal.SIGBUS  # the subpool is full
                with pytest.raises(HostSigbus):
                    m.touch(0)
        with pytest.raises(OSError, match=r"\(umount2\)") as e:
            mount.close()
        assert e.value.errno == errno.EBUSY
        assert os.path.ismount(mount.path)
    assert counts(host) == (4, 4, 0, 0, 0)


def test_mount_min_size_reserves_at_mount(host):
    with host.mount(M2, min_size=2 * M2) as mount:
        path = mount.path
        assert counts(host) == (4, 4, 2, 0, 0)
        with mount.create() as f, f.mmap(M2) as m:
            assert counts(host) == (4, 4, 2, 0, 0)  # out of the subpool's minimum
            m.touch(0)
            assert counts(host) == (4, 3, 1, 0, 0)
            with f.mmap(2 * M2, M2):  # 3 pages used: one more than the minimum
                assert counts(host) == (4, 3, 2, 0, 0)
        assert counts(host) == (4, 4, 2, 0, 0)
    assert counts(host) == (4, 4, 0, 0, 0)
    assert not os.path.exists(path)
    for size, min_size, err in ((None, 5 * M2, errno.ENOMEM), (2 * M2, 4 * M2, errno.EINVAL)):
        with pytest.raises(OSError, match=r"\(mount\)") as e:
            host.mount(M2, size=size, min_size=min_size)
        assert e.value.errno == err


def test_shrinking_the_pool_below_its_use_leaves_surplus(host):
    with host.memfd_create(M2) as f, f.mmap(3 * M2) as m:
        m.touch(0)
        m.touch(M2)
        assert host.set_nr_hugepages(M2, 1) == 3  # 2 in use + 1 reserved stay
        assert counts(host) == (3, 1, 1, 2, 0)
        assert host.set_nr_hugepages(M2, 0) == 3
        assert counts(host) == (3, 1, 1, 3, 0)
        m.madvise(0, M2, libc.MADV_REMOVE)  # a surplus page freed goes to the buddy
        assert counts(host) == (2, 1, 1, 2, 0)
    assert counts(host) == (0, 0, 0, 0, 0)


def test_no_page_size_the_kernel_lacks(host):
    with pytest.raises(OSError, match=r"\(memfd_create\)") as e:
        host.memfd_create(4 << 20)
    assert e.value.errno == errno.ENODEV
    with pytest.raises(OSError, match=r"\(mount\)") as e:
        host.mount(4096)
    assert e.value.errno == errno.EINVAL


@pytest.fixture
def hvo_setting() -> Iterator[str]:
    if not os.path.exists(HVO):
        pytest.skip(f"no {HVO}: HugeTLB Vmemmap Optimization not built")
    with open(HVO) as f:
        was = f.read().strip()
    try:
        yield was
    finally:
        with open(HVO, "w") as f:
            f.write(was)


def _vmemmap_pages() -> int:
    """vmemmap pages, boot-time and runtime (/proc/vmstat)."""
    with open("/proc/vmstat") as f:
        stat = dict(line.split() for line in f)
    return int(stat["nr_memmap_pages"]) + int(stat["nr_memmap_boot_pages"])


def test_hvo_frees_seven_vmemmap_pages_per_2m_page(host, hvo_setting):
    host.set_nr_hugepages(M2, 0)
    for setting, freed in (("1", 7), ("0", 0)):
        with open(HVO, "w") as f:
            f.write(setting)
        before = _vmemmap_pages()
        assert host.set_nr_hugepages(M2, 2) == 2
        assert before - _vmemmap_pages() == 2 * freed
        host.set_nr_hugepages(M2, 0)
        assert _vmemmap_pages() == before  # restored when the pages leave the pool


def test_a_reservation_whose_page_left_the_pool_takes_a_surplus_page(host):
    """A subpool's minimum restores its reservation when a surplus page is freed
    and leaves the pool (resv 1, free 0); the next allocation under it takes a
    surplus page from the buddy allocator. The same steps on the model give the
    same counters (tests/test_model_hugetlb.py has the model's side alone)."""
    from guestmem.model.hugetlb import Hugetlb as ModelHugetlb

    host.set_nr_hugepages(M2, 0)
    model = ModelHugetlb()
    seen = []
    host.set_nr_overcommit_hugepages(M2, 2)
    model.set_nr_overcommit_hugepages(M2, 2)
    mounts = [host.mount(M2, None, M2), model.mount(M2, None, M2)]
    try:
        files = [m.create() for m in mounts]
        for step in ("fallocate", "ftruncate", "fallocate"):
            for h, f in zip((host, model), files, strict=True):
                if step == "fallocate":
                    f.fallocate(0, M2 // 2, M2 + 4096)  # pages 0 and 1
                else:
                    f.ftruncate(0)
                seen.append(h.counters(M2))
            assert seen[-2] == seen[-1], step
        assert seen[-1] == api.HugetlbCounters(2, 0, 0, 2, 2)
        for f in files:
            f.close()
    finally:
        for m in mounts:
            m.close()
        host.set_nr_overcommit_hugepages(M2, 0)
    assert counts(host) == (0, 0, 0, 0, 0)
