"""The capability record both backends report (layer 1).

Besides the KVM_CHECK_EXTENSION values, it records what a host does beyond the
upstream guest_memfd rules, because kernel builds differ (even two builds of
one release: ../shared/spec/host-notes.md): the kvm backend probes these by
running tiny guests, the model states them in its profile.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from guestmem import uapi

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"
VENDOR_HYGON = "HygonGenuine"  # AMD's Zen under licence: SVM, VMMCALL


def native_hypercall(cpu_vendor: str) -> str:
    """The vendor's hypercall instruction: VMMCALL on SVM CPUs (AMD, Hygon), VMCALL
    elsewhere (Intel, and other VMX CPUs)."""
    return "vmmcall" if cpu_vendor in (VENDOR_AMD, VENDOR_HYGON) else "vmcall"


class HypercallOutcome(Enum):
    """What a guest's VMCALL/VMMCALL of KVM_HC_MAP_GPA_RANGE led to."""

    RETURNS_EPERM = "returns -KVM_EPERM (-1) to the guest"  # upstream at CPL3
    RETURNS_ENOSYS = "returns -KVM_ENOSYS to the guest"  # exit not enabled
    EXITS = "exits to userspace as KVM_EXIT_HYPERCALL"  # upstream at CPL0
    UD_SHUTDOWN = "raises #UD: the guest shuts down"  # the other vendor's opcode, natively
    NEVER_RETURNS = "KVM_RUN does not return until kicked"  # kvm_pvm's emulator loops
    OTHER = "something else"


@dataclass(frozen=True)
class GuestExecution:
    """How this KVM runs guest code: probed on the kvm backend, stated by profiles.

    `cpl3_hypercall` maps each instruction ("vmcall", "vmmcall") to what it does
    at CPL3 with KVM_CAP_EXIT_HYPERCALL enabled; `cpl0_hypercall` is the CPU
    vendor's own instruction at CPL0. `emulated_cpls` are the privilege levels
    whose code KVM's instruction emulator runs (kvm_pvm: CPL0): its accesses go
    through the memslot's userspace_addr, MMIO where that fails, whatever the
    memslot's guest_memfd holds."""

    cpu_vendor: str
    cpl3_hypercall: dict[str, HypercallOutcome]
    cpl0_hypercall: HypercallOutcome
    emulated_cpls: frozenset[int] = frozenset()

    @property
    def native_hypercall(self) -> str:
        return native_hypercall(self.cpu_vendor)

    @property
    def default_cpl(self) -> int:
        """CPL0, which hypercalls need (__kvm_emulate_hypercall: CPL != 0 ->
        -KVM_EPERM), unless KVM emulates CPL0 code (kvm_pvm): then CPL3, which
        runs natively."""
        return 3 if 0 in self.emulated_cpls else 0

    def hypercall_exits_at(self, cpl: int) -> bool:
        """A hypercall at `cpl` reaches userspace as KVM_EXIT_HYPERCALL."""
        if cpl == 0:
            return self.cpl0_hypercall is HypercallOutcome.EXITS
        return self.cpl3_hypercall.get(self.native_hypercall) is HypercallOutcome.EXITS


# Upstream x86 on VMX/SVM (x86.c __kvm_emulate_hypercall; a foreign opcode is
# #UD-intercepted and emulated, so both instructions behave alike).
UPSTREAM_EXECUTION = GuestExecution(
    cpu_vendor=VENDOR_INTEL,
    cpl3_hypercall={"vmcall": HypercallOutcome.RETURNS_EPERM,
                    "vmmcall": HypercallOutcome.RETURNS_EPERM},
    cpl0_hypercall=HypercallOutcome.EXITS,
)


