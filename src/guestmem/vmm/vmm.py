"""A small VMM over the backend-neutral API (layer 4).

It creates a VM with guest_memfd-backed (MMAP|INIT_SHARED) or anonymous memory,
loads a guest image, runs the vCPU and dispatches exits: port I/O reports from
the guest program, KVM_HC_MAP_GPA_RANGE into the shared/private tracker, memory
faults. It never touches /dev/kvm itself, only `Kvm`/`Vm`/`Vcpu` methods.

Two conversion strategies (DESIGN.md, layer 4). Without in-place conversion a
private VM has two backings per memslot, private pages in a guest_memfd and
shared ones in anonymous memory at userspace_addr ("gmem+shared"), and a
conversion is KVM_SET_MEMORY_ATTRIBUTES on the VM. With it (the in-place series,
upstream-2026-11.md §1) one guest_memfd holds both: created MMAP|INIT_SHARED and
mapped at userspace_addr ("gmem-inplace"), as QEMU's convert-in-place backend
does (`-object memory-backend-guest-memfd,share=on` with `convert-in-place=on`),
and a conversion is KVM_SET_MEMORY_ATTRIBUTES2 on that guest_memfd.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Self

from guestmem import api, machine, uapi
from guestmem import program as p
from guestmem.exits import (
    Exit,
    HypercallExit,
    IoExit,
    KvmRunError,
    MemoryFaultExit,
    MmioExit,
    MsrExit,
    ShutdownExit,
)
from guestmem.hypercall import kvm_check
from guestmem.vmm.tracker import SharedRegionTracker, Sharing, validate_map_gpa_range

GMEM_BACKING_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
IN_PLACE = "gmem-inplace"  # the backing of a memslot whose guest_memfd converts in place
# How often the VMM retries a to-private KVM_SET_MEMORY_ATTRIBUTES2 that failed with
# EAGAIN, after dropping its own pins on the range. Our choice: the series leaves
# the policy to userspace; a reference that is not the VMM's own (a transient GUP,
# a page in a per-CPU LRU batch) may be gone on the next try, a long-term pin is not.
CONVERSION_RETRIES: Final = 3


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
    # "gmem", "gmem+shared" (private in gmem, shared at userspace_addr), "gmem-inplace"
    # (private and shared in one guest_memfd, mapped at userspace_addr) or "anon"
    backing: str
    mapping: api.Mapping
    gmem: api.GuestMemfd | None = None
    gmem_offset: int = 0  # where the slot starts in the guest_memfd (guest_memfd_offset)

    @property
    def guest_memfd(self) -> api.GuestMemfd:
        """The region's guest_memfd; ValueError for anonymous memory."""
        if self.gmem is None:
            raise ValueError(f"memslot {self.slot} is {self.backing} memory, not a guest_memfd")
        return self.gmem

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    def gpa_of(self, offset: int) -> int:
        """The GPA of guest_memfd offset `offset` within this memslot."""
        return self.gpa + offset - self.gmem_offset


@dataclass(frozen=True)
class HeldPin:
    """Pages the VMM itself keeps pinned at [gpa, gpa+size): a buffer it registered
    (an io_uring fixed buffer, a VFIO DMA mapping). It drops them when they stop a
    conversion to private (EAGAIN)."""

    gpa: int
    size: int
    pin: api.Pin


@dataclass(frozen=True)
class Converted:
    """How the userspace side of a conversion went: the guest's RAX, and on an
    in-place failure the GPA of the guest_memfd's error_offset (the first pinned page)."""

    ret: int
    failed_gpa: int | None = None


def _continues(piece: tuple[MemoryRegion, int, int], region: MemoryRegion, gpa: int) -> bool:
    """Does `region` at `gpa` go on where `piece` ends, in the same guest_memfd at
    the next offset? Then one KVM_SET_MEMORY_ATTRIBUTES2 covers both, atomically."""
    first, start, length = piece
    return (region.gmem is first.gmem and start + length == gpa
            and first.gmem_offset + start + length - first.gpa
            == region.gmem_offset + gpa - region.gpa)


class _ConversionFailed(Exception):
    """KVM_SET_MEMORY_ATTRIBUTES2 failed on one piece; the pieces before it are undone."""

    def __init__(self, error: OSError, gpa: int | None) -> None:
        super().__init__(str(error))
        self.errno = error.errno
        self.gpa = gpa


@dataclass
class RunResult:
    """What one `Vmm.run()` saw. `stop` is "done" (the program halted), "paused"
    (on_checkpoint asked to stop at a Checkpoint),
    "memory_fault" (KVM_RUN failed with a MEMORY_FAULT exit), "error" (KVM_RUN
    failed otherwise), "shutdown" (a triple fault) or "mmio" (an access no memslot
    or device answers; `exit` has its address and data)."""

    stop: str
    reports: list[int] = field(default_factory=list)
    exits: int = 0
    ticks: int = 0
    checkpoints: list[int] = field(default_factory=list)
    errno: int | None = None
    memory_fault: MemoryFaultExit | None = None
    log: list[str] = field(default_factory=list)
    exit: Exit | None = None  # the exit that ended the run ("shutdown", "mmio")


