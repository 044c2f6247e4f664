"""Constants, ioctl numbers and struct layouts of the KVM uAPI used by guest_memfd.

Layer 1 of DESIGN.md: pure data, shared by both backends. Values come from
include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h and kvm_para.h as of
v6.18 (../shared/spec/upstream.md §1), never from the system's kvm.h, which is
older than guest_memfd. Constants of unmerged series are grouped at the end and
marked as such: their numbers may change before merge.
"""

from __future__ import annotations

import ctypes
from typing import Final

PAGE_SIZE: Final = 4096
PAGE_SHIFT: Final = 12

# --- include/uapi/asm-generic/ioctl.h -------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802 - kernel name
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _IO(type_: int, nr: int) -> int:  # noqa: N802
    return _IOC(IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:  # noqa: N802
    return _IOC(IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:  # noqa: N802
    return _IOC(IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:  # noqa: N802
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _Struct(ctypes.Structure):
    """Little-endian uAPI struct; subclasses declare EXPECTED_SIZE, checked at import."""

    EXPECTED_SIZE: int = -1

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, *_ in self._fields_:
            value = getattr(self, name)
            if isinstance(value, ctypes.Array):
                value = list(value)
            out[name] = value
        return out


# --- memslots ----------------------------------------------------------------------------
class kvm_userspace_memory_region(_Struct):  # noqa: N801 - kernel name
    EXPECTED_SIZE = 32
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_userspace_memory_region2(_Struct):  # noqa: N801
    EXPECTED_SIZE = 160
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("guest_memfd_offset", u64),
        ("guest_memfd", u32),
        ("pad1", u32),
        ("pad2", u64 * 14),
    ]


KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2

# --- guest_memfd -----------------------------------------------------------------------
class kvm_create_guest_memfd(_Struct):  # noqa: N801
    """6.18: size, flags, reserved[6]. page_order..reserve32 are the HugeTLB WIP
    branch's layout (upstream-2026-11.md §2), in what 6.18 has as reserved[0]."""

    EXPECTED_SIZE = 64
    _fields_ = [("size", u64), ("flags", u64), ("page_order", u8), ("reserve8", u8),
                ("reserve16", u16), ("reserve32", u32), ("reserved", u64 * 5)]


GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0  # v6.18
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1  # v6.18

# --- memory attributes ------------------------------------------------------------------
class kvm_memory_attributes(_Struct):  # noqa: N801
    EXPECTED_SIZE = 32
    _fields_ = [("address", u64), ("size", u64), ("attributes", u64), ("flags", u64)]


KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3

# --- vCPU pre-fault -----------------------------------------------------------------------
class kvm_pre_fault_memory(_Struct):  # noqa: N801
    EXPECTED_SIZE = 64
    _fields_ = [("gpa", u64), ("size", u64), ("flags", u64), ("padding", u64 * 5)]


# --- capabilities ---------------------------------------------------------------------------
class kvm_enable_cap(_Struct):  # noqa: N801
    EXPECTED_SIZE = 104
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- signal mask (KVM_SET_SIGNAL_MASK) --------------------------------------------------------
class kvm_signal_mask(_Struct):  # noqa: N801
    """The header the ioctl number is made from; the sigset follows it."""

    EXPECTED_SIZE = 4
    _fields_ = [("len", u32)]


KERNEL_SIGSET_SIZE: Final = 8  # x86-64 _NSIG / 8: what KVM_SET_SIGNAL_MASK's len must be


class kvm_signal_mask_sigset(_Struct):  # noqa: N801
    """kvm_signal_mask with its x86-64 sigset (the buffer the ioctl reads)."""

    EXPECTED_SIZE = 4 + KERNEL_SIGSET_SIZE
    _pack_ = 1
    _fields_ = [("len", u32), ("sigset", u64)]


# --- dirty log --------------------------------------------------------------------------------
class kvm_dirty_log(_Struct):  # noqa: N801
    EXPECTED_SIZE = 16
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_msr_filter_range(_Struct):  # noqa: N801
    """One range of the MSR filter: nmsrs MSRs from base, a bit each in bitmap
    (set: allowed), for reads and/or writes (flags)."""

    EXPECTED_SIZE = 24
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", u64)]


KVM_MSR_FILTER_MAX_RANGES: Final = 16
KVM_MSR_FILTER_READ: Final = 1 << 0
KVM_MSR_FILTER_WRITE: Final = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW: Final = 0
KVM_MSR_FILTER_DEFAULT_DENY: Final = 1 << 0


class kvm_msr_filter(_Struct):  # noqa: N801
    EXPECTED_SIZE = 8 + 16 * 24
    _fields_ = [("flags", u32), ("pad", u32),
                ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


# --- x86 registers (arch/x86/include/uapi/asm/kvm.h) ------------------------------------------
class kvm_regs(_Struct):  # noqa: N801
    EXPECTED_SIZE = 144
    _fields_ = [(f"r{name}" if name.isdigit() else name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "8", "9", "10", "11", "12", "13",
        "14", "15", "rip", "rflags",
    )]


class kvm_segment(_Struct):  # noqa: N801
    EXPECTED_SIZE = 24
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):  # noqa: N801
    EXPECTED_SIZE = 16
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(_Struct):  # noqa: N801
    EXPECTED_SIZE = 312
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


# --- struct kvm_run (include/uapi/linux/kvm.h; x86 layout, no s390 psw) ------------------------
class kvm_run_io(_Struct):  # noqa: N801
    EXPECTED_SIZE = 16
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(_Struct):  # noqa: N801
    EXPECTED_SIZE = 24
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hypercall(_Struct):  # noqa: N801
    EXPECTED_SIZE = 72
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("flags", u64)]


class kvm_run_memory_fault(_Struct):  # noqa: N801
    EXPECTED_SIZE = 24
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class kvm_run_fail_entry(_Struct):  # noqa: N801
    EXPECTED_SIZE = 16
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(_Struct):  # noqa: N801
    EXPECTED_SIZE = 136
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):  # noqa: N801
    EXPECTED_SIZE = 136
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_ex(_Struct):  # noqa: N801
    EXPECTED_SIZE = 8
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_msr(_Struct):  # noqa: N801
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: error is the VMM's answer (1: the
    guest gets #GP), data goes both ways."""

    EXPECTED_SIZE = 24
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_exit(ctypes.Union):  # noqa: N801
    _fields_ = [
        ("hw_exit_reason", u64),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("memory_fault", kvm_run_memory_fault),
        ("msr", kvm_run_msr),
        ("padding", u8 * 256),
    ]


