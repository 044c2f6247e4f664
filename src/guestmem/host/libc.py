"""The few libc calls Python's stdlib does not expose the way we need them.

mmap through libc (not the `mmap` module) so that a mapping may be larger than
the file, MAP_PRIVATE/PROT_EXEC can be requested and refused with the kernel's
errno, and the address is known for `userspace_addr`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import faulthandler
import os
import signal
import threading
from typing import Final

from guestmem.exits import oserror

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

PROT_NONE: Final = 0
PROT_READ: Final = 1
PROT_WRITE: Final = 2
PROT_EXEC: Final = 4
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000
MAP_FAILED: Final = ctypes.c_void_p(-1).value

MADV_DONTNEED: Final = 4
MADV_REMOVE: Final = 9
MADV_HUGEPAGE: Final = 14
MADV_COLLAPSE: Final = 25
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23


def _errno() -> int:
    return ctypes.get_errno()


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        raise oserror(_errno(), "mmap")
    return int(addr)


def mmap_aligned(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0,
                 align: int = 0) -> int:
    """mmap at a multiple of `align`, as the selftests get one (test_collapse):
    reserve length+align bytes of PROT_NONE address space, MAP_FIXED the mapping
    at the first aligned address in it, then unmap the rest of the reservation."""
    page = os.sysconf("SC_PAGE_SIZE")
    if align <= page:
        return mmap(length, prot, flags, fd, offset)
    span = -(-length // page) * page + align
    reserved = mmap(span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    addr = -(-reserved // align) * align
    got = _libc.mmap(addr, length, prot, flags | MAP_FIXED, fd, offset)
    if got is None or got == MAP_FAILED:
        err = _errno()
        munmap(reserved, span)
        raise oserror(err, "mmap")
    end = addr + span - align
    if addr > reserved:
        munmap(reserved, addr - reserved)
    if reserved + span > end:
        munmap(end, reserved + span - end)
    return addr


def ioctl_inout(fd: int, request: int, arg: ctypes.Structure, name: str) -> int:
    """ioctl(2) on a struct the kernel writes back even when the call fails
    (fcntl.ioctl copies it back only on success); EINTR is retried (PEP 475)."""
    while True:
        ret = int(_libc.ioctl(fd, request, ctypes.addressof(arg)))
        if ret >= 0:
            return ret
        err = _errno()
        if err != errno.EINTR:
            raise oserror(err, name)


def ioctl(fd: int, request: int, arg: int, name: str, retry_eintr: bool = True) -> int:
    """ioctl(2) with an integer argument as the kernel takes it, an unsigned long
    (fcntl.ioctl passes a C int: ids and types above 2**31 could not be asked).
    EINTR runs the signal handlers, as fcntl.ioctl does, then retries (PEP 475),
    unless the caller takes EINTR as an answer (KVM_RUN: a kick). Seen here once:
    KVM_CREATE_VM interrupted by a signal in a full test run."""
    while True:
        ret = _libc.ioctl(fd, request, arg)
        if ret >= 0:
            return int(ret)
        err = _errno()
        if err == errno.EINTR:
            ctypes.pythonapi.PyErr_CheckSignals()
            if retry_eintr:
                continue
        raise oserror(err, name)


def munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise oserror(_errno(), "munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    if _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(prot)) != 0:
        raise oserror(_errno(), "mprotect")


def madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        raise oserror(_errno(), "madvise")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode bits (os.posix_fallocate cannot pass a mode)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        raise oserror(_errno(), "fallocate")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """mount(2); `data` is the filesystem's option string (hugetlbfs: pagesize=, size=, ...)."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags,
                   None if data is None else os.fsencode(data)) != 0:
        raise oserror(_errno(), "mount")


MNT_DETACH: Final = 2


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): EBUSY while a file on the mount is open or mapped (flags=0)."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        raise oserror(_errno(), "umount2")


def memset(addr: int, byte: int, length: int) -> None:
    _libc.memset(addr, byte, length)


def read_memory(addr: int, length: int) -> bytes:
    return ctypes.string_at(addr, length)


