"""The backend API as Protocols (layer 1): what `guestmem.Kvm(...)` returns.

Both backends implement it, the model (`guestmem.model`) and the kernel through
/dev/kvm (`guestmem.host`); the VMM, the conformance suite and the CLI are typed
against it, and mypy holds both backends to it (`guestmem/__init__.py`). One
type per kind of file descriptor, a method per ioctl or file operation, named
after it, as rust-vmm's kvm-ioctls does. Every failure is an OSError carrying
the kernel's errno; a host access the kernel answers with a signal raises
HostSigbus or HostSigsegv (guestmem.exits).

Model-only extras (GUP pins, loading a program into a vCPU that interprets it)
are separate Protocols, narrowed to with isinstance().
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from guestmem import uapi
from guestmem.caps import Capabilities
from guestmem.exits import Exit
from guestmem.memmap import MemoryMap
from guestmem.program import Program


class Closable(Protocol):
    def close(self) -> None:
        """Drop this object's reference (close(2), munmap(2))."""

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Mapping(Closable, Protocol):
    """A host userspace mapping (a VMA) of a guest_memfd or of anonymous memory."""

    @property
    def addr(self) -> int:
        """Its start address: what a memslot's userspace_addr points at."""

    @property
    def length(self) -> int:
        """Its length in bytes."""

    def read(self, offset: int, length: int) -> bytes:
        """A host load of [offset, offset+length): HostSigbus/HostSigsegv on a fault."""

    def write(self, offset: int, data: bytes) -> None:
        """A host store of data at offset: HostSigbus/HostSigsegv on a fault."""

    def fill(self, offset: int, byte: int, length: int) -> None:
        """memset(3) of [offset, offset+length)."""

    def touch_in_child(self, offset: int, write: bool = False, length: int = 1) -> int | None:
        """The signal a real access would get (None: no signal)."""

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) on [offset, offset+length)."""

    def mprotect(self, prot: int) -> None:
        """mprotect(2) of the whole mapping."""

    def mbind(self, offset: int, length: int, mode: int, nodes: int | None = None,
              flags: int = 0, maxnode: int = ...) -> None:
        """mbind(2) on [offset, offset+length); nodes is a nodemask (bit n = node n)."""

    def get_mempolicy(self, offset: int) -> tuple[int, int]:
        """get_mempolicy(2) with MPOL_F_ADDR: (mode | mode flags, nodemask)."""

    def move_pages(self, offset: int, count: int) -> list[int]:
        """move_pages(2) query: each page's node, or -ENOENT."""

    def pin(self, offset: int, length: int) -> Pin:
        """pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) on [offset, offset+length)
        (kvm: an io_uring registered buffer); EFAULT where a fault would fail."""

    def munmap(self) -> None:
        """munmap(2)."""


class Pin(Protocol):
    """Pages pinned by Mapping.pin."""

    def unpin(self) -> None:
        """unpin_user_pages()."""


class ChildProcess(Closable, Protocol):
    """A fork(2) of this process (the VMM's): it has every mapping the parent had
    at the fork but those marked MADV_DONTFORK, at the same addresses, and holds
    every file the parent had open until it exits. Accesses happen in the child,
    through its own page tables; `mapping` names the parent's mapping whose
    address is meant."""

    @property
    def pid(self) -> int:
        """The child's process id."""

    def read(self, mapping: Mapping, offset: int, length: int) -> bytes:
        """A load in the child; HostSigbus/HostSigsegv where the child would be signalled."""

    def write(self, mapping: Mapping, offset: int, data: bytes) -> None:
        """A store in the child; HostSigbus/HostSigsegv as read."""

    def touch(self, mapping: Mapping, offset: int, write: bool = False,
              length: int = 1) -> int | None:
        """The signal a load (store) in the child gets (SIGBUS, SIGSEGV), or None."""

    def exit(self) -> None:
        """exit(2) of the child, reaped: its mappings and fds go. close() is exit()."""


