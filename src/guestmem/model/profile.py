"""Kernel profiles and VM types, as data (DESIGN.md "Kernel profiles").

A profile says which kernel the model behaves like; a VM type says what a kind
of VM does differently. Code asks these records questions instead of branching
on type numbers.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace
from enum import Enum

from guestmem import uapi
from guestmem.caps import UPSTREAM_EXECUTION, Capabilities, GuestExecution


class Prepare(Enum):
    """What happens to a page the first time it is given to the guest."""

    ZERO = "kernel zeroes"  # kvm_gmem_get_pfn zeroes !uptodate folios (ML)
    FIRMWARE = "firmware initialises"  # SNP/TDX: the page is assigned and scrubbed by firmware


class HostPrivateAccess(Enum):
    """What a host access to private memory would meet in hardware, had guest_memfd
    mapped it (seed 000, seed 001 "the guest could induce a #MC in the host").
    guest_memfd never maps it: the access is SIGBUS, and the reason names this."""

    SIGBUS = "SIGBUS"  # nothing beyond guest_memfd stops it (SW_PROTECTED: software only)
    RMP_FAULT = "RMP #PF"  # SNP: the RMP check fails; the host process dies
    MACHINE_CHECK = "#MC"  # TDX: poisoned cache line
    STAGE2_ABORT = "stage-2 abort"  # pKVM: the hypervisor's host stage-2 (pkvm.rst)


class Conversion(Enum):
    """What a page converted in place holds for its new owner (the series' arch
    callbacks kvm_arch_gmem_make_shared / make_private, upstream-2026-11.md §1)."""

    # The bytes stay: software-only protection (SW_PROTECTED), and pKVM's "conversion =
    # preserve" (Fuad Tabba on v8; seed 004: hand a large buffer over without a copy).
    PRESERVE = "preserved"
    # TDX: to private, TDH.MEM.PAGE.AUG adds a page the guest's TDG.MEM.PAGE.ACCEPT
    # zeroes; to shared, KVM removes the page and clears it (tdx_clear_page, MOVDIR64B)
    # before the host gets it back. Either side reads zeros.
    ZERO = "zeroed"
    # SNP: RMPUPDATE reassigns the page but its bytes stay, encrypted or not under
    # the VM's key: the guest reads the host's plaintext decrypted (noise), the host
    # the guest's ciphertext (noise). Neither reads the other's data.
    CIPHERTEXT = "ciphertext"


@dataclass(frozen=True)
class VmType:
    number: int
    name: str
    has_private_mem: bool  # kvm_arch_has_private_mem
    gmem_flags: int  # kvm_gmem_get_supported_flags for this VM (upstream.md §1.4)
    prepare: Prepare
    conversion: Conversion  # contents across an in-place conversion (Conversion)
    host_private_access: HostPrivateAccess
    conversion_trusted: bool  # the guest's MAP_GPA_RANGE is authoritative (TDX: a hint, seed 001)
    private_from_hardware: bool  # fault privateness comes from the C-bit/shared bit, not attrs
    pre_fault_allowed: bool = True  # x86 kvm->arch.pre_fault_allowed (SNP/TDX: after finalize)
    # Base pages of the largest private stage-2 leaf: TDX caps private mappings at
    # 2 MiB, with no promotion (the TDX module wants all 512 4 KiB leaves alike:
    # upstream-2026-11.md §2, TDX huge page v3); others allow 1 GiB.
    max_private_leaf: int = 1 << 18
    # SEV/SEV-ES: the memory controller encrypts what the guest accesses with its
    # C-bit set, under the VM's key, and KVM never knows (seed 001's setting): the
    # host reads ciphertext, and only the firmware (SEND_UPDATE_DATA) the data.
    c_bit_encrypts: bool = False

    @property
    def conversion_preserves(self) -> bool:
        """Contents survive shared<->private in place (SW_PROTECTED, pKVM)."""
        return self.conversion is Conversion.PRESERVE


_MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
_MMAP = uapi.GUEST_MEMFD_FLAG_MMAP

VM_TYPES: dict[int, VmType] = {t.number: t for t in (
    VmType(uapi.KVM_X86_DEFAULT_VM, "default", False, _MMAP_SHARED, Prepare.ZERO,
           Conversion.PRESERVE, HostPrivateAccess.SIGBUS, True, False),
    # x86.c: SW_PROTECTED takes privateness from the attributes (kvm_mem_is_private).
    # Conversion preserves: the selftest's unallocated_folios reads 'A' back after a
    # bulk convert (upstream.md §7.1).
    VmType(uapi.KVM_X86_SW_PROTECTED_VM, "sw-protected", True, _MMAP, Prepare.ZERO,
           Conversion.PRESERVE, HostPrivateAccess.SIGBUS, True, False),
    # SEV/SEV-ES: encryption is invisible to KVM (no private memory, no private
    # faults: upstream.md §2.10 takes privateness from hardware only for SNP/TDX).
    VmType(uapi.KVM_X86_SEV_VM, "sev", False, _MMAP_SHARED, Prepare.ZERO,
           Conversion.CIPHERTEXT, HostPrivateAccess.SIGBUS, True, False, c_bit_encrypts=True),
    VmType(uapi.KVM_X86_SEV_ES_VM, "sev-es", False, _MMAP_SHARED, Prepare.ZERO,
           Conversion.CIPHERTEXT, HostPrivateAccess.SIGBUS, True, False, c_bit_encrypts=True),
    # SNP/TDX: KVM_PRE_FAULT_MEMORY only after the VM is finalized, which the model
    # has no API for yet: EOPNOTSUPP (upstream.md §2.14).
    VmType(uapi.KVM_X86_SNP_VM, "snp", True, _MMAP, Prepare.FIRMWARE, Conversion.CIPHERTEXT,
           HostPrivateAccess.RMP_FAULT, True, True, pre_fault_allowed=False),
    # Seed 001: "in the case of TDX, the hypercall can't be trusted, i.e. is just a hint".
    VmType(uapi.KVM_X86_TDX_VM, "tdx", True, _MMAP, Prepare.FIRMWARE, Conversion.ZERO,
           HostPrivateAccess.MACHINE_CHECK, False, True, pre_fault_allowed=False,
           max_private_leaf=1 << 9),
    # A model extension (seed 004, upstream-2026-11.md §5): a pKVM-style protected VM on
    # guest_memfd, which no kernel release has (pKVM uses pinned memory). It is
    # SW_PROTECTED's behaviour plus what pKVM asked for: conversion preserves, so a
    # buffer of hundreds of MiB is handed over without a copy. Only with in-place
    # conversion (PROFILES["inplace"]), which its preserve mode depends on.
    VmType(uapi.GUESTMEM_PKVM_VM, "pkvm", True, _MMAP, Prepare.ZERO, Conversion.PRESERVE,
           HostPrivateAccess.STAGE2_ABORT, True, False),
)}
X86_VM_TYPES = frozenset(t for t in VM_TYPES if t != uapi.GUESTMEM_PKVM_VM)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    vm_types: frozenset[int]
    memory_attributes: bool  # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
    pre_fault_memory: bool  # x86: tdp_enabled
    exit_hypercall: int = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    nr_memslots: int = 32764  # KVM_USER_MEM_SLOTS on x86 (KVM_MEM_SLOTS_NUM - 4)
    # kvm_gmem_bind on an already bound file range: ML EINVAL, kvm-x86/next EEXIST.
    bind_overlap_errno: int = errno.EINVAL
    # Shadow paging (no TDP; kvm_pvm): the MMU reads the guest's page tables through
    # userspace_addr, and the guest's own dirty bits decide whether a read fault
    # maps writable, which dirty logging sees.
    shadow_paging: bool = False
    # CONFIG_MEMORY_FAILURE: MADV_HWPOISON injects errors (off in x86_64_defconfig).
    memory_failure: bool = False
    # NUMA policy of guest_memfd pages: per inode (upstream 6.18, kvm_gmem_set_policy)
    # or per VMA only, never consulted by allocations (a build without it).
    gmem_shared_policy: bool = True
    # The in-place conversion series (upstream-2026-11.md §1; kvm.gmem_in_place_conversion):
    # PRIVATE is tracked per guest_memfd and set with KVM_SET_MEMORY_ATTRIBUTES2 on it;
    # the VM-level ioctl no longer takes PRIVATE; INIT_SHARED is allowed for VM types
    # with private memory.
    gmem_in_place_conversion: bool = False
    # Seed 003 (RFC patch 30, "zero folios after conversions to avoid leaking
    # initialized kernel memory") as an option: every page converted in place reads
    # zero for its new owner, whatever the VM type would keep. A model extension.
    gmem_zero_on_conversion: bool = False
    # guest_memfd on HugeTLB (the WIP branch, upstream-2026-11.md §2; issue 10):
    # GUEST_MEMFD_FLAG_HUGETLB and kvm_create_guest_memfd.page_order. Without it the
    # page_order byte is reserved and never read (observed on 6.18.44: any value).
    gmem_hugetlb: bool = False
    # How KVM_CREATE_GUEST_MEMFD names the huge page size, neither merged: "page_order"
    # (the WIP branch: kvm_create_guest_memfd.page_order, log2 base pages) or "flags"
    # (RFC v2: log2 bytes in flag bits 58-63, GUESTMEM_HUGETLB_FLAG_SHIFT, as
    # MAP_HUGE_*; upstream.md §7.2). Both put HUGETLB at bit 2, NO_DIRECT_MAP's bit.
    gmem_hugetlb_encoding: str = "page_order"
    # KVM_MEM_LOG_DIRTY_PAGES on guest_memfd memslots, which check_memory_region_flags
    # refuses upstream (R10, ecosystem.md §3.3: an open request). A model extension,
    # for studying pre-copy of guest_memfd memory (issue 11's attributes design).
    gmem_dirty_logging: bool = False
    implementation: str = "model"
    # How guest code runs: hypercall outcomes, emulated privilege levels (caps.py).
    execution: GuestExecution = UPSTREAM_EXECUTION
    # KVM_CAP_GUEST_MEMFD_FLAGS per VM type where it differs from VM_TYPES' upstream value.
    gmem_flags: dict[int, int] = field(default_factory=dict)
    # Every KVM_CHECK_EXTENSION answer by number, where a probe supplied them (the
    # host profile); otherwise the model derives them (model/kvm.py).
    system_numbers: dict[int, int] | None = None
    vm_numbers: dict[int, dict[int, int]] | None = None

    def gmem_flags_of(self, vt: VmType) -> int:
        """kvm_gmem_get_supported_flags: the VM type's, plus INIT_SHARED for a VM
        with private memory where conversion is in place (upstream.md §7.1), plus
        HUGETLB where guest_memfd is on HugeTLB (the WIP branch; every VM type:
        our reading, the branch gates it on the config only)."""
        flags = vt.gmem_flags
        if self.gmem_in_place_conversion and vt.has_private_mem:
            flags |= uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        if self.gmem_hugetlb:
            flags |= uapi.GUEST_MEMFD_FLAG_HUGETLB
        return flags

    def vm_attributes(self, vt: VmType) -> int:
        """kvm_supported_mem_attributes: PRIVATE iff the VM has private memory and
        PRIVATE is still tracked per VM (not with in-place conversion)."""
        if self.memory_attributes and vt.has_private_mem and not self.gmem_in_place_conversion:
            return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        return 0

    def conversion_of(self, vt: VmType) -> Conversion:
        """What a page converted in place holds for its new owner on this kernel."""
        return Conversion.ZERO if self.gmem_zero_on_conversion else vt.conversion

    def vm_type(self, number: int) -> VmType:
        """The VM type as this kernel has it."""
        vt = VM_TYPES[number]
        return replace(vt, gmem_flags=self.gmem_flags[number]) if number in self.gmem_flags \
            else vt

    @classmethod
    def from_capabilities(cls, caps: Capabilities) -> Profile:
        """The `host` profile: the kernel a probe of /dev/kvm found (DESIGN.md "Kernel
        profiles"): its capability numbers, VM types, guest_memfd flags, the errnos
        that differ between builds, and how it runs guest code."""
        unknown = caps.vm_types - VM_TYPES.keys()
        return cls(
            name="host",
            description=f"this machine's /dev/kvm as probed ({caps.implementation}, "
                        f"{caps.execution.cpu_vendor})",
            vm_types=caps.vm_types - unknown,
            memory_attributes=bool(caps.memory_attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE),
            pre_fault_memory=caps.pre_fault_memory,
            exit_hypercall=caps.exit_hypercall,
            nr_memslots=caps.nr_memslots,
            bind_overlap_errno=caps.gmem_bind_overlap_errno or errno.EINVAL,
            **{name: getattr(caps, name) for name in SHARED_WITH_CAPABILITIES},
            gmem_flags=dict(caps.gmem_flags_by_vm_type),
            system_numbers=dict(caps.system_numbers),
            vm_numbers={t: dict(v) for t, v in caps.vm_numbers.items() if t not in unknown},
        )


# Fields a Profile and a Capabilities record both have, under the same name: the
# model reports them (model/kvm.py) and the host profile takes them (from_capabilities).
SHARED_WITH_CAPABILITIES: tuple[str, ...] = (
    "shadow_paging", "memory_failure", "gmem_in_place_conversion", "gmem_shared_policy",
    "implementation", "execution")


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("mainline", "upstream Linux 6.18 on an x86 host with TDP: default VM, "
            "MMAP and INIT_SHARED, no private memory", frozenset({uapi.KVM_X86_DEFAULT_VM}),
            memory_attributes=False, pre_fault_memory=True),
    Profile("coco", "mainline plus the CoCo VM types with KVM_SET_MEMORY_ATTRIBUTES and "
            "private memory (an x86 host with SEV-SNP/TDX and CONFIG_KVM_SW_PROTECTED_VM)",
            X86_VM_TYPES, memory_attributes=True, pre_fault_memory=True,
            memory_failure=True),
    # Our choice: the VM-level ioctl stays (CONFIG_KVM_VM_MEMORY_ATTRIBUTES built, the
    # mode turned on by kvm.gmem_in_place_conversion=1) and takes no PRIVATE; where the
    # mode is on by default that config is off and the VM ioctl is ENOTTY instead.
    Profile("inplace", "coco with the in-place conversion series (v13, reportedly applied "
            "2026-09): PRIVATE kept per guest_memfd, converted with "
            "KVM_SET_MEMORY_ATTRIBUTES2 on it; adds the pkvm VM type (a model extension)",
            frozenset(VM_TYPES), memory_attributes=True,
            pre_fault_memory=True, memory_failure=True, gmem_in_place_conversion=True),
    # The HugeTLB WIP branch (googleprodkernel wip-gmem-conversions-hugetlb-restructuring,
    # Dec 2025; upstream-2026-11.md §2) on top of in-place conversion, which it needs.
    Profile("hugetlb", "inplace plus guest_memfd on HugeTLB (an unmerged WIP branch): "
            "GUEST_MEMFD_FLAG_HUGETLB with a page_order, folios split on conversion to "
            "shared and merged when private whole",
            frozenset(VM_TYPES), memory_attributes=True, pre_fault_memory=True,
            memory_failure=True, gmem_in_place_conversion=True, gmem_hugetlb=True),
)}
# `host` is not in PROFILES: it exists only once a probe of /dev/kvm has built it
# (guestmem.Kvm(backend="model", profile="host")).