Handler = Callable[[Exit, RunResult], bool]  # True: the program is done

# What the VMM does for a guest's KVM_HC_MAP_GPA_RANGE on a VM with private memory:
# - "attributes+fallocate": KVM_SET_MEMORY_ATTRIBUTES, then PUNCH_HOLE the guest_memfd
#   pages that became shared or allocate the ones that became private;
# - "attributes": KVM_SET_MEMORY_ATTRIBUTES only (private_mem_conversions_test with
#   do_fallocate = false): private pages stay allocated, with their contents;
# - "guest-flags": the guest says per call, with private_mem_conversions_test's own
#   bits in the attrs argument (KVM passes it through unchecked): BIT0 set the
#   attributes, BIT1 shared (else private), BIT2 fallocate (punch if shared,
#   allocate if private), in that test's handle_exit_hypercall order.
# With in-place conversion the attributes are KVM_SET_MEMORY_ATTRIBUTES2 on the
# guest_memfd, and "attributes+fallocate" does no fallocate: the page that becomes
# shared is the one the guest shares its data in, and there is no second backing to
# free (our reading of QEMU's kvm_convert_memory, which discards the other backing
# only where there are two). "guest-flags" still punches and allocates as the guest
# asks, in the same guest_memfd.
CONVERSIONS = ("attributes+fallocate", "attributes", "guest-flags")
# What the shared-regions list records of a MAP_GPA_RANGE on a VM whose VMM also
# converts: "outcome" (the state the conversion left: one meaning per VM, as QEMU
# keeps them apart, R9) or "request" (what the guest said, failed conversions
# included: SEV-LM's notification meaning on top of the conversion meaning).
MAP_GPA_LISTS = ("outcome", "request")
# VM types whose memory only the guest's C-bit protects (SEV, SEV-ES): no private
# memory in KVM, every page encrypted until the guest reports it shared.
C_BIT_VM_TYPES = frozenset({uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM})
MAP_GPA_SET_ATTRIBUTES, MAP_GPA_SHARED, MAP_GPA_DO_FALLOCATE = 1 << 0, 1 << 1, 1 << 2
# Shared-memory sources of add_private_memory (kvm_util's vm_mem_backing_src_type).
SHARED_SOURCES = ("anon", "thp")
THP_SIZE = 2 << 20  # x86 PMD size