class GuestMemfd(Closable, Protocol):
    """A guest_memfd file (KVM_CREATE_GUEST_MEMFD)."""

    @property
    def fd(self) -> int:
        """The file descriptor (EBADF once closed)."""

    @property
    def closed(self) -> bool:
        """close() was called."""

    def stat(self) -> os.stat_result:
        """fstat(2)."""

    @property
    def size(self) -> int:
        """st_size: fixed at creation."""

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with any mode bits."""

    def allocate(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE)."""

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""

    def ioctl(self, request: int, arg: int = 0) -> int:
        """ioctl(2) on the file."""

    def set_memory_attributes2(self, offset: int, size: int, attributes: int,
                               flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd (in-place conversion series):
        ENOTTY where the kernel has no in-place conversion. A failure carries the
        struct's `error_offset` as OSError.error_offset."""

    def ftruncate(self, length: int) -> None:
        """ftruncate(2)."""

    def read(self, n: int) -> bytes:
        """read(2)."""

    def write(self, data: bytes) -> int:
        """write(2)."""

    def pread(self, n: int, offset: int) -> bytes:
        """pread(2)."""

    def pwrite(self, data: bytes, offset: int) -> int:
        """pwrite(2)."""

    def lseek(self, offset: int, whence: int) -> int:
        """lseek(2)."""

    def mmap(self, length: int | None = None, offset: int = 0,
             prot: int = ..., shared: bool = True, align: int = 0) -> Mapping:
        """mmap(2) of the file (MAP_SHARED unless shared=False); length None: its size.
        `align` places it at a multiple of align, as the selftests do (test_collapse:
        reserve address space, then MAP_FIXED at its first aligned address)."""

    def memory_map(self, offset: int = 0, length: int | None = None) -> MemoryMap:
        """What the pages of [offset, offset+length) look like, as runs of alike pages
        (the model sees all it keeps; the kernel backend mincore and pagemap)."""


class Vcpu(Closable, Protocol):
    """A vCPU (KVM_CREATE_VCPU)."""

    @property
    def vcpu_id(self) -> int:
        """The id it was created with."""

    @property
    def immediate_exit(self) -> bool:
        """kvm_run->immediate_exit."""

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None: ...

    def get_regs(self) -> uapi.kvm_regs:
        """KVM_GET_REGS."""

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS."""

    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS."""

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY: the (gpa, size) KVM wrote back; a failure raises
        PreFaultError, which carries them too."""

    def run(self) -> Exit:
        """KVM_RUN: the typed exit; KvmRunError when it fails."""

    def kick(self) -> None:
        """immediate_exit plus a signal to the thread in KVM_RUN: it returns EINTR."""

    def complete_io_in(self, data: bytes) -> None:
        """Answer a KVM_EXIT_IO IN before the next KVM_RUN."""

    def complete_hypercall(self, ret: int) -> None:
        """Answer a KVM_EXIT_HYPERCALL: the guest's RAX after the next KVM_RUN."""

    def complete_msr(self, error: bool, data: int = 0) -> None:
        """Answer a KVM_EXIT_X86_RDMSR/WRMSR: error injects #GP; a read gets data."""


@runtime_checkable
class ProgramVcpu(Vcpu, Protocol):
    """Model only: a vCPU that interprets guestmem programs instead of x86 code."""

    def load_program(self, program: Program, hypercall_abi: str,
                     migration_control: str = "port") -> None:
        """Give the vCPU the program the VMM placed in guest memory (compiled for
        `hypercall_abi` and `migration_control`, as guest.compile_program)."""

    def program_state(self) -> ProgramState:
        """Where the program stands, to continue elsewhere (a migrated vCPU's RIP
        and the guest's C-bit view, which on hardware live in registers and guest
        page tables). ValueError unless the vCPU stopped at a resumable exit: a
        top-level Checkpoint, or after the program's last step."""

    def restore_program_state(self, state: ProgramState) -> None:
        """Continue `state`'s program from where it stood (the destination of a
        migration)."""


@dataclass(frozen=True)
class ProgramState:
    """Model only: a program, the index of the step to run next, the hypercall
    ABI, and the gfn ranges the guest's page tables map with the C-bit set."""

    program: Program
    next_step: int
    hypercall_abi: str
    encrypted: tuple[tuple[int, int], ...]
    migration_control: str = "port"


@dataclass(frozen=True)
class Run:
    """Bytes [start, end) of a mapping (or guest-physical range): real `data`, or,
    when data is None, the formula "64-bit word i is word + i * step" (a zeroed
    run is word 0, step 0). Formulas let the model move a 1 TiB guest in ranges."""

    start: int
    end: int
    data: bytes | None = None
    word: int = 0
    step: int = 0


@runtime_checkable
class ContentRuns(Protocol):
    """Model only: a mapping that reads and writes its contents as Runs, so what
    is alike costs one run however large (DESIGN.md "Scale")."""

    def content_runs(self, offset: int, length: int) -> list[Run]:
        """[offset, +length) as the host reads it, page-aligned runs, in order."""

    def write_runs(self, offset: int, runs: list[Run]) -> None:
        """Write runs (offsets relative to the mapping) as the host would."""


@runtime_checkable
class DirtyLogRanges(Protocol):
    """Model only: KVM_GET_DIRTY_LOG as page ranges instead of a bitmap, so that a
    harvest of a 1 TiB memslot costs in ranges (a bitmap is 32 MiB)."""

    def get_dirty_log_ranges(self, slot: int) -> list[tuple[int, int]]:
        """The slot's dirty pages as [first, last) page indexes, cleared as read;
        the errors of KVM_GET_DIRTY_LOG."""


@runtime_checkable
class Firmware(Protocol):
    """Model only: the platform firmware's view of a VM's memory, as SEV's
    SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA have it (the PSP reads and writes guest
    pages under the VM's memory key; for guest_memfd no uAPI exists,
    upstream-2026-11.md §4). A VM whose memory nothing encrypts needs none: its
    pages read the same through the host mapping."""

    def firmware_export(self, gpa: int, length: int, private: bool) -> list[Run]:
        """The guest's data at [gpa, +length) as the firmware decrypts it: a
        private page under the VM's key (from guest_memfd where the VM keeps it
        there), a shared one as stored. Offsets are guest-physical."""

    def firmware_import(self, gpa: int, runs: list[Run], private: bool) -> None:
        """Place runs at their guest-physical offsets, as the firmware does: under
        the VM's key (in guest_memfd for a VM that keeps private memory there) if
        `private`, else in plaintext."""

    def launch_start(self) -> None:
        """KVM_SEV_LAUNCH_START: memory encryption on for an SEV VM (the guest's
        C-bit set wherever it does not clear it)."""

    def launch_update_data(self, gpa: int, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA: encrypt [gpa, +length) in place under the VM's
        key (the VMM's initial image of a launched SEV guest)."""

    def guest_view(self, gpa: int, length: int) -> list[tuple[Run, bool]]:
        """What the guest reads at [gpa, +length) through its own page tables and
        the VM's memory state, and whether each run is private (a checker's oracle:
        hardware truth, which neither KVM nor the VMM knows for SEV)."""


class Vm(Closable, Protocol):
    """A VM (KVM_CREATE_VM)."""

    @property
    def fd(self) -> int:
        """The VM's file descriptor (EBADF once closed)."""

    @property
    def vm_type(self) -> int:
        """The KVM_CREATE_VM type."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM."""

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP."""

    def set_msr_filter(self, flags: int, ranges: list[tuple[int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER: default allow or deny, and (flags, base, bitmap)
        ranges (a set bit allows the MSR)."""

    def create_guest_memfd(self, size: int, flags: int = 0, page_order: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD; page_order (log2 of base pages per folio) goes with
        GUEST_MEMFD_FLAG_HUGETLB, the HugeTLB series' field (0 elsewhere)."""

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION."""

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0,
                                guest_memfd: GuestMemfd | int = 0,
                                guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2."""

    def delete_memslot(self, slot: int) -> None:
        """KVM_SET_USER_MEMORY_REGION2 with memory_size 0."""

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU."""

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap, one bit per page."""


class Kvm(Closable, Protocol):
    """/dev/kvm, or the model's."""

    @property
    def fd(self) -> int:
        """The /dev/kvm file descriptor (EBADF once closed)."""

    @property
    def backend(self) -> str:
        """"model" or "kvm"."""

    @property
    def capabilities(self) -> Capabilities:
        """What this KVM offers and does, probed (kvm) or stated by the profile (model)."""

    def api_version(self) -> int:
        """KVM_GET_API_VERSION."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION at system scope."""

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE."""

    def supported_vm_types(self) -> frozenset[int]:
        """KVM_CAP_VM_TYPES as a set."""

    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        """KVM_CREATE_VM."""

    def mmap_anonymous(self, length: int, align: int = 0) -> Mapping:
        """mmap(2) of MAP_SHARED|MAP_ANONYMOUS memory, e.g. for a userspace_addr;
        `align` as for GuestMemfd.mmap (kvm_util aligns THP-backed memory so)."""

    def fork(self) -> ChildProcess:
        """fork(2) of this process: a child with its mappings and files (ChildProcess)."""

    @property
    def hugetlb(self) -> Hugetlb:
        """The machine's HugeTLB pools and hugetlbfs (the model's own, or the host's)."""

    def open_fd_count(self) -> int:
        """Open fds of this process (leak checks)."""


# --- HugeTLB: the host's huge page pools and hugetlbfs (issue 10) ------------------------------
@dataclass(frozen=True)
class HugetlbCounters:
    """/sys/kernel/mm/hugepages/hugepages-<size>kB/: one hstate's pool."""

    nr: int  # nr_hugepages: the pool, surplus included
    free: int  # free_hugepages: in the pool, not allocated
    resv: int  # resv_hugepages: committed to reservations, not yet faulted
    surplus: int  # surplus_hugepages: above the persistent pool, from overcommit
    overcommit: int  # nr_overcommit_hugepages: how many surplus pages may exist


class HugetlbMapping(Closable, Protocol):
    """A MAP_SHARED, PROT_READ|PROT_WRITE mapping of a hugetlbfs file."""

    @property
    def addr(self) -> int:
        """Its start address."""

    @property
    def length(self) -> int:
        """Its length in bytes."""

    def touch(self, offset: int) -> None:
        """A store at offset (a fault if no page is mapped there); HostSigbus where
        hugetlb_fault fails (no page to allocate, beyond EOF)."""

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """madvise(2) on [offset, offset+length) (MADV_DONTNEED, MADV_REMOVE, ...)."""

    def munmap(self) -> None:
        """munmap(2)."""


class HugetlbFile(Closable, Protocol):
    """A file on hugetlbfs: memfd_create(MFD_HUGETLB) or one created on a mount."""

    @property
    def size(self) -> int:
        """st_size."""

    def ftruncate(self, length: int) -> None:
        """ftruncate(2) (hugetlbfs_setattr: sizes are whole huge pages, else EINVAL)."""

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) (hugetlbfs_fallocate: KEEP_SIZE and PUNCH_HOLE only)."""

    def mmap(self, length: int, offset: int = 0) -> HugetlbMapping:
        """mmap(2) MAP_SHARED, PROT_READ|PROT_WRITE (hugetlbfs_file_mmap reserves)."""


class HugetlbMount(Closable, Protocol):
    """A hugetlbfs mount of one page size with size=/min_size= (its subpool);
    close() unmounts it."""

    def create(self) -> HugetlbFile:
        """open(2) O_CREAT|O_RDWR of a new file on the mount, unlinked at once (so
        its pages go when it is closed and unmapped)."""


class Hugetlb(Protocol):
    """The HugeTLB pools and hugetlbfs of one machine (the host, or the model's)."""

    @property
    def page_sizes(self) -> tuple[int, ...]:
        """The huge page sizes there are pools for, in bytes."""

    def counters(self, page_size: int) -> HugetlbCounters:
        """The pool's counters (sysfs hugepages-<size>kB)."""

    def set_nr_hugepages(self, page_size: int, count: int) -> int:
        """Write nr_hugepages (set_max_huge_pages); returns the pool size reached,
        which is smaller where memory could not be found."""

    def set_nr_overcommit_hugepages(self, page_size: int, count: int) -> None:
        """Write nr_overcommit_hugepages."""

    def memfd_create(self, page_size: int) -> HugetlbFile:
        """memfd_create(2) with MFD_HUGETLB and the size's MFD_HUGE_* bits."""

    def mount(self, page_size: int, size: int | None = None,
              min_size: int | None = None) -> HugetlbMount:
        """mount(2) of hugetlbfs with pagesize=, size= and min_size= (in bytes)."""

    def settle(self) -> None:
        """Wait for HugeTLB's deferred work (the WIP's "hugetlb_restructuring"
        workqueue merging freed pieces, RCU inode frees), after which the
        counters stop moving: the model runs it; the kernel offers no handle,
        so the host waits 300 ms as guest_memfd_hugetlb_reporting_test does."""
