"""The host's HugeTLB pools and hugetlbfs (issue 10), behind api.Hugetlb.

Counters are the sysfs files of each hstate (/sys/kernel/mm/hugepages/
hugepages-<size>kB/, mm/hugetlb_sysfs.c); files are memfd_create(MFD_HUGETLB)
memfds or files on a hugetlbfs mount of our own (fs/hugetlbfs/inode.c), with
size= and min_size= making the mount's subpool. Stores go through
/proc/self/mem: where hugetlb_fault cannot give a page (pool empty, beyond EOF)
that write fails with EIO instead of SIGBUS killing the interpreter, and the
mapping raises HostSigbus; `touch_in_child` sees the real signal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Final, Self

from guestmem import _args, api
from guestmem.exits import HostSigbus, oserror
from guestmem.host import libc
from guestmem.host.owned import OwnedFd

SYSFS: Final = "/sys/kernel/mm/hugepages"
MFD_HUGE_SHIFT: Final = 26  # include/uapi/linux/memfd.h: log2(page size) << 26
MFD_HUGE_MASK: Final = 0x3F
_COUNTER_FILES: Final = {"nr": "nr_hugepages", "free": "free_hugepages",
                         "resv": "resv_hugepages", "surplus": "surplus_hugepages",
                         "overcommit": "nr_overcommit_hugepages"}


@contextlib.contextmanager
def _syscall(name: str) -> Iterator[None]:
    """An os function's OSError, re-raised naming the syscall `name`."""
    try:
        yield
    except OSError as e:
        raise oserror(e.errno, name) from None


def size_option(n: int) -> str:
    """A byte count as hugetlbfs's memparse reads it: 2M, 1G, else plain bytes."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def mount_options(page_size: int, size: int | None, min_size: int | None) -> str:
    """hugetlbfs's option string: pagesize=, then size= and min_size= where given."""
    opts = [f"pagesize={size_option(page_size)}"]
    opts += [f"{key}={value}" for key, value in (("size", size), ("min_size", min_size))
             if value is not None]
    return ",".join(opts)


def memfd_flags(page_size: int) -> int:
    """MFD_HUGETLB with the page size's MFD_HUGE_* bits (log2 << MFD_HUGE_SHIFT);
    ValueError for a size no such bits can encode."""
    shift = page_size.bit_length() - 1
    if page_size <= 0 or page_size & (page_size - 1) or shift > MFD_HUGE_MASK:
        raise ValueError(f"page_size={page_size:#x} is not a power of two MFD_HUGE_* encodes")
    return os.MFD_HUGETLB | os.MFD_CLOEXEC | (shift << MFD_HUGE_SHIFT)


