"""The model's /dev/kvm: a profile, a host process, and the VMs created from it."""

from __future__ import annotations

import errno
import os
import weakref
from typing import Self

from guestmem import _args, uapi
from guestmem.caps import Capabilities
from guestmem.exits import oserror
from guestmem.model.addrspace import page_align
from guestmem.model.content import PAGE
from guestmem.model.process import PROT_READ, PROT_WRITE, AnonymousMemory, HostProcess, Mapping
from guestmem.model.profile import PROFILES, VM_TYPES, Profile
from guestmem.model.vm import Vm

BACKEND = "model"


@_args.checked
class Kvm:
    backend = BACKEND

    def __init__(self, profile: str | Profile = "mainline", numa_nodes: int = 1) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
            profile = PROFILES[profile]
        self.profile = profile
        if not 1 <= numa_nodes <= 64:
            raise ValueError("numa_nodes must be 1..64")
        self.process = HostProcess(numa_nodes)
        self.process.memory_failure = profile.memory_failure
        self.vms: weakref.WeakSet[Vm] = weakref.WeakSet()  # live VMs (fd or references)
        self.closed = False
        self.fd = self.process.install(self)
        self._caps = self._capabilities()

    @property
    def capabilities(self) -> Capabilities:
        """What KVM_CHECK_EXTENSION says, as a record; EBADF once closed."""
        self._live("KVM_CHECK_EXTENSION")
        return self._caps

    def _live(self, ioctl: str) -> None:
        if self.closed:  # every ioctl on /dev/kvm needs its fd (as the kvm backend)
            raise oserror(errno.EBADF, ioctl)

    # --- capabilities ------------------------------------------------------------------------
    def _system(self) -> dict[str, int]:
        """KVM_CHECK_EXTENSION at system scope, as this project's host reports the
        generic ones (Linux 6.18); the profile decides the guest_memfd-related ones."""
        prof = self.profile
        values = {
            uapi.KVM_CAP_USER_MEMORY: 1, uapi.KVM_CAP_NR_VCPUS: 2,
            uapi.KVM_CAP_NR_MEMSLOTS: prof.nr_memslots, uapi.KVM_CAP_SYNC_MMU: 1,
            uapi.KVM_CAP_MAX_VCPUS: 1024, uapi.KVM_CAP_READONLY_MEM: 1,
            uapi.KVM_CAP_MULTI_ADDRESS_SPACE: 0, uapi.KVM_CAP_IMMEDIATE_EXIT: 1,
            uapi.KVM_CAP_EXIT_HYPERCALL: prof.exit_hypercall, uapi.KVM_CAP_USER_MEMORY2: 1,
            uapi.KVM_CAP_MEMORY_FAULT_INFO: 1,
            # kvm_supported_mem_attributes(NULL): PRIVATE at system scope when built
            uapi.KVM_CAP_MEMORY_ATTRIBUTES: (
                uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if prof.memory_attributes else 0),
            uapi.KVM_CAP_GUEST_MEMFD: 1,
            uapi.KVM_CAP_VM_TYPES: sum(1 << t for t in prof.vm_types),
            uapi.KVM_CAP_PRE_FAULT_MEMORY: int(prof.pre_fault_memory),
            # kvm_gmem_get_supported_flags(NULL): MMAP | INIT_SHARED
            uapi.KVM_CAP_GUEST_MEMFD_FLAGS: (
                uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED),
        }
        return {uapi.CAPABILITY_NAMES[nr]: v for nr, v in sorted(values.items())}

    def _capabilities(self) -> Capabilities:
        system = self._system()
        by_type = {t: VM_TYPES[t].gmem_flags for t in sorted(self.profile.vm_types)}
        return Capabilities(
            api_version=uapi.KVM_API_VERSION,
            implementation=self.profile.implementation,
            vm_types=frozenset(self.profile.vm_types),
            guest_memfd=True,
            guest_memfd_flags=by_type[uapi.KVM_X86_DEFAULT_VM],
            memory_attributes=system["KVM_CAP_MEMORY_ATTRIBUTES"],
            user_memory2=True,
            memory_fault_info=True,
            exit_hypercall=self.profile.exit_hypercall,
            pre_fault_memory=self.profile.pre_fault_memory,
            readonly_mem=True,
            nr_memslots=self.profile.nr_memslots,
            multi_address_space=0,
            numa_nodes=self.process.numa_nodes,
            gmem_shared_policy=self.profile.gmem_shared_policy,
            gmem_flags_by_vm_type=by_type,
            system=system,
            vm={t: self._vm_scope(t, system) for t in sorted(self.profile.vm_types)},
        )

    def _vm_scope(self, vm_type: int, system: dict[str, int]) -> dict[str, int]:
        """KVM_CHECK_EXTENSION on a VM of this type (kvm_vm_ioctl_check_extension_generic):
        system values, except the guest_memfd flags and attributes the VM type decides."""
        vt = VM_TYPES[vm_type]
        attrs = (uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
                 if self.profile.memory_attributes and vt.has_private_mem else 0)
        return {**system, "KVM_CAP_GUEST_MEMFD_FLAGS": vt.gmem_flags,
                "KVM_CAP_MEMORY_ATTRIBUTES": attrs}

    def api_version(self) -> int:
        self._live("KVM_GET_API_VERSION")
        return uapi.KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        self._live("KVM_CHECK_EXTENSION")
        return self.system_extension(cap)

    def system_extension(self, cap: int) -> int:
        """kvm_vm_ioctl_check_extension_generic(NULL, cap), for the model's own use."""
        return self._caps.system.get(uapi.CAPABILITY_NAMES.get(cap, ""), 0)

    def vcpu_mmap_size(self) -> int:
        self._live("KVM_GET_VCPU_MMAP_SIZE")
        return 3 * PAGE

    def supported_vm_types(self) -> frozenset[int]:
        self._live("KVM_CHECK_EXTENSION")
        return frozenset(self.profile.vm_types)

    # --- objects -------------------------------------------------------------------------------
    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        self._live("KVM_CREATE_VM")
        if vm_type not in self.profile.vm_types:
            raise oserror(errno.EINVAL, "KVM_CREATE_VM type")  # kvm_arch_init_vm
        vm = Vm(self, VM_TYPES[vm_type])
        self.vms.add(vm)
        return vm

    def mmap_anonymous(self, length: int) -> Mapping:
        """mmap(MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE): shmem of length bytes."""
        addr = self.process.get_unmapped_area(length)
        memory = AnonymousMemory(self.process, page_align(length) // PAGE)
        return self.process.map(addr, length, memory, 0, PROT_READ | PROT_WRITE)

    def open_fd_count(self) -> int:
        """Open fds of this process: model objects hold real fds, so this counts them."""
        return len(os.listdir("/proc/self/fd"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.process.release_fd(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
