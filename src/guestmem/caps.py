"""The capability record both backends report (layer 1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What the host's KVM offers, probed once (system scope, then a default VM)."""

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
    system: dict[str, int]  # every known capability at system scope, by name
    vm: dict[int, dict[str, int]]  # every known capability on a VM of each type, by name
    runs_guests: bool = True

    def gmem_flags_for(self, vm_type: int) -> int:
        return self.gmem_flags_by_vm_type.get(vm_type, 0)