class kvm_run(_Struct):  # noqa: N801
    # The struct continues with 2048 bytes of sync regs; we map only up to them.
    EXPECTED_SIZE = 304
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
    ]


KVM_RUN_EXIT_OFFSET: Final = 32

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_MEMORY_FAULT: Final = 39
# kvm_run.msr.reason, and KVM_CAP_X86_USER_SPACE_MSR's argument: which MSR accesses
# exit to userspace (invalid, unknown to KVM, denied by the filter)
KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3
KVM_EXIT_HYPERCALL_LONG_MODE: Final = 1 << 0
KVM_INTERNAL_ERROR_EMULATION: Final = 1

# --- ioctls on /dev/kvm -------------------------------------------------------------------
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
# --- ioctls on a VM fd ---------------------------------------------------------------------
KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG: Final = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_X86_SET_MSR_FILTER: Final = _IOW(KVMIO, 0xC6, kvm_msr_filter)
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_SET_MEMORY_ATTRIBUTES: Final = _IOW(KVMIO, 0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
# --- ioctls on a vCPU fd ----------------------------------------------------------------------
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_PRE_FAULT_MEMORY: Final = _IOWR(KVMIO, 0xD5, kvm_pre_fault_memory)
KVM_SET_SIGNAL_MASK: Final = _IOW(KVMIO, 0x8B, kvm_signal_mask)
# The ioctls above by number, for error messages (KVM_SET_MEMORY_ATTRIBUTES2, a
# series ioctl defined further down, is added there).
IOCTL_NAMES: Final[dict[int, str]] = {
    value: name for name, value in list(globals().items())
    if name.startswith("KVM_") and not name.startswith("KVM_CAP") and name.isupper()
    and isinstance(value, int) and value >> 8 & 0xFF == KVMIO
}

# --- capabilities (KVM_CHECK_EXTENSION) ---------------------------------------------------------
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_CAP_X86_MSR_FILTER: Final = 189
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

CAPABILITY_NAMES: Final[dict[int, str]] = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("KVM_CAP_") and isinstance(value, int)
}

