"""Seed 004's designs as conversion policies: what each lets real userspace do, and at what cost.

Seed 004 (the 2022 pKVM thread) proposed ways to let host userspace mmap a
guest_memfd-like file and still convert it to private in place: Sean's
restrictions (the whole file mapped once, no split VMAs, no references at
munmap; no get_pfn while mapped) and Andy's reply (ordinary mappings, no GUP,
the switch unmaps through the rmap). The model's `inplace` profile has each as a
per-file policy (guestmem.model.gmem.ConversionPolicy, chosen with the
model-only GuestMemfd.set_conversion_policy right after KVM_CREATE_GUEST_MEMFD),
next to the upstream series' rule (per-page: any mappings, a to-private
conversion unmaps them and fails EAGAIN on a pinned page):

    per-page                 upstream (upstream-2026-11.md §1)
    whole-file               seed 004 items 1, 4, 5
    no-get-pfn-while-mapped  seed 004 item 2
    rmap-switch              seed 004, the rmap reply

Each WORKLOAD (one function below; its docstring gives its steps and source) is
a small userspace pattern from the selftests and the VMMs (ecosystem.md §1),
run on a fresh Kvm("inplace") once per policy, the policy set on the
workload's guest_memfd(s) as soon as they are created. The guest program's
code and page tables are the VMM harness's own low memory (guestmem.vmm.Vmm: a
guest_memfd of its own, left at the default policy), so the policy under test
is seen by the workload's memory only.

A workload stops at its first step that fails: an errno of a host call
(EBUSY, EFAULT, EAGAIN, EINVAL), a signal where the host expected none
(SIGBUS, SIGSEGV), a guest run that ends in a memory fault (its errno), a
MAP_GPA_RANGE the VMM could not carry out (the errno of its
KVM_SET_MEMORY_ATTRIBUTES2), or a value that is not what the workload wrote.
Failures the workload expects (the selftest's EAGAIN on a pinned page, SIGBUS
on a private page) are checks that pass. Costs are the model's counters over
the whole workload, or up to the failure: invalidations, TLB flushes and
stage-2 pages zapped of its VMs (vm.mmu) and host PTEs zapped
(process.stats.ptes_zapped: unmap_mapping_range by a conversion or a punch;
munmap's own teardown is not counted). Only the model runs; no time is measured.

    .venv/bin/python bench/policies.py [--json | --markdown] [-w WORKLOAD]... [-p POLICY]...
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

from rich.console import Console
from rich.table import Table

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostFault
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm
from guestmem.model.gmem import ConversionPolicy, GuestMemfd
from guestmem.model.invariants import violations
from guestmem.model.process import ChildProcess, Mapping
from guestmem.model.vm import Vm
from guestmem.vmm import MemoryRegion, RunResult, Vmm

T = TypeVar("T")

PS = uapi.PAGE_SIZE
MIB = 1 << 20
GPA = 1 << 32  # the workloads' memory, above the VMM harness's low memory
SLOT = 1  # the selftest's memslot (gmem_conversions_do_setup)
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
SW = uapi.KVM_X86_SW_PROTECTED_VM
PKVM = uapi.GUESTMEM_PKVM_VM
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
POLICIES = tuple(policy.value for policy in ConversionPolicy)  # per-page first
HANDOFF = 256 * MIB  # seed 004: "hand off a large buffer (hundreds of MiB)"


def word(byte: int) -> int:
    """The 64-bit word of eight `byte`s (what memset leaves, what VerifyPattern checks)."""
    return int.from_bytes(bytes([byte]) * 8, "little")


def words(value: int, length: int, step: int = 0) -> bytes:
    """The bytes a WritePattern(gpa, length, value, step) leaves."""
    return b"".join(p.pattern_word(value, step, i).to_bytes(8, "little")
                    for i in range(length // 8))


# --- running one workload under one policy --------------------------------------------------------
class Counters(NamedTuple):
    """The model's cost counters (as bench/conversion.py)."""

    invalidations: int = 0
    tlb_flushes: int = 0
    s2_zapped: int = 0  # stage-2 pages zapped (vm.mmu.zapped_pages)
    ptes_zapped: int = 0  # host PTEs zapped (process stats)


