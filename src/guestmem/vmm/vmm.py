"""A small VMM over the backend-neutral API (layer 4).

It creates a VM with guest_memfd-backed (MMAP|INIT_SHARED) or anonymous memory,
loads a guest image, runs the vCPU and dispatches exits: port I/O reports from
the guest program, KVM_HC_MAP_GPA_RANGE into the shared/private tracker, memory
faults. It never touches /dev/kvm itself, only `Kvm`/`Vm`/`Vcpu` methods.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Self

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import (
    Exit,
    HypercallExit,
    IoExit,
    KvmRunError,
    MemoryFaultExit,
)
from guestmem.vmm import machine
from guestmem.vmm.tracker import SharedRegionTracker, Sharing, validate_map_gpa_range

GMEM_BACKING_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


class GuestTimeout(Exception):
    """The guest did not finish within the VMM's time limit."""


class UnhandledExit(Exception):
    def __init__(self, exit: Exit) -> None:
        super().__init__(f"unhandled exit {exit!r}")
        self.exit = exit


@dataclass
class MemoryRegion:
    """One memslot and the host memory behind it."""

    slot: int
    gpa: int
    size: int
    backing: str  # "gmem", "gmem+shared" (private in gmem, shared at userspace_addr) or "anon"
    mapping: Any
    gmem: Any = None

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


@dataclass
class RunResult:
    """What one `Vmm.run()` saw. `stop` is "done" (the program halted),
    "memory_fault" (KVM_RUN failed with a MEMORY_FAULT exit) or "error"."""

    stop: str
    reports: list[int] = field(default_factory=list)
    exits: int = 0
    ticks: int = 0
    errno: int | None = None
    memory_fault: MemoryFaultExit | None = None
    log: list[str] = field(default_factory=list)


