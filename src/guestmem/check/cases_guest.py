"""Cases that run a guest program on guest_memfd memory (through the VMM).

Ported from guest_memfd_test.c test_guest_memfd_guest and the punch-hole /
lifetime rules of upstream.md §2.5, §2.9 and §2.10, on the real kernel.
"""

from __future__ import annotations

import errno

from guestmem import program as p
from guestmem import uapi
from guestmem.check.suite import Ctx, case, needs_guests
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
HIGH = 1 << 32  # selftests put guest_memfd memory at 4 GiB
MB2 = 2 << 20
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def _run(ctx: Ctx, vmm: Vmm, *steps: p.Step) -> object:
    image = compile_program(p.Program.of(*steps), default_hypercall_abi(ctx.caps.implementation))
    vmm.load(image)
    return vmm.run()


@case("guest.memfd_guest", "guest_memfd_test.c test_guest_memfd_guest",
      "host writes 0xaa via mmap, guest at 4 GiB reads it and writes 0xff, host sees 0xff",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def memfd_guest(ctx: Ctx) -> None:
    aa, ff = 0xAAAAAAAAAAAAAAAA, 0xFFFFFFFFFFFFFFFF
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(HIGH, PS)
        region.mapping.write(0, b"\xaa" * PS)
        result = _run(ctx, vmm, p.VerifyPattern(HIGH, PS, aa), p.WritePattern(HIGH, PS, ff))
        ctx.equal("guest run", "done", result.stop)
        ctx.equal("guest verified 0xaa", [p.VERIFY_OK], result.reports)
        with region.gmem.mmap(PS) as again:
            ctx.bytes_equal("host re-mmap sees 0xff", again, 0, b"\xff" * PS)


@case("guest.high_gpa", "issue 2 (memory above 4 GiB, both KVM memory paths)",
      "guest writes a pattern over 2 MiB at 4 GiB and 8 GiB, verifies it, host reads it back",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def high_gpa(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        for gpa in (HIGH, 2 * HIGH):
            vmm.add_memory(gpa, MB2)
        steps = []
        for i, gpa in enumerate((HIGH, 2 * HIGH)):
            steps += [p.WritePattern(gpa, MB2, 0x1000 * (i + 1), 1),
                      p.VerifyPattern(gpa, MB2, 0x1000 * (i + 1), 1)]
        result = _run(ctx, vmm, *steps)
        ctx.equal("guest verified both ranges", [p.VERIFY_OK, p.VERIFY_OK], result.reports)
        last = (MB2 // 8) - 1
        ctx.equal("host reads the last word at 8 GiB",
                  p.pattern_word(0x2000, 1, last).to_bytes(8, "little"),
                  vmm.read(2 * HIGH + MB2 - 8, 8))


@case("guest.punch_hole_zeroes", "guest_memfd_test.c mmap_supported; "
      "private_mem_conversions_test.c guest_test_punch_hole",
      "after PUNCH_HOLE of a page the guest reads zeros there, the rest keeps its data",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def punch_hole_zeroes(ctx: Ctx) -> None:
    value = 0x5151515151515151
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(HIGH, 4 * PS)
        first = _run(ctx, vmm, p.WritePattern(HIGH, 4 * PS, value))
        ctx.equal("guest wrote", "done", first.stop)
        ctx.ok("punch page 1", region.gmem.punch_hole, PS, PS)
        second = _run(ctx, vmm, p.VerifyPattern(HIGH + PS, PS, 0), p.VerifyPattern(HIGH, PS, value),
                      p.VerifyPattern(HIGH + 2 * PS, 2 * PS, value))
        ctx.equal("zeros in the hole, data around it", [p.VERIFY_OK] * 3, second.reports)
        ctx.bytes_equal("host sees the hole too", region.mapping, PS, bytes(PS))


@case("guest.closed_gmem_memory_fault", "upstream.md §2.9/§2.10 (kvm_gmem_get_pfn: file gone)",
      "after the guest_memfd is closed for good, KVM_RUN fails EFAULT with a MEMORY_FAULT "
      "exit naming the page (flags 0, size 4096)",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def closed_gmem_memory_fault(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(HIGH, 4 * PS)
        first = _run(ctx, vmm, p.WritePattern(HIGH, 4 * PS, 7))
        ctx.equal("guest ran while the file was open", "done", first.stop)
        # "For good": the mmap holds a file reference too, so drop both.
        region.mapping.munmap()
        region.gmem.close()
        target = HIGH + 2 * PS + 8
        result = _run(ctx, vmm, p.ReadValue(target))
        ctx.equal("run stops", "memory_fault", result.stop)
        ctx.equal("KVM_RUN errno", errno.EFAULT, result.errno)
        fault = result.memory_fault
        ctx.equal("MEMORY_FAULT (gpa, size, flags)", (target & ~(PS - 1), PS, 0),
                  (fault.gpa, fault.size, fault.flags) if fault else None)


@case("guest.anonymous_memory", "issue 2 (VMM backs memory with guest_memfd or anonymous)",
      "the same program runs on anonymous memory; host reads the guest's pattern",
      needs=(needs_guests,))
def anonymous_memory(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type, backing="anon") as vmm:
        vmm.add_memory(HIGH, MB2, backing="anon")
        result = _run(ctx, vmm, p.WritePattern(HIGH, MB2, 3, 3), p.VerifyPattern(HIGH, MB2, 3, 3))
        ctx.equal("guest verified", [p.VERIFY_OK], result.reports)
        ctx.equal("host reads word 1", (6).to_bytes(8, "little"), vmm.read(HIGH + 8, 8))
