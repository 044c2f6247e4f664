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
from guestmem.model.hugetlb import Hugetlb
from guestmem.model.process import (
    PROT_READ,
    PROT_WRITE,
    AnonymousMemory,
    ChildProcess,
    HostProcess,
    Mapping,
)
from guestmem.model.profile import PROFILES, SHARED_WITH_CAPABILITIES, Profile
from guestmem.model.vm import Vm

BACKEND = "model"


@_args.checked
class Kvm:
    backend = BACKEND

    def __init__(self, profile: str | Profile = "mainline", numa_nodes: int = 1) -> None:
        if isinstance(profile, str):
            if profile == "host":
                raise ValueError("the host profile is built from a probe of /dev/kvm: use "
                                 "guestmem.Kvm(backend='model', profile='host'), or pass "
                                 "Profile.from_capabilities(caps)")
            if profile not in PROFILES:
                raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}, "
                                 f"and host (guestmem.Kvm('model', profile='host'))")
            profile = PROFILES[profile]
        self.profile = profile
        if not 1 <= numa_nodes <= 64:
            raise ValueError("numa_nodes must be 1..64")
        self.process = HostProcess(numa_nodes)
        # The machine's HugeTLB pools (empty, as a booted host's; size them with
        # hugetlb.set_nr_hugepages): guest_memfd's on the hugetlb profile come from them.
        self.hugetlb = Hugetlb()
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
    def _derived_system(self) -> dict[int, int]:
        """KVM_CHECK_EXTENSION at system scope where no probe supplied the numbers: the
        generic values of an x86 Linux 6.18 host; the profile decides the
        guest_memfd-related ones."""
        prof = self.profile
        return {
            uapi.KVM_CAP_USER_MEMORY: 1, uapi.KVM_CAP_NR_VCPUS: 2,
            uapi.KVM_CAP_NR_MEMSLOTS: prof.nr_memslots, uapi.KVM_CAP_SYNC_MMU: 1,
            uapi.KVM_CAP_MAX_VCPUS: 1024, uapi.KVM_CAP_READONLY_MEM: 1,
            uapi.KVM_CAP_MULTI_ADDRESS_SPACE: 0, uapi.KVM_CAP_IMMEDIATE_EXIT: 1,
            uapi.KVM_CAP_EXIT_HYPERCALL: prof.exit_hypercall, uapi.KVM_CAP_USER_MEMORY2: 1,
            uapi.KVM_CAP_MEMORY_FAULT_INFO: 1,
            uapi.KVM_CAP_X86_USER_SPACE_MSR: 1, uapi.KVM_CAP_X86_MSR_FILTER: 1,
            # kvm_supported_mem_attributes(NULL): PRIVATE at system scope when built
            uapi.KVM_CAP_MEMORY_ATTRIBUTES: (
                uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
                if prof.memory_attributes and not prof.gmem_in_place_conversion else 0),
            # the series: PRIVATE iff in place (system scope: our choice, any VM type)
            uapi.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: (
                uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if prof.gmem_in_place_conversion else 0),
            uapi.KVM_CAP_GUEST_MEMFD: 1,
            uapi.KVM_CAP_VM_TYPES: sum(1 << t for t in prof.vm_types),
            uapi.KVM_CAP_PRE_FAULT_MEMORY: int(prof.pre_fault_memory),
            # kvm_gmem_get_supported_flags(NULL): MMAP | INIT_SHARED
            uapi.KVM_CAP_GUEST_MEMFD_FLAGS: (
                uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED),
        }

    def _derived_vm(self, vm_type: int, system: dict[int, int]) -> dict[int, int]:
        """KVM_CHECK_EXTENSION on a VM of this type (kvm_vm_ioctl_check_extension_generic):
        system values, except the guest_memfd flags and attributes the VM type decides."""
        prof = self.profile
        vt = prof.vm_type(vm_type)
        in_place = (uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
                    if prof.gmem_in_place_conversion and vt.has_private_mem else 0)
        return {**system, uapi.KVM_CAP_GUEST_MEMFD_FLAGS: prof.gmem_flags_of(vt),
                uapi.KVM_CAP_MEMORY_ATTRIBUTES: prof.vm_attributes(vt),
                uapi.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: in_place}

    def _capabilities(self) -> Capabilities:
        prof = self.profile
        numbers = prof.system_numbers if prof.system_numbers is not None else \
            self._derived_system()
        vm_numbers = {t: (prof.vm_numbers or {}).get(t) or self._derived_vm(t, numbers)
                      for t in sorted(prof.vm_types)}
        return Capabilities.from_numbers(
            numbers, vm_numbers,
            api_version=uapi.KVM_API_VERSION,
            numa_nodes=self.process.numa_nodes,
            gmem_bind_overlap_errno=prof.bind_overlap_errno,
            **{name: getattr(prof, name) for name in SHARED_WITH_CAPABILITIES},
        )

    def api_version(self) -> int:
        """KVM_GET_API_VERSION (kvm_dev_ioctl: KVM_API_VERSION)."""
        self._live("KVM_GET_API_VERSION")
        return uapi.KVM_API_VERSION

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION at system scope (kvm_dev_ioctl_check_extension_generic)."""
        self._live("KVM_CHECK_EXTENSION")
        return self.system_extension(cap)

    def system_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION at system scope for the model's own use (no fd check)."""
        return self._caps.system_numbers.get(cap, 0)

    def vm_extension(self, vm_type: int, cap: int) -> int:
        """KVM_CHECK_EXTENSION on a VM of vm_type (its VM fd outlives /dev/kvm's)."""
        return self._caps.vm_numbers[vm_type].get(cap, 0)

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE (kvm_dev_ioctl: kvm_run and the pages after it)."""
        self._live("KVM_GET_VCPU_MMAP_SIZE")
        return 3 * PAGE

    def supported_vm_types(self) -> frozenset[int]:
        """KVM_CAP_VM_TYPES as a set (x86 kvm_caps.supported_vm_types)."""
        self._live("KVM_CHECK_EXTENSION")
        return frozenset(self.profile.vm_types)

    # --- objects -------------------------------------------------------------------------------
    def create_vm(self, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Vm:
        """KVM_CREATE_VM (kvm_dev_ioctl_create_vm; kvm_arch_init_vm: unknown type EINVAL)."""
        self._live("KVM_CREATE_VM")
        if vm_type not in self.profile.vm_types:
            raise oserror(errno.EINVAL, "KVM_CREATE_VM type")  # kvm_arch_init_vm
        vm = Vm(self, self.profile.vm_type(vm_type))
        self.vms.add(vm)
        return vm

    def mmap_anonymous(self, length: int, align: int = 0) -> Mapping:
        """mmap(MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE): shmem of length bytes, at
        a multiple of `align` if given."""
        addr = self.process.get_unmapped_area(length, align)
        memory = AnonymousMemory(self.process, page_align(length) // PAGE)
        return self.process.map(addr, length, memory, 0, PROT_READ | PROT_WRITE)

    def fork(self) -> ChildProcess:
        """fork(2) of this process (HostProcess.fork): a child that shares its
        mappings (but MADV_DONTFORK ones) and holds its files until exit()."""
        return self.process.fork()

    def open_fd_count(self) -> int:
        """Open fds of this process: model objects hold real fds, so this counts them."""
        return len(os.listdir("/proc/self/fd"))

    def close(self) -> None:
        """close(2) of /dev/kvm; its VMs live on (kvm_dev_release only drops the file)."""
        if not self.closed:
            self.closed = True
            self.process.release_fd(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

