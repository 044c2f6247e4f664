"""Typed vCPU exits and the errors of the backend-neutral API (layer 1: pure data).

Both backends return these from `Vcpu.run()`, so the VMM and the conformance
suite never look at a `struct kvm_run` directly. Names follow the KVM_EXIT_*
reasons of include/uapi/linux/kvm.h.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field

from guestmem import uapi


@dataclass(frozen=True)
class Exit:
    """Base of every exit; `reason` is the KVM_EXIT_* number."""

    reason: int


@dataclass(frozen=True)
class IoExit(Exit):
    """KVM_EXIT_IO: `data` holds count*size bytes for OUT; IN is answered with
    `Vcpu.complete_io_in()` before the next run."""

    direction: int
    size: int
    port: int
    count: int
    data: bytes = b""

    @property
    def is_out(self) -> bool:
        return self.direction == uapi.KVM_EXIT_IO_OUT

    def value(self) -> int:
        """The first element written by an OUT, as an unsigned little-endian int."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class MmioExit(Exit):
    phys_addr: int
    data: bytes
    length: int
    is_write: bool


@dataclass(frozen=True)
class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL; the VMM answers with `Vcpu.complete_hypercall(ret)`."""

    nr: int
    args: tuple[int, ...]
    flags: int


@dataclass(frozen=True)
class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (KVM_CAP_X86_USER_SPACE_MSR): why it
    exited (KVM_MSR_EXIT_REASON_*), the MSR, the value written. The VMM answers
    with `Vcpu.complete_msr(error, data)`; error 1 injects #GP."""

    msr_reason: int  # kvm_run.msr.reason
    index: int
    data: int

    @property
    def is_write(self) -> bool:
        return self.reason == uapi.KVM_EXIT_X86_WRMSR


@dataclass(frozen=True)
class HltExit(Exit):
    pass


@dataclass(frozen=True)
class ShutdownExit(Exit):
    pass


@dataclass(frozen=True)
class FailEntryExit(Exit):
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalErrorExit(Exit):
    suberror: int
    data: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SystemEventExit(Exit):
    type: int
    data: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MemoryFaultExit(Exit):
    """KVM_EXIT_MEMORY_FAULT (kvm_prepare_memory_fault_exit): reported together
    with a failing KVM_RUN, see `KvmRunError`."""

    flags: int
    gpa: int
    size: int

    @property
    def is_private(self) -> bool:
        return bool(self.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


@dataclass(frozen=True)
class UnknownExit(Exit):
    hardware_exit_reason: int = 0


class KvmRunError(OSError):
    """KVM_RUN returned -1. `exit` is the exit KVM filled in alongside the errno
    (a MemoryFaultExit for EFAULT/EHWPOISON from guest_memfd), or None."""

    def __init__(self, err: int, exit: Exit | None) -> None:
        super().__init__(err, f"{os.strerror(err)} (KVM_RUN)")
        self.exit = exit


class PreFaultError(OSError):
    """KVM_PRE_FAULT_MEMORY returned -1. KVM copies the range back even then
    (kvm_vcpu_pre_fault_memory): `gpa` and `size` are what it wrote."""

    def __init__(self, err: int, gpa: int, size: int) -> None:
        super().__init__(err, f"{os.strerror(err)} (KVM_PRE_FAULT_MEMORY, {size:#x} bytes left "
                              f"at {gpa:#x})")
        self.gpa = gpa
        self.size = size


class HostFault(Exception):
    """A host userspace access the kernel answers with a signal instead of data."""

    signal_name = "SIGNAL"

    def __init__(self, addr: int, reason: str = "") -> None:
        super().__init__(f"{self.signal_name} at {addr:#x}" + (f": {reason}" if reason else ""))
        self.addr = addr
        self.reason = reason


class HostSigbus(HostFault):
    """SIGBUS: beyond EOF of a guest_memfd, private memory, hwpoison."""

    signal_name = "SIGBUS"


class HostSigsegv(HostFault):
    """SIGSEGV: an access the mapping's protection does not allow."""

    signal_name = "SIGSEGV"


def oserror(err: int | None, what: str = "") -> OSError:
    """An OSError carrying the kernel errno, with the kernel's message (an OSError
    re-raised without an errno becomes EIO)."""
    err = _errno.EIO if err is None else err
    msg = os.strerror(err) + (f" ({what})" if what else "")
    return OSError(err, msg)


ERRNO_NAMES: dict[int, str] = {v: k for k, v in vars(_errno).items() if k.startswith("E")}
ERRNO_NAMES.update({_errno.EAGAIN: "EAGAIN", _errno.EOPNOTSUPP: "EOPNOTSUPP",
                    uapi.EHWPOISON: "EHWPOISON"})


def errno_name(err: int | None) -> str:
    if err is None:
        return "ok"
    return ERRNO_NAMES.get(err, str(err))
