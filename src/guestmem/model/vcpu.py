"""The model's vCPU: runs guest `Program`s and returns the exits the kernel would.

It interprets the program the VMM loaded (GuestImage.program) instead of x86
code; every exit it produces is one the real vCPU produces for the compiled
code: port I/O for reports, ticks and the doorbell, KVM_EXIT_HYPERCALL, and a
failing KVM_RUN with KVM_EXIT_MEMORY_FAULT. Guest memory accesses take KVM's
two paths (arch/x86/kvm/mmu/mmu.c __kvm_mmu_faultin_pfn): private or
guest_memfd-only slots fault through guest_memfd, the rest through the slot's
userspace_addr and the host process's mappings.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from guestmem import _args, api, hypercall, uapi
from guestmem import program as p
from guestmem.caps import HypercallOutcome
from guestmem.exits import (
    Exit,
    HostFault,
    HostSigbus,
    HypercallExit,
    IoExit,
    KvmRunError,
    MemoryFaultExit,
    MmioExit,
    MsrExit,
    PreFaultError,
    ShutdownExit,
    oserror,
)
from guestmem.extents import ExtentMap
from guestmem.model.content import PAGE, PageStore, Pattern
from guestmem.model.paths import complete, gmem_fault_path
from guestmem.model.reset import reset_regs, reset_sregs

if TYPE_CHECKING:
    from guestmem.model.vm import Memslot, Vm

_MASK = (1 << 64) - 1
_FAULT_RETRIES = 3
_FRAME_SHIFT = 9  # gfns per 2 MiB guest page: 1 << 9
_BLOCKED_POLL = 0.001  # seconds between looks at immediate_exit while KVM_RUN blocks


@dataclass(frozen=True)
class _Fault:
    """A failing KVM_RUN: errno and the exit filled in with it."""

    err: int
    exit: Exit | None


@dataclass(frozen=True)
class _Piece:
    """A run of guest memory resolved to its backing store."""

    store: PageStore
    offset: int  # byte offset in the store
    gpa: int
    length: int
    key: int | None = None  # the SEV memory key the access is under (C=1), else None


Execution = Generator[Exit | _Fault, None, None]
Failure = _Fault | MmioExit | ShutdownExit
Resolution = tuple[list[_Piece], Failure | None]  # what resolved, then what failed after it


@dataclass(frozen=True)
class _Faulted:
    """Pages [first, end) of a run are present: their store and the byte offset
    of the first; the run may end before what was asked (the next page fails)."""

    store: PageStore
    offset: int
    end: int

_PTE_PRESENT, _PTE_WRITE, _PTE_USER, _PTE_HUGE = 1, 2, 4, 0x80
_PTE_ADDR = ((1 << 52) - 1) & ~0xFFF


_BLOCKED = _Fault(errno.EINTR, None)  # what a blocked KVM_RUN returns once kicked


@_args.checked
class Vcpu:

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.regs = reset_regs()  # the x86 reset state, as KVM_CREATE_VCPU leaves it
        self.sregs = reset_sregs(vcpu_id)
        self._execution: Execution | None = None
        self._hypercall_ret: int | None = None
        self._immediate_exit = False
        self.closed = False
        self._fd = vm.kvm.process.install(self, vm.put_ref)  # dropped: as close()
        self.encrypted_view: ExtentMap[bool] = ExtentMap()  # the guest's own C-bit view
        if vm.sev_active:  # SEV launched: C=1 wherever the guest does not clear it
            self.encrypted_view.set(0, hypercall.GFN_LIMIT, True)
        self._program = p.Program()
        self._abi = "port"
        self._migration_control = "port"
        self._msr_error: bool | None = None
        self._resume_at: int | None = None  # the step a paused program continues at
        self._depth = 0  # Loop nesting of the step running

    def _live(self, what: str) -> None:
        """Every call needs the fd (an ioctl) or its kvm_run page, gone with it."""
        if self.closed:
            raise oserror(errno.EBADF, what)

    # --- registers and setup ------------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        """KVM_GET_REGS."""
        self._live("KVM_GET_REGS")
        return uapi.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """KVM_SET_REGS."""
        self._live("KVM_SET_REGS")
        self.regs = uapi.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        """KVM_GET_SREGS."""
        self._live("KVM_GET_SREGS")
        return uapi.kvm_sregs.from_buffer_copy(self.sregs)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self._live("KVM_SET_SREGS")
        self.sregs = uapi.kvm_sregs.from_buffer_copy(sregs)

    @property
    def immediate_exit(self) -> bool:
        """kvm_run->immediate_exit."""
        self._live("kvm_run")
        return self._immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._live("kvm_run")
        self._immediate_exit = _args.BOOL("immediate_exit", value)

    def load_program(self, program: p.Program, hypercall_abi: str,
                     migration_control: str = "port") -> None:
        """Model only: the program the VMM placed in guest memory, to interpret."""
        if not isinstance(program, p.Program):
            raise TypeError(f"the model's vCPU interprets guestmem programs, not x86 code: "
                            f"got {type(program).__name__}; raw machine code runs only on "
                            f"the kvm backend")
        self._abi = hypercall_abi
        self._migration_control = migration_control
        self._program = program
        self._execution = self._run_steps(program.steps)

    def program_state(self) -> api.ProgramState:
        """api.ProgramVcpu: the program, the step to continue at, the C-bit view."""
        self._live("KVM_GET_REGS")
        if self._execution is None or self._resume_at is None:
            raise ValueError("the vCPU can be continued elsewhere only when stopped at a "
                             "top-level Checkpoint or at the program's end")
        return api.ProgramState(self._program, self._resume_at, self._abi,
                                tuple((s, e) for s, e, _ in self.encrypted_view.overlapping(
                                    0, hypercall.GFN_LIMIT)), self._migration_control)

    def restore_program_state(self, state: api.ProgramState) -> None:
        """api.ProgramVcpu: continue state's program at its next step."""
        self._live("KVM_SET_REGS")
        self._abi, self._program = state.hypercall_abi, state.program
        self._migration_control = state.migration_control
        self._execution = self._run_steps(state.program.steps, state.next_step)
        self.encrypted_view = ExtentMap()
        for s, e in state.encrypted:
            self.encrypted_view.set(s, e, True)

    @property
    def fd(self) -> int:
        """The vCPU fd (EBADF once closed)."""
        if self.closed:
            raise oserror(errno.EBADF, "closed vCPU")
        return self._fd

    @property
    def cpl(self) -> int:
        """The CPL: CS's DPL in the loaded sregs."""
        return int(self.sregs.cs.dpl)

    # --- KVM_RUN --------------------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN (vcpu_run): the next exit of the program the vCPU interprets."""
        if self.closed:
            raise oserror(errno.EBADF, "closed vCPU")
        if self.immediate_exit:  # completes nothing pending in the model: EINTR at once
            raise KvmRunError(errno.EINTR, None)
        if self._execution is None:
            raise RuntimeError("no program loaded: the model's vCPU interprets guestmem "
                               "programs (Vmm.load(compile_program(...)) first)")
        item = next(self._execution)
        if item is _BLOCKED:
            while not self._immediate_exit:  # until kick() (or close()) from another thread
                time.sleep(_BLOCKED_POLL)
        if isinstance(item, _Fault):
            raise KvmRunError(item.err, item.exit)
        return item

    def kick(self) -> None:
        """Make KVM_RUN return EINTR, from any thread (the model's KVM_RUN runs in
        the caller's thread, so immediate_exit is all it takes)."""
        self.immediate_exit = True

    def complete_io_in(self, data: bytes) -> None:
        """Guest programs never do port IN, so there is never an IN to complete."""
        self._live("kvm_run")
        raise RuntimeError("no KVM_EXIT_IO IN is pending: model guests do not read ports")

    def complete_hypercall(self, ret: int) -> None:
        """Answer a KVM_EXIT_HYPERCALL: the guest's RAX (complete_hypercall_exit)."""
        self._live("kvm_run")
        self._hypercall_ret = ret & _MASK

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """KVM_PRE_FAULT_MEMORY (kvm_vcpu_pre_fault_memory, x86
        kvm_arch_vcpu_pre_fault_memory): returns the (gpa, size) written back; a
        failure is PreFaultError with them (unchanged: a call that maps anything
        succeeds)."""
        self._live("KVM_PRE_FAULT_MEMORY")
        if flags:
            raise PreFaultError(errno.EINVAL, gpa, size)
        if gpa % PAGE or size % PAGE or (gpa + size) & _MASK <= gpa:  # u64 wraps
            raise PreFaultError(errno.EINVAL, gpa, size)
        if not self.vm.kvm.profile.pre_fault_memory:
            # Shadow paging (this host, mainline profile), observed on 6.18: with no
            # memslot at all the MMU root cannot be loaded (ENOSPC); otherwise x86
            # refuses without TDP (EOPNOTSUPP).
            err = errno.ENOSPC if not self.vm.memslots else errno.EOPNOTSUPP
            raise PreFaultError(err, gpa, size)
        if not self.vm.vm_type_info.pre_fault_allowed:
            raise PreFaultError(errno.EOPNOTSUPP, gpa, size)  # before finalize
        gfn, last, done = gpa // PAGE, (gpa + size) // PAGE, 0
        while gfn < last:  # one memslot and one uniform run at a time
            slot = self.vm.slot_for_gfn(gfn)
            fault: _Faulted | _Fault = _Fault(errno.ENOENT, None)  # no memslot: emulated MMIO
            if slot is not None:
                end = self._uniform_end(gfn, min(last, slot.end_gfn))
                fault = self._fault_in(gfn, end, False, self.vm.is_private(gfn), slot)
            if isinstance(fault, _Fault):
                if done:
                    break  # partial progress is success; gpa/size tell how far
                raise PreFaultError(fault.err, gpa, size)  # nothing done: range as given
            done += (fault.end - gfn) * PAGE
            gfn = fault.end
        return gpa + done, size - done

    def close(self) -> None:
        """close(2) of the vCPU fd (kvm_vcpu_release: kvm_put_kvm); a KVM_RUN blocked
        in another thread returns."""
        if not self.closed:
            self._immediate_exit = True
            self.closed = True
            self.vm.kvm.process.release_fd(self._fd)
            self.vm.vcpus.pop(self.vcpu_id, None)
            self.vm.put_ref()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the program ---
    def _run_steps(self, steps: tuple[p.Step, ...], start: int = 0) -> Execution:
        for index in range(start, len(steps)):
            step = steps[index]
            if isinstance(step, p.Checkpoint):  # paused here, go on after it
                self._resume_at = index + 1
            elif isinstance(step, p.Halt):  # paused here, halt again
                self._resume_at = index
            yield from self._step(step)
            self._resume_at = None

    def _step(self, step: p.Step) -> Execution:
        match step:
            case p.WritePattern(gpa=gpa, length=length, value=value, step=inc):
                def word(addr: int, gpa: int = gpa, value: int = value, inc: int = inc) -> bytes:
                    return ((value + (addr - gpa) // 8 * inc) & _MASK).to_bytes(8, "little")

                def store(piece: _Piece) -> bool:
                    first_word = (piece.gpa - gpa) // 8
                    piece.store.write_pattern(piece.offset, piece.length,
                                              value + first_word * inc, inc, piece.key)
                    return True

                yield from self._access(gpa, length, True, store, word)
            case p.VerifyPattern(gpa=gpa, length=length, value=value, step=inc):
                yield from self._verify(gpa, length, value, inc)
            case p.ReadValue(gpa=gpa):
                data: list[bytes] = []

                def load(piece: _Piece) -> bool:
                    data.append(piece.store.read(piece.offset, piece.length, piece.key))
                    return True

                yield from self._access(gpa, 8, False, load)
                yield from self._report(int.from_bytes(b"".join(data), "little"))
            case p.Report(value=value):
                yield from self._report(value)
            case p.Tick():
                yield _out(p.PORT_TICK, 0)
            case p.Checkpoint(label=label):
                if self._depth:  # not resumable inside a Loop
                    self._resume_at = None
                yield _out(p.PORT_CHECKPOINT, label & 0xFFFFFFFF)
            case p.MigrationReady() if self._migration_control == "wrmsr":
                yield from self._wrmsr(uapi.MSR_KVM_MIGRATION_CONTROL, uapi.KVM_MIGRATION_READY)
            case p.MigrationReady():
                yield _out(p.PORT_MIGRATION_CONTROL, uapi.KVM_MIGRATION_READY)
            case p.MapGpaRange():
                ret = yield from self._hypercall(uapi.KVM_HC_MAP_GPA_RANGE,
                                                 (step.gpa, step.npages, step.attrs))
                if ret == 0 and step.sets_view:
                    gfn = step.gpa // PAGE
                    view = True if step.encrypted else None
                    self.encrypted_view.set(gfn, gfn + step.npages, view)
                yield from self._report(ret)
            case p.SetCBit(gpa=gpa, npages=npages, encrypted=encrypted):
                gfn = gpa // PAGE
                self.encrypted_view.set(gfn, gfn + npages, True if encrypted else None)
            case p.Loop(count=count, body=body):
                self._depth += 1
                for _ in range(count):
                    for inner in body:
                        yield from self._step(inner)
                self._depth -= 1
            case p.Halt():
                while True:
                    yield _out(p.PORT_DONE, 0)
            case _:
                raise TypeError(f"unknown step {step!r}")

    def _wrmsr(self, index: int, value: int) -> Execution:
        """WRMSR: #GP at CPL3 before any MSR handling (observed on 6.18 PVM, whatever
        the capability and filter); at CPL0 KVM_EXIT_X86_WRMSR where the VM asked
        for this reason (KVM_CAP_X86_USER_SPACE_MSR), else #GP. With no IDT a #GP
        is a triple fault: KVM_EXIT_SHUTDOWN."""
        reason = self.vm.msr_write_exit(index) if self.cpl == 0 else None
        if reason is not None:
            self._msr_error = None
            yield MsrExit(uapi.KVM_EXIT_X86_WRMSR, reason, index, value)
            if not self._msr_error:
                return
        yield from _shut_down()

    def complete_msr(self, error: bool, data: int = 0) -> None:
        """Answer a KVM_EXIT_X86_RDMSR/WRMSR: error injects #GP on the next KVM_RUN."""
        self._live("kvm_run")
        self._msr_error = bool(error)

    def _report(self, value: int) -> Execution:
        value &= _MASK
        yield _out(p.PORT_REPORT_LO, value & 0xFFFFFFFF)
        yield _out(p.PORT_REPORT_HI, value >> 32)

    def _verify(self, gpa: int, length: int, value: int, inc: int) -> Execution:
        """The compiled loop: compare word by word, report the first mismatch."""
        mismatch: list[tuple[int, int]] = []

        def compare(piece: _Piece) -> bool:
            first_word = (piece.gpa - gpa) // 8
            want = Pattern((value + first_word * inc) & _MASK, inc & _MASK, piece.offset)
            bad = piece.store.first_mismatch(piece.offset, piece.length, want, piece.key)
            if bad is not None:
                offset, found = bad
                mismatch.append((piece.gpa + offset - piece.offset, found))
            return bad is None

        yield from self._access(gpa, length, False, compare)
        if mismatch:
            (where, found), = mismatch
            yield from self._report(p.MISMATCH_TAG)
            yield from self._report(where)
            yield from self._report(found)
        else:
            yield from self._report(p.VERIFY_OK)

    def _hypercall(self, nr: int, args: tuple[int, ...]) -> Generator[Exit | _Fault, None, int]:
        """Issue a hypercall the way the compiled code does for this ABI."""
        if self._abi == "port":  # the doorbell: arguments in registers, answer in RAX
            self.regs.rax = nr
            self.regs.rbx, self.regs.rcx, self.regs.rdx = args[:3]
            yield _out(p.PORT_HYPERCALL, nr & 0xFFFFFFFF)
            return int(self.regs.rax)
        outcome = self._hypercall_outcome()
        if outcome is HypercallOutcome.RETURNS_EPERM:
            return -uapi.KVM_EPERM & _MASK  # __kvm_emulate_hypercall: CPL != 0
        if outcome is HypercallOutcome.RETURNS_ENOSYS:
            return -uapi.KVM_ENOSYS & _MASK
        if outcome is HypercallOutcome.UD_SHUTDOWN:
            yield from _shut_down()
        if outcome is not HypercallOutcome.EXITS:  # NEVER_RETURNS, OTHER
            yield from _never_returns()
        if nr != uapi.KVM_HC_MAP_GPA_RANGE or not self.vm.exit_hypercall_mask & (1 << nr):
            return -uapi.KVM_ENOSYS & _MASK
        gpa, npages, attrs = args
        bad = hypercall.kvm_check(gpa, npages)
        if bad:
            return bad & _MASK
        self._hypercall_ret = None
        yield HypercallExit(uapi.KVM_EXIT_HYPERCALL, nr, (gpa, npages, attrs, 0, 0, 0),
                            uapi.KVM_EXIT_HYPERCALL_LONG_MODE)
        return self._hypercall_ret if self._hypercall_ret is not None else 0

    def _hypercall_outcome(self) -> HypercallOutcome:
        """What the profile's KVM does with this VMCALL/VMMCALL at this CPL (caps.py
        GuestExecution; at CPL0 both instructions behave as the vendor's own, as
        KVM's #UD interception makes them on VMX/SVM)."""
        execution = self.vm.kvm.profile.execution
        if self.cpl == 0:
            return execution.cpl0_hypercall
        return execution.cpl3_hypercall.get(self._abi, HypercallOutcome.OTHER)

    # --- guest memory ---
    def _access(self, gpa: int, length: int, write: bool, consume: Callable[[_Piece], bool],
                data_at: Callable[[int], bytes] | None = None) -> Execution:
        """[gpa, gpa+length) as the compiled loop touches it, word by word in
        order: `consume` takes each run of memory that resolved (a store, a
        compare; False stops the loop); what fails is reported where it happens,
        so a write stores everything before the faulting page, as the real loop
        does. A fault is retried when the VMM runs the vCPU again; after MMIO the
        device has taken the word (a read gets zeros) and the loop goes on.
        `data_at(addr)` gives the 8 bytes a write stores at addr."""
        pos, end = gpa, gpa + length
        while pos < end:
            pieces, failure = self._resolve(pos, end - pos, write, data_at)
            for piece in pieces:
                if not consume(piece):
                    return
                pos = piece.gpa + piece.length
            if failure is None:
                continue
            yield failure  # at pos: the pieces before it cover [gpa, pos)
            if isinstance(failure, MmioExit):
                word = _Piece(PageStore(), 0, pos, min(8, end - pos))
                if not write and not consume(word):  # an unanswered read: zeros
                    return
                pos += 8

    def _resolve(self, gpa: int, length: int, write: bool,
                 data_at: Callable[[int], bytes] | None = None) -> Resolution:
        """A guest data access: the runs the guest's page tables map contiguously,
        each to guest-physical memory, up to the first failure (None: all of it)."""
        pieces: list[_Piece] = []
        pos, end = gpa, gpa + length
        tables: dict[int, bytes | None] = {}  # table pages read by this access's walks
        while pos < end:
            run = self._translate(pos, end, write, tables)
            if run is None:
                return pieces, ShutdownExit(uapi.KVM_EXIT_SHUTDOWN)
            phys, stop = run
            linear = pos - phys  # what to add to a physical address of this run
            stored = None if data_at is None else (
                lambda addr, linear=linear: data_at(addr + linear))
            done, failure = self._resolve_physical(phys, stop - pos, write, stored)
            for piece in done:  # back to the linear addresses the guest used
                pieces.append(_Piece(piece.store, piece.offset, piece.gpa - phys + pos,
                                     piece.length, piece.key))
            if failure is not None:
                return pieces, failure
            pos = stop
        return pieces, None

    def _translate(self, addr: int, end: int, write: bool,
                   tables: dict[int, bytes | None]) -> tuple[int, int] | None:
        """The guest-physical address of `addr` and the end of the run after it
        that successive leaves map contiguously and permit (below `end`); None
        where the walk faults."""
        leaf = self._walk(addr, write, tables)
        if leaf is None:
            return None
        phys, run_end = leaf
        while run_end < end:
            nxt = self._walk(run_end, write, tables)
            if nxt is None or nxt[0] != phys + (run_end - addr):
                break
            run_end = nxt[1]
        return phys, min(run_end, end)

    def _walk(self, addr: int, write: bool,
              tables: dict[int, bytes | None]) -> tuple[int, int] | None:
        """The 4-level walk of the guest's page tables from CR3 (paging_tmpl.h
        walk_addr_generic, or the CPU's own with TDP): (guest-physical address of
        `addr`, end of its leaf), or None where it faults. With no IDT a #PF is a
        triple fault, i.e. KVM_EXIT_SHUTDOWN. CR0.WP is set, so writes need W at
        every level; CPL3 needs U at every level; PS in a PML4E is reserved, and so
        is PS in a PDPTE where KVM walks the tables itself (shadow paging, the
        emulator): it checks the guest's CPUID for GBPAGES (reset_guest_rsvds_bits_mask),
        and guestmem's VMM sets none; with TDP the CPU's own walk takes 1 GiB pages."""
        table = int(self.sregs.cr3) & _PTE_ADDR
        for level, shift in enumerate((39, 30, 21, 12)):
            entry = self._table_entry(table, (addr >> shift) & 511, tables)
            if entry is None or not entry & _PTE_PRESENT:
                return None
            if (write and not entry & _PTE_WRITE) or (self.cpl == 3 and not entry & _PTE_USER):
                return None
            huge = bool(entry & _PTE_HUGE)
            if huge and (level == 0 or level == 1 and self._kvm_walks):
                return None
            if shift == 12 or huge:
                size = 1 << shift
                frame = entry & _PTE_ADDR & ~(size - 1)
                return frame + (addr & (size - 1)), (addr & ~(size - 1)) + size
            table = entry & _PTE_ADDR
        return None

    def _table_entry(self, table: int, index: int, tables: dict[int, bytes | None]) -> int | None:
        """Entry `index` of the page table at guest-physical `table`, reading each
        table page once per access."""
        if table not in tables:
            tables[table] = self._read_table(table)
        page = tables[table]
        return None if page is None else int.from_bytes(page[index * 8:index * 8 + 8], "little")

    def _read_table(self, gpa: int) -> bytes | None:
        """A page of guest page table. Shadow paging and the instruction emulator
        read the guest's tables through the memslot's userspace_addr
        (kvm_read_guest); with TDP the CPU reads them where the MMU maps the gfn:
        the guest_memfd for gmem-only slots and private gfns. None if unreadable
        (the walk fails)."""
        gfn = gpa // PAGE
        slot = self.vm.slot_for_gfn(gfn)
        if slot is None:
            return None
        through_hva = self._kvm_walks
        if not through_hva and (slot.gmem_only or self._access_is_private(gfn)):
            if slot.gmem is None:
                return None
            # SEV: the walk reads a table the guest encrypted through the VM's key
            return slot.gmem.store.read(slot.gmem_index(gfn) * PAGE, PAGE, self._memory_key(gfn))
        found = self.vm.kvm.process.mapping_at(slot.userspace_addr + (gfn - slot.base_gfn) * PAGE)
        if found is None or found[1] + PAGE > found[0].length:
            return None
        try:
            data = found[0].read(found[1], PAGE)
        except HostFault:
            return None
        key = self._memory_key(gfn)
        if key is not None:  # SEV: as above
            mapping, offset = found
            data = mapping.backing.store.read(mapping.pgoff * PAGE + offset, PAGE, key)
        return data

    @property
    def _kvm_walks(self) -> bool:
        """KVM, not the CPU, walks the guest's page tables (and checks reserved bits
        against the guest's CPUID)."""
        return self.vm.kvm.profile.shadow_paging or self._emulated

    @property
    def _emulated(self) -> bool:
        """This CPL's code runs in KVM's instruction emulator (kvm_pvm: CPL0)."""
        return self.cpl in self.vm.kvm.profile.execution.emulated_cpls

    def _resolve_physical(self, gpa: int, length: int, write: bool,
                          data_at: Callable[[int], bytes] | None = None) -> Resolution:
        """Guest-physical [gpa, gpa+length) to backing stores, run by run, up to the
        first page that fails (pieces cover everything before it)."""
        pieces: list[_Piece] = []
        first, last = gpa // PAGE, -(-(gpa + length) // PAGE)
        gfn = first
        while gfn < last:
            if write:  # the guest's page walk sets the dirty bit of the 2 MiB PTE it uses
                self.vm.guest_pte_dirty.set(gfn >> _FRAME_SHIFT, (gfn >> _FRAME_SHIFT) + 1, True)
            addr = max(gpa, gfn * PAGE)
            data = data_at(addr) if write and data_at else b""
            slot = self.vm.slot_for_gfn(gfn)
            if slot is None:
                if self._access_is_private(gfn) and not self._emulated:
                    # x86 kvm_mmu_faultin_pfn: a private fault goes to guest_memfd first;
                    # no slot -> memory-fault exit, EFAULT (private_mem_kvm_exits_test).
                    flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
                    return pieces, _Fault(errno.EFAULT, MemoryFaultExit(
                        uapi.KVM_EXIT_MEMORY_FAULT, flags, gfn * PAGE, PAGE))
                return pieces, MmioExit(uapi.KVM_EXIT_MMIO, addr, data, 8, write)
            if write and slot.flags & uapi.KVM_MEM_READONLY:
                # A write to a read-only memslot is emulated MMIO (observed on 6.18).
                return pieces, MmioExit(uapi.KVM_EXIT_MMIO, addr, data, 8, True)
            end = self._uniform_end(gfn, min(last, slot.end_gfn))
            if self._emulated:
                got: _Faulted | _Fault | MmioExit = self._emulated_access(
                    slot, gfn, end, write, addr, data)
            else:
                got = self._mmu_access(slot, gfn, end, write)
            if not isinstance(got, _Faulted):
                return pieces, got
            end = got.end
            if write:
                self.vm.guest_pte_dirty.set(gfn >> _FRAME_SHIFT, ((end - 1) >> _FRAME_SHIFT) + 1,
                                            True)
            lo, hi = max(gpa, gfn * PAGE), min(gpa + length, end * PAGE)
            pieces.append(_Piece(got.store, got.offset + lo - gfn * PAGE, lo, hi - lo,
                                 self._memory_key(lo // PAGE)))
            if write:
                slot.mark_dirty(gfn, end)
            gfn = end
        return pieces, None

    def _mmu_access(self, slot: Memslot, gfn: int, end: int, write: bool) -> _Faulted | _Fault:
        """A native access: the MMU faults [gfn, end) in."""
        unmapped = list(self.vm.mmu.mapped.gaps(gfn, end))
        fault = self._fault_in(gfn, end, write, self._access_is_private(gfn), slot)
        if isinstance(fault, _Faulted) and not write and \
                slot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES and self.vm.kvm.profile.shadow_paging:
            self._log_writable_read_faults(slot, [(lo, min(hi, fault.end)) for lo, hi in unmapped
                                                  if lo < fault.end])
        return fault

    def _emulated_access(self, slot: Memslot, gfn: int, end: int, write: bool, addr: int,
                         data: bytes) -> _Faulted | MmioExit:
        """The instruction emulator's access (x86.c emulator_read_write_onepage):
        kvm_vcpu_read/write_guest through userspace_addr, whatever guest_memfd the
        slot has; where the copy fails, emulated MMIO (observed on kvm_pvm: a
        userspace_addr of 0 gives KVM_EXIT_MMIO with the data). No SPTE is made."""
        got = self._gup(slot, gfn, end, write)
        return got if got is not None else MmioExit(uapi.KVM_EXIT_MMIO, addr, data, 8, write)

    def _gup(self, slot: Memslot, gfn: int, end: int, write: bool) -> _Faulted | None:
        """Fault in the host pages behind [gfn, end) through the slot's
        userspace_addr, as far as they go (the mapping's end, the first page that
        would SIGBUS); None if the first one fails, or the VMA's protection forbids
        the access (mm/gup.c check_vma_flags)."""
        found = self.vm.kvm.process.mapping_at(slot.userspace_addr + (gfn - slot.base_gfn) * PAGE)
        if found is None:
            return None
        mapping, offset = found
        end = min(end, gfn + (mapping.length - offset) // PAGE)
        if end <= gfn:
            return None
        try:
            mapping._allowed(offset, write)
            mapping._fault(offset, (end - gfn) * PAGE, write)
        except HostSigbus as e:
            end = gfn + (e.addr - mapping.addr - offset) // PAGE  # those before it are in
        except HostFault:
            return None
        if end <= gfn:
            return None
        return _Faulted(mapping.backing.store, mapping.pgoff * PAGE + offset, end)

    def _log_writable_read_faults(self, slot: Memslot, faulted: list[tuple[int, int]]) -> None:
        """Shadow paging: a read fault on a page whose guest PTE is already dirty
        gets a writable SPTE, and x86 make_spte marks a page dirty whenever it
        makes a writable SPTE in a dirty-logged slot (observed on 6.18 PVM)."""
        for lo, hi in faulted:
            frames = self.vm.guest_pte_dirty.overlapping(lo >> _FRAME_SHIFT,
                                                         ((hi - 1) >> _FRAME_SHIFT) + 1)
            for f0, f1, _ in list(frames):
                slot.mark_dirty(max(lo, f0 << _FRAME_SHIFT), min(hi, f1 << _FRAME_SHIFT))

    def _uniform_end(self, gfn: int, limit: int) -> int:
        """End of the run from gfn over which privateness (attributes and the
        guest's own view) does not change."""
        end = limit
        for emap in (self.vm.attributes, self.encrypted_view):
            for s, e, _ in emap.overlapping(gfn, limit):
                for point in (s, e):
                    if gfn < point < end:
                        end = point
        for s, e in self.vm.gmem_private_runs(gfn, end):  # in-place: the inode's attributes
            for point in (s, e):
                if gfn < point < end:
                    end = point
        return end

    def _memory_key(self, gfn: int) -> int | None:
        """SEV/SEV-ES once launched: the VM's memory key where the guest's C-bit is
        set (the memory controller encrypts the access; KVM never sees it), else None."""
        if self.vm.sev_active and self.encrypted_view.get(gfn):
            return self.vm.memory_key
        return None

    def _access_is_private(self, gfn: int) -> bool:
        """SW_PROTECTED: the attributes say (kvm_mem_is_private); SEV/SNP/TDX: the
        hardware access does (the guest's C-bit / shared-bit view)."""
        if self.vm.vm_type_info.private_from_hardware:
            return bool(self.encrypted_view.get(gfn))
        return self.vm.is_private(gfn)

    def _fault_in(self, first: int, last: int, write: bool, private: bool,
                  slot: Memslot | None = None) -> _Faulted | _Fault:
        """kvm_mmu_faultin_pfn for [first, last): the pages faulted in, up to the first
        that fails, or the fault of the first page."""
        slot = slot or self.vm.slot_for_gfn(first)
        assert slot is not None
        flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0

        def memory_fault(err: int, gfn: int) -> _Fault:
            return _Fault(err, MemoryFaultExit(uapi.KVM_EXIT_MEMORY_FAULT, flags, gfn * PAGE, PAGE))

        # Hardware-private VMs: a private/shared mismatch with the attributes exits.
        if self.vm.vm_type_info.private_from_hardware and private != self.vm.is_private(first):
            return memory_fault(errno.EFAULT, first)
        if private or slot.gmem_only:  # kvm_mmu_faultin_pfn_gmem
            inode = slot.gmem
            if not slot.is_gmem_slot or inode is None:
                return memory_fault(errno.EFAULT, first)  # no guest_memfd / file released
            if inode.get_pfn_refused():  # seed 004 item 2 (ConversionPolicy)
                # Only a new fault asks for a pfn: SPTEs already there keep working.
                unmapped = next(iter(self.vm.mmu.mapped.gaps(first, last)), None)
                if unmapped is not None and unmapped[0] == first:
                    return memory_fault(errno.EBUSY, first)
                if unmapped is not None:
                    last = unmapped[0]
                else:
                    return _Faulted(inode.store, slot.gmem_index(first) * PAGE, last)
            lo, hi = slot.gmem_index(first), slot.gmem_index(last)
            poisoned = inode.poisoned(lo, hi)
            if poisoned == lo:
                return memory_fault(uapi.EHWPOISON, first)
            if poisoned is not None:  # the pages before it fault in
                last, hi = first + poisoned - lo, poisoned
            if not inode.allocation_affordable(lo, hi):  # kvm_gmem_get_pfn: -ENOMEM
                return memory_fault(errno.ENOMEM, first)
            for _ in range(_FAULT_RETRIES):  # an invalidation raced: retry, as KVM does
                if complete(gmem_fault_path(self.vm, slot, first, last)):
                    return _Faulted(inode.store, lo * PAGE, last)
            # A vCPU thread would spin until the invalidation ends; single-threaded, an
            # invalidation still in progress here is one an explorer paused.
            raise RuntimeError("guest fault cannot complete while an invalidation is in "
                               "progress: finish the paused path first")
        return self._fault_in_hva(slot, first, last, write)

    def _fault_in_hva(self, slot: Memslot, first: int, last: int,
                      write: bool) -> _Faulted | _Fault:
        """Shared access through userspace_addr: GUP of the host mapping. A failed
        GUP is KVM_PFN_ERR_FAULT, and x86 kvm_handle_error_pfn returns -EFAULT
        without a memory-fault exit (observed on 6.18 too)."""
        got = self._gup(slot, first, last, write)
        if got is None:
            return _Fault(errno.EFAULT, None)
        self.vm.mmu.map(first, got.end, "hva")
        return got


def _shut_down() -> Execution:
    """A triple fault: every KVM_RUN from now on reports KVM_EXIT_SHUTDOWN."""
    while True:
        yield ShutdownExit(uapi.KVM_EXIT_SHUTDOWN)


def _never_returns() -> Execution:
    """KVM_RUN does not come back until the vCPU is kicked (Vcpu.run blocks)."""
    while True:
        yield _BLOCKED


def _out(port: int, value: int) -> IoExit:
    return IoExit(uapi.KVM_EXIT_IO, uapi.KVM_EXIT_IO_OUT, 4, port, 1, value.to_bytes(4, "little"))

