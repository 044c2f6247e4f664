"""What a guest does, as data (layer 1).

A `Program` is a list of steps. `guestmem.guest` compiles it to x86-64 machine
code for the kernel; the model's vCPU interprets the same steps. The guest talks
to the VMM only through port I/O on the ports below and the MAP_GPA_RANGE
hypercall, so both backends produce the same exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from guestmem import uapi

# Port I/O protocol between guest programs and the VMM (our choice; the sources
# leave it open). Every report is a 64-bit value sent as two 32-bit OUTs.
PORT_REPORT_LO: Final = 0xE0
PORT_REPORT_HI: Final = 0xE4
PORT_TICK: Final = 0xE8  # one exit, counted by the VMM (benchmarks)
# Hypercall doorbell (guestmem extension, "port" ABI): `out PORT_HYPERCALL, eax` with
# the upstream hypercall registers (RAX=nr, RBX, RCX, RDX, RSI); the VMM reads them
# with KVM_GET_REGS and answers in RAX with KVM_SET_REGS. For hosts whose KVM cannot
# deliver KVM_EXIT_HYPERCALL to userspace (this project's kvm_pvm host: README).
PORT_HYPERCALL: Final = 0xEC
PORT_DONE: Final = 0xF4
# How a compiled guest makes a hypercall (guest.default_hypercall_abi chooses) and
# how it writes MSR_KVM_MIGRATION_CONTROL: the doorbell port, or WRMSR (CPL0 only).
HYPERCALL_ABIS: Final = ("port", "vmcall", "vmmcall")
MIGRATION_CONTROLS: Final = ("port", "wrmsr")
# A numbered point in the program where the VMM may act (a migration step) and
# where the vCPU can be paused and continued elsewhere: `out PORT_CHECKPOINT, eax`.
PORT_CHECKPOINT: Final = 0xF8
# The guest's MSR_KVM_MIGRATION_CONTROL write (guestmem extension, "port" doorbell):
# `out PORT_MIGRATION_CONTROL, eax` with the MSR's value in EAX (KVM_MIGRATION_READY
# = 1). For hosts where the WRMSR cannot reach the VMM (README).
PORT_MIGRATION_CONTROL: Final = 0xFC

# Report tags: the low 32 bits say what a report is, the high 32 bits carry data
# that fits (a step index); full 64-bit values go in a following report.
VERIFY_OK: Final = 0x0
MISMATCH_TAG: Final = 0x4D49534D  # "MSIM": next two reports are the address and the word read


def pattern_word(value: int, step: int, index: int) -> int:
    """The 64-bit word a pattern puts at word `index` of its range."""
    return (value + index * step) & 0xFFFF_FFFF_FFFF_FFFF


def pattern_words(gpa: int, length: int) -> int:
    """The 64-bit words of a pattern range, which the guest code reads and writes
    whole: ValueError unless the range is 8-byte aligned and not empty."""
    if gpa % 8 or length % 8 or length <= 0:
        raise ValueError(f"pattern range [{gpa:#x}, +{length:#x}) must be 8-byte aligned")
    return length // 8


@dataclass(frozen=True)
class WritePattern:
    """Write word i = value + i*step (64-bit words) over [gpa, gpa+length)."""

    gpa: int
    length: int
    value: int
    step: int = 0

    def __post_init__(self) -> None:
        pattern_words(self.gpa, self.length)  # both backends refuse what x86 code cannot do


@dataclass(frozen=True)
class VerifyPattern:
    """Check [gpa, gpa+length) holds the pattern; report VERIFY_OK, or
    MISMATCH_TAG then the first bad address then the word found there."""

    gpa: int
    length: int
    value: int
    step: int = 0

    def __post_init__(self) -> None:
        pattern_words(self.gpa, self.length)


@dataclass(frozen=True)
class ReadValue:
    """Read the 64-bit word at gpa and report it."""

    gpa: int


@dataclass(frozen=True)
class Report:
    """Report a constant (a marker the host can wait for)."""

    value: int


@dataclass(frozen=True)
class MapGpaRange:
    """KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs) and report the value it returns.

    `npages` counts 4 KiB pages whatever the page size; `page_size` (4K/2M/1G in
    bytes) is only the guest's hint (Documentation/virt/kvm/x86/hypercalls.rst);
    `encrypted` asks for private memory. `flags`, if given, is the attrs argument
    as is, for a VMM that reads its own bits there (KVM passes attrs through
    unchecked; private_mem_conversions_test does this, guestmem's Vmm with
    conversion="guest-flags")."""

    gpa: int
    npages: int
    page_size: int = uapi.PAGE_SIZE
    encrypted: bool = True
    flags: int | None = None
    # The guest also sets its C-bit (SEV) on the pages it announces, as Linux's
    # set_memory_decrypted does; False announces only (R1's rounding bug: the
    # hypercall covers a page the guest did not convert).
    sets_view: bool = True

    @property
    def attrs(self) -> int:
        if self.flags is not None:
            return self.flags
        size_bits = {
            4096: uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
            2 << 20: uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
            1 << 30: uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
        }
        if self.page_size not in size_bits:
            raise ValueError(f"page_size must be 4K, 2M or 1G, not {self.page_size}")
        enc = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if self.encrypted else 0
        return size_bits[self.page_size] | enc


@dataclass(frozen=True)
class Tick:
    """One port-I/O exit the VMM only counts (exits-per-second benchmarks)."""


@dataclass(frozen=True)
class SetCBit:
    """SEV: set (encrypted) or clear the C-bit of [gpa, +npages pages) in the
    guest's own page tables, without telling the host (seed 001 #1: the guest
    writes under the new C-bit before its hypercall). Model only: no SEV guest
    runs on the kernels guestmem compiles for."""

    gpa: int
    npages: int
    encrypted: bool


@dataclass(frozen=True)
class Checkpoint:
    """Tell the VMM the program reached point `label` (one port-I/O exit). A
    top-level checkpoint is where a migration may pause the vCPU."""

    label: int


@dataclass(frozen=True)
class MigrationReady:
    """Write KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL: "every shared region
    has been reported" (commit f4495615d76c, ecosystem.md §3.1), through the
    VMM's doorbell port where the WRMSR cannot reach it."""


