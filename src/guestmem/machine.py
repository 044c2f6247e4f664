"""The x86-64 machine a guest program starts in: memory layout, page tables, GDT,
and the initial register state. The VMM's job, as kvm_util's vm_create does for
the selftests.

Guests run in 64-bit mode with identity-mapped page tables (2 MiB pages, U/S=1)
and RFLAGS.IOPL=3, at CPL0 or CPL3: the VMM picks CPL0 unless the host's KVM
emulates CPL0 code (kvm_pvm runs only 64-bit CPL3 code natively:
caps.GuestExecution.default_cpl). IOPL=3 makes port I/O at CPL3 exit to
userspace instead of raising #GP.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from guestmem import uapi
from guestmem.program import Program

# --- layout of the low memory slot at GPA 0 (our choice) ---------------------------------
LOW_MEMORY_SIZE: Final = 4 << 20
PML4: Final = 0x1000
PDPT: Final = 0x2000
PD_BASE: Final = 0x3000  # one page directory per GiB, 2 MiB entries
IDENTITY_MAP_GIB: Final = 64  # identity map GPAs [0, 64 GiB)
GDT: Final = PD_BASE + IDENTITY_MAP_GIB * 0x1000
IDT: Final = GDT + 0x1000
CODE: Final = 0x100000
CODE_LIMIT: Final = 0x300000
STACK_TOP: Final = 0x400000 - 0x1000

# Selectors of the host Linux GDT layout (arch/x86/include/asm/segment.h): PVM runs
# the guest on the host's GDT, so the guest's own GDT mirrors it and the emulator
# and the hardware agree on what a selector means.
KERNEL_CS: Final = 0x10
KERNEL_DS: Final = 0x18
USER32_CS: Final = 0x23
USER_DS: Final = 0x2B
USER_CS: Final = 0x33

PTE_PRESENT, PTE_WRITE, PTE_USER, PTE_HUGE = 1, 2, 4, 0x80
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1, 2, 0x10, 0x20, 0x10000, 0x40000, 0x80000000)
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1, 0x100, 0x400, 0x800
RFLAGS_FIXED, RFLAGS_IF, RFLAGS_IOPL3 = 0x2, 0x200, 0x3000


@dataclass(frozen=True)
class GuestImage:
    """What the VMM loads: machine code placed at CODE, entered at CODE+entry,
    plus the program it was compiled from (the model's vCPU runs that)."""

    code: bytes
    entry: int
    program: Program | None  # None: raw machine code, which only a real vCPU runs
    hypercall_abi: str
    # How MigrationReady reaches the VMM: "port" (the doorbell, any CPL) or "wrmsr"
    # (MSR_KVM_MIGRATION_CONTROL itself, through KVM_EXIT_X86_WRMSR: CPL0 only)
    migration_control: str = "port"


@functools.cache
def page_tables() -> tuple[tuple[int, bytes], ...]:
    """(gpa, bytes) of identity page tables for [0, IDENTITY_MAP_GIB GiB); a constant."""
    flags = PTE_PRESENT | PTE_WRITE | PTE_USER
    pml4 = struct.pack("<Q", PDPT | flags)
    pdpt = b"".join(struct.pack("<Q", (PD_BASE + i * 0x1000) | flags)
                    for i in range(IDENTITY_MAP_GIB))
    pds = b"".join(
        struct.pack("<Q", ((gib << 30) + (i << 21)) | flags | PTE_HUGE)
        for gib in range(IDENTITY_MAP_GIB)
        for i in range(512)
    )
    return ((PML4, pml4), (PDPT, pdpt), (PD_BASE, pds))


def _descriptor(typ: int, dpl: int, long: int, db: int) -> bytes:
    """A flat 4 GiB code/data descriptor (S=1, P=1, G=1)."""
    limit, base = 0xFFFFF, 0
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = (((base >> 16) & 0xFF) | (typ << 8) | (1 << 12) | (dpl << 13) | (1 << 15)
          | (((limit >> 16) & 0xF) << 16) | (long << 21) | (db << 22) | (1 << 23)
          | (((base >> 24) & 0xFF) << 24))
    return struct.pack("<II", lo, hi)


@functools.cache
def gdt() -> bytes:
    entries = [bytes(8)] * 8
    entries[KERNEL_CS >> 3] = _descriptor(0xB, 0, 1, 0)
    entries[KERNEL_DS >> 3] = _descriptor(0x3, 0, 0, 1)
    entries[USER32_CS >> 3] = _descriptor(0xB, 3, 0, 1)
    entries[USER_DS >> 3] = _descriptor(0x3, 3, 0, 1)
    entries[USER_CS >> 3] = _descriptor(0xB, 3, 1, 0)
    return b"".join(entries)


def low_memory_contents(image: GuestImage) -> list[tuple[int, bytes]]:
    """Everything the VMM writes into low memory before the first KVM_RUN."""
    if CODE + len(image.code) > CODE_LIMIT:
        raise ValueError(f"guest code of {len(image.code)} bytes does not fit below "
                         f"{CODE_LIMIT:#x}")
    return [*page_tables(), (GDT, gdt()), (CODE, image.code)]


def _segment(selector: int, typ: int, dpl: int, long: int = 0, db: int = 0) -> uapi.kvm_segment:
    return uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=typ, present=1,
                            dpl=dpl, db=db, s=1, l=long, g=1)


def initial_sregs(sregs: uapi.kvm_sregs, cpl: int = 3) -> uapi.kvm_sregs:
    """64-bit state at `cpl` (0 or 3): flat segments, paging on, long mode active."""
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    code, data_sel = (USER_CS, USER_DS) if cpl == 3 else (KERNEL_CS, KERNEL_DS)
    sregs.cs = _segment(code, 0xB, cpl, long=1)
    data = _segment(data_sel, 0x3, cpl, db=1)
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = data
    sregs.tr = uapi.kvm_segment(base=0, limit=0x67, selector=0, type=0xB, present=1)
    sregs.ldt = uapi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1)
    sregs.gdt.base, sregs.gdt.limit = GDT, len(gdt()) - 1
    sregs.idt.base, sregs.idt.limit = IDT, 0xFFF
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = PML4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NX
    return sregs


def initial_regs(image: GuestImage) -> uapi.kvm_regs:
    regs = uapi.kvm_regs()
    regs.rip = CODE + image.entry
    regs.rsp = STACK_TOP
    regs.rflags = RFLAGS_FIXED | RFLAGS_IF | RFLAGS_IOPL3
    return regs
