"""Memslot bad input the differential test found, the same calls on both backends."""

from __future__ import annotations

import errno
import os

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm

from .conftest import backends

PS = uapi.PAGE_SIZE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
LAST_GPA = (1 << 52) - PS  # kvm_mmu_max_gfn() without TDP: 52 address bits




def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("backend", backends())
def test_memslots_end_at_the_largest_gfn(backend):
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, kvm.create_vm() as vm, vm.create_guest_memfd(2 * PS, 0) as g, \
            kvm.mmap_anonymous(PS) as anon:
        region2 = vm.set_user_memory_region2
        assert errno_of(region2, 1, GMEM, LAST_GPA + PS, PS, 0, g, 0) == errno.EINVAL
        assert errno_of(region2, 1, GMEM, LAST_GPA, 2 * PS, 0, g, 0) == errno.EINVAL
        assert errno_of(region2, 1, GMEM, LAST_GPA, PS, 0, g, 0) is None, "the last page"
        vm.delete_memslot(1)
        assert errno_of(region2, 1, GMEM, 1 << 32, 2 * PS, 0, g, 0) is None, "g was unbound"
        region2(2, 0, 1 << 33, PS, anon.addr)
        assert errno_of(region2, 2, 0, LAST_GPA + PS, PS, anon.addr) == errno.EINVAL, "move"
        assert errno_of(region2, 2, 0, LAST_GPA, PS, anon.addr) is None


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("fd", [-1, 999, 1 << 31, (1 << 32) - 2])
def test_a_guest_memfd_fd_that_is_not_open_is_ebadf(backend, fd):
    """kvm_gmem_bind: fget() fails first, even for a slot beyond the largest gfn.
    (The model asked os.fstat about fds above 2**31 and raised OverflowError.)"""
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, kvm.create_vm() as vm:
        while 0 <= fd < 1 << 20 and _is_open(fd):  # a harness may hold fd 999: take a free one
            fd += 1
        for gpa in (1 << 32, 1 << 52):
            assert errno_of(vm.set_user_memory_region2, 1, GMEM, gpa, PS, 0, fd, 0) == \
                errno.EBADF


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("backend", backends())
def test_dirty_log_of_a_second_address_space_is_einval(backend):
    """kvm_get_dirty_log checks as_id (bits 16-31 of slot) before looking the slot up."""
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, kvm.create_vm() as vm:
        assert errno_of(vm.get_dirty_log, 1 << 16 | 1, 1) == errno.EINVAL
        assert errno_of(vm.get_dirty_log, 1, 1) == errno.ENOENT, "no such slot"


@pytest.mark.parametrize("backend", backends())
def test_dirty_log_fills_the_slots_bitmap_whatever_npages_says(backend):
    """KVM_GET_DIRTY_LOG writes the slot's whole bitmap: asked with npages=1 for a
    1 Mi-page slot, the kvm backend handed the kernel an 8-byte buffer for 128 KiB
    (a heap overflow). Both return the slot's bitmap. Run in a child: the overflow
    may kill it."""
    from .test_lifetime import in_child

    npages = 1 << 20

    def log_length():
        kvm = ModelKvm() if backend == "model" else HostKvm()
        with kvm, kvm.create_vm() as vm, kvm.mmap_anonymous(npages * PS) as anon:
            vm.set_user_memory_region2(1, uapi.KVM_MEM_LOG_DIRTY_PAGES, 1 << 32, npages * PS,
                                       anon.addr)
            for _ in range(20):  # a few rounds, so a corrupted heap shows
                log = vm.get_dirty_log(1, 1)
            return len(log)

    killed, out = in_child(log_length)
    assert killed is None, f"the child died of signal {killed}"
    assert out == str(npages // 8)