@dataclass(frozen=True)
class Capabilities:
    """What the host's KVM offers, probed once (system scope, then a VM of each type)."""

    api_version: int
    implementation: str  # kvm_intel, kvm_amd, kvm_pvm or unknown
    vm_types: frozenset[int]
    guest_memfd: bool
    guest_memfd_flags: int  # KVM_CAP_GUEST_MEMFD_FLAGS on a default VM
    memory_attributes: int  # KVM_CAP_MEMORY_ATTRIBUTES, system scope
    user_memory2: bool
    memory_fault_info: bool
    exit_hypercall: int  # KVM_CAP_EXIT_HYPERCALL valid mask
    pre_fault_memory: bool
    readonly_mem: bool
    nr_memslots: int
    multi_address_space: int
    numa_nodes: int
    gmem_shared_policy: bool  # mbind on a guest_memfd keeps a per-inode policy (upstream 6.18)
    gmem_flags_by_vm_type: dict[int, int]  # KVM_CAP_GUEST_MEMFD_FLAGS on a VM of each type
    system: dict[str, int]  # every named capability at system scope
    vm: dict[int, dict[str, int]]  # every named capability on a VM of each type
    execution: GuestExecution = UPSTREAM_EXECUTION
    # x86 KVM_CAP_PRE_FAULT_MEMORY is tdp_enabled: without TDP the MMU shadows the
    # guest's page tables, which it reads through userspace_addr.
    shadow_paging: bool = False
    # kvm_gmem_bind on a bound range: EINVAL on 6.18, EEXIST in kvm-x86/next; None:
    # no guest_memfd to ask
    gmem_bind_overlap_errno: int | None = errno.EINVAL
    memory_failure: bool = False  # CONFIG_MEMORY_FAILURE (MADV_HWPOISON)
    # the in-place conversion series with kvm.gmem_in_place_conversion on: a guest_memfd
    # answers KVM_SET_MEMORY_ATTRIBUTES2 (probed: anything but ENOTTY)
    gmem_in_place_conversion: bool = False
    # Every nonzero KVM_CHECK_EXTENSION answer by number, named or not.
    system_numbers: dict[int, int] = field(default_factory=dict)
    vm_numbers: dict[int, dict[int, int]] = field(default_factory=dict)
    runs_guests: bool = True

    def gmem_flags_for(self, vm_type: int) -> int:
        return self.gmem_flags_by_vm_type.get(vm_type, 0)

    @classmethod
    def from_numbers(cls, system_numbers: dict[int, int], vm_numbers: dict[int, dict[int, int]],
                     **rest: Any) -> Capabilities:
        """The record from KVM_CHECK_EXTENSION's answers at system scope and on a VM
        of each type (the VM types are vm_numbers' keys); `rest` gives the fields
        the answers do not (the probed or stated behaviours)."""
        system = _named(system_numbers)
        vm = {t: _named(nums) for t, nums in sorted(vm_numbers.items())}
        by_type = {t: v["KVM_CAP_GUEST_MEMFD_FLAGS"] for t, v in vm.items()}
        return cls(
            vm_types=frozenset(vm_numbers),
            guest_memfd=bool(system["KVM_CAP_GUEST_MEMFD"]),
            guest_memfd_flags=by_type.get(uapi.KVM_X86_DEFAULT_VM, 0),
            memory_attributes=system["KVM_CAP_MEMORY_ATTRIBUTES"],
            user_memory2=bool(system["KVM_CAP_USER_MEMORY2"]),
            memory_fault_info=bool(system["KVM_CAP_MEMORY_FAULT_INFO"]),
            exit_hypercall=system["KVM_CAP_EXIT_HYPERCALL"],
            pre_fault_memory=bool(system["KVM_CAP_PRE_FAULT_MEMORY"]),
            readonly_mem=bool(system["KVM_CAP_READONLY_MEM"]),
            nr_memslots=system["KVM_CAP_NR_MEMSLOTS"],
            multi_address_space=system["KVM_CAP_MULTI_ADDRESS_SPACE"],
            gmem_flags_by_vm_type=by_type,
            system=system,
            vm=vm,
            system_numbers={nr: v for nr, v in system_numbers.items() if v},
            vm_numbers={t: {nr: v for nr, v in nums.items() if v}
                        for t, nums in vm_numbers.items()},
            **rest,
        )


def _named(numbers: dict[int, int]) -> dict[str, int]:
    """The answers for every capability guestmem has a name for."""
    return {name: numbers.get(nr, 0) for nr, name in sorted(uapi.CAPABILITY_NAMES.items())}
