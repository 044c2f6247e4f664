"""The real backend: typed wrappers over /dev/kvm, one class per fd kind.

Methods are the ioctls and file operations by their kernel names. Every failure
is the kernel's own errno as OSError; nothing here re-validates what the kernel
validates (the point is to observe the kernel). Each object owns its fd and
closes it on `close()` / context exit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
from typing import Self, TypeVar

from guestmem import _args, api, memmap, uapi
from guestmem.caps import Capabilities
from guestmem.exits import (
    Exit,
    FailEntryExit,
    HltExit,
    HostSigbus,
    HostSigsegv,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    KvmRunError,
    MemoryFaultExit,
    MmioExit,
    MsrExit,
    PreFaultError,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    oserror,
)
from guestmem.host import libc, procfs
from guestmem.host.fork import ChildProcess
from guestmem.host.hugetlb import Hugetlb
from guestmem.host.owned import OwnedFd
from guestmem.host.populate import PopulateLimit
from guestmem.memmap import MemoryMap

BACKEND = "kvm"
T = TypeVar("T")
PAGE = uapi.PAGE_SIZE
MEMORY_MAP_LIMIT = 4 << 30  # memory_map() reads the kernel's per-page answers: 1 Mi pages
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore: bit 0 is residency
CAPABILITY_SCAN = 512  # KVM_CAP_* numbers probed (6.18's highest is in the 240s)
_PROBED: dict[int, Capabilities] = {}  # by the device number of /dev/kvm


_Fd = OwnedFd  # the file-descriptor base of every kvm object here


def kvm_implementation() -> str:
    """Which module backs /dev/kvm (host-notes: this machine is kvm_pvm)."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return "unknown"


def numa_node_count() -> int:
    try:
        return sum(1 for d in os.listdir("/sys/devices/system/node") if d[4:].isdigit()
                   and d.startswith("node"))
    except FileNotFoundError:
        return 1