def write_memory(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl); glibc has no wrappers
# for these (libnuma does), so they go through syscall(2).
SYS_MBIND: Final = 237
SYS_GET_MEMPOLICY: Final = 239
SYS_MOVE_PAGES: Final = 279
_libc.syscall.restype = ctypes.c_long
_NODEMASK_BITS: Final = 64 * 16  # room for 1024 nodes, as the kernel's MAX_NUMNODES allows
MAXNODE: Final = _NODEMASK_BITS + 1  # mbind reads maxnode - 1 bits (get_nodes)


def _nodemask(nodes: int) -> ctypes.Array[ctypes.c_ulong]:
    words = (ctypes.c_ulong * (_NODEMASK_BITS // 64))()
    for i in range(len(words)):
        words[i] = (nodes >> (64 * i)) & ((1 << 64) - 1)
    return words


def mbind(addr: int, length: int, mode: int, nodes: int | None, maxnode: int,
          flags: int) -> None:
    """mbind(2); `nodes` is the nodemask as an int (bit n = node n), None for NULL."""
    mask = _nodemask(nodes) if nodes is not None else None
    ret = _libc.syscall(ctypes.c_long(SYS_MBIND), ctypes.c_ulong(addr), ctypes.c_ulong(length),
                        ctypes.c_ulong(mode), mask, ctypes.c_ulong(maxnode),
                        ctypes.c_uint(flags))
    if ret != 0:
        raise oserror(_errno(), "mbind")


def get_mempolicy(addr: int, flags: int, maxnode: int = _NODEMASK_BITS) -> tuple[int, int]:
    """get_mempolicy(2): (mode with its flags, nodemask as an int)."""
    mode, mask = ctypes.c_int(0), _nodemask(0)
    ret = _libc.syscall(ctypes.c_long(SYS_GET_MEMPOLICY), ctypes.byref(mode), mask,
                        ctypes.c_ulong(maxnode), ctypes.c_ulong(addr), ctypes.c_ulong(flags))
    if ret != 0:
        raise oserror(_errno(), "get_mempolicy")
    return mode.value, sum(int(w) << (64 * i) for i, w in enumerate(mask))


# --- long-term pins: io_uring registered buffers ----------------------------------------------
# IORING_REGISTER_BUFFERS pins every page of a buffer with pin_user_pages(FOLL_WRITE |
# FOLL_LONGTERM) (io_uring/rsrc.c io_sqe_buffer_register, io_pin_pages) until it is
# unregistered: the userspace way to hold what the in-place conversion selftest's
# pin_pages holds through CONFIG_GUP_TEST.
SYS_IO_URING_SETUP: Final = 425
SYS_IO_URING_REGISTER: Final = 427
IORING_REGISTER_BUFFERS: Final = 0
IORING_UNREGISTER_BUFFERS: Final = 1
_IO_URING_PARAMS_SIZE: Final = 120  # sizeof(struct io_uring_params)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def pin_user_buffer(addr: int, length: int) -> int:
    """A one-entry io_uring whose registered buffer [addr, addr+length) is pinned;
    its fd. The ring is closed again when registration fails."""
    params = (ctypes.c_uint8 * _IO_URING_PARAMS_SIZE)()
    ring = _libc.syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(1), params)
    if ring < 0:
        raise oserror(_errno(), "io_uring_setup")
    iov = _Iovec(addr, length)
    if _libc.syscall(ctypes.c_long(SYS_IO_URING_REGISTER), ctypes.c_uint(ring),
                     ctypes.c_uint(IORING_REGISTER_BUFFERS), ctypes.byref(iov),
                     ctypes.c_uint(1)) < 0:
        err = _errno()
        os.close(ring)
        raise oserror(err, "io_uring_register(IORING_REGISTER_BUFFERS)")
    return int(ring)


def unpin_user_buffer(ring: int) -> None:
    """Unregister (unpin) now, then close: closing alone unpins later, from a worker."""
    _libc.syscall(ctypes.c_long(SYS_IO_URING_REGISTER), ctypes.c_uint(ring),
                  ctypes.c_uint(IORING_UNREGISTER_BUFFERS), None, ctypes.c_uint(0))
    os.close(ring)


def move_pages_status(addrs: list[int]) -> list[int]:
    """move_pages(2) of this process with nodes=NULL: where each page is (a node
    id), or a negative errno per page (-ENOENT: no page mapped there)."""
    n = len(addrs)
    pages, status = (ctypes.c_void_p * n)(*addrs), (ctypes.c_int * n)()
    ret = _libc.syscall(ctypes.c_long(SYS_MOVE_PAGES), ctypes.c_long(0), ctypes.c_ulong(n),
                        pages, None, status, ctypes.c_int(0))
    if ret != 0:
        raise oserror(_errno(), "move_pages")
    return list(status)


def mincore(addr: int, length: int) -> bytes:
    """mincore(2): one byte per page, bit 0 set where the page is resident."""
    vec = ctypes.create_string_buffer(-(-length // os.sysconf("SC_PAGE_SIZE")))
    if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        raise oserror(_errno(), "mincore")
    return vec.raw


SYS_PIDFD_OPEN: Final = 434
SYS_PIDFD_GETFD: Final = 438


def pidfd_open(pid: int) -> int:
    """pidfd_open(2)."""
    fd = _libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        raise oserror(_errno(), "pidfd_open")
    return int(fd)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """pidfd_getfd(2): a copy of another process's fd (O_CLOEXEC)."""
    fd = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                       ctypes.c_int(targetfd), ctypes.c_uint(0))
    if fd < 0:
        raise oserror(_errno(), "pidfd_getfd")
    return int(fd)


def fd_count() -> int:
    """Open fds of this process, for leak tests."""
    return len(os.listdir("/proc/self/fd"))


# --- kicking a vCPU out of KVM_RUN from another thread -------------------------------------
# A VMM stops a running vCPU with kvm_run->immediate_exit = 1 plus a signal to the
# vCPU's thread (Documentation/virt/kvm/api.rst, KVM_RUN: EINTR). The signal needs
# a handler: an ignored signal is discarded without interrupting anything. Python's
# signal.signal() only works in the main thread, so the handler is installed with
# sigaction(2) directly; it only has to exist and be async-signal-safe, and libc's
# getpid (which ignores its argument) is such a function.
KICK_SIGNAL: Final = signal.SIGRTMIN + 5


class _Sigaction(ctypes.Structure):
    _fields_ = [("sa_handler", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_kick_lock = threading.Lock()
_kick_installed = False


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a no-op handler unless the program has its own."""
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return
        old = _Sigaction()
        if _libc.sigaction(KICK_SIGNAL, None, ctypes.byref(old)) != 0:
            raise oserror(_errno(), "sigaction")
        if old.sa_handler in (None, 0, 1):  # SIG_DFL or SIG_IGN: ours
            act = _Sigaction(sa_handler=ctypes.cast(_libc.getpid, ctypes.c_void_p).value)
            if _libc.sigaction(KICK_SIGNAL, ctypes.byref(act), None) != 0:
                raise oserror(_errno(), "sigaction")
        _kick_installed = True


def block_kick_signal() -> set[int]:
    """Block KICK_SIGNAL in the calling thread; the signals it blocked before."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [KICK_SIGNAL])} - \
        {int(KICK_SIGNAL)}


def sigset_bits(signals: set[int]) -> int:
    """The kernel's sigset_t as an int: bit n-1 for signal n."""
    return sum(1 << (sig - 1) for sig in signals)


def eat_kick_signals() -> None:
    """Take pending kick signals off the calling thread, where it blocks them."""
    while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
        pass


def kick_thread(thread_id: int) -> None:
    """Interrupt whatever blocking call thread `thread_id` is in (EINTR)."""
    signal.pthread_kill(thread_id, KICK_SIGNAL)


# --- touching memory without dying of it -------------------------------------------------------
_proc_self_mem: int | None = None


def proc_self_mem() -> int:
    """This process's /proc/self/mem, opened once: loads and stores through it fault
    as real ones do, and a fault the kernel would answer with SIGBUS fails the
    pread/pwrite (EIO) instead. A forked child must open its own (this fd names
    the parent's mm)."""
    global _proc_self_mem
    if _proc_self_mem is None:
        _proc_self_mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    return _proc_self_mem


def touch_in_child(addr: int, length: int, write: bool) -> int | None:
    """Load (or store 0x5A into) [addr, addr+length) with plain instructions in a
    fork(2)ed child; the signal that killed it, or None."""
    pid = os.fork()
    if pid == 0:  # the child: like a C program would
        faulthandler.disable()  # the expected SIGBUS is no crash to report
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        try:
            if write:
                memset(addr, 0x5A, length)
            else:
                ctypes.string_at(addr, length)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
