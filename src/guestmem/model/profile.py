"""Kernel profiles and VM types, as data (DESIGN.md "Kernel profiles").

A profile says which kernel the model behaves like; a VM type says what a kind
of VM does differently. Code asks these records questions instead of branching
on type numbers.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum

from guestmem import uapi


class Prepare(Enum):
    """What happens to a page the first time it is given to the guest."""

    ZERO = "kernel zeroes"  # kvm_gmem_get_pfn zeroes !uptodate folios (ML)
    FIRMWARE = "firmware initialises"  # SNP/TDX: the page is assigned and scrubbed by firmware


class HostPrivateAccess(Enum):
    """What host userspace touching private memory gets (seed 000)."""

    SIGBUS = "SIGBUS"  # guest_memfd refuses the fault (kvm_gmem_fault_user_mapping)
    RMP_FAULT = "RMP #PF"  # SNP: the RMP check fails; the host process dies
    MACHINE_CHECK = "#MC"  # TDX: poisoned cache line


@dataclass(frozen=True)
class VmType:
    number: int
    name: str
    has_private_mem: bool  # kvm_arch_has_private_mem
    gmem_flags: int  # kvm_gmem_get_supported_flags for this VM (upstream.md §1.4)
    prepare: Prepare
    conversion_preserves: bool  # contents survive shared<->private (SW VMs; HW scrambles)
    host_private_access: HostPrivateAccess
    conversion_trusted: bool  # the guest's MAP_GPA_RANGE is authoritative (TDX: a hint, seed 001)
    private_from_hardware: bool  # fault privateness comes from the C-bit/shared bit, not attrs
    pre_fault_allowed: bool = True  # x86 kvm->arch.pre_fault_allowed (SNP/TDX: after finalize)


_MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
_MMAP = uapi.GUEST_MEMFD_FLAG_MMAP

VM_TYPES: dict[int, VmType] = {t.number: t for t in (
    VmType(uapi.KVM_X86_DEFAULT_VM, "default", False, _MMAP_SHARED, Prepare.ZERO, True,
           HostPrivateAccess.SIGBUS, True, False),
    # x86.c: SW_PROTECTED takes privateness from the attributes (kvm_mem_is_private).
    VmType(uapi.KVM_X86_SW_PROTECTED_VM, "sw-protected", True, _MMAP, Prepare.ZERO, True,
           HostPrivateAccess.SIGBUS, True, False),
    # SEV/SEV-ES: encryption is invisible to KVM (no private memory, no private
    # faults: upstream.md §2.10 takes privateness from hardware only for SNP/TDX).
    VmType(uapi.KVM_X86_SEV_VM, "sev", False, _MMAP_SHARED, Prepare.ZERO, False,
           HostPrivateAccess.SIGBUS, True, False),
    VmType(uapi.KVM_X86_SEV_ES_VM, "sev-es", False, _MMAP_SHARED, Prepare.ZERO, False,
           HostPrivateAccess.SIGBUS, True, False),
    # SNP/TDX: KVM_PRE_FAULT_MEMORY only after the VM is finalized, which the model
    # has no API for yet: EOPNOTSUPP (upstream.md §2.14).
    VmType(uapi.KVM_X86_SNP_VM, "snp", True, _MMAP, Prepare.FIRMWARE, False,
           HostPrivateAccess.RMP_FAULT, True, True, pre_fault_allowed=False),
    # Seed 001: "in the case of TDX, the hypercall can't be trusted, i.e. is just a hint".
    VmType(uapi.KVM_X86_TDX_VM, "tdx", True, _MMAP, Prepare.FIRMWARE, False,
           HostPrivateAccess.MACHINE_CHECK, False, True, pre_fault_allowed=False),
)}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    vm_types: frozenset[int]
    memory_attributes: bool  # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
    pre_fault_memory: bool  # x86: tdp_enabled
    exit_hypercall: int = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    nr_memslots: int = 32764  # KVM_USER_MEM_SLOTS as this host reports it
    # kvm_gmem_bind on an already bound file range: ML EINVAL, kvm-x86/next EEXIST.
    bind_overlap_errno: int = errno.EINVAL
    # Shadow paging (this host: kvm_pvm, tdp_mmu=N): the guest's own page-table dirty
    # bits decide whether a read fault maps writable, which dirty logging sees.
    shadow_paging: bool = False
    # CONFIG_MEMORY_FAILURE: MADV_HWPOISON injects errors (this host: EINVAL, so off).
    memory_failure: bool = False
    # NUMA policy of guest_memfd pages: per inode (upstream 6.18, kvm_gmem_set_policy)
    # or per VMA only, never consulted by allocations (this host: no kvm_gmem_set_policy).
    gmem_shared_policy: bool = False
    implementation: str = "model"


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("mainline", "Linux 6.18 as on this project's host: default VM, MMAP and "
            "INIT_SHARED, no private memory", frozenset({uapi.KVM_X86_DEFAULT_VM}), False, False,
            shadow_paging=True),
    Profile("coco", "mainline plus the CoCo VM types with KVM_SET_MEMORY_ATTRIBUTES and "
            "private memory (an x86 host with SEV-SNP/TDX and CONFIG_KVM_SW_PROTECTED_VM)",
            frozenset(VM_TYPES), True, True, memory_failure=True, gmem_shared_policy=True),
)}