class Failed(Exception):
    """The workload's first failing step: `how` is an errno or signal name (or
    "wrong data", "no SIGBUS", ...), `kind` says what failed."""

    def __init__(self, step: str, how: str, kind: str, detail: str = "") -> None:
        super().__init__(f"{step}: {how} ({detail})" if detail else f"{step}: {how}")
        self.step, self.how, self.kind, self.detail = step, how, kind, detail


def errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))


_ATTRIBUTES2_ERROR = re.compile(r"KVM_SET_MEMORY_ATTRIBUTES2 .*?: (E[A-Z0-9]+)")


class Run:
    """One workload on a fresh Kvm("inplace") with `policy` on its guest_memfds:
    the steps done, notes (failures the VMM recovered from), and the counters."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.kvm = Kvm("inplace")
        self.vms: list[Vm] = []
        self.steps: list[str] = []  # the steps that completed, in order
        self.notes: list[str] = []
        self.closers: list[Callable[[], object]] = []

    # --- setup ----------------------------------------------------------------------------------
    def vmm(self, vm_type: int) -> Vmm:
        """The VMM harness: a VM with its low memory (code, page tables); every
        guest_memfd created on the VM after this gets the policy at once."""
        vmm = Vmm(self.kvm, vm_type)
        self.on_close(vmm.close)
        vm = cast(Vm, vmm.vm)
        self.vms.append(vm)
        create = vm.create_guest_memfd
        policy = self.policy

        def create_with_policy(size: int, flags: int = 0) -> GuestMemfd:
            gmem = create(size, flags)
            gmem.set_conversion_policy(policy)  # before any mmap or pin
            return gmem

        vm.create_guest_memfd = create_with_policy  # type: ignore[method-assign]
        return vmm

    def on_close(self, close: Callable[[], object]) -> None:
        """Undo a setup step when the run is over (newest first)."""
        self.closers.append(close)

    def close(self) -> None:
        """Tear down (the model's fds are real); a failing close is a note."""
        for close in reversed(self.closers):
            try:
                close()
            except OSError as e:
                self.notes.append(f"teardown: {e}")
        self.kvm.close()

    def counters(self) -> Counters:
        return Counters(sum(vm.mmu.invalidations for vm in self.vms),
                        sum(vm.mmu.tlb_flushes for vm in self.vms),
                        sum(vm.mmu.zapped_pages for vm in self.vms),
                        self.kvm.process.stats.ptes_zapped)

    # --- steps ----------------------------------------------------------------------------------
    def step(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """A host step that should succeed: an errno or a signal is its failure."""
        try:
            result = fn(*args)
        except OSError as e:
            raise Failed(name, errno_name(e.errno), "errno", str(e)) from None
        except HostFault as e:
            raise Failed(name, e.signal_name, "signal", str(e)) from None
        self.steps.append(name)
        return result

    def fails(self, name: str, expected: int, fn: Callable[..., object], *args: Any) -> OSError:
        """A host step that should fail with `expected` (the selftest's EAGAIN)."""
        try:
            self.step(name, fn, *args)
        except Failed as e:
            if e.kind != "errno" or e.how != errno_name(expected):
                raise
            error = e.__context__  # the OSError (step raised Failed from None)
            assert isinstance(error, OSError)
            self.steps.append(f"{name} ({e.how}, as expected)")
            return error
        raise Failed(name, f"no {errno_name(expected)}", "check")

    def sigbus(self, name: str, fn: Callable[..., object], *args: Any) -> None:
        """A host access that should take SIGBUS (private memory)."""
        try:
            self.step(name, fn, *args)
        except Failed as e:
            if e.how == "SIGBUS":
                self.steps.append(f"{name} (SIGBUS, as expected)")
                return
            raise
        raise Failed(name, "no SIGBUS", "check")

    def child_signal(self, name: str, child: ChildProcess, mapping: Mapping, offset: int,
                     write: bool, expected: int | None) -> None:
        """An access in a forked child: the signal it gets must be `expected`."""
        got = self.step(name, child.touch, mapping, offset, write)
        if got != expected:
            how = signal.Signals(got).name if got else f"no {signal.Signals(expected or 0).name}"
            raise Failed(name, how, "signal" if got else "check")

    def check(self, name: str, expected: object, observed: object) -> None:
        if observed != expected:
            raise Failed(name, "wrong data", "check", f"expected {expected!r:.40}, "
                                                      f"observed {observed!r:.40}")
        self.steps.append(name)

    def guest(self, name: str, vmm: Vmm, *steps: p.Step) -> RunResult:
        """Run a guest program to its halt. A memory fault fails the step with its
        errno; a MAP_GPA_RANGE the VMM could not do fails "MAP_GPA_RANGE" with the
        errno KVM_SET_MEMORY_ATTRIBUTES2 gave; a VerifyPattern mismatch is wrong
        data. Failures the VMM recovered from (EAGAIN, then its pin dropped) are notes."""
        abi = default_hypercall_abi(vmm.kvm.capabilities, vmm.cpl)
        vmm.load(compile_program(p.Program.of(*steps), abi))
        result = vmm.run()
        recovered = _recovered(result.log)
        if result.stop == "memory_fault":
            fault = result.memory_fault
            where = f"gpa {fault.gpa:#x}" if fault is not None else ""
            raise Failed(name, errno_name(result.errno), "memory_fault",
                         f"KVM_RUN: memory fault, {where}")
        if result.stop != "done":
            raise Failed(name, result.stop, "guest", "; ".join(result.log))
        reports = iter(result.reports)
        for s in steps:
            if isinstance(s, p.MapGpaRange):
                if next(reports) != 0:
                    found = [m.group(1) for line in result.log
                             if (m := _ATTRIBUTES2_ERROR.search(line))]
                    raise Failed("MAP_GPA_RANGE", found[-1] if found else "-KVM_EINVAL",
                                 "conversion", f"in {name}: {result.log[-1]}")
            elif isinstance(s, p.VerifyPattern) and next(reports) != p.VERIFY_OK:
                gpa, found_word = next(reports), next(reports)
                raise Failed(name, "wrong data", "check", f"at gpa {gpa:#x}: {found_word:#x}")
            elif isinstance(s, p.ReadValue | p.Report):
                next(reports)
        self.notes += [f"{name}: {note}" for note in recovered]
        self.steps.append(name)
        return result


_EAGAIN = re.compile(r"KVM_SET_MEMORY_ATTRIBUTES2 \[(0x[0-9a-f]+), \+(0x[0-9a-f]+)\) private: "
                     r"EAGAIN at gpa (0x[0-9a-f]+)")


def _recovered(log: list[str]) -> list[str]:
    """A to-private conversion that met EAGAIN and then went through (the VMM
    dropped its own pins: Vmm._convert_in_place), one short note each."""
    notes = []
    for line in log:
        if m := _EAGAIN.search(line):
            notes.append(f"MAP_GPA_RANGE [{m[1]}, +{m[2]}): EAGAIN at {m[3]}, the VMM "
                         "dropped its pin and retried")
    return notes


@dataclass
class Outcome:
    """One cell of the tables: how `workload` went under `policy`, and its cost."""

    workload: str
    policy: str
    works: bool
    step: str | None  # the first step that failed
    how: str | None  # its errno / signal name, or "wrong data", "no SIGBUS", ...
    kind: str | None  # errno, signal, memory_fault, conversion, check, guest
    detail: str
    steps: list[str]
    notes: list[str]
    invalidations: int
    tlb_flushes: int
    s2_zapped: int
    ptes_zapped: int
    violations: list[str] = field(default_factory=list)  # the model's invariants after it

    @property
    def cell(self) -> str:
        return "works" if self.works else f"{self.how}: {self.step}"

    @property
    def cost(self) -> str:
        return f"{self.invalidations}/{self.tlb_flushes}/{self.s2_zapped}/{self.ptes_zapped}"


# --- the workloads --------------------------------------------------------------------------------
def conversions_selftest(run: Run) -> None:
    """guest_memfd_conversions_test.c, the in-place series' selftest (v8;
    upstream-2026-11.md §1; our port: src/guestmem/check/cases_gmem_conversions.py),
    its cases run in sequence on one 16-page fixture instead of a fixture each:

    1. gmem_conversions_do_setup: a SW_PROTECTED VM, a guest_memfd MMAP|INIT_SHARED
       mmapped whole (one mmap), its mapping the userspace_addr of memslot 1 at 4 GiB;
    2. init_shared / indexing: on pages 0-3 the host reads 0 and writes, the guest
       reads the host's byte and writes its own, the host sees it (host and guest rmw);
    3. indexing: page by page, to private while the mapping stays (the host's read
       and write SIGBUS, the guest rmw), back to shared (the host sees the guest's data);
    4. forked_accesses: a forked child reads and writes page 4 (mapping it in its
       page tables); the parent converts page 4 to private; the child's read and
       write take SIGBUS;
    5. elevated_refcount: page 5 pinned (pin_pages); to private of pages 0-7
       fails EAGAIN with error_offset = page 5, page 6 alone converts; after the
       unpin pages 0-7 convert, and the guest reads the data written before."""
    vmm = run.vmm(SW)
    size = 16 * PS
    gmem = run.step("create", cast(Vm, vmm.vm).create_guest_memfd, size, INIT_SHARED)
    run.on_close(gmem.close)
    mem: Mapping = run.step("mmap", gmem.mmap, size)
    run.on_close(mem.munmap)
    run.step("memslot", vmm.vm.set_user_memory_region2, SLOT, uapi.KVM_MEM_GUEST_MEMFD, GPA,
             size, mem.addr, gmem, 0)

    def host_rmw(page: int, expected: int, value: int) -> None:
        run.check("host rmw", bytes([expected]), run.step("host rmw", mem.read, page * PS, 1))
        run.step("host rmw", mem.write, page * PS, bytes([value]))

    def guest_rmw(page: int, expected: int, value: int) -> None:
        at = GPA + page * PS
        run.guest("guest rmw", vmm, p.VerifyPattern(at, 8, expected), p.WritePattern(at, 8, value))

    def convert(page: int, pages: int, private: bool) -> None:
        run.step("to private" if private else "to shared", gmem.set_memory_attributes2,
                 page * PS, pages * PS, PRIVATE if private else 0)

    for page in range(4):  # test_shared
        host_rmw(page, 0, 0x10 + page)
        guest_rmw(page, 0x10 + page, 0x20 + page)
        run.check("host sees guest", bytes([0x20 + page]), run.step("host read", mem.read,
                                                                    page * PS, 1))
    for page in range(4):  # test_convert_to_private, test_convert_to_shared
        convert(page, 1, True)
        run.sigbus("host read private", mem.read, page * PS, 1)
        run.sigbus("host write private", mem.write, page * PS, b"\xff")
        guest_rmw(page, 0x20 + page, 0x30 + page)
        convert(page, 1, False)
        host_rmw(page, 0x30 + page, 0x40 + page)
    child: ChildProcess = run.step("fork", run.kvm.fork)
    try:  # forked_accesses
        run.check("child read", b"\x00", run.step("child read", child.read, mem, 4 * PS, 1))
        run.step("child write", child.write, mem, 4 * PS, b"\x0c")
        convert(4, 1, True)
        guest_rmw(4, 0x0C, 0x0D)
        for write in (False, True):
            run.child_signal("child access", child, mem, 4 * PS, write, signal.SIGBUS)
    finally:
        child.exit()
    for page in (5, 6, 7):  # elevated_refcount's pages hold the host's bytes
        host_rmw(page, 0, 0x50 + page)
    pin = run.step("pin", mem.pin, 5 * PS, PS)
    try:
        error = run.fails("to private, pinned", errno.EAGAIN, gmem.set_memory_attributes2, 0,
                          8 * PS, PRIVATE)
        run.check("error_offset", 5 * PS, getattr(error, "error_offset", None))
        convert(6, 1, True)
    finally:
        pin.unpin()
    convert(0, 8, True)
    run.guest("guest reads", vmm, *(p.VerifyPattern(GPA + page * PS, 8, value) for page, value in
                                    ((0, 0x40), (4, 0x0D), (5, 0x55), (6, 0x56), (7, 0x57))))


QEMU_RAM = 64 * PS  # pages 0-31 the guest's RAM, 40-41 a virtio ring, 48-55 a DMA buffer
FW, REQ, DATA, DONE = word(0xF0), word(0xA1), 0xDA7A0000, word(0xC0)


def qemu_in_place(run: Run, memslots: int = 2) -> None:
    """QEMU's convert-in-place backend (ecosystem.md §1.1, upstream-2026-11.md §1:
    `-object memory-backend-guest-memfd,share=on` + `convert-in-place=on`, tested
    with the v8 series): one guest_memfd MMAP|INIT_SHARED holds the guest's RAM,
    mapped for the VMM's whole life at the memslots' userspace_addr. Here (the
    project's Vmm.add_private_memory, the v8 selftest's layout) as `memslots`
    pieces, an mmap of its part of the file each; QEMU itself maps a RAMBlock once
    and splits memslots inside that mapping (below/above 4 GiB), which is the
    one-mmap variant (memslots=1, one memslot: the same one mapping of the file).

    1. the memslots and their mmaps of the 64-page guest_memfd;
    2. firmware load: the VMM writes pages 0-3 through the mapping;
    3. the guest boots: checks the firmware, MAP_GPA_RANGE private of its RAM
       (pages 0-31), writes its data, finds the firmware kept (converted in place),
       writes a virtio request in the shared ring (page 40);
    4. device emulation: the VMM reads the request through the mapping;
    5. DMA pin: the VMM pins a shared 8-page buffer (pages 48-55) long-term, as
       vhost / VFIO map guest memory for DMA;
    6. while it is pinned the guest converts pages 32-39 to private and fills the
       buffer; the device reads the buffer (DMA) and writes a completion (page 41);
    7. the guest checks the completion and takes the buffer back: MAP_GPA_RANGE
       private of pages 48-55. A pin there makes KVM_SET_MEMORY_ATTRIBUTES2
       EAGAIN; the VMM drops its own pin and retries (QEMU's RamDiscardManager
       unmaps VFIO DMA on such a conversion), and the guest finds its data kept;
    8. the host's access to the buffer now takes SIGBUS."""
    vmm = run.vmm(SW)
    regions: list[MemoryRegion] = run.step("mmap pieces" if memslots > 1 else "mmap",
                                           vmm.add_private_memory, GPA, QEMU_RAM, memslots)
    assert regions
    run.step("firmware load", vmm.write, GPA, words(FW, 4 * PS))
    run.guest("guest boot", vmm, p.VerifyPattern(GPA, 4 * PS, FW), p.MapGpaRange(GPA, 32),
              p.WritePattern(GPA + 4 * PS, 28 * PS, 0x1000, 1),
              p.VerifyPattern(GPA, 4 * PS, FW), p.WritePattern(GPA + 40 * PS, PS, REQ))
    run.check("virtio read", words(REQ, PS), run.step("virtio read", vmm.read, GPA + 40 * PS, PS))
    buffer = GPA + 48 * PS
    run.step("DMA pin", vmm.pin, buffer, 8 * PS)
    run.guest("guest I/O", vmm, p.MapGpaRange(GPA + 32 * PS, 8),
              p.WritePattern(buffer, 8 * PS, DATA, 1))
    run.check("DMA read", words(DATA, 8 * PS, 1), run.step("DMA read", vmm.read, buffer, 8 * PS))
    run.step("DMA write", vmm.write, GPA + 41 * PS, words(DONE, PS))
    run.guest("guest reclaim", vmm, p.VerifyPattern(GPA + 41 * PS, PS, DONE),
              p.MapGpaRange(buffer, 8), p.VerifyPattern(buffer, 8 * PS, DATA, 1))
    run.sigbus("host read private", vmm.read, buffer, 8)


def qemu_one_mmap(run: Run) -> None:
    """qemu_in_place with one memslot and one mmap of the whole file (what QEMU
    does with a RAMBlock: see qemu_in_place)."""
    qemu_in_place(run, memslots=1)


FC_MEM = 64 * PS  # 0-7 kernel, 8-47 guest RAM, 48-63 swiotlb bounce buffers (shared)
KERNEL, FC_DATA, REQ2 = word(0x4B), 0xB10C0000, word(0xA2)


def firecracker_secret_hiding(run: Run) -> None:
    """Firecracker's secret hiding (ecosystem.md §1.3, `feature/secret-hiding`:
    SECRET_FREE_BOOT_GUEST_MEMFD_FLAGS = MMAP|INIT_SHARED|NO_DIRECT_MAP, all I/O
    through bounce buffers, MaybeBounce): the guest_memfd is all of guest memory,
    mapped whole once (one mmap, one memslot) and kept mapped while the guest
    runs. NO_DIRECT_MAP is not modelled; a guest that converts is a SW_PROTECTED VM.

    1. the guest_memfd (64 pages), mmapped whole, memslot at 4 GiB;
    2. kernel load: Firecracker writes pages 0-7 through the mapping;
    3. the guest boots while the mapping exists: checks the kernel, writes its
       RAM (pages 8-47), i.e. faults guest_memfd pages into stage 2;
    4. the guest converts its own memory (pages 0-47) to private, keeping the
       swiotlb bounce buffers (48-63) shared, and finds the kernel kept;
    5. virtio-blk: the guest writes a request (page 48); Firecracker reads it
       through the mapping;
    6. an O_DIRECT read into the bounce buffer (pages 49-52): GUP pins the pages
       for the I/O only, the data lands, the pin goes right after;
    7. the guest reads the data, converts pages 44-47 to shared for more bounce
       buffers and writes a second request there, which Firecracker reads;
    8. the guest converts the used bounce pages 49-52 back to private and finds
       the data kept; the host's read there takes SIGBUS.

    Firecracker itself copies through its own buffers (MaybeBounce), so it never
    needs GUP on the guest_memfd mapping: the pin in 6 is the O_DIRECT fast path."""
    vmm = run.vmm(SW)
    region: MemoryRegion = run.step("mmap", vmm.add_memory, GPA, FC_MEM)
    run.step("kernel load", vmm.write, GPA, words(KERNEL, 8 * PS))
    run.guest("guest boot", vmm, p.VerifyPattern(GPA, 8 * PS, KERNEL),
              p.WritePattern(GPA + 8 * PS, 40 * PS, 0x2000, 1))
    run.guest("guest to private", vmm, p.MapGpaRange(GPA, 48),
              p.VerifyPattern(GPA, 8 * PS, KERNEL))
    run.guest("guest request", vmm, p.WritePattern(GPA + 48 * PS, PS, REQ))
    run.check("virtio read", words(REQ, PS), run.step("virtio read", vmm.read, GPA + 48 * PS,
                                                      PS))
    bounce = 49 * PS
    pin = run.step("O_DIRECT pin", region.mapping.pin, bounce, 4 * PS)
    try:
        run.step("O_DIRECT read", region.mapping.write, bounce, words(FC_DATA, 4 * PS, 1))
    finally:
        pin.unpin()
    run.guest("guest bounce", vmm, p.VerifyPattern(GPA + bounce, 4 * PS, FC_DATA, 1),
              p.MapGpaRange(GPA + 44 * PS, 4, encrypted=False),
              p.WritePattern(GPA + 44 * PS, 4 * PS, REQ2))
    run.check("virtio read 2", words(REQ2, 4 * PS), run.step("virtio read 2", vmm.read,
                                                             GPA + 44 * PS, 4 * PS))
    run.guest("guest reclaim", vmm, p.MapGpaRange(GPA + bounce, 4),
              p.VerifyPattern(GPA + bounce, 4 * PS, FC_DATA, 1))
    run.sigbus("host read private", vmm.read, GPA + bounce, 8)


HANDOFF_BYTE = 0x5A


def pkvm_handoff(run: Run, munmap: bool = True) -> None:
    """Seed 004's pKVM use: "convert from shared to private while preserving the
    contents, e.g. to hand off a large buffer (hundreds of MiB) for processing in
    the protected VM" (the pkvm VM type, whose conversion preserves; the demo's
    hand-over, src/guestmem/demo.py). Sean's design has the host munmap before the
    conversion ("force userspace to munmap() everything in one shot"); the
    `munmap=False` variant keeps the mapping, as a VMM that maps guest memory for
    its whole life (QEMU, Firecracker) would.

    1. a 256 MiB guest_memfd MMAP|INIT_SHARED, mmapped whole, memslot at 4 GiB;
    2. the host fills it (memset through the mapping);
    3. the host munmaps it (not in the kept-mapped variant);
    4. the host converts all 256 MiB to private in one KVM_SET_MEMORY_ATTRIBUTES2;
    5. the guest verifies every byte of the buffer (VerifyPattern over 256 MiB);
    6. kept mapped: the host's read of the buffer takes SIGBUS."""
    vmm = run.vmm(PKVM)
    region: MemoryRegion = run.step("mmap", vmm.add_memory, GPA, HANDOFF)
    run.step("fill", region.mapping.fill, 0, HANDOFF_BYTE, HANDOFF)
    if munmap:
        run.step("munmap", region.mapping.munmap)
    run.step("convert 256M", region.guest_memfd.set_memory_attributes2, 0, HANDOFF, PRIVATE)
    run.guest("guest verify", vmm, p.VerifyPattern(GPA, HANDOFF, word(HANDOFF_BYTE)))
    if not munmap:
        run.sigbus("host read private", region.mapping.read, 0, 8)


def pkvm_handoff_mapped(run: Run) -> None:
    """pkvm_handoff without the munmap: the host keeps its mapping."""
    pkvm_handoff(run, munmap=False)


@dataclass(frozen=True)
class Workload:
    name: str
    label: str  # the table's row (short)
    run: Callable[[Run], None]


WORKLOADS = (
    Workload("conversions selftest", "selftest", conversions_selftest),
    Workload("QEMU in-place backend", "QEMU pieces", qemu_in_place),
    Workload("QEMU in-place backend, one mmap", "QEMU 1 mmap", qemu_one_mmap),
    Workload("Firecracker secret hiding", "Firecracker", firecracker_secret_hiding),
    Workload("pKVM 256 MiB hand-off", "pKVM munmap", pkvm_handoff),
    Workload("pKVM 256 MiB hand-off, kept mapped", "pKVM mapped", pkvm_handoff_mapped),
)


def run_one(workload: Workload, policy: str) -> Outcome:
    """`workload` on a fresh model with `policy`; the model's invariants after it."""
    run = Run(policy)
    failed: Failed | None = None
    try:
        workload.run(run)
    except Failed as e:
        failed = e
    c = run.counters()
    broken = violations(run.kvm)
    run.close()
    return Outcome(workload.name, policy, failed is None,
                   failed.step if failed else None, failed.how if failed else None,
                   failed.kind if failed else None, failed.detail if failed else "",
                   run.steps, run.notes, *c, violations=broken)


def run_all(workloads: tuple[Workload, ...] = WORKLOADS,
            policies: tuple[str, ...] = POLICIES) -> list[Outcome]:
    return [run_one(w, policy) for w in workloads for policy in policies]


# --- output ---------------------------------------------------------------------------------------
HEADERS = {"per-page": "per-page", "whole-file": "whole-file",
           "no-get-pfn-while-mapped": "no-get-pfn-\nwhile-mapped", "rmap-switch": "rmap-switch"}


def grid(outcomes: list[Outcome], cell: Callable[[Outcome], str]) -> tuple[list[str],
                                                                          list[list[str]]]:
    """(policies, rows of [label, cell per policy]) in WORKLOADS order."""
    policies = list(dict.fromkeys(o.policy for o in outcomes))
    by = {(o.workload, o.policy): o for o in outcomes}
    rows = []
    for w in WORKLOADS:
        if any((w.name, policy) in by for policy in policies):
            rows.append([w.label, *(cell(by[w.name, policy]) for policy in policies)])
    return policies, rows


def print_tables(console: Console, outcomes: list[Outcome]) -> None:
    for title, cell in (("1: what each workload does under each policy", lambda o: o.cell),
                        ("2: cost of the workload (or up to its failure): invalidations/"
                         "TLB flushes/stage-2 pages zapped/host PTEs zapped",
                         lambda o: o.cost)):
        policies, rows = grid(outcomes, cell)
        table = Table(title=title, title_justify="left")
        table.add_column("workload", no_wrap=True)
        for policy in policies:
            table.add_column(HEADERS.get(policy, policy))
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print("guest steps (guest boot, guest rmw, ...): the vCPU's run ended in a "
                  "memory fault with that errno; MAP_GPA_RANGE: the VMM's "
                  "KVM_SET_MEMORY_ATTRIBUTES2 failed with it (the guest got -KVM_EINVAL).")
    for o in outcomes:
        for note in o.notes:
            console.print(f"note, {o.workload} / {o.policy}: {note}")
        for v in o.violations:
            console.print(f"[bold]model invariant broken[/] ({o.workload}, {o.policy}): {v}")


def markdown(outcomes: list[Outcome]) -> str:
    """Both tables as markdown (for the README)."""
    out = []
    for cell in (lambda o: o.cell, lambda o: o.cost):
        policies, rows = grid(outcomes, cell)
        out.append("| workload | " + " | ".join(policies) + " |")
        out.append("|---" * (len(policies) + 1) + "|")
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [w.label for w in WORKLOADS]
    ap.add_argument("-w", "--workload", action="append", choices=names,
                    help="only this workload (its row label; repeatable)")
    ap.add_argument("-p", "--policy", action="append", choices=POLICIES,
                    help="only this policy (repeatable)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = ap.parse_args(argv)
    workloads = tuple(w for w in WORKLOADS if not args.workload or w.label in args.workload)
    policies = tuple(args.policy or POLICIES)
    start = time.perf_counter()
    outcomes = run_all(workloads, policies)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"policies": list(policies),
                          "workloads": [{"name": w.name, "label": w.label,
                                         "steps": (w.run.__doc__ or "").strip()}
                                        for w in workloads],
                          "results": [asdict(o) | {"cell": o.cell} for o in outcomes],
                          "elapsed_s": elapsed}, indent=1))
    elif args.markdown:
        print(markdown(outcomes), end="")
    else:
        console = Console(width=80)
        print_tables(console, outcomes)
        console.print(f"run {elapsed:.1f} s")
    return 1 if any(o.violations for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