class Vmm:
    def __init__(
        self,
        kvm: Any,
        vm_type: int = uapi.KVM_X86_DEFAULT_VM,
        backing: str = "gmem",
        low_memory_size: int = machine.LOW_MEMORY_SIZE,
        cpl: int | None = None,
    ) -> None:
        self.kvm = kvm
        self.cpl = machine.default_cpl(kvm.capabilities.implementation) if cpl is None else cpl
        self.vm = kvm.create_vm(vm_type)
        self.regions: list[MemoryRegion] = []
        self.exit_hypercall = self._enable_exit_hypercall()
        self.tracker = SharedRegionTracker(Sharing.SHARED)
        # Perform the userspace side of conversions when the VM has private memory.
        attrs = self.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        self.converts = bool(attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self._next_slot = 0
        self.log: list[str] = []
        self.low = self.add_memory(0, low_memory_size, backing)
        self.vcpu = self.vm.create_vcpu(0)
        self.handlers: dict[type[Exit], Callable[[Any, RunResult], bool]] = {
            IoExit: self._handle_io,
            HypercallExit: self._handle_hypercall,
        }
        self._report_lo: int | None = None
        self._tables_written = False

    # --- memory -----------------------------------------------------------------------------
    def _enable_exit_hypercall(self) -> bool:
        """KVM_CAP_EXIT_HYPERCALL with BIT(KVM_HC_MAP_GPA_RANGE), if the host offers it."""
        want = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        if not self.vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) & want:
            return False
        self.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, want)
        return True

    def add_memory(self, gpa: int, size: int, backing: str = "gmem") -> MemoryRegion:
        """A new memslot at gpa.

        "gmem" on a VM that allows MMAP|INIT_SHARED: one guest_memfd whose own mmap
        is the slot's userspace_addr, so KVM's two memory paths (MMU faults through
        guest_memfd, emulator through userspace_addr) see the same pages. On a VM
        with private memory (INIT_SHARED not allowed, upstream.md §1.4) the
        selftests' layout instead: a guest_memfd (flags 0) for private pages and
        anonymous memory at userspace_addr for shared ones ("gmem+shared")."""
        slot = self._next_slot
        if backing not in ("gmem", "anon"):
            raise ValueError(f"backing must be 'gmem' or 'anon', not {backing!r}")
        made: list[Any] = []  # what this call created, undone in reverse if it fails
        try:
            gmem = None
            if backing == "gmem":
                supported = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
                in_place = supported & GMEM_BACKING_FLAGS == GMEM_BACKING_FLAGS
                gmem = self.vm.create_guest_memfd(size, GMEM_BACKING_FLAGS if in_place else 0)
                made.append(gmem)
                mapping = gmem.mmap(size) if in_place else self.kvm.mmap_anonymous(size)
                backing = "gmem" if in_place else "gmem+shared"
            else:
                mapping = self.kvm.mmap_anonymous(size)
            made.append(mapping)
            flags = uapi.KVM_MEM_GUEST_MEMFD if gmem is not None else 0
            self.vm.set_user_memory_region2(slot, flags, gpa, size, mapping.addr,
                                            gmem if gmem is not None else 0, 0)
        except BaseException as e:
            _undo(made, e)
            raise
        self._next_slot += 1
        region = MemoryRegion(slot, gpa, size, backing, mapping, gmem)
        self.regions.append(region)
        self.log.append(f"memslot {slot}: [{gpa:#x}, {gpa + size:#x}) {backing}")
        return region

    def region_of(self, gpa: int) -> MemoryRegion:
        for region in self.regions:
            if region.contains(gpa):
                return region
        raise ValueError(f"no memory at GPA {gpa:#x}")

    def read(self, gpa: int, length: int) -> bytes:
        """Host read of guest memory through the slot's mapping."""
        region = self.region_of(gpa)
        return region.mapping.read(gpa - region.gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        region = self.region_of(gpa)
        region.mapping.write(gpa - region.gpa, data)

    # --- loading and running ------------------------------------------------------------------
    def load(self, image: machine.GuestImage) -> None:
        """Place the image and reset the vCPU. Page tables and GDT never change, so
        they are written once per VM; the code every time."""
        for gpa, data in machine.low_memory_contents(image):
            if gpa != machine.CODE and self._tables_written:
                continue
            self.write(gpa, data)
        self._tables_written = True
        self.vcpu.set_sregs(machine.initial_sregs(self.vcpu.get_sregs(), self.cpl))
        self.vcpu.set_regs(machine.initial_regs(image))
        if getattr(self.vcpu, "interprets_programs", False):  # the model runs the program itself
            self.vcpu.load_program(image.program, image.hypercall_abi)
        self.image = image

    def run(self, timeout: float = 30.0) -> RunResult:
        """Run until the program halts or KVM_RUN fails."""
        result = RunResult(stop="running")
        with _alarm(timeout):
            while result.stop == "running":
                try:
                    exit = self.vcpu.run()
                except KvmRunError as e:
                    result.stop = "memory_fault" if e.exit else "error"
                    result.errno = e.errno
                    if isinstance(e.exit, MemoryFaultExit):
                        result.memory_fault = e.exit
                        result.log.append(
                            f"KVM_RUN failed: errno {e.errno}, MEMORY_FAULT gpa={e.exit.gpa:#x} "
                            f"size={e.exit.size:#x} flags={e.exit.flags:#x}")
                    break
                result.exits += 1
                handler = self.handlers.get(type(exit))
                try:
                    if handler is None:
                        raise UnhandledExit(exit)
                    if handler(exit, result):
                        result.stop = "done"
                except UnhandledExit:
                    self._complete_pending()
                    raise
        return result

    def _complete_pending(self) -> None:
        """Let KVM finish an exit we will not answer (an emulated MMIO read, say):
        KVM_RUN with immediate_exit completes pending I/O and returns EINTR at once
        (Documentation/virt/kvm/api.rst). Otherwise the next KVM_RUN would complete
        it into the old instruction, whatever registers were set since."""
        self.vcpu.immediate_exit = True
        try:
            self.vcpu.run()
        except KvmRunError as e:
            if e.errno != errno.EINTR:
                raise
        finally:
            self.vcpu.immediate_exit = False

    def _handle_io(self, exit: IoExit, result: RunResult) -> bool:
        if not exit.is_out:
            raise UnhandledExit(exit)
        if exit.port == p.PORT_REPORT_LO:
            self._report_lo = exit.value()
        elif exit.port == p.PORT_REPORT_HI:
            if self._report_lo is None:
                raise UnhandledExit(exit)
            result.reports.append(self._report_lo | exit.value() << 32)
            self._report_lo = None
        elif exit.port == p.PORT_HYPERCALL:
            self._handle_doorbell(result)
        elif exit.port == p.PORT_TICK:
            result.ticks += 1
        elif exit.port == p.PORT_DONE:
            return True
        else:
            raise UnhandledExit(exit)
        return False

    def _handle_hypercall(self, exit: HypercallExit, result: RunResult) -> bool:
        """KVM_EXIT_HYPERCALL: KVM validated gpa/npages already; answer via kvm_run."""
        self.vcpu.complete_hypercall(self.hypercall(exit.nr, exit.args, result))
        return False

    def _handle_doorbell(self, result: RunResult) -> None:
        """The "port" ABI: arguments in the guest's registers, answer in its RAX."""
        regs = self.vcpu.get_regs()
        args = (regs.rbx, regs.rcx, regs.rdx, regs.rsi, 0, 0)
        regs.rax = self.hypercall(regs.rax, args, result) & 0xFFFF_FFFF_FFFF_FFFF
        self.vcpu.set_regs(regs)

    def hypercall(self, nr: int, args: tuple[int, ...], result: RunResult) -> int:
        """One guest hypercall; returns the guest's RAX. Only MAP_GPA_RANGE is
        known (KVM_CAP_EXIT_HYPERCALL's only valid bit); others get -KVM_ENOSYS
        as __kvm_emulate_hypercall answers unknown numbers."""
        if nr != uapi.KVM_HC_MAP_GPA_RANGE:
            result.log.append(f"hypercall {nr} -> -KVM_ENOSYS")
            return -uapi.KVM_ENOSYS
        gpa, npages, attrs = args[:3]
        ret = validate_map_gpa_range(gpa, npages, attrs)
        if ret == 0 and self.converts:  # convert first: the list records only what happened
            ret = self.convert(gpa, npages * uapi.PAGE_SIZE,
                               bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED))
        self.tracker.apply(gpa, npages, attrs, ret)
        result.log.append(f"MAP_GPA_RANGE gpa={gpa:#x} npages={npages} attrs={attrs:#x} -> {ret}")
        return ret

    def convert(self, gpa: int, size: int, private: bool) -> int:
        """The userspace side of a conversion, as private_mem_conversions_test's
        handler does: KVM_SET_MEMORY_ATTRIBUTES, then PUNCH_HOLE the guest_memfd
        pages that just became shared (private contents are discarded) or
        allocate the ones that became private. Returns the guest's RAX."""
        try:
            self.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
                                          if private else 0)
        except OSError:
            return -uapi.KVM_EINVAL
        for region in self.regions:
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo >= hi or region.gmem is None or region.backing != "gmem+shared":
                continue
            if private:
                region.gmem.allocate(lo - region.gpa, hi - lo)
            else:
                region.gmem.punch_hole(lo - region.gpa, hi - lo)
        return 0

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        self.vcpu.close()
        for region in self.regions:
            region.mapping.munmap()
            if region.gmem is not None:
                region.gmem.close()
        self.vm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _undo(made: list[Any], error: BaseException) -> None:
    """Close what a failed call made, newest first (a mapping before its file);
    a failure here is noted on the original error, which the caller re-raises."""
    for obj in reversed(made):
        try:
            obj.close()
        except Exception as e:  # keep undoing, and say so
            error.add_note(f"while undoing, {obj!r}.close() failed: {e!r}")


class _alarm:  # noqa: N801 - used as a context manager
    """Interrupt a stuck KVM_RUN: SIGALRM makes KVM_RUN return EINTR, and the
    handler raises GuestTimeout out of the ioctl. Main thread only."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread() and seconds > 0

    def __enter__(self) -> None:
        if self.active:
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        raise GuestTimeout(f"guest still running after {self.seconds}s")

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