# --- x86 VM types (arch/x86/include/uapi/asm/kvm.h) ---------------------------------------------
KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5
# Not in any kernel header: guestmem's model of a pKVM-style protected VM (seed 004),
# a documented model extension (model/profile.py VM_TYPES). Bit 31 of KVM_CAP_VM_TYPES,
# far from x86's numbers, as arm64's KVM_VM_TYPE_ARM_PROTECTED is bit 31 of its type.
GUESTMEM_PKVM_VM: Final = 31
VM_TYPE_NAMES: Final[dict[int, str]] = {
    KVM_X86_DEFAULT_VM: "default",
    KVM_X86_SW_PROTECTED_VM: "sw-protected",
    KVM_X86_SEV_VM: "sev",
    KVM_X86_SEV_ES_VM: "sev-es",
    KVM_X86_SNP_VM: "snp",
    KVM_X86_TDX_VM: "tdx",
    GUESTMEM_PKVM_VM: "pkvm",
}

# --- hypercalls (include/uapi/linux/kvm_para.h, arch/x86/include/uapi/asm/kvm_para.h) ---
KVM_HC_MAP_GPA_RANGE: Final = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K: Final = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M: Final = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G: Final = 1 << 1


def KVM_MAP_GPA_RANGE_ENC_STAT(n: int) -> int:  # noqa: N802
    return n << 4


KVM_MAP_GPA_RANGE_ENCRYPTED: Final = KVM_MAP_GPA_RANGE_ENC_STAT(1)
KVM_MAP_GPA_RANGE_DECRYPTED: Final = KVM_MAP_GPA_RANGE_ENC_STAT(0)
# SEV live migration: the guest's "every shared region is reported" (kvm_para.h).
MSR_KVM_MIGRATION_CONTROL: Final = 0x4B564D08
KVM_MIGRATION_READY: Final = 1 << 0
KVM_FEATURE_MIGRATION_CONTROL: Final = 17
KVM_FEATURE_HC_MAP_GPA_RANGE: Final = 16
# Guest-visible error codes (include/uapi/linux/kvm_para.h).
KVM_ENOSYS: Final = 1000
KVM_EFAULT: Final = 14
KVM_EINVAL: Final = 22
KVM_E2BIG: Final = 7
KVM_EPERM: Final = 1
KVM_EOPNOTSUPP: Final = 95

# --- errno values Python's errno module lacks (include/uapi/asm-generic/errno.h) ---
EHWPOISON: Final = 133  # memory page has hardware error

# --- fallocate modes (include/uapi/linux/falloc.h) ----------------------------------------------
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20
FALLOC_FL_UNSHARE_RANGE: Final = 0x40
FALLOC_FL_WRITE_ZEROES: Final = 0x80  # v6.17

# --- NUMA memory policy (include/uapi/linux/mempolicy.h) -------------------------------------
MPOL_DEFAULT: Final = 0
MPOL_PREFERRED: Final = 1
MPOL_BIND: Final = 2
MPOL_INTERLEAVE: Final = 3
MPOL_LOCAL: Final = 4
MPOL_PREFERRED_MANY: Final = 5
MPOL_WEIGHTED_INTERLEAVE: Final = 6
MPOL_MAX: Final = 7
MPOL_F_NUMA_BALANCING: Final = 1 << 13  # mode flags, or-ed into the mode
MPOL_F_RELATIVE_NODES: Final = 1 << 14
MPOL_F_STATIC_NODES: Final = 1 << 15
MPOL_MODE_FLAGS: Final = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING
MPOL_F_NODE: Final = 1 << 0  # get_mempolicy flags
MPOL_F_ADDR: Final = 1 << 1
MPOL_F_MEMS_ALLOWED: Final = 1 << 2
MPOL_MF_STRICT: Final = 1 << 0  # mbind flags
MPOL_MF_MOVE: Final = 1 << 1
MPOL_MF_MOVE_ALL: Final = 1 << 2
MPOL_MF_VALID: Final = MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL

