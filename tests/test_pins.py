"""Pins a process can really take, on both backends.

On the kernel, Mapping.pin registers an io_uring buffer: pin_user_pages(FOLL_WRITE
| FOLL_LONGTERM) on every page (io_uring/rsrc.c), counted in /proc/self/status
VmPin until it is unregistered. That is the reference the in-place conversion
series' safety check refuses (EAGAIN), and what a punched page outlives.
"""

from __future__ import annotations

import errno

import pytest

from guestmem import uapi

from .conftest import backends, open_kvm

PS = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def vm_pin_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmPin:"):
                return int(line.split()[1])
    raise AssertionError("no VmPin in /proc/self/status")


def pinned_pages(backend, gmem, first, last):
    """What each backend can show of a pin: VmPin (kernel), the inode's pins (model)."""
    if backend == "kvm":
        return vm_pin_kib() // 4
    return sum(hi - lo for lo, hi, _ in gmem.inode.pins.overlapping(first, last))


@pytest.mark.parametrize("backend", backends())
def test_a_pin_faults_the_pages_in_and_holds_them_until_unpinned(backend):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        g = vm.create_guest_memfd(8 * PS, SHARED)
        m = g.mmap()
        m.write(PS, b"A")
        before = pinned_pages(backend, g, 0, 8)
        pin = m.pin(0, 4 * PS)
        assert pinned_pages(backend, g, 0, 8) == before + 4
        runs = {r.first: r.state for r in g.memory_map().runs}
        assert {"uptodate", "host-mapped"} <= runs[0], "pinning faulted the pages in"
        pin.unpin()
        pin.unpin()  # again: nothing to drop
        assert pinned_pages(backend, g, 0, 8) == before
        assert m.read(PS, 1) == b"A"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["private", "read-only"])
def test_pinning_what_the_host_cannot_write_is_efault(backend, case):
    """GUP refuses FOLL_WRITE on a mapping without PROT_WRITE (check_vma_flags), and a
    fault that would SIGBUS (a private guest_memfd page) is EFAULT, not a signal."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        g = vm.create_guest_memfd(4 * PS, MMAP if case == "private" else SHARED)
        m = g.mmap(prot=1) if case == "read-only" else g.mmap()
        before = pinned_pages(backend, g, 0, 4)
        try:
            m.pin(0, PS)
        except OSError as e:
            assert e.errno == errno.EFAULT
        else:
            raise AssertionError(f"pinned a {case} page")
        assert pinned_pages(backend, g, 0, 4) == before


@pytest.mark.parametrize("backend", backends())
def test_anonymous_memory_can_be_pinned(backend):
    with open_kvm(backend) as kvm:
        anon = kvm.mmap_anonymous(2 * PS)
        pin = anon.pin(0, 2 * PS)
        if backend == "kvm":
            assert vm_pin_kib() >= 8
        pin.unpin()
        anon.write(0, b"x")
        assert anon.read(0, 1) == b"x"


def test_a_punched_page_lives_on_in_a_pipe_that_references_it(host_kvm):
    """vmsplice(2) takes page references (not pins): PUNCH_HOLE removes the page from
    the guest_memfd, the mapping then reads a new zero page, and the pipe still
    reads the old bytes. The kernel, not the model: the model has no pipes."""
    import ctypes
    import os

    class Iovec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.vmsplice.restype = ctypes.c_ssize_t
    vm = host_kvm.create_vm()
    with vm, vm.create_guest_memfd(2 * PS, SHARED) as g:
        m = g.mmap()
        m.write(0, b"A" * PS)
        rfd, wfd = os.pipe()
        try:
            iov = Iovec(m.addr, PS)
            assert libc.vmsplice(wfd, ctypes.byref(iov), 1, 0) == PS, os.strerror(
                ctypes.get_errno())
            g.punch_hole(0, PS)
            assert m.read(0, 8) == bytes(8), "the file has a new, zero page"
            assert os.read(rfd, 8) == b"A" * 8, "the pipe still holds the old one"
        finally:
            os.close(rfd)
            os.close(wfd)
            m.munmap()


def test_a_dropped_pin_is_unpinned(host_kvm):
    """A RegisteredBuffer nobody unpinned gives its pages back when it is collected,
    as a closed io_uring would (but now, not from a kernel worker later)."""
    import gc

    vm = host_kvm.create_vm()
    with vm, vm.create_guest_memfd(4 * PS, SHARED) as g:
        m = g.mmap()
        before = vm_pin_kib()
        m.pin(0, 4 * PS)  # dropped at once
        gc.collect()
        assert vm_pin_kib() == before
        m.munmap()