@_args.checked
class Kvm(_Fd):
    """/dev/kvm."""

    backend = BACKEND
    _hugetlb: Hugetlb | None = None

    def __init__(self, path: str = "/dev/kvm", populate_limit: int | None = None) -> None:
        """Open /dev/kvm. populate_limit bounds the memory one call may populate
        (bytes; default: half of MemAvailable at call time, see host.populate)."""
        self.populate_limit = PopulateLimit(populate_limit)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise oserror(e.errno, f"open {path}") from None
        super().__init__(fd)
        self._caps: Capabilities | None = None

    def api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return self._ioctl(uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION at system scope."""
        return self._ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE."""
        return self._ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_vm_types(self) -> frozenset[int]:
        """KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) as a set."""
        # Selftests treat a missing KVM_CAP_VM_TYPES as BIT(default) (upstream.md §1.4).
        mask = self.check_extension(uapi.KVM_CAP_VM_TYPES) or 1 << uapi.KVM_X86_DEFAULT_VM
        return frozenset(t for t in range(64) if mask >> t & 1)

    @property
    def capabilities(self) -> Capabilities:
        """What this host's KVM offers and does, probed once per process; EBADF once
        closed, probed before or not (as the model)."""
        if self._fd is None:
            raise oserror(errno.EBADF, "KVM_CHECK_EXTENSION")
        if self._caps is None:
            key = os.fstat(self.fd).st_rdev
            if key not in _PROBED:
                _PROBED[key] = self._probe()
            self._caps = _PROBED[key]
        return self._caps

    def _numbers(self, target: Kvm | Vm) -> dict[int, int]:
        """Every nonzero KVM_CHECK_EXTENSION answer of `target`, named or not."""
        values = {nr: target.check_extension(nr) for nr in range(CAPABILITY_SCAN)}
        return {nr: v for nr, v in values.items() if v}

    def _probe(self) -> Capabilities:
        from guestmem.host import probe  # probe runs guests with this module's classes

        system_numbers = self._numbers(self)
        vm_numbers: dict[int, dict[int, int]] = {}
        for vm_type in sorted(self.supported_vm_types()):
            with self.create_vm(vm_type) as vm:
                vm_numbers[vm_type] = self._numbers(vm)
        default_flags = vm_numbers.get(uapi.KVM_X86_DEFAULT_VM, {}).get(
            uapi.KVM_CAP_GUEST_MEMFD_FLAGS, 0)
        return Capabilities.from_numbers(
            system_numbers, vm_numbers,
            api_version=self.api_version(),
            implementation=kvm_implementation(),
            numa_nodes=numa_node_count(),
            gmem_shared_policy=self._probe_gmem_shared_policy(default_flags),
            execution=probe.guest_execution(self),
            shadow_paging=probe.shadow_paging(self),
            gmem_bind_overlap_errno=probe.gmem_bind_overlap_errno(self),
            memory_failure=probe.memory_failure_built(),
            gmem_in_place_conversion=probe.gmem_in_place_conversion(self),
        )

    def _probe_gmem_shared_policy(self, default_gmem_flags: int) -> bool:
        """Does an mbind() through one mapping of a guest_memfd show through another
        (a per-inode policy, kvm_gmem_set_policy), or stay on its VMA?"""
        if not default_gmem_flags & uapi.GUEST_MEMFD_FLAG_MMAP:
            return False
        page = uapi.PAGE_SIZE
        with (self.create_vm() as vm,
              vm.create_guest_memfd(page, uapi.GUEST_MEMFD_FLAG_MMAP) as gmem,
              gmem.mmap(page) as first, gmem.mmap(page) as second):
            try:
                first.mbind(0, page, uapi.MPOL_BIND, 1)
            except OSError:  # ENOSYS without CONFIG_NUMA
                return False
            return second.get_mempolicy(0)[0] == uapi.MPOL_BIND

    def open_fd_count(self) -> int:
        """Open fds of this process (leak checks)."""
        return libc.fd_count()

    @property
    def hugetlb(self) -> Hugetlb:
        """This machine's HugeTLB pools (sysfs) and hugetlbfs."""
        if self._hugetlb is None:
            self._hugetlb = Hugetlb()
        return self._hugetlb

    def fork(self) -> ChildProcess:
        """fork(2) of this process: a child that serves loads and stores (host/fork.py)."""
        return ChildProcess()

    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        """KVM_CREATE_VM."""
        return Vm(self, self._ioctl(uapi.KVM_CREATE_VM, vm_type), vm_type)

    def mmap_anonymous(self, length: int, align: int = 0) -> Mapping:
        """mmap(2) of MAP_SHARED|MAP_ANONYMOUS memory, e.g. for a memslot's userspace_addr."""
        prot = libc.PROT_READ | libc.PROT_WRITE
        flags = libc.MAP_SHARED | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
        return Mapping(libc.mmap_aligned(length, prot, flags, align=align), length, prot,
                       populate_limit=self.populate_limit)


@_args.checked
class Vm(_Fd):
    def __init__(self, kvm: Kvm, fd: int, vm_type: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vm_type = vm_type
        # Asked now: the VM's vCPUs need it even after /dev/kvm is closed.
        self.vcpu_mmap_size = kvm.vcpu_mmap_size()
        # Pages of each memslot set through this object: KVM_GET_DIRTY_LOG writes a
        # slot's whole bitmap, so the buffer must hold it.
        self._slot_pages: dict[int, int] = {}
        self._slot_ranges: dict[int, tuple[int, int]] = {}  # slot -> (gpa, size), for pre-fault

    def _memslot_bytes(self, gpa: int, size: int) -> int:
        """How much of [gpa, gpa+size) (as u64s) the memslots set so far cover."""
        start, end = gpa % (1 << 64), min(gpa % (1 << 64) + size % (1 << 64), 1 << 64)
        return sum(max(0, min(end, lo + n) - max(start, lo))
                   for lo, n in self._slot_ranges.values())

    def _set_region(self, request: int, region: ctypes.Structure) -> None:
        self._ioctl(request, region)
        slot = region.slot
        if region.memory_size:
            self._slot_pages[slot] = region.memory_size // uapi.PAGE_SIZE
            self._slot_ranges[slot] = (region.guest_phys_addr, region.memory_size)
        else:
            self._slot_pages.pop(slot, None)
            self._slot_ranges.pop(slot, None)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM."""
        return self._ioctl(uapi.KVM_CHECK_EXTENSION, cap)

    def create_guest_memfd(self, size: int, flags: int = 0, page_order: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD (page_order in the HugeTLB series' byte of the struct)."""
        args = uapi.kvm_create_guest_memfd(size=size, flags=flags, page_order=page_order)
        return GuestMemfd(self, self._ioctl(uapi.KVM_CREATE_GUEST_MEMFD, args))

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        region = uapi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        self._set_region(uapi.KVM_SET_USER_MEMORY_REGION, region)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: api.GuestMemfd | int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2."""
        fd = guest_memfd if isinstance(guest_memfd, int) else guest_memfd.fd
        region = uapi.kvm_userspace_memory_region2(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=fd & 0xFFFFFFFF,
        )
        self._set_region(uapi.KVM_SET_USER_MEMORY_REGION2, region)

    def delete_memslot(self, slot: int) -> None:
        """A memslot is deleted by setting it with size 0 (kvm_set_memory_region)."""
        self.set_user_memory_region2(slot, 0, 0, 0)

    def set_memory_attributes(
        self, address: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        attrs = uapi.kvm_memory_attributes(
            address=address, size=size, attributes=attributes, flags=flags
        )
        self._ioctl(uapi.KVM_SET_MEMORY_ATTRIBUTES, attrs)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP with up to four args."""
        req = uapi.kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            req.args[i] = value
        self._ioctl(uapi.KVM_ENABLE_CAP, req)

    def set_msr_filter(self, flags: int, ranges: list[tuple[int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER: the default (KVM_MSR_FILTER_DEFAULT_*) and up to 16
        ranges of (flags, base MSR, bitmap: a bit per MSR, set = allowed)."""
        req = uapi.kvm_msr_filter(flags=flags)
        if len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:
            raise OSError(errno.EINVAL, "KVM_X86_SET_MSR_FILTER: more than 16 ranges")
        keep = []  # the bitmaps must live until the ioctl returns
        for i, (range_flags, base, bitmap) in enumerate(ranges):
            buf = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
            keep.append(buf)
            req.ranges[i].flags, req.ranges[i].base = range_flags, base
            req.ranges[i].nmsrs = len(bitmap) * 8
            req.ranges[i].bitmap = ctypes.addressof(buf)
        self._ioctl(uapi.KVM_X86_SET_MSR_FILTER, req)
        del keep

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU, and the mmap of its struct kvm_run."""
        return Vcpu(self, self._ioctl(uapi.KVM_CREATE_VCPU, vcpu_id), vcpu_id)

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's whole bitmap (npages is only a fallback for
        a slot this object did not set; the kernel writes the whole bitmap)."""
        npages = self._slot_pages.get(slot, max(npages, 0))
        bitmap = ctypes.create_string_buffer(((npages + 63) // 64) * 8)
        log = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(uapi.KVM_GET_DIRTY_LOG, log)
        return bitmap.raw


@_args.checked
class GuestMemfd(_Fd):
    """A guest_memfd file (KVM_CREATE_GUEST_MEMFD)."""

    def __init__(self, vm: Vm | None, fd: int, owner: int | None = None) -> None:
        super().__init__(fd)
        self.vm = vm  # None: attached from another process (attach_guest_memfd)
        self.owner = owner  # the pid whose mappings memory_map() shows; None: this one

    @property
    def _populate_limit(self) -> PopulateLimit:
        """The VM's Kvm's limit; the default one for a file attached from elsewhere."""
        return self.vm.kvm.populate_limit if self.vm is not None else PopulateLimit()

    def stat(self) -> os.stat_result:
        """fstat(2)."""
        return self._call("fstat", os.fstat)

    @property
    def size(self) -> int:
        """st_size from fstat(2)."""
        return self.stat().st_size

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2); an allocation above the populate limit is ENOMEM first."""
        self._populate_limit.check(self._allocates(mode, offset, length), "fallocate")
        self._call("fallocate", libc.fallocate, mode, offset, length)

    def _allocates(self, mode: int, offset: int, length: int) -> int:
        """How many bytes the kernel would allocate: kvm_gmem_allocate runs only
        for KEEP_SIZE alone on an aligned range inside the file. Anything else the
        kernel refuses (or punches), so it goes to the kernel for its errno."""
        ps = uapi.PAGE_SIZE
        if mode != uapi.FALLOC_FL_KEEP_SIZE or self._fd is None:
            return 0
        if offset < 0 or length <= 0 or offset % ps or length % ps:
            return 0
        return length if offset + length <= self.size else 0

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, offset, length)

    def ioctl(self, request: int, arg: int = 0) -> int:
        """ioctl(2) on the file (mainline guest_memfd has none: ENOTTY)."""
        return self._ioctl(request, arg)

    def set_memory_attributes2(self, offset: int, size: int, attributes: int,
                               flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd; the kernel writes
        error_offset back on EAGAIN and ENOMEM, and it rides on the OSError."""
        attrs = uapi.kvm_memory_attributes2(offset=offset, size=size, attributes=attributes,
                                            flags=flags)
        try:
            self._ioctl(uapi.KVM_SET_MEMORY_ATTRIBUTES2, attrs)
        except OSError as e:
            e.error_offset = attrs.error_offset  # type: ignore[attr-defined]
            raise

    def ftruncate(self, length: int) -> None:
        """ftruncate(2)."""
        self._call("ftruncate", os.ftruncate, length)

    def read(self, n: int) -> bytes:
        """read(2)."""
        return self._call("read", os.read, n)

    def write(self, data: bytes) -> int:
        """write(2)."""
        return self._call("write", os.write, data)

    def pread(self, n: int, offset: int) -> bytes:
        """pread64(2)."""
        return self._call("pread64", os.pread, n, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite64(2)."""
        return self._call("pwrite64", os.pwrite, data, offset)

    def lseek(self, offset: int, whence: int) -> int:
        """lseek(2)."""
        return self._call("lseek", os.lseek, offset, whence)

    def mmap(
        self,
        length: int | None = None,
        offset: int = 0,
        prot: int = libc.PROT_READ | libc.PROT_WRITE,
        shared: bool = True,
        align: int = 0,
    ) -> Mapping:
        """mmap(2) of the file (MAP_SHARED unless shared=False), at a multiple of align."""
        length = self.size if length is None else length
        flags = libc.MAP_SHARED if shared else libc.MAP_PRIVATE
        addr = self._call("mmap", lambda fd: libc.mmap_aligned(length, prot, flags, fd, offset,
                                                               align))
        return Mapping(addr, length, prot, offset, self._populate_limit)

    def memory_map(self, offset: int = 0, length: int | None = None) -> MemoryMap:
        """What the kernel shows of [offset, offset+length): uptodate folios by
        mincore(2) on a PROT_NONE mapping (MMAP files only), and which pages the
        owner's mappings of the file map (/proc/PID/maps and pagemap)."""
        size = self.size
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset % PAGE or length % PAGE or offset + length > size:
            raise ValueError(f"[{offset:#x}, +{length:#x}) is not a page-aligned range of "
                             f"the {size:#x}-byte file")
        if length > MEMORY_MAP_LIMIT:
            raise ValueError(f"the kernel answers page by page: at most {MEMORY_MAP_LIMIT:#x} "
                             f"bytes at a time")
        first, last = offset // PAGE, (offset + length) // PAGE
        st = self.stat()
        flags = {memmap.HOST_MAPPED: procfs.mapped_file_pages(
            self.owner or "self", st.st_dev, st.st_ino, first, last)}
        uptodate = self._resident(offset, length)
        if uptodate is not None:
            flags[memmap.UPTODATE] = memmap.intervals_of(first, uptodate)
        return MemoryMap(size, first, last, memmap.runs_of(first, last, flags),
                         frozenset(flags))

    def _resident(self, offset: int, length: int) -> bytes | None:
        """mincore of [offset, offset+length), or None where the file cannot be
        mapped (no GUEST_MEMFD_FLAG_MMAP: ENODEV)."""
        if length == 0:
            return b""
        try:
            addr = self._call("mmap", lambda fd: libc.mmap(length, libc.PROT_NONE,
                                                           libc.MAP_SHARED, fd, offset))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        try:
            return libc.mincore(addr, length).translate(_LOW_BIT)
        finally:
            libc.munmap(addr, length)


class RegisteredBuffer:
    """Pages pinned by an io_uring registered buffer (Mapping.pin); unpin() drops
    them (IORING_UNREGISTER_BUFFERS)."""

    def __init__(self, ring: int) -> None:
        self._ring: int | None = ring

    def unpin(self) -> None:
        """unpin_user_pages, through IORING_UNREGISTER_BUFFERS; again is a no-op."""
        if self._ring is not None:
            ring, self._ring = self._ring, None
            libc.unpin_user_buffer(ring)

    def __del__(self) -> None:
        self.unpin()


@_args.checked
class Mapping:
    """A host userspace mapping. `read`/`write` go through /proc/self/mem so that
    an access the kernel would answer with SIGBUS raises HostSigbus (the GUP
    behind /proc/self/mem fails with EIO exactly there) instead of killing the
    interpreter; `touch_in_child` observes the real signal."""

    def __init__(self, addr: int, length: int, prot: int = libc.PROT_READ | libc.PROT_WRITE,
                 offset: int = 0, populate_limit: PopulateLimit | None = None) -> None:
        self.addr = addr
        self.length = length
        self.prot = prot
        self.offset = offset  # in the file mapped, if any
        self.populate_limit = populate_limit or PopulateLimit()
        self._mapped = True


    def _check(self, offset: int, length: int) -> None:
        if not self._mapped:
            raise OSError(errno.EBADF, "mapping was unmapped")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {self.length:#x} mapping")

    def _allowed(self, offset: int, write: bool) -> None:
        """A load or store the protection forbids is SIGSEGV; /proc/self/mem would
        force it (FOLL_FORCE), so it is refused here, as a real access would be."""
        if not self.prot & (libc.PROT_WRITE if write else libc.PROT_READ):
            raise HostSigsegv(self.addr + offset, "protection")

    def mprotect(self, prot: int) -> None:
        """mprotect(2) of the whole mapping."""
        self._check(0, 0)
        libc.mprotect(self.addr, self.length, prot)
        self.prot = prot

    def read(self, offset: int, length: int) -> bytes:
        """A host load, through /proc/self/mem: HostSigbus where a real one would SIGBUS."""
        self._check(offset, length)
        self._allowed(offset, False)
        self.populate_limit.check(length, "read")
        try:
            data = os.pread(libc.proc_self_mem(), length, self.addr + offset)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                raise HostSigbus(self.addr + offset) from e
            raise oserror(e.errno, "pread64 /proc/self/mem") from None
        if len(data) != length:  # a short read stops at the first page that faults
            raise HostSigbus(self.addr + offset + len(data))
        return data

    def write(self, offset: int, data: bytes) -> None:
        """A host store, through /proc/self/mem: HostSigbus where a real one would SIGBUS."""
        self._check(offset, len(data))
        self._allowed(offset, True)
        self.populate_limit.check(len(data), "write")
        try:
            done = os.pwrite(libc.proc_self_mem(), data, self.addr + offset)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                raise HostSigbus(self.addr + offset) from e
            raise oserror(e.errno, "pwrite64 /proc/self/mem") from None
        if done != len(data):
            raise HostSigbus(self.addr + offset + done)

    def fill(self, offset: int, byte: int, length: int) -> None:
        """memset in this process: fast, but the caller must know no page SIGBUSes."""
        self._check(offset, length)
        self._allowed(offset, True)
        self.populate_limit.check(length, "fill")
        libc.memset(self.addr + offset, byte, length)

    def touch_in_child(self, offset: int, write: bool = False, length: int = 1) -> int | None:
        """Touch [offset, offset+length) in a forked child; return the signal that
        killed it (e.g. SIGBUS) or None. The authoritative SIGBUS check."""
        self._check(offset, 0)
        self.populate_limit.check(length, "touch_in_child")  # shared pages stay populated
        return libc.touch_in_child(self.addr + offset, length, write)

    def pin(self, offset: int, length: int) -> RegisteredBuffer:
        """pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) on [offset, offset+length),
        through an io_uring registered buffer: EFAULT where a fault would fail
        (a private page, a mapping without PROT_WRITE)."""
        self._check(offset, length)
        self.populate_limit.check(length, "pin")
        return RegisteredBuffer(libc.pin_user_buffer(self.addr + offset, length))

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) on [offset, offset+length)."""
        self._check(offset, length)
        if advice in (libc.MADV_POPULATE_READ, libc.MADV_POPULATE_WRITE):
            self.populate_limit.check(length, "madvise(MADV_POPULATE)")
        libc.madvise(self.addr + offset, length, advice)

    # --- NUMA memory policy (mm/mempolicy.c) ---------------------------------------------------
    def mbind(self, offset: int, length: int, mode: int, nodes: int | None = None,
              flags: int = 0, maxnode: int = libc.MAXNODE) -> None:
        """mbind(2) on [offset, offset+length); `nodes` is a nodemask (bit n = node n)."""
        self._check(offset, length)
        libc.mbind(self.addr + offset, length, mode, nodes, maxnode, flags)

    def get_mempolicy(self, offset: int) -> tuple[int, int]:
        """get_mempolicy(2) with MPOL_F_ADDR: (mode | mode flags, nodemask) there."""
        self._check(offset, 0)
        return libc.get_mempolicy(self.addr + offset, uapi.MPOL_F_ADDR)

    def move_pages(self, offset: int, count: int) -> list[int]:
        """move_pages(2) with nodes=NULL for `count` pages from offset: each page's
        node, or -ENOENT where this mapping has no page."""
        ps = uapi.PAGE_SIZE
        self._check(offset, count * ps)
        return libc.move_pages_status([self.addr + offset + i * ps for i in range(count)])

    def munmap(self) -> None:
        """munmap(2)."""
        if self._mapped:
            self._mapped = False
            libc.munmap(self.addr, self.length)

    close = munmap

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.munmap()


SIGBUS = signal.SIGBUS


@_args.checked
class Vcpu(_Fd):
    _run_addr: int | None = None  # set once kvm_run is mapped

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        # kvm_run is unmapped only when no KVM_RUN is in flight (_run_lock, held by
        # run()) and no other thread is touching it (_map_lock): close() from one
        # thread while another runs the vCPU must not crash the interpreter.
        self._run_lock = threading.Lock()
        self._map_lock = threading.RLock()
        super().__init__(fd)
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._run_size = vm.vcpu_mmap_size
        prot = libc.PROT_READ | libc.PROT_WRITE
        try:
            self._run_addr = libc.mmap(self._run_size, prot, libc.MAP_SHARED, fd, 0)
        except OSError:
            self.close()  # the vCPU stays in its VM; its fd does not leak
            raise
        self._kvm_run = uapi.kvm_run.from_address(self._run_addr)
        self._thread: int | None = None  # the thread inside KVM_RUN, for kick()
        self._masked_for: int | None = None  # the thread the signal mask was set up for
        libc.install_kick_handler()

    def _unmask_kick_in_kvm_run(self, thread: int) -> None:
        """QEMU's way to kick without hitting anything else: the calling thread
        blocks the kick signal, and KVM_SET_SIGNAL_MASK gives KVM_RUN the same
        mask without it (kvm_sigset_activate swaps it in for the run). A kick
        then interrupts only KVM_RUN; one that comes between runs stays pending
        until the next, instead of making a syscall of the VMM fail with EINTR.
        KVM puts the blocking mask back before it returns, so a kick that ended a
        KVM_RUN is still pending after it: run() eats it (QEMU kvm_eat_signals)."""
        blocked = libc.block_kick_signal()
        mask = uapi.kvm_signal_mask_sigset(len=uapi.KERNEL_SIGSET_SIZE,
                                           sigset=libc.sigset_bits(blocked))
        self._ioctl(uapi.KVM_SET_SIGNAL_MASK, mask)
        self._masked_for = thread

    def _shared(self, what: str) -> uapi.kvm_run:
        """The mmapped struct kvm_run; EBADF once closed (it is unmapped then, and
        touching it would crash the interpreter). Callers outside run() hold
        _map_lock while they use it."""
        if self._fd is None:
            raise oserror(errno.EBADF, what)
        return self._kvm_run

    def close(self) -> None:
        """Kick a KVM_RUN in flight and wait for it; munmap(2) of kvm_run, then
        close(2) of the vCPU fd."""
        if "_run_lock" not in vars(self):  # __init__ never got that far
            super().close()
            return
        with self._map_lock:
            if self._thread is not None and self._fd is not None:
                self._kick_locked()
        with self._run_lock, self._map_lock:
            if not self.closed and self._run_addr is not None:
                libc.munmap(self._run_addr, self._run_size)
                self._run_addr = None
            super().close()

    # --- registers ----------------------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        """KVM_GET_REGS."""
        regs = uapi.kvm_regs()
        self._ioctl(uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl(uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS."""
        sregs = uapi.kvm_sregs()
        self._ioctl(uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl(uapi.KVM_SET_SREGS, sregs)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY; returns the (gpa, size) KVM wrote back."""
        if not flags and not (gpa | size) % PAGE:  # KVM's own EINVALs come first
            # what it would go on to fault in: the memslots' part of the range
            self.vm.kvm.populate_limit.check(self.vm._memslot_bytes(gpa, size),
                                             "KVM_PRE_FAULT_MEMORY")
        req = uapi.kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
        try:
            libc.ioctl_inout(self.fd, uapi.KVM_PRE_FAULT_MEMORY, req, "KVM_PRE_FAULT_MEMORY")
        except OSError as e:
            raise PreFaultError(e.errno or errno.EIO, req.gpa, req.size) from None
        return req.gpa, req.size

    # --- running ------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN. Returns the typed exit; a failing KVM_RUN raises KvmRunError
        carrying the errno and the exit KVM reported with it (MEMORY_FAULT)."""
        with self._run_lock:
            # KVM writes exit_reason only when it fills an exit; clear it so a failing
            # KVM_RUN that reports none (e.g. EFAULT from a failed GUP) is not read as
            # the previous run's exit.
            self._shared("KVM_RUN").exit_reason = uapi.KVM_EXIT_UNKNOWN
            thread = threading.get_ident()
            if thread != self._masked_for:
                self._unmask_kick_in_kvm_run(thread)
            with self._map_lock:
                self._thread = thread
            try:
                self._ioctl(uapi.KVM_RUN)
            except OSError as e:
                reason = self._kvm_run.exit_reason
                exit = self._decode() if reason == uapi.KVM_EXIT_MEMORY_FAULT else None
                raise KvmRunError(e.errno or errno.EIO, exit) from None
            finally:
                with self._map_lock:
                    self._thread = None
                # A kick ends this run, or (arriving late) leaves immediate_exit set
                # for the next: either way its signal has done its work.
                libc.eat_kick_signals()
            return self._decode()

    def kick(self) -> None:
        """Make KVM_RUN return EINTR, from any thread: immediate_exit, then a signal
        to the thread inside KVM_RUN (api.rst, KVM_RUN). A vCPU not running now
        returns EINTR from its next KVM_RUN, until immediate_exit is cleared."""
        with self._map_lock:
            self._shared("kvm_run")
            self._kick_locked()

    def _kick_locked(self) -> None:
        self._kvm_run.immediate_exit = 1
        if self._thread is not None:
            libc.kick_thread(self._thread)

    def _decode(self) -> Exit:
        run = self._kvm_run
        reason = run.exit_reason
        u = run.exit
        if reason == uapi.KVM_EXIT_IO:
            io = u.io
            data = b""
            if io.direction == uapi.KVM_EXIT_IO_OUT:
                data = ctypes.string_at(self._kvm_addr() + io.data_offset, io.size * io.count)
            return IoExit(reason, io.direction, io.size, io.port, io.count, data)
        if reason == uapi.KVM_EXIT_HYPERCALL:
            hc = u.hypercall
            return HypercallExit(reason, hc.nr, tuple(hc.args), hc.flags)
        if reason == uapi.KVM_EXIT_MEMORY_FAULT:
            mf = u.memory_fault
            return MemoryFaultExit(reason, mf.flags, mf.gpa, mf.size)
        if reason in (uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_EXIT_X86_WRMSR):
            return MsrExit(reason, u.msr.reason, u.msr.index, u.msr.data)
        if reason == uapi.KVM_EXIT_MMIO:
            m = u.mmio
            # The data of a read is for userspace to fill in: report it for writes only.
            data = bytes(m.data)[: m.len] if m.is_write else b""
            return MmioExit(reason, m.phys_addr, data, m.len, bool(m.is_write))
        if reason == uapi.KVM_EXIT_HLT:
            return HltExit(reason)
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return ShutdownExit(reason)
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            fe = u.fail_entry
            return FailEntryExit(reason, fe.hardware_entry_failure_reason, fe.cpu)
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            ie = u.internal
            return InternalErrorExit(reason, ie.suberror, tuple(ie.data[: min(ie.ndata, 16)]))
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            se = u.system_event
            return SystemEventExit(reason, se.type, tuple(se.data[: min(se.ndata, 16)]))
        return UnknownExit(reason, u.hw_exit_reason)

    def complete_io_in(self, data: bytes) -> None:
        """Answer a KVM_EXIT_IO IN: KVM copies the bytes into the guest on the next run."""
        with self._map_lock:
            io = self._shared("kvm_run").exit.io
            ctypes.memmove(self._kvm_addr() + io.data_offset, data, io.size * io.count)

    def _kvm_addr(self) -> int:
        assert self._run_addr is not None  # mapped while the fd is open
        return self._run_addr

    def complete_hypercall(self, ret: int) -> None:
        """Answer a KVM_EXIT_HYPERCALL: KVM puts `ret` in the guest's RAX on the next run."""
        with self._map_lock:
            self._shared("kvm_run").exit.hypercall.ret = ret & 0xFFFFFFFFFFFFFFFF

    def complete_msr(self, error: bool, data: int = 0) -> None:
        """Answer a KVM_EXIT_X86_RDMSR/WRMSR in kvm_run.msr: error injects #GP on the
        next KVM_RUN (complete_emulated_msr_access); a read returns `data`."""
        with self._map_lock:
            msr = self._shared("kvm_run").exit.msr
            msr.error = 1 if error else 0
            msr.data = data & 0xFFFFFFFFFFFFFFFF

    @property
    def immediate_exit(self) -> bool:
        """kvm_run->immediate_exit."""
        with self._map_lock:
            return bool(self._shared("kvm_run").immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        with self._map_lock:
            self._shared("kvm_run").immediate_exit = int(_args.BOOL("immediate_exit", value))


GMEM_LINK = "anon_inode:[kvm-gmem]"  # what /proc/PID/fd/N reads for a guest_memfd


def attach_guest_memfd(pid: int, fd: int) -> GuestMemfd:
    """Another process's guest_memfd (a VMM's, say), duplicated with pidfd_getfd(2)
    (which needs ptrace access to it), to look at with memory_map()."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    if link != GMEM_LINK:
        raise OSError(errno.EINVAL, f"fd {fd} of process {pid} is {link}, not a guest_memfd")
    pidfd = libc.pidfd_open(pid)
    try:
        return GuestMemfd(None, libc.pidfd_getfd(pidfd, fd), owner=pid)
    finally:
        os.close(pidfd)