# --- in-flight series (NOT merged; numbers may change) ---
# "guest_memfd: In-place conversion support" v8 (Ackerley Tng et al., 2026-06-18), upstream.md §7.1.
class kvm_memory_attributes2(_Struct):  # noqa: N801
    EXPECTED_SIZE = 128
    _fields_ = [
        ("offset", u64),  # union with `address` when issued on the VM fd
        ("size", u64),
        ("attributes", u64),
        ("flags", u64),
        ("error_offset", u64),
        ("reserved", u64 * 11),
    ]


KVM_SET_MEMORY_ATTRIBUTES2: Final = _IOWR(KVMIO, 0xD2, kvm_memory_attributes2)  # series v8
IOCTL_NAMES[KVM_SET_MEMORY_ATTRIBUTES2] = "KVM_SET_MEMORY_ATTRIBUTES2"
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: Final = 250  # series v8 numbering
# Direct-map removal series (Patrick Roy / Nikita Kalyazin), upstream.md §7.3.
GUEST_MEMFD_FLAG_NO_DIRECT_MAP: Final = 1 << 2  # series
# "1G page support for guest_memfd" RFC v2 (2025-05-14), upstream.md §7.2: obsolete numbering.
GUEST_MEMFD_FLAG_HUGETLB_RFC: Final = 1 << 2  # RFC, collides with NO_DIRECT_MAP
# The HugeTLB WIP branch (googleprodkernel wip-gmem-conversions-hugetlb-restructuring,
# Dec 2025; upstream-2026-11.md §2): series, unstable; bit 2 again, as NO_DIRECT_MAP.
GUEST_MEMFD_FLAG_HUGETLB: Final = 1 << 2  # series
HUGETLB_PAGE_ORDER_2M: Final = 9  # kvm_create_guest_memfd.page_order: log2(base pages)
HUGETLB_PAGE_ORDER_1G: Final = 18
GUESTMEM_HUGETLB_FLAG_SHIFT: Final = 58
GUESTMEM_HUGETLB_FLAG_MASK: Final = 0x3F
GUESTMEM_HUGETLB_FLAG_2MB: Final = 21 << GUESTMEM_HUGETLB_FLAG_SHIFT
GUESTMEM_HUGETLB_FLAG_1GB: Final = 30 << GUESTMEM_HUGETLB_FLAG_SHIFT


class kvm_gmem_convert(_Struct):  # noqa: N801 - RFC 2025, obsolete
    EXPECTED_SIZE = 64
    _fields_ = [("offset", u64), ("size", u64), ("error_offset", u64), ("reserved", u64 * 5)]


KVM_GMEM_IO: Final = 0xAF
KVM_GMEM_CONVERT_SHARED: Final = _IOWR(KVM_GMEM_IO, 0x41, kvm_gmem_convert)  # RFC, obsolete
KVM_GMEM_CONVERT_PRIVATE: Final = _IOWR(KVM_GMEM_IO, 0x42, kvm_gmem_convert)  # RFC, obsolete


def _check_sizes() -> None:
    """Every struct must have the kernel's size; a wrong layout is a silent ABI bug."""
    for obj in list(globals().values()):
        if isinstance(obj, type) and issubclass(obj, _Struct) and obj is not _Struct:
            actual = ctypes.sizeof(obj)
            if actual != obj.EXPECTED_SIZE:
                raise AssertionError(f"{obj.__name__}: size {actual} != {obj.EXPECTED_SIZE}")


_check_sizes()
