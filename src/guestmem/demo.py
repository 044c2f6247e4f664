"""`guestmem demo`: a real guest on guest_memfd memory, step by step.

A scenario over the VMM and guest layers; it yields (title, detail, ok) steps
and the CLI prints them. Every claim a step makes is checked, not assumed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

from guestmem import api, uapi
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Sharing, Vmm

HIGH = 1 << 32
SIZE = 2 << 20
PS = uapi.PAGE_SIZE
PATTERN = 0x6775657374000000  # "guest" << 24, plus the word index


@dataclass(frozen=True)
class Step:
    title: str
    detail: str
    ok: bool = True


def _guest(vmm: Vmm, abi: str, *steps: p.Step) -> RunResult:
    vmm.load(compile_program(p.Program.of(*steps), abi))
    return vmm.run()


def _ret(value: int) -> str:
    signed = value - (1 << 64) if value >> 63 else value
    names = {0: "0 (success)", -uapi.KVM_EPERM: "-KVM_EPERM", -uapi.KVM_EINVAL: "-KVM_EINVAL",
             -uapi.KVM_ENOSYS: "-KVM_ENOSYS"}
    return names.get(signed, str(signed))


def run(kvm: api.Kvm) -> Iterator[Step]:
    caps = kvm.capabilities
    abi = default_hypercall_abi(caps)
    execution = caps.execution
    yield Step("host", f"{kvm.backend} backend, {caps.implementation} on "
                       f"{execution.cpu_vendor}, guest_memfd flags {caps.guest_memfd_flags:#x}, "
                       f"guest at CPL{execution.default_cpl}, hypercall ABI '{abi}'")
    with Vmm(kvm) as vmm:
        region = vmm.add_memory(HIGH, SIZE)
        yield Step("memory", f"guest_memfd of {SIZE >> 20} MiB (MMAP|INIT_SHARED) bound at GPA "
                             f"{HIGH:#x} as memslot {region.slot}; userspace_addr = its own mmap")

        r = _guest(vmm, abi, p.WritePattern(HIGH, SIZE, PATTERN, 1),
                   p.VerifyPattern(HIGH, SIZE, PATTERN, 1))
        yield Step("guest writes and verifies", f"{SIZE >> 20} MiB at {HIGH:#x}: guest reported "
                   f"{'OK' if r.reports == [p.VERIFY_OK] else r.reports} in {r.exits} exits",
                   r.reports == [p.VERIFY_OK])

        words = [int.from_bytes(vmm.read(HIGH + 8 * i, 8), "little") for i in range(3)]
        expected = [p.pattern_word(PATTERN, 1, i) for i in range(3)]
        yield Step("host reads through the mmap",
                   "first words " + ", ".join(f"{w:#x}" for w in words), words == expected)

        r = _guest(vmm, abi, p.MapGpaRange(HIGH, SIZE // PS, SIZE, encrypted=True),
                   p.MapGpaRange(HIGH + PS, 1, PS, encrypted=False))
        yield from _conversions(vmm, r, abi)

        region.guest_memfd.punch_hole(0, PS)
        r = _guest(vmm, abi, p.VerifyPattern(HIGH, PS, 0),
                   p.VerifyPattern(HIGH + PS, SIZE - PS, p.pattern_word(PATTERN, 1, PS // 8), 1))
        yield Step("PUNCH_HOLE page 0", "guest now reads zeros there and the pattern elsewhere: "
                   f"{'OK' if r.reports == [p.VERIFY_OK] * 2 else r.reports}",
                   r.reports == [p.VERIFY_OK] * 2)

        region.mapping.munmap()
        region.guest_memfd.close()
        r = _guest(vmm, abi, p.ReadValue(HIGH + 3 * PS))
        fault = r.memory_fault
        good = r.errno == errno.EFAULT and fault is not None and fault.gpa == HIGH + 3 * PS
        detail = (f"KVM_RUN failed with {errno.errorcode.get(r.errno or 0, r.errno)}, "
                  f"MEMORY_FAULT gpa={fault.gpa:#x} size={fault.size:#x} flags={fault.flags:#x}"
                  if fault else f"run ended with {r.stop}")
        yield Step("guest_memfd closed for good", detail, good)


def _conversions(vmm: Vmm, r: RunResult, abi: str) -> Iterator[Step]:
    """MAP_GPA_RANGE: what the guest got back, and what reached the VMM's tracker."""
    rets = ", ".join(_ret(v) for v in r.reports)
    path = ("through guestmem's port doorbell (this KVM cannot deliver KVM_EXIT_HYPERCALL)"
            if abi == "port" else f"as KVM_EXIT_HYPERCALL ({abi})")
    private = [(hex(a), hex(s)) for a, s in vmm.tracker.ranges(Sharing.PRIVATE)]
    expected = [(hex(HIGH), hex(PS)), (hex(HIGH + 2 * PS), hex(SIZE - 2 * PS))]
    yield Step("MAP_GPA_RANGE", f"guest asked for 2 MiB private, then page 1 shared, {path}; "
               f"guest got {rets}; tracker's private ranges: {private}",
               private == expected and all(v == 0 for v in r.reports))