class Vmm:
    def __init__(
        self,
        kvm: api.Kvm,
        vm_type: int = uapi.KVM_X86_DEFAULT_VM,
        backing: str = "gmem",
        low_memory_size: int = machine.LOW_MEMORY_SIZE,
        cpl: int | None = None,
        conversion: str = "attributes+fallocate",
        map_gpa_list: str = "outcome",
        launch_sev: bool = False,
    ) -> None:
        if map_gpa_list not in MAP_GPA_LISTS:
            raise ValueError(f"map_gpa_list must be one of {', '.join(MAP_GPA_LISTS)}, "
                             f"not {map_gpa_list!r}")
        self.map_gpa_list = map_gpa_list
        if conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {', '.join(CONVERSIONS)}, "
                             f"not {conversion!r}")
        self.conversion = conversion
        self.kvm = kvm
        # CPL0 unless this KVM emulates CPL0 code (caps.GuestExecution.default_cpl);
        # the CPL of the next load() may be changed by setting it.
        self.cpl = kvm.capabilities.execution.default_cpl if cpl is None else cpl
        self.vm = kvm.create_vm(vm_type)
        self.regions: list[MemoryRegion] = []
        self.pins: list[HeldPin] = []  # pins the VMM holds itself (Vmm.pin)
        self.exit_hypercall = self._enable_exit_hypercall()
        # An SEV guest launched with memory encryption (KVM_SEV_LAUNCH_START, a backend
        # with api.Firmware) starts private: KVM_HC_MAP_GPA_RANGE "by default all guest
        # pages are considered encrypted" (commit 0dbb11230437); the list is of shared
        # regions. Without the launch nothing encrypts (the conformance cases' SEV VMs).
        self.sev = launch_sev
        if launch_sev:
            if vm_type not in C_BIT_VM_TYPES or not isinstance(self.vm, api.Firmware):
                self.vm.close()
                raise ValueError("launch_sev needs an SEV VM type on a backend with the "
                                 "firmware (the model)")
            self.vm.launch_start()
        self.tracker = SharedRegionTracker(Sharing.PRIVATE if launch_sev else Sharing.SHARED)
        # What this VMM set with KVM_SET_MEMORY_ATTRIBUTES(2): the conversions that
        # succeeded, wherever they came from (there is no KVM_GET_MEMORY_ATTRIBUTES:
        # QEMU keeps its own bitmap too, RamBlockAttributes). The attributes design of
        # live migration reads it.
        self.attributes = SharedRegionTracker(Sharing.SHARED)
        # Perform the userspace side of conversions when the VM has private memory:
        # PRIVATE in the VM's attributes, or in its guest_memfds (in place).
        self.in_place = self._in_place_conversion()
        attrs = self.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        self.converts = bool(attrs & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) or self.in_place
        self._next_slot = 0
        self.log: list[str] = []
        self.low = self.add_memory(0, low_memory_size, backing)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpus: list[api.Vcpu] = [self.vcpu]
        self.handlers: dict[type[Exit], Handler] = {
            IoExit: self._handle_io,
            HypercallExit: self._handle_hypercall,
            MsrExit: self._handle_msr,
        }
        self._msr_filtered = False
        self._report_lo: int | None = None
        # Called at each Checkpoint with its label; True pauses the run (stop
        # "paused"), as a migration's stop-and-copy does.
        self.on_checkpoint: Callable[[int, RunResult], bool] | None = None
        # The guest wrote KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL: every
        # shared region is reported (ecosystem.md §3.1, R2).
        self.migration_ready = False
        self._tables_written = False
        self.image: machine.GuestImage | None = None  # what load() placed last

    # --- memory -----------------------------------------------------------------------------
    def _enable_exit_hypercall(self) -> bool:
        """KVM_CAP_EXIT_HYPERCALL with BIT(KVM_HC_MAP_GPA_RANGE), if the host offers it."""
        want = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        if not self.vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) & want:
            return False
        self.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, want)
        return True

    def _in_place_conversion(self) -> bool:
        """Does this VM keep PRIVATE in its guest_memfds? The series' per-VM
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: PRIVATE iff the mode is on and the VM
        has private memory (upstream.md §7.1). Asked only where the probe found the
        mode: the capability's number has moved with every revision."""
        if not self.kvm.capabilities.gmem_in_place_conversion:
            return False
        cap = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)
        return bool(cap & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def add_memory(self, gpa: int, size: int, backing: str = "gmem") -> MemoryRegion:
        """A new memslot at gpa.

        "gmem" on a VM that allows MMAP|INIT_SHARED: one guest_memfd whose own mmap
        is the slot's userspace_addr, so KVM's two memory paths (MMU faults through
        guest_memfd, emulator through userspace_addr) see the same pages; on a VM
        that converts in place the region is "gmem-inplace". On a VM with private
        memory and no in-place conversion (INIT_SHARED not allowed, upstream.md
        §1.4) the selftests' layout instead: a guest_memfd (flags 0) for private
        pages and anonymous memory at userspace_addr for shared ones ("gmem+shared")."""
        slot = self._next_slot
        if backing not in ("gmem", "anon"):
            raise ValueError(f"backing must be 'gmem' or 'anon', not {backing!r}")
        made: list[api.Closable] = []  # what this call created, undone in reverse if it fails
        try:
            gmem = None
            if backing == "gmem":
                supported = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
                in_place = supported & GMEM_BACKING_FLAGS == GMEM_BACKING_FLAGS
                gmem = self.vm.create_guest_memfd(size, GMEM_BACKING_FLAGS if in_place else 0)
                made.append(gmem)
                mapping = gmem.mmap(size) if in_place else self.kvm.mmap_anonymous(size)
                backing = ((IN_PLACE if self.in_place else "gmem") if in_place
                           else "gmem+shared")
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

    def add_private_memory(self, gpa: int, size: int, nr_memslots: int = 1,
                           shared: str = "anon") -> list[MemoryRegion]:
        """private_mem_conversions_test's layout (kvm_util vm_mem_add with
        KVM_MEM_GUEST_MEMFD): one guest_memfd for private pages, bound by
        `nr_memslots` memslots of size/nr_memslots at guest_memfd offsets
        slot_size*i (the test's -m). Without in-place conversion the guest_memfd has
        flags 0 and each memslot its own anonymous memory at userspace_addr for
        shared pages; `shared` is the test's -s source: "anon", or "thp"
        (VM_MEM_SRC_ANONYMOUS_THP: 2 MiB-aligned, MADV_HUGEPAGE). With it the
        guest_memfd is MMAP|INIT_SHARED and each memslot's userspace_addr is its own
        piece of the guest_memfd's mmap (the series' v8 selftest: shared memory is
        the guest_memfd), so `shared` must be "anon" (there is no other source).
        A failure undoes every step before it."""
        slot_size = size // max(nr_memslots, 1)
        if shared not in SHARED_SOURCES:
            raise ValueError(f"shared must be one of {', '.join(SHARED_SOURCES)}, not {shared!r}")
        if self.in_place and shared != "anon":
            raise ValueError("with in-place conversion shared pages are the guest_memfd's: "
                             f"no {shared!r} source")
        if nr_memslots < 1 or slot_size * nr_memslots != size or slot_size % uapi.PAGE_SIZE:
            raise ValueError(f"{size:#x} bytes do not split into {nr_memslots} page-aligned "
                             "memslots")
        gmem = self.vm.create_guest_memfd(size, GMEM_BACKING_FLAGS if self.in_place else 0)
        regions: list[MemoryRegion] = []
        try:
            for i in range(nr_memslots):
                regions.append(self._private_slot(self._next_slot + i, gpa + i * slot_size,
                                                  gmem, i * slot_size, slot_size, shared))
        except BaseException:
            for region in regions:
                self.vm.delete_memslot(region.slot)
                region.mapping.munmap()
            gmem.close()
            raise
        self._next_slot += nr_memslots
        self.regions += regions
        source = "" if self.in_place else f" ({shared})"
        self.log += [f"memslot {r.slot}: [{r.gpa:#x}, {r.gpa + r.size:#x}) {r.backing} "
                     f"@{r.gmem_offset:#x}{source}" for r in regions]
        return regions

    def _private_slot(self, slot: int, gpa: int, gmem: api.GuestMemfd, offset: int, size: int,
                      shared: str) -> MemoryRegion:
        """One memslot of add_private_memory; on failure its mapping is gone again."""
        mapping = self._shared_mapping(gmem, offset, size, shared)
        try:
            if shared == "thp":
                mapping.madvise(0, size, mmap.MADV_HUGEPAGE)
            self.vm.set_user_memory_region2(slot, uapi.KVM_MEM_GUEST_MEMFD, gpa, size,
                                            mapping.addr, gmem, offset)
        except BaseException:
            mapping.munmap()
            raise
        backing = IN_PLACE if self.in_place else "gmem+shared"
        return MemoryRegion(slot, gpa, size, backing, mapping, gmem, offset)

    def _shared_mapping(self, gmem: api.GuestMemfd, offset: int, size: int,
                        shared: str) -> api.Mapping:
        """Where a private memslot's shared pages live: its piece of the guest_memfd
        (in place), else anonymous memory of the -s source."""
        if self.in_place:
            return gmem.mmap(size, offset=offset)
        return self.kvm.mmap_anonymous(size, align=THP_SIZE if shared == "thp" else 0)

    # --- pins the VMM holds -------------------------------------------------------------------
    def pin(self, gpa: int, size: int) -> HeldPin:
        """Pin [gpa, gpa+size) of one memslot's host memory for the VMM's own use (a
        registered buffer: Mapping.pin, FOLL_LONGTERM); Vmm.unpin or an EAGAIN
        conversion drops it."""
        region = self.region_of(gpa)
        if gpa + size > region.gpa + region.size:
            raise ValueError(f"[{gpa:#x}, +{size:#x}) is not within memslot {region.slot}")
        held = HeldPin(gpa, size, region.mapping.pin(gpa - region.gpa, size))
        self.pins.append(held)
        return held

    def unpin(self, held: HeldPin) -> None:
        held.pin.unpin()
        self.pins.remove(held)

    def _drop_pins(self, gpa: int, size: int, log: list[str]) -> None:
        """Drop the VMM's own pins on [gpa, gpa+size): they keep KVM from making
        those pages private (the series' refcount check, upstream.md §7.1)."""
        for held in [h for h in self.pins if h.gpa < gpa + size and gpa < h.gpa + h.size]:
            self.unpin(held)
            log.append(f"dropped the VMM's pin on [{held.gpa:#x}, +{held.size:#x})")

    # --- loading and running ------------------------------------------------------------------
    def load(self, image: machine.GuestImage, vcpu: api.Vcpu | None = None) -> None:
        """Place the image and reset the vCPU (`vcpu`, default the first). Page
        tables and GDT never change, so they are written once per VM; the code
        every time (so a vCPU's run ends before another vCPU's load)."""
        if vcpu is not None and vcpu is not self.vcpu:
            with self._driving(vcpu):
                return self.load(image)
        # Refused before anything is written: the model runs programs, not machine code.
        if isinstance(self.vcpu, api.ProgramVcpu) and image.program is None:
            raise TypeError("the model's vCPU interprets guestmem programs, not x86 "
                            "machine code: load an image from guest.compile_program()")
        for gpa, data in machine.low_memory_contents(image):
            if gpa != machine.CODE and self._tables_written:
                continue
            self.write(gpa, data)
            if self.sev and isinstance(self.vm, api.Firmware):
                self.vm.launch_update_data(gpa, -(-len(data) // uapi.PAGE_SIZE) * uapi.PAGE_SIZE)
        self._tables_written = True
        self.vcpu.set_sregs(machine.initial_sregs(self.vcpu.get_sregs(), self.cpl))
        self.vcpu.set_regs(machine.initial_regs(image))
        if isinstance(self.vcpu, api.ProgramVcpu) and image.program is not None:
            self.vcpu.load_program(image.program, image.hypercall_abi,  # the model runs it
                                   image.migration_control)
        if image.migration_control == "wrmsr":
            self._msr_exits()
        self.image = image

    def adopt(self, image: machine.GuestImage) -> None:
        """Take a program that is already in guest memory and in the vCPU (a
        migration's destination): run() goes on with it; nothing is written."""
        self._tables_written = True
        self.image = image

    def run(self, timeout: float = 30.0, vcpu: api.Vcpu | None = None) -> RunResult:
        """Run `vcpu` (default the first) until the program halts, KVM_RUN fails, or
        an exit ends the run: a shutdown (triple fault), or MMIO that no device here
        answers. Raises GuestTimeout after `timeout` seconds (0: none), from any
        thread: a timer kicks the vCPU (immediate_exit plus a signal to this thread)."""
        if vcpu is not None and vcpu is not self.vcpu:
            with self._driving(vcpu):
                return self.run(timeout)
        if self.image is None:
            raise RuntimeError("nothing to run: load() a guest image first "
                               "(guest.compile_program(...))")
        result = RunResult(stop="running")
        with _Watchdog(self.vcpu, timeout) as watchdog:
            while result.stop == "running":
                try:
                    exit = self.vcpu.run()
                except KvmRunError as e:
                    if e.errno == errno.EINTR and watchdog.fired:
                        raise GuestTimeout(f"guest still running after {timeout}s") from None
                    if e.errno == errno.EINTR:
                        continue  # a signal for someone else: run again, as VMMs do
                    self._failed_run(e, result)
                    break
                result.exits += 1
                self._dispatch(exit, result)
        return result

    def add_vcpu(self) -> api.Vcpu:
        """Another vCPU, with the next id. The VMM drives one vCPU at a time, in the
        caller's thread: load(image, vcpu) and run(vcpu=vcpu) interleave them."""
        vcpu = self.vm.create_vcpu(len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    @contextmanager
    def _driving(self, vcpu: api.Vcpu) -> Iterator[None]:
        """Make `vcpu` the one the exit handlers answer (self.vcpu) for a while."""
        saved, self.vcpu = self.vcpu, vcpu
        try:
            yield
        finally:
            self.vcpu = saved

    def _failed_run(self, error: KvmRunError, result: RunResult) -> None:
        result.stop = "memory_fault" if error.exit else "error"
        result.errno = error.errno
        if isinstance(error.exit, MemoryFaultExit):
            fault = result.memory_fault = error.exit
            result.log.append(f"KVM_RUN failed: errno {error.errno}, MEMORY_FAULT "
                              f"gpa={fault.gpa:#x} size={fault.size:#x} flags={fault.flags:#x}")

    def _dispatch(self, exit: Exit, result: RunResult) -> None:
        """Hand the exit to its handler; shutdown and unanswered MMIO end the run."""
        if isinstance(exit, ShutdownExit | MmioExit):
            if isinstance(exit, MmioExit):
                self._complete_pending()
            result.stop = "shutdown" if isinstance(exit, ShutdownExit) else "mmio"
            result.exit = exit
            return
        handler = self.handlers.get(type(exit))
        try:
            if handler is None:
                raise UnhandledExit(exit)
            if handler(exit, result):
                result.stop = "done"
        except UnhandledExit:
            self._complete_pending()
            raise

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

    def _handle_io(self, exit: Exit, result: RunResult) -> bool:
        if not isinstance(exit, IoExit) or not exit.is_out:
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
        elif exit.port == p.PORT_CHECKPOINT:
            return self._checkpoint(exit.value(), result)
        elif exit.port == p.PORT_MIGRATION_CONTROL:
            self._migration_control(exit.value(), result)
        elif exit.port == p.PORT_DONE:
            return True
        else:
            raise UnhandledExit(exit)
        return False

    def _msr_exits(self) -> None:
        """The guest writes MSR_KVM_MIGRATION_CONTROL itself: make that WRMSR exit
        to us as QEMU's SEV series does, with KVM_CAP_X86_USER_SPACE_MSR (FILTER)
        and a filter that denies the write (KVM does not handle the MSR)."""
        if self._msr_filtered:
            return
        need = (uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_CAP_X86_MSR_FILTER)
        missing = [cap for cap in need if not self.vm.check_extension(cap)]
        if missing:
            raise RuntimeError(f"KVM cannot hand the guest's WRMSR to userspace here "
                               f"(capabilities {missing} missing): compile the guest with "
                               "migration_control='port'")
        self.vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_FILTER)
        deny = [(uapi.KVM_MSR_FILTER_WRITE, uapi.MSR_KVM_MIGRATION_CONTROL, b"\x00")]
        self.vm.set_msr_filter(uapi.KVM_MSR_FILTER_DEFAULT_ALLOW, deny)
        self._msr_filtered = True

    def _handle_msr(self, exit: Exit, result: RunResult) -> bool:
        """KVM_EXIT_X86_WRMSR/RDMSR: the guest's MSR_KVM_MIGRATION_CONTROL write is
        taken; anything else gets #GP, as KVM would have given it."""
        if not isinstance(exit, MsrExit):
            raise UnhandledExit(exit)
        ours = exit.is_write and exit.index == uapi.MSR_KVM_MIGRATION_CONTROL
        if ours:
            result.log.append(f"KVM_EXIT_X86_WRMSR {exit.index:#x} = {exit.data:#x}")
            self._migration_control(exit.data, result)
        else:
            result.log.append(f"MSR {exit.index:#x} {'write' if exit.is_write else 'read'}: #GP")
        self.vcpu.complete_msr(not ours)
        return False

    def _checkpoint(self, label: int, result: RunResult) -> bool:
        result.checkpoints.append(label)
        if self.on_checkpoint is not None and self.on_checkpoint(label, result):
            result.stop = "paused"
            return False
        return False

    def _migration_control(self, value: int, result: RunResult) -> None:
        """The guest's MSR_KVM_MIGRATION_CONTROL write, through the doorbell. QEMU's
        SEV series takes only READY (a write of other bits is refused: our reading
        of its kvm_handle_x86_msr; the guest sees nothing either way)."""
        if value & ~uapi.KVM_MIGRATION_READY:
            result.log.append(f"MSR_KVM_MIGRATION_CONTROL {value:#x}: unknown bits, ignored")
            return
        self.migration_ready = bool(value & uapi.KVM_MIGRATION_READY)
        result.log.append(f"MSR_KVM_MIGRATION_CONTROL {value:#x}: migration "
                          f"{'ready' if self.migration_ready else 'not ready'}")

    def settle_vcpu(self) -> None:
        """Make the vCPU's state consistent before it is saved: KVM_RUN with
        immediate_exit completes a pending exit (an OUT's RIP advance) and returns
        EINTR (Documentation/virt/kvm/api.rst, immediate_exit)."""
        self._complete_pending()

    def _handle_hypercall(self, exit: Exit, result: RunResult) -> bool:
        """KVM_EXIT_HYPERCALL: KVM validated gpa/npages already; answer via kvm_run."""
        if not isinstance(exit, HypercallExit):
            raise UnhandledExit(exit)
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
        if self.conversion == "guest-flags":
            done = self._convert_as_flagged(gpa, npages, attrs, result.log)
        else:
            done = Converted(validate_map_gpa_range(gpa, npages, attrs))
            if done.ret == 0 and self.map_gpa_list == "request":
                # SEV-LM's meaning, a notification: listed as the guest said it
                self.tracker.apply(gpa, npages, attrs, 0)
            # convert first: the list records only what happened
            if done.ret == 0 and self.converts:
                done = self._convert(gpa, npages * uapi.PAGE_SIZE,
                                     bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED), result.log)
            if self.map_gpa_list == "outcome" or done.ret:
                self.tracker.apply(gpa, npages, attrs, done.ret, done.failed_gpa)
        where = "" if done.failed_gpa is None else f" (failed at gpa {done.failed_gpa:#x})"
        result.log.append(f"MAP_GPA_RANGE gpa={gpa:#x} npages={npages} attrs={attrs:#x} -> "
                          f"{done.ret}{where}")
        return done.ret

    def convert(self, gpa: int, size: int, private: bool) -> int:
        """The userspace side of a conversion; returns the guest's RAX (0, or
        -KVM_EINVAL if it failed and changed nothing). Its log goes to Vmm.log."""
        return self._convert(gpa, size, private, self.log).ret

    def _convert(self, gpa: int, size: int, private: bool, log: list[str]) -> Converted:
        if self.in_place:
            done = self._convert_in_place(gpa, size, private, log)
        else:
            done = Converted(self._convert_vm_attributes(gpa, size, private))
        return self._recorded(done, gpa, size, private)

    def _recorded(self, done: Converted, gpa: int, size: int, private: bool) -> Converted:
        """Keep a successful conversion in Vmm.attributes (what live migration's
        attributes design reads), whichever path made it."""
        if done.ret == 0:
            enc = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0
            self.attributes.apply(gpa, size // uapi.PAGE_SIZE, enc, 0)
        return done

    def _convert_vm_attributes(self, gpa: int, size: int, private: bool) -> int:
        """Without in-place conversion: KVM_SET_MEMORY_ATTRIBUTES, then (unless
        the VMM's conversion is "attributes") PUNCH_HOLE the guest_memfd pages that
        just became shared (private contents are discarded) or allocate the ones
        that became private. Returns the guest's RAX: -KVM_EINVAL if either step
        fails, with the attributes put back as the tracker had them (pages the
        failed allocation did allocate stay allocated: empty, reused by a retry)."""
        before = self.tracker.ranges(Sharing.PRIVATE, gpa, gpa + size)
        try:
            self.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
                                          if private else 0)
        except OSError:
            return -uapi.KVM_EINVAL
        if self.conversion == "attributes+fallocate":
            try:
                self.fallocate(gpa, size, punch_hole=not private, in_place=False)
            except OSError:
                self._restore_attributes(gpa, size, before)
                return -uapi.KVM_EINVAL
        return 0

    def _restore_attributes(self, gpa: int, size: int, private: list[tuple[int, int]]) -> None:
        """Put [gpa, gpa+size) back to shared except the `private` (gpa, size) ranges."""
        self.vm.set_memory_attributes(gpa, size, 0)
        for start, length in private:
            self.vm.set_memory_attributes(start, length, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    # --- in-place conversion ------------------------------------------------------------------
    def _convert_in_place(self, gpa: int, size: int, private: bool, log: list[str]) -> Converted:
        """KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd behind every memslot the
        range spans, all or nothing. A to-private conversion fails with EAGAIN while
        a page has references beyond guest_memfd's own (kvm_gmem_set_attributes,
        upstream.md §7.1): the VMM drops its own pins there and tries again, at most
        CONVERSION_RETRIES times. A failure answers the guest -KVM_EINVAL, what
        this VMM answers any conversion it could not do (kvm_para.h's error codes;
        x86.c complete_hypercall_exit puts hypercall.ret into the guest's RAX,
        and the TDX and SNP completions, tdx_complete_vmcall_map_gpa and
        snp_complete_psc, turn any nonzero ret into a failure for the guest), and
        the GPA of the error_offset goes to the log and the tracker."""
        pieces = self._gmem_pieces(gpa, size, private)
        if pieces is None:
            log.append(f"[{gpa:#x}, +{size:#x}) has memory without a guest_memfd: it "
                       "cannot become private")
            return Converted(-uapi.KVM_EINVAL)
        failed: _ConversionFailed | None = None
        for attempt in range(1 + CONVERSION_RETRIES):
            try:
                self._set_pieces(pieces, private)
                return Converted(0)
            except _ConversionFailed as e:
                failed = e
            where = "" if failed.gpa is None else f" at gpa {failed.gpa:#x}"
            log.append(f"KVM_SET_MEMORY_ATTRIBUTES2 [{gpa:#x}, +{size:#x}) "
                       f"{'private' if private else 'shared'}: "
                       f"{errno.errorcode.get(failed.errno or 0, failed.errno)}{where} "
                       f"(attempt {attempt + 1})")
            if failed.errno != errno.EAGAIN or attempt == CONVERSION_RETRIES:
                break
            self._drop_pins(gpa, size, log)
        assert failed is not None  # the loop returns on success
        return Converted(-uapi.KVM_EINVAL, failed.gpa)

    def _gmem_pieces(self, gpa: int, size: int,
                     private: bool) -> list[tuple[MemoryRegion, int, int]] | None:
        """The (memslot, gpa, size) pieces of [gpa, gpa+size) that an in-place
        guest_memfd backs. None if a to-private range has other memory, or none:
        only a guest_memfd has private pages. To shared, such memory is left alone
        (it is shared anyway). Both as QEMU's kvm_convert_memory does: to-private of
        memory without a guest_memfd fails, to-shared of unassigned memory (a TDX
        guest's MMIO window) is ignored."""
        pieces: list[tuple[MemoryRegion, int, int]] = []
        for region in sorted(self.regions, key=lambda r: r.gpa):
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo >= hi or region.backing != IN_PLACE:
                continue
            if pieces and _continues(pieces[-1], region, lo):
                first, start, length = pieces[-1]
                pieces[-1] = (first, start, length + hi - lo)
            else:
                pieces.append((region, lo, hi - lo))
        if private and sum(length for _, _, length in pieces) != size:
            return None
        return pieces

    def _set_pieces(self, pieces: list[tuple[MemoryRegion, int, int]], private: bool) -> None:
        """Convert piece by piece; if one fails, put the ones before it back as the
        tracker had them and raise _ConversionFailed (a failed call leaves no
        partial state; each KVM_SET_MEMORY_ATTRIBUTES2 is all-or-nothing itself,
        and memslots that are contiguous in one guest_memfd are one piece). Only
        pieces in different guest_memfds can be undone, and an undo restores the
        attributes, not the contents a re-initialising VM type (SNP, TDX) gave
        the converted piece. The tracker is the VMM's record of what it converted:
        the host converting behind its back is not undone correctly."""
        other = Sharing.SHARED if private else Sharing.PRIVATE
        done: list[tuple[MemoryRegion, list[tuple[int, int]]]] = []
        for region, gpa, size in pieces:
            before = self.tracker.ranges(other, gpa, gpa + size)
            try:
                self._set_attributes2(region, gpa, size, private)
            except OSError as e:
                self._undo_pieces(done, private)
                offset = getattr(e, "error_offset", None)
                raise _ConversionFailed(e, None if e.errno != errno.EAGAIN or offset is None
                                        else region.gpa_of(offset)) from e
            done.append((region, before))

    def _undo_pieces(self, done: list[tuple[MemoryRegion, list[tuple[int, int]]]],
                     private: bool) -> None:
        """Put back the ranges that were in the other state, newest piece first. To
        shared never meets EAGAIN; back to private only pages that were private
        before this request, which nothing can have pinned since."""
        for region, ranges in reversed(done):
            for gpa, size in ranges:
                self._set_attributes2(region, gpa, size, not private)

    @staticmethod
    def _set_attributes2(region: MemoryRegion, gpa: int, size: int, private: bool) -> None:
        region.guest_memfd.set_memory_attributes2(
            region.gmem_offset + gpa - region.gpa, size,
            uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)

    def fallocate(self, gpa: int, size: int, punch_hole: bool, in_place: bool = True) -> None:
        """PUNCH_HOLE (or allocate) the guest_memfd behind [gpa, gpa+size), memslot by
        memslot, as the selftests' vm_guest_mem_fallocate does. `in_place` False
        touches only the guest_memfds that hold private pages alone ("gmem+shared"):
        a guest_memfd that also holds the shared pages (MMAP) is left alone."""
        for region in self.regions:
            lo, hi = max(gpa, region.gpa), min(gpa + size, region.gpa + region.size)
            if lo >= hi or region.gmem is None or (not in_place
                                                   and region.backing != "gmem+shared"):
                continue
            offset = region.gmem_offset + lo - region.gpa
            if punch_hole:
                region.gmem.punch_hole(offset, hi - lo)
            else:
                region.gmem.allocate(offset, hi - lo)

    def _convert_as_flagged(self, gpa: int, npages: int, flags: int,
                            log: list[str]) -> Converted:
        """private_mem_conversions_test handle_exit_hypercall: fallocate if
        MAP_GPA_DO_FALLOCATE (punch when MAP_GPA_SHARED, else allocate), then set
        the attributes if MAP_GPA_SET_ATTRIBUTES (KVM_SET_MEMORY_ATTRIBUTES, or in
        place KVM_SET_MEMORY_ATTRIBUTES2 with the retries of _convert_in_place);
        0 to the guest. KVM's own checks of gpa/npages come first (the doorbell
        path has not had them); the tracker records the attribute changes only."""
        ret = kvm_check(gpa, npages)
        if ret:
            return Converted(ret)
        size, shared = npages * uapi.PAGE_SIZE, bool(flags & MAP_GPA_SHARED)
        done = Converted(0)
        try:
            if flags & MAP_GPA_DO_FALLOCATE:
                self.fallocate(gpa, size, punch_hole=shared)
        except OSError:
            done = Converted(-uapi.KVM_EINVAL)
        if flags & MAP_GPA_SET_ATTRIBUTES:
            if done.ret == 0:
                done = self._set_flagged_attributes(gpa, size, not shared, log)
            attrs = 0 if shared else uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
            self.tracker.apply(gpa, npages, attrs, done.ret, done.failed_gpa)
        return done

    def _set_flagged_attributes(self, gpa: int, size: int, private: bool,
                                log: list[str]) -> Converted:
        if self.in_place:
            return self._recorded(self._convert_in_place(gpa, size, private, log), gpa, size,
                                  private)
        try:
            self.vm.set_memory_attributes(gpa, size,
                                          uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
        except OSError:
            return Converted(-uapi.KVM_EINVAL)
        return self._recorded(Converted(0), gpa, size, private)

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        for held in list(self.pins):
            self.unpin(held)
        self.vcpu.close()
        for vcpu in self.vcpus[1:]:
            vcpu.close()
        for region in self.regions:
            region.mapping.munmap()
            if region.gmem is not None:
                region.gmem.close()
        self.vm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _undo(made: list[api.Closable], error: BaseException) -> None:
    """Close what a failed call made, newest first (a mapping before its file);
    a failure here is noted on the original error, which the caller re-raises."""
    for obj in reversed(made):
        try:
            obj.close()
        except Exception as e:  # keep undoing, and say so
            error.add_note(f"while undoing, {obj!r}.close() failed: {e!r}")


@contextmanager
def _unless_closed() -> Iterator[None]:
    """Nothing to do on a vCPU someone closed meanwhile (EBADF)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.EBADF:
            raise


class _Watchdog:
    """Kick the vCPU after `seconds` (0: never), from a timer thread: KVM_RUN then
    returns EINTR in whichever thread runs it."""

    def __init__(self, vcpu: api.Vcpu, seconds: float) -> None:
        self.vcpu = vcpu
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire) if seconds > 0 else None

    def _fire(self) -> None:
        self.fired = True
        with _unless_closed():
            self.vcpu.kick()

    def __enter__(self) -> Self:
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
            with _unless_closed():  # a kick that came too late must not linger
                self.vcpu.immediate_exit = False