@_args.checked
class HugetlbMapping:
    """A MAP_SHARED, PROT_READ|PROT_WRITE mapping of a hugetlbfs file."""

    def __init__(self, addr: int, length: int) -> None:
        self._addr = addr
        self._length = length
        self._mapped = True

    @property
    def addr(self) -> int:
        """Its start address (what mmap(2) returned)."""
        return self._addr

    @property
    def length(self) -> int:
        """Its length in bytes."""
        return self._length

    def _check(self, offset: int, length: int) -> None:
        if not self._mapped:
            raise oserror(errno.EBADF, "mapping was unmapped")
        if offset < 0 or length < 0 or offset + length > self._length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {self._length:#x} mapping")

    def touch(self, offset: int) -> None:
        """A one-byte store at offset through pwrite64(2) of /proc/self/mem (its GUP
        faults as a store would, hugetlb_fault): HostSigbus where that fault fails
        (EIO on this host: no page in the pool, beyond EOF)."""
        self._check(offset, 1)
        try:
            done = os.pwrite(libc.proc_self_mem(), b"\x5a", self._addr + offset)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                raise HostSigbus(self._addr + offset, os.strerror(e.errno)) from None
            raise oserror(e.errno, "pwrite64 /proc/self/mem") from None
        if done != 1:
            raise HostSigbus(self._addr + offset, "short write")

    def touch_in_child(self, offset: int) -> int | None:
        """A real one-byte store at offset in a forked child (fork(2), then a
        plain store): the signal that killed it (SIGBUS) or None."""
        self._check(offset, 1)
        return libc.touch_in_child(self._addr + offset, 1, write=True)

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) on [offset, offset+length) (MADV_DONTNEED, MADV_REMOVE, ...)."""
        self._check(offset, length)
        libc.madvise(self._addr + offset, length, advice)

    def munmap(self) -> None:
        """munmap(2), once (hugetlb_vm_op_close gives back unfaulted reservations)."""
        if self._mapped:
            self._mapped = False
            libc.munmap(self._addr, self._length)

    def close(self) -> None:
        """munmap(2), once."""
        self.munmap()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.munmap()


@_args.checked
class HugetlbFile(OwnedFd):
    """A file on hugetlbfs, owned fd: a MFD_HUGETLB memfd or a file on a mount.
    Its mappings keep it alive after close(), as vma->vm_file does."""

    @property
    def size(self) -> int:
        """st_size, from fstat(2)."""
        with _syscall("fstat"):
            return os.fstat(self.fd).st_size

    def ftruncate(self, length: int) -> None:
        """ftruncate(2) (hugetlbfs_setattr: sizes are whole huge pages, else EINVAL)."""
        with _syscall("ftruncate"):
            os.ftruncate(self.fd, length)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) (hugetlbfs_fallocate: KEEP_SIZE and PUNCH_HOLE only)."""
        libc.fallocate(self.fd, mode, offset, length)

    def mmap(self, length: int, offset: int = 0) -> HugetlbMapping:
        """mmap(2) MAP_SHARED, PROT_READ|PROT_WRITE (hugetlbfs_file_mmap reserves).
        ksys_mmap_pgoff rounds a hugetlb file's length up to whole huge pages (the
        VMA is that long; hugetlbfs's st_blksize is the huge page size)."""
        addr = libc.mmap(length, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, self.fd,
                         offset)
        huge = os.fstat(self.fd).st_blksize
        return HugetlbMapping(addr, -(-length // huge) * huge)


@_args.checked
class HugetlbMount:
    """A hugetlbfs mount of one page size on a directory of our own; close()
    unmounts it (umount2(2): EBUSY while a file on it is open or mapped) and
    removes the directory."""

    _path: str | None = None

    def __init__(self, page_size: int, size: int | None = None,
                 min_size: int | None = None) -> None:
        path = tempfile.mkdtemp(prefix="guestmem-hugetlbfs-")
        try:
            libc.mount("hugetlbfs", path, "hugetlbfs", 0,
                       mount_options(page_size, size, min_size))
        except OSError:
            os.rmdir(path)
            raise
        self._path = path
        self.page_size = page_size
        self._files = 0

    @property
    def path(self) -> str:
        """Where it is mounted; EBADF once unmounted."""
        if self._path is None:
            raise oserror(errno.EBADF, "unmounted")
        return self._path

    def create(self) -> HugetlbFile:
        """open(2) O_CREAT|O_EXCL|O_RDWR of a new file on the mount, then unlink(2)
        at once (so its pages go when it is closed and unmapped)."""
        self._files += 1
        name = os.path.join(self.path, f"file{self._files}")
        with _syscall("open"):
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            with _syscall("unlink"):
                os.unlink(name)
        except OSError:
            os.close(fd)
            raise
        return HugetlbFile(fd)

    def close(self) -> None:
        """umount2(2) then rmdir(2), once; EBUSY (and still mounted) while a file
        on it is open or mapped."""
        if self._path is not None:
            libc.umount2(self._path)
            path, self._path = self._path, None
            os.rmdir(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        """Forgotten while mounted: detach it lazily (MNT_DETACH) rather than leak it."""
        if self._path is not None:
            with contextlib.suppress(OSError):
                libc.umount2(self._path, libc.MNT_DETACH)
                os.rmdir(self._path)


@_args.checked
class Hugetlb:
    """The host's HugeTLB pools (sysfs) and hugetlbfs."""

    def __init__(self, sysfs: str = SYSFS) -> None:
        self.sysfs = sysfs

    def settle(self) -> None:
        """usleep(300 ms), as guest_memfd_hugetlb_reporting_test does after close:
        no syscall flushes the kernel's deferred HugeTLB work."""
        time.sleep(0.3)

    @property
    def page_sizes(self) -> tuple[int, ...]:
        """The huge page sizes there are pools for, in bytes (the hugepages-<size>kB
        directories of sysfs); () where HugeTLB is not built."""
        try:
            names = os.listdir(self.sysfs)
        except FileNotFoundError:
            return ()
        return tuple(sorted(int(n[len("hugepages-"):-len("kB")]) << 10 for n in names
                            if n.startswith("hugepages-") and n.endswith("kB")))

    def _file(self, page_size: int, name: str) -> str:
        if page_size not in self.page_sizes:
            raise ValueError(f"no HugeTLB pool of page_size={page_size:#x}; this host has "
                             f"{', '.join(size_option(s) for s in self.page_sizes) or 'none'}")
        return os.path.join(self.sysfs, f"hugepages-{page_size >> 10}kB", name)

    def _read(self, page_size: int, name: str) -> int:
        """One counter. The kernel keeps them as unsigned longs and prints them with
        %lu: a counter an accounting bug took below zero reads as 2**64 - n, and is
        returned as -n (seen here: resv_hugepages at 2**64 - 1)."""
        with open(self._file(page_size, name)) as f:
            value = int(f.read())
        return value - (1 << 64) if value >= 1 << 63 else value

    def _write(self, page_size: int, name: str, count: int) -> None:
        path = self._file(page_size, name)
        with _syscall(f"open {name}"):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with _syscall(f"write {name}"):
                os.write(fd, str(count).encode())
        finally:
            os.close(fd)

    def counters(self, page_size: int) -> api.HugetlbCounters:
        """The pool's counters, read(2) from sysfs hugepages-<size>kB (hugetlb_sysfs.c)."""
        return api.HugetlbCounters(**{field: self._read(page_size, name)
                                      for field, name in _COUNTER_FILES.items()})

    def set_nr_hugepages(self, page_size: int, count: int) -> int:
        """write(2) of nr_hugepages (set_max_huge_pages); returns the pool size reached,
        which is smaller where memory could not be found."""
        self._write(page_size, "nr_hugepages", count)
        return self._read(page_size, "nr_hugepages")

    def set_nr_overcommit_hugepages(self, page_size: int, count: int) -> None:
        """write(2) of nr_overcommit_hugepages."""
        self._write(page_size, "nr_overcommit_hugepages", count)

    def memfd_create(self, page_size: int) -> HugetlbFile:
        """memfd_create(2) with MFD_HUGETLB and the size's MFD_HUGE_* bits."""
        flags = memfd_flags(page_size)
        with _syscall("memfd_create"):
            fd = os.memfd_create("guestmem-hugetlb", flags)
        return HugetlbFile(fd)

    def mount(self, page_size: int, size: int | None = None,
              min_size: int | None = None) -> HugetlbMount:
        """mount(2) of hugetlbfs with pagesize=, size= and min_size= (in bytes)."""
        return HugetlbMount(page_size, size, min_size)