@dataclass(frozen=True)
class Loop:
    """Repeat the inner steps `count` times (for benchmarks: exits per second)."""

    count: int
    body: tuple[Step, ...]


@dataclass(frozen=True)
class Halt:
    """Stop: tell the VMM through PORT_DONE (HLT is not usable at CPL3)."""


Step = (WritePattern | VerifyPattern | ReadValue | Report | MapGpaRange | SetCBit | Tick
        | Checkpoint | MigrationReady | Loop | Halt)


@dataclass(frozen=True)
class Program:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, *steps: Step) -> Program:
        if not steps or not isinstance(steps[-1], Halt):
            steps = (*steps, Halt())
        return cls(tuple(steps))


_STEP_TYPES: Final = {cls.__name__: cls for cls in (
    WritePattern, VerifyPattern, ReadValue, Report, MapGpaRange, SetCBit, Tick, Checkpoint,
    MigrationReady, Loop, Halt)}


def encode_program(program: Program) -> list[object]:
    """The program as JSON-able data: [step name, fields] per step (a migrated
    model vCPU carries it, as a real guest's code travels in its memory)."""
    def step(s: Step) -> list[object]:
        fields = {k: (encode_program(Program(v)) if k == "body" else v)
                  for k, v in vars(s).items()}
        return [type(s).__name__, fields]
    return [step(s) for s in program.steps]


def decode_program(data: object) -> Program:
    """encode_program's inverse; ValueError (or TypeError) for anything else."""
    if not isinstance(data, list):
        raise ValueError("a program is a list of steps")
    steps: list[Step] = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in _STEP_TYPES
                and isinstance(item[1], dict)):
            raise ValueError(f"not a step: {item!r}")
        fields = dict(item[1])
        if "body" in fields:
            fields["body"] = decode_program(fields["body"]).steps
        steps.append(_STEP_TYPES[item[0]](**fields))
    return Program(tuple(steps))
