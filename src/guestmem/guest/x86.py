"""Compile a guest `Program` to x86-64 machine code with iced-x86 (no external assembler).

The code runs at CPL3 in the machine of `guestmem.vmm.machine`. Register use:
rax/rbx/rcx/rdx/rdi/r8/r10 are scratch for a step; r12-r15 hold loop counters,
so loops nest four deep.

Hypercall ABIs (how KVM_HC_MAP_GPA_RANGE is issued), all with RAX=nr, RBX, RCX, RDX:
- "vmcall" / "vmmcall": upstream x86 (kvm_emulate_hypercall; Intel / AMD).
- "port": guestmem's doorbell, `out PORT_HYPERCALL` handled by the VMM. Used on
  kvm_pvm hosts: that KVM answers a native VMCALL itself with -1 (the
  kvm:kvm_hypercall tracepoint never fires), loops on an emulated one, and SYSCALL
  stays in the guest (virt-pvm's SYSCALL hypercalls need MSR_PVM_*, absent here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand
from iced_x86 import Register as R

if TYPE_CHECKING:  # iced_x86's stubs type registers and codes as enums; at run time: ints
    from iced_x86._iced_x86_py import Code as CodeT
    from iced_x86._iced_x86_py import Register as RegisterT

from guestmem import program as p
from guestmem import uapi
from guestmem.caps import Capabilities
from guestmem.machine import CODE, GuestImage

HYPERCALL_ABIS = p.HYPERCALL_ABIS
_LOOP_REGISTERS: tuple[RegisterT, ...] = (R.R12, R.R13, R.R14, R.R15)
_MASK64 = (1 << 64) - 1


class _Assembler:
    """A list of iced-x86 instructions with labels (iced's convention: a branch
    target is the `ip` given to the instruction that carries the label)."""

    def __init__(self) -> None:
        self.instructions: list[Instruction] = []
        self._labels = 0
        self._pending: int | None = None

    def label(self) -> int:
        self._labels += 1
        return self._labels

    def bind(self, label: int) -> None:
        if self._pending is not None:  # two labels on one spot: pad with a nop
            self.emit(Instruction.create(Code.NOPD))
        self._pending = label

    def emit(self, ins: Instruction) -> None:
        if self._pending is not None:
            ins.ip = self._pending
            self._pending = None
        self.instructions.append(ins)

    def mov_imm(self, reg: RegisterT, value: int) -> None:
        self.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, reg, value & _MASK64))

    def mov(self, dst: RegisterT, src: RegisterT) -> None:
        self.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, dst, src))

    def load(self, dst: RegisterT, base: RegisterT) -> None:
        self.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, dst, MemoryOperand(base)))

    def store(self, base: RegisterT, src: RegisterT) -> None:
        self.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(base), src))

    def add(self, dst: RegisterT, src: RegisterT) -> None:
        self.emit(Instruction.create_reg_reg(Code.ADD_RM64_R64, dst, src))

    def add_imm(self, dst: RegisterT, value: int) -> None:
        self.emit(Instruction.create_reg_i32(Code.ADD_RM64_IMM32, dst, value))

    def cmp(self, a: RegisterT, b: RegisterT) -> None:
        self.emit(Instruction.create_reg_reg(Code.CMP_RM64_R64, a, b))

    def dec(self, reg: RegisterT) -> None:
        self.emit(Instruction.create_reg(Code.DEC_RM64, reg))

    def shr(self, reg: RegisterT, count: int) -> None:
        self.emit(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, reg, count))

    def jne(self, label: int) -> None:
        self.emit(Instruction.create_branch(Code.JNE_REL32_64, label))

    def jmp(self, label: int) -> None:
        self.emit(Instruction.create_branch(Code.JMP_REL32_64, label))

    def out(self, port: int) -> None:
        """out imm8, eax"""
        self.emit(Instruction.create_u32_reg(Code.OUT_IMM8_EAX, port, R.EAX))

    def plain(self, code: CodeT) -> None:
        self.emit(Instruction.create(code))

    def encode(self, base: int) -> bytes:
        if self._pending is not None:
            self.plain(Code.NOPD)
        encoder = BlockEncoder(64)
        encoder.add_many(self.instructions)
        return bytes(encoder.encode(base))


MIGRATION_CONTROLS = p.MIGRATION_CONTROLS


class Compiler:
    def __init__(self, hypercall_abi: str = "vmcall", migration_control: str = "port") -> None:
        if hypercall_abi not in HYPERCALL_ABIS:
            raise ValueError(f"hypercall ABI {hypercall_abi!r} not one of {HYPERCALL_ABIS}")
        if migration_control not in MIGRATION_CONTROLS:
            raise ValueError(f"migration control {migration_control!r} not one of "
                             f"{MIGRATION_CONTROLS}")
        self.abi = hypercall_abi
        self.migration_control = migration_control
        self.asm = _Assembler()
        self._depth = 0

    def compile(self, prog: p.Program) -> GuestImage:
        for step in prog.steps:
            self._step(step)
        return GuestImage(self.asm.encode(CODE), 0, prog, self.abi, self.migration_control)

    # --- steps ------------------------------------------------------------------------------
    def _step(self, step: p.Step) -> None:
        match step:
            case p.WritePattern():
                self._write_pattern(step)
            case p.VerifyPattern():
                self._verify_pattern(step)
            case p.ReadValue(gpa=gpa):
                self.asm.mov_imm(R.RDI, gpa)
                self.asm.load(R.R8, R.RDI)
                self._report_r8()
            case p.Report(value=value):
                self.asm.mov_imm(R.R8, value)
                self._report_r8()
            case p.Tick():
                self.asm.out(p.PORT_TICK)
            case p.SetCBit():
                raise ValueError("SetCBit changes an SEV guest's C-bit; guestmem compiles "
                                 "for hosts without SEV (the model runs it)")
            case p.Checkpoint(label=label):
                self.asm.mov_imm(R.RAX, label)
                self.asm.out(p.PORT_CHECKPOINT)
            case p.MigrationReady() if self.migration_control == "wrmsr":
                self.asm.mov_imm(R.RCX, uapi.MSR_KVM_MIGRATION_CONTROL)
                self.asm.mov_imm(R.RAX, uapi.KVM_MIGRATION_READY)
                self.asm.mov_imm(R.RDX, 0)
                self.asm.plain(Code.WRMSR)
            case p.MigrationReady():
                self.asm.mov_imm(R.RAX, uapi.KVM_MIGRATION_READY)
                self.asm.out(p.PORT_MIGRATION_CONTROL)
            case p.MapGpaRange():
                self._map_gpa_range(step)
            case p.Loop():
                self._loop(step)
            case p.Halt():
                self._halt()
            case _:
                raise TypeError(f"unknown step {step!r}")

    def _pattern_registers(self, gpa: int, length: int, value: int, step: int) -> None:
        a = self.asm
        a.mov_imm(R.RDI, gpa)
        a.mov_imm(R.RCX, p.pattern_words(gpa, length))
        a.mov_imm(R.RAX, value)
        a.mov_imm(R.RDX, step)

    def _write_pattern(self, s: p.WritePattern) -> None:
        a = self.asm
        self._pattern_registers(s.gpa, s.length, s.value, s.step)
        top = a.label()
        a.bind(top)
        a.store(R.RDI, R.RAX)
        a.add(R.RAX, R.RDX)
        a.add_imm(R.RDI, 8)
        a.dec(R.RCX)
        a.jne(top)

    def _verify_pattern(self, s: p.VerifyPattern) -> None:
        a = self.asm
        self._pattern_registers(s.gpa, s.length, s.value, s.step)
        top, bad, done = a.label(), a.label(), a.label()
        a.bind(top)
        a.load(R.RBX, R.RDI)
        a.cmp(R.RBX, R.RAX)
        a.jne(bad)
        a.add(R.RAX, R.RDX)
        a.add_imm(R.RDI, 8)
        a.dec(R.RCX)
        a.jne(top)
        a.mov_imm(R.R8, p.VERIFY_OK)
        self._report_r8()
        a.jmp(done)
        a.bind(bad)
        a.mov_imm(R.R8, p.MISMATCH_TAG)
        self._report_r8()
        a.mov(R.R8, R.RDI)
        self._report_r8()
        a.mov(R.R8, R.RBX)
        self._report_r8()
        a.bind(done)

    def _map_gpa_range(self, s: p.MapGpaRange) -> None:
        a = self.asm
        a.mov_imm(R.RAX, uapi.KVM_HC_MAP_GPA_RANGE)
        a.mov_imm(R.RBX, s.gpa)
        a.mov_imm(R.RCX, s.npages)
        a.mov_imm(R.RDX, s.attrs)
        if self.abi == "port":
            a.out(p.PORT_HYPERCALL)
        else:
            a.plain(Code.VMCALL if self.abi == "vmcall" else Code.VMMCALL)
        a.mov(R.R8, R.RAX)
        self._report_r8()

    def _loop(self, s: p.Loop) -> None:
        if self._depth >= len(_LOOP_REGISTERS):
            raise ValueError(f"loops nest at most {len(_LOOP_REGISTERS)} deep")
        if s.count <= 0:
            return
        a = self.asm
        counter = _LOOP_REGISTERS[self._depth]
        self._depth += 1
        a.mov_imm(counter, s.count)
        top = a.label()
        a.bind(top)
        for inner in s.body:
            self._step(inner)
        a.dec(counter)
        a.jne(top)
        self._depth -= 1

    def _report_r8(self) -> None:
        """Send r8 as two 32-bit OUTs (low to PORT_REPORT_LO, high to PORT_REPORT_HI)."""
        a = self.asm
        a.mov(R.RAX, R.R8)
        a.out(p.PORT_REPORT_LO)
        a.shr(R.RAX, 32)
        a.out(p.PORT_REPORT_HI)

    def _halt(self) -> None:
        a = self.asm
        spin = a.label()
        a.mov_imm(R.RAX, 0)
        a.bind(spin)
        a.out(p.PORT_DONE)
        a.jmp(spin)  # a VMM that resumes anyway gets PORT_DONE again


def compile_program(prog: p.Program, hypercall_abi: str = "vmcall",
                    migration_control: str = "port") -> GuestImage:
    """`migration_control`: how MigrationReady reaches the VMM, the doorbell port or
    a WRMSR of MSR_KVM_MIGRATION_CONTROL (which only CPL0 code may execute)."""
    return Compiler(hypercall_abi, migration_control).compile(prog)


def default_hypercall_abi(caps: Capabilities, cpl: int | None = None) -> str:
    """How a guest at `cpl` (default: the VMM's, caps.execution.default_cpl) reaches
    the VMM: the CPU vendor's own instruction where a hypercall exits to
    userspace, else the "port" doorbell (kvm_pvm; any CPL3 guest)."""
    execution = caps.execution
    level = execution.default_cpl if cpl is None else cpl
    return execution.native_hypercall if execution.hypercall_exits_at(level) else "port"
