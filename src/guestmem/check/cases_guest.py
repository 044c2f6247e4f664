"""Cases that run a guest program on guest_memfd memory (through the VMM).

Ported from guest_memfd_test.c test_guest_memfd_guest and the punch-hole /
lifetime rules of upstream.md §2.5, §2.9 and §2.10, on the real kernel.
"""

from __future__ import annotations

import errno
import mmap
import os

from guestmem import machine, uapi
from guestmem import program as p
from guestmem.caps import Capabilities, HypercallOutcome
from guestmem.check.suite import CaseSkipped, Ctx, case, needs_exit_hypercall, needs_guests
from guestmem.exits import Exit, HypercallExit, MmioExit
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Sharing, Vmm

PS = uapi.PAGE_SIZE
HIGH = 1 << 32  # selftests put guest_memfd memory at 4 GiB
MB2 = 2 << 20
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def _run(ctx: Ctx, vmm: Vmm, *steps: p.Step) -> RunResult:
    image = compile_program(p.Program.of(*steps), default_hypercall_abi(ctx.caps, vmm.cpl))
    vmm.load(image)
    return vmm.run()


@case("guest.memfd_guest", "guest_memfd_test.c test_guest_memfd_guest",
      "a 1-page MMAP|INIT_SHARED guest_memfd bound at 4 GiB with userspace_addr NULL; the "
      "host fills 0xaa through an mmap and unmaps it; the guest reads 0xaa, writes 0xff; "
      "a new mmap sees 0xff", needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def memfd_guest(ctx: Ctx) -> None:
    """Upstream's only guest on MMAP guest_memfd: a guest_memfd-only memslot (slot 1)
    with no userspace_addr at all, so every guest access takes its pages from the
    file (kvm_gmem_get_pfn); guest code, stack and page tables stay in slot 0."""
    aa, ff = 0xAAAAAAAAAAAAAAAA, 0xFFFFFFFFFFFFFFFF
    with Vmm(ctx.kvm, ctx.vm_type) as vmm, vmm.vm.create_guest_memfd(PS, MMAP_SHARED) as gmem:
        ctx.ok("slot 1 at 4 GiB, userspace_addr NULL", vmm.vm.set_user_memory_region2, 1,
               uapi.KVM_MEM_GUEST_MEMFD, HIGH, PS, 0, gmem, 0)
        with gmem.mmap(PS) as mem:
            mem.fill(0, 0xAA, PS)
        result = _run(ctx, vmm, p.VerifyPattern(HIGH, PS, aa), p.WritePattern(HIGH, PS, ff))
        ctx.equal("guest run (UCALL_DONE)", "done", result.stop)
        ctx.equal("guest verified 0xaa", [p.VERIFY_OK], result.reports)
        with gmem.mmap(PS) as again:
            ctx.bytes_equal("host re-mmap sees 0xff", again, 0, b"\xff" * PS)


def needs_default_vm(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    return None if vm_type == uapi.KVM_X86_DEFAULT_VM else "case is for the default VM type"


@case("guest.default_vm_flags", "guest_memfd_test.c test_guest_memfd_guest (its TEST_ASSERTs "
      "on the VM)", "where KVM_CAP_GUEST_MEMFD_FLAGS is nonzero at system scope, a default "
      "VM's KVM_CAP_GUEST_MEMFD_FLAGS includes MMAP and INIT_SHARED",
      needs=(needs_default_vm,))
def default_vm_flags(ctx: Ctx) -> None:
    if not ctx.kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS):
        raise CaseSkipped("KVM_CAP_GUEST_MEMFD_FLAGS=0 at system scope (upstream returns early)")
    with ctx.vm(uapi.KVM_X86_DEFAULT_VM) as vm:
        supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        ctx.equal("Default VM type should support MMAP", uapi.GUEST_MEMFD_FLAG_MMAP,
                  supported & uapi.GUEST_MEMFD_FLAG_MMAP)
        ctx.equal("Default VM type should support INIT_SHARED",
                  uapi.GUEST_MEMFD_FLAG_INIT_SHARED, supported & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)


@case("guest.high_gpa", "issue 2 (memory above 4 GiB, both KVM memory paths)",
      "guest writes a pattern over 2 MiB at 4 GiB and 8 GiB, verifies it, host reads it back",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def high_gpa(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        for gpa in (HIGH, 2 * HIGH):
            vmm.add_memory(gpa, MB2)
        steps: list[p.Step] = []
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
        ctx.ok("punch page 1", region.guest_memfd.punch_hole, PS, PS)
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
        region.guest_memfd.close()
        target = HIGH + 2 * PS + 8
        result = _run(ctx, vmm, p.ReadValue(target))
        ctx.equal("run stops", "memory_fault", result.stop)
        ctx.equal("KVM_RUN errno", errno.EFAULT, result.errno)
        fault = result.memory_fault
        ctx.equal("MEMORY_FAULT (gpa, size, flags)", (target & ~(PS - 1), PS, 0),
                  (fault.gpa, fault.size, fault.flags) if fault else None)


@case("guest.delete_and_rebind", "upstream.md §2.9 (delete memslot: kvm_gmem_unbind keeps pages)",
      "delete a guest_memfd slot and bind another file at the same GPA: the guest sees the "
      "new file; the old file keeps the data the guest wrote; rebinding it brings it back",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def delete_and_rebind(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        first = vmm.add_memory(HIGH, PS)
        ctx.equal("guest writes through the first file", "done",
                  _run(ctx, vmm, p.WritePattern(HIGH, PS, 0xA1, 1)).stop)
        second = vmm.add_memory(2 * HIGH, PS)  # a second file, bound elsewhere for now
        vm = vmm.vm
        ctx.ok("delete the first slot", vm.delete_memslot, first.slot)
        ctx.ok("delete the second slot", vm.delete_memslot, second.slot)
        gmem_flags = uapi.KVM_MEM_GUEST_MEMFD
        ctx.ok("bind the second file at the first GPA", vm.set_user_memory_region2, first.slot,
               gmem_flags, HIGH, PS, second.mapping.addr, second.guest_memfd, 0)
        ctx.equal("guest sees the new, untouched file", [p.VERIFY_OK],
                  _run(ctx, vmm, p.VerifyPattern(HIGH, PS, 0)).reports)
        ctx.bytes_equal("the old file kept the guest's data", first.mapping, 8,
                        (0xA2).to_bytes(8, "little"))
        ctx.ok("delete again", vm.delete_memslot, first.slot)
        ctx.ok("rebind the first file", vm.set_user_memory_region2, first.slot, gmem_flags,
               HIGH, PS, first.mapping.addr, first.guest_memfd, 0)
        ctx.equal("guest sees its old data again", [p.VERIFY_OK],
                  _run(ctx, vmm, p.VerifyPattern(HIGH, PS, 0xA1, 1)).reports)


@case("guest.dirty_log", "KVM_GET_DIRTY_LOG (kvm_get_dirty_log); observed on 6.18",
      "a LOG_DIRTY_PAGES slot logs exactly the pages the guest wrote; reading the log "
      "clears it; host writes are not logged", needs=(needs_guests,))
def dirty_log(ctx: Ctx) -> None:
    npages = 16
    with Vmm(ctx.kvm, ctx.vm_type, backing="anon") as vmm:
        region = vmm.add_memory(HIGH, npages * PS, backing="anon")
        vm = vmm.vm
        vm.delete_memslot(region.slot)
        ctx.ok("slot with LOG_DIRTY_PAGES", vm.set_user_memory_region2, region.slot,
               uapi.KVM_MEM_LOG_DIRTY_PAGES, HIGH, npages * PS, region.mapping.addr)

        def dirty() -> list[int]:
            bitmap = int.from_bytes(vm.get_dirty_log(region.slot, npages), "little")
            return [i for i in range(npages) if bitmap >> i & 1]

        ctx.equal("nothing dirty yet", [], dirty())
        # Writes only: on shadow-paging hosts (PVM) a later read in the same guest
        # 2 MiB page is logged too, once the write set that guest PTE's dirty bit.
        _run(ctx, vmm, p.WritePattern(HIGH + 3 * PS, 8, 1),
             p.WritePattern(HIGH + 9 * PS, 2 * PS, 2))
        ctx.equal("pages the guest wrote", [3, 9, 10], dirty())
        ctx.equal("reading the log cleared it", [], dirty())
        region.mapping.write(PS, b"host")
        ctx.equal("host writes are not logged", [], dirty())
        _run(ctx, vmm, p.WritePattern(HIGH + 3 * PS, 8, 7))
        ctx.equal("a page written again is logged again", [3], dirty())


@case("guest.dirty_log_toggle", "kvm_main.c kvm_prepare_memory_region (KVM_MR_FLAGS_ONLY: "
      "the bitmap is freed when logging stops, a new one made when it starts)",
      "dirty logging turned off and on again on one slot: while off, the log is ENOENT "
      "and writes are not kept; on again, the log starts empty and logs new writes",
      needs=(needs_guests,))
def dirty_log_toggle(ctx: Ctx) -> None:
    npages, log = 16, uapi.KVM_MEM_LOG_DIRTY_PAGES
    with Vmm(ctx.kvm, ctx.vm_type, backing="anon") as vmm:
        region = vmm.add_memory(HIGH, npages * PS, backing="anon")
        vm, slot, hva = vmm.vm, region.slot, region.mapping.addr

        def dirty() -> list[int]:
            bitmap = int.from_bytes(vm.get_dirty_log(slot, npages), "little")
            return [i for i in range(npages) if bitmap >> i & 1]

        ctx.ok("logging on", vm.set_user_memory_region2, slot, log, HIGH, npages * PS, hva)
        _run(ctx, vmm, p.WritePattern(HIGH + 3 * PS, 8, 1))
        ctx.ok("logging off (flags only)", vm.set_user_memory_region2, slot, 0, HIGH,
               npages * PS, hva)
        ctx.fails("the log while off", errno.ENOENT, vm.get_dirty_log, slot, npages)
        _run(ctx, vmm, p.WritePattern(HIGH + 5 * PS, 8, 2))
        ctx.ok("logging on again", vm.set_user_memory_region2, slot, log, HIGH, npages * PS,
               hva)
        ctx.equal("a fresh log: page 3 went with the old bitmap, page 5 was not logged",
                  [], dirty())
        _run(ctx, vmm, p.WritePattern(HIGH + 7 * PS, 8, 3))
        ctx.equal("new writes are logged", [7], dirty())


@case("guest.close_while_mapped", "guest_memfd.c kvm_gmem_release (the last reference: "
      "the fd and every mapping)", "a bound guest_memfd closed while still mmapped lives on: "
      "host and guest keep using it, its closed fd number is EBADF for a new binding; once "
      "the mapping goes too, the next guest access fails EFAULT with a MEMORY_FAULT exit",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def close_while_mapped(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(HIGH, 2 * PS)
        gmem, mapping = region.guest_memfd, region.mapping
        number = gmem.fd
        ctx.equal("guest writes", "done", _run(ctx, vmm, p.WritePattern(HIGH, 8, 0xC1)).stop)
        gmem.close()
        ctx.bytes_equal("host reads through the mapping after close", mapping, 0,
                        (0xC1).to_bytes(8, "little"))
        mapping.write(8, (0xC2).to_bytes(8, "little"))
        ctx.equal("the guest reads both words", [0xC1, 0xC2],
                  _run(ctx, vmm, p.ReadValue(HIGH), p.ReadValue(HIGH + 8)).reports)
        if not _fd_is_open(number):
            ctx.fails("binding the closed fd number", errno.EBADF,
                      vmm.vm.set_user_memory_region2, 9, uapi.KVM_MEM_GUEST_MEMFD, 2 * HIGH, PS,
                      0, number, 0)
        mapping.munmap()
        result = _run(ctx, vmm, p.ReadValue(HIGH + PS))
        fault = result.memory_fault
        ctx.equal("after the last mapping: EFAULT, MEMORY_FAULT (gpa, size, flags)",
                  (errno.EFAULT, (HIGH + PS, PS, 0)),
                  (result.errno, (fault.gpa, fault.size, fault.flags) if fault else None))


def _fd_is_open(fd: int) -> bool:
    """Whether fd names an open file now (another object may have reused the number)."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@case("guest.readonly_memslot", "KVM_MEM_READONLY (observed on 6.18)",
      "a guest reads a read-only memslot; its write exits to userspace as KVM_EXIT_MMIO "
      "(is_write, gpa, the data) and memory is unchanged", needs=(needs_guests,))
def readonly_memslot(ctx: Ctx) -> None:
    if not ctx.caps.readonly_mem:
        raise CaseSkipped("KVM_CAP_READONLY_MEM=0")
    with Vmm(ctx.kvm, ctx.vm_type, backing="anon") as vmm:
        region = vmm.add_memory(HIGH, PS, backing="anon")
        vmm.vm.delete_memslot(region.slot)
        ctx.ok("recreate it READONLY", vmm.vm.set_user_memory_region2, region.slot,
               uapi.KVM_MEM_READONLY, HIGH, PS, region.mapping.addr)
        region.mapping.write(0, (77).to_bytes(8, "little"))
        ctx.equal("guest reads", [77], _run(ctx, vmm, p.ReadValue(HIGH)).reports)
        result = _run(ctx, vmm, p.WritePattern(HIGH + 8, 8, 0x55))
        x = result.exit
        observed = (result.stop, x.phys_addr, x.is_write, x.data) \
            if isinstance(x, MmioExit) else (result.stop, repr(x))
        ctx.equal("the write ends the run as MMIO",
                  ("mmio", HIGH + 8, True, (0x55).to_bytes(8, "little")), observed)
        ctx.bytes_equal("memory unchanged", region.mapping, 8, bytes(8))


@case("guest.anonymous_memory", "issue 2 (VMM backs memory with guest_memfd or anonymous)",
      "the same program runs on anonymous memory; host reads the guest's pattern",
      needs=(needs_guests,))
def anonymous_memory(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type, backing="anon") as vmm:
        vmm.add_memory(HIGH, MB2, backing="anon")
        result = _run(ctx, vmm, p.WritePattern(HIGH, MB2, 3, 3), p.VerifyPattern(HIGH, MB2, 3, 3))
        ctx.equal("guest verified", [p.VERIFY_OK], result.reports)
        ctx.equal("host reads word 1", (6).to_bytes(8, "little"), vmm.read(HIGH + 8, 8))


def _mmio(result: RunResult) -> object:
    """How a run that should end in MMIO ended: (stop, gpa, is_write, data, length)."""
    x = result.exit
    if isinstance(x, MmioExit):
        return (result.stop, x.phys_addr, x.is_write, x.data, x.length)
    return (result.stop, result.reports)


@case("guest.unbacked_gpa", "api.rst KVM_EXIT_MMIO; x86.c emulator_read_write_onepage",
      "a guest write to a GPA no memslot covers ends the run as KVM_EXIT_MMIO carrying "
      "the 8 bytes written; a read ends it as an 8-byte MMIO read", needs=(needs_guests,))
def unbacked_gpa(ctx: Ctx) -> None:
    value = 0x1122334455667788
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        ctx.equal("write", ("mmio", HIGH, True, value.to_bytes(8, "little"), 8),
                  _mmio(_run(ctx, vmm, p.WritePattern(HIGH, 8, value))))
        ctx.equal("read", ("mmio", HIGH + 8, False, b"", 8),
                  _mmio(_run(ctx, vmm, p.ReadValue(HIGH + 8))))
        ctx.equal("a program after the MMIO exit runs", [7], _run(ctx, vmm, p.Report(7)).reports)


BEYOND = machine.IDENTITY_MAP_GIB << 30


@case("guest.beyond_identity_map", "guestmem.machine page tables; SDM: #PF without an IDT "
      "is a triple fault", "a guest access above the [0, 64 GiB) its page tables map "
      "shuts the guest down (KVM_EXIT_SHUTDOWN), even with a memslot there; just below "
      "it, without a memslot, is MMIO", needs=(needs_guests,))
def beyond_identity_map(ctx: Ctx) -> None:
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        vmm.add_memory(BEYOND, PS)
        ctx.equal("read at 64 GiB", "shutdown", _run(ctx, vmm, p.ReadValue(BEYOND)).stop)
        ctx.equal("write at 64 GiB", "shutdown",
                  _run(ctx, vmm, p.WritePattern(BEYOND, 8, 1)).stop)
        ctx.equal("the last word below it, mapped but with no memslot: MMIO",
                  ("mmio", BEYOND - 8, True, (1).to_bytes(8, "little"), 8),
                  _mmio(_run(ctx, vmm, p.WritePattern(BEYOND - 8, 8, 1))))


@case("guest.memory_paths", "host-notes.md (two memory paths); x86.c "
      "emulator_read_write_onepage", "on a guest_memfd-only memslot whose userspace_addr maps "
      "other memory, code KVM runs natively reads and writes the guest_memfd, code it "
      "emulates (kvm_pvm: CPL0) goes through userspace_addr, MMIO where that is NULL; "
      "as the capability record says", needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def memory_paths(ctx: Ctx) -> None:
    in_file, elsewhere, written = 0xAAAAAAAAAAAAAAAA, 0xBBBBBBBBBBBBBBBB, 0x1111111111111111
    for cpl in (3, 0):
        emulated = cpl in ctx.caps.execution.emulated_cpls
        with (Vmm(ctx.kvm, ctx.vm_type, cpl=cpl) as vmm,
              vmm.vm.create_guest_memfd(PS, MMAP_SHARED) as gmem, gmem.mmap(PS) as file_view,
              ctx.kvm.mmap_anonymous(PS) as other):
            file_view.write(0, in_file.to_bytes(8, "little"))
            other.write(0, elsewhere.to_bytes(8, "little"))
            slot, flags = 9, uapi.KVM_MEM_GUEST_MEMFD
            vmm.vm.set_user_memory_region2(slot, flags, HIGH, PS, other.addr, gmem, 0)
            ctx.equal(f"CPL{cpl} read ({'emulated' if emulated else 'native'})",
                      [elsewhere if emulated else in_file],
                      _run(ctx, vmm, p.ReadValue(HIGH)).reports)
            vmm.vm.delete_memslot(slot)
            vmm.vm.set_user_memory_region2(slot, flags, HIGH, PS, 0, gmem, 0)
            result = _run(ctx, vmm, p.WritePattern(HIGH, 8, written), p.ReadValue(HIGH))
            if emulated:
                ctx.equal(f"CPL{cpl} write with userspace_addr 0",
                          ("mmio", HIGH, True, written.to_bytes(8, "little"), 8), _mmio(result))
            else:
                ctx.equal(f"CPL{cpl} write with userspace_addr 0", [written], result.reports)
            ctx.bytes_equal(f"CPL{cpl}: the file after the write", file_view, 0,
                            (in_file if emulated else written).to_bytes(8, "little"))


@case("guest.userspace_addr_protection", "mm/gup.c check_vma_flags; x86.c "
      "emulator_read_write_onepage (observed on 6.18)",
      "an ordinary memslot whose userspace_addr the host mprotects: a native guest access "
      "the protection forbids fails KVM_RUN with a bare EFAULT (GUP fails); one the "
      "emulator makes (kvm_pvm: CPL0) is MMIO; an allowed one works", needs=(needs_guests,))
def userspace_addr_protection(ctx: Ctx) -> None:
    for cpl in (3, 0):
        emulated = cpl in ctx.caps.execution.emulated_cpls
        refused = ("mmio",) if emulated else ("error", errno.EFAULT)
        with Vmm(ctx.kvm, ctx.vm_type, cpl=cpl) as vmm, ctx.kvm.mmap_anonymous(PS) as hva:
            hva.write(0, (41).to_bytes(8, "little"))
            vmm.vm.set_user_memory_region2(9, 0, HIGH, PS, hva.addr)
            for prot, name in ((mmap.PROT_READ, "PROT_READ"), (0, "PROT_NONE")):
                hva.mprotect(prot)
                read = _run(ctx, vmm, p.ReadValue(HIGH))
                write = _run(ctx, vmm, p.WritePattern(HIGH, 8, 42))
                ctx.equal(f"CPL{cpl} read, {name}", ("done", [41]) if prot else refused,
                          _ended(read))
                ctx.equal(f"CPL{cpl} write, {name}", refused, _ended(write))
            hva.mprotect(mmap.PROT_READ | mmap.PROT_WRITE)
            ctx.bytes_equal(f"CPL{cpl}: memory unchanged", hva, 0, (41).to_bytes(8, "little"))


def _ended(result: RunResult) -> tuple[object, ...]:
    """How a run ended, for comparing: done with reports, MMIO, or a KVM_RUN errno."""
    if result.stop == "done":
        return ("done", result.reports)
    if result.stop == "error":
        return ("error", result.errno)
    return (result.stop,)


@case("guest.page_tables", "paging_tmpl.h walk_addr_generic; mmu.c "
      "reset_guest_rsvds_bits_mask; SDM 4.5 (4-level paging)",
      "guests go through their own page tables: a 2 MiB entry remapped to other "
      "memory moves what a write reaches (an unbacked target is MMIO at the physical "
      "address, with the data of each word); a 1 GiB entry (PS in a PDPTE) works "
      "where the CPU walks the tables (TDP) and shuts the guest down where KVM does "
      "(shadow paging, the emulator: the guest's CPUID has no GBPAGES)",
      needs=(needs_guests,), flag_variants=(MMAP_SHARED,))
def page_tables(ctx: Ctx) -> None:
    flags = machine.PTE_PRESENT | machine.PTE_WRITE | machine.PTE_USER | machine.PTE_HUGE
    pd_8g = machine.PD_BASE + 8 * 0x1000  # the page directory of [8 GiB, 9 GiB)
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        region = vmm.add_memory(HIGH, MB2)
        ctx.equal("tables written", [0], _run(ctx, vmm, p.Report(0)).reports)
        vmm.write(pd_8g, (HIGH | flags).to_bytes(8, "little"))  # 8 GiB -> 4 GiB
        vmm.write(pd_8g + 8, ((10 << 30) | flags).to_bytes(8, "little"))  # -> 10 GiB: none
        crossing = _run(ctx, vmm, p.WritePattern(2 * HIGH + MB2 - 16, 32, 0x100, 1))
        ctx.equal("the write's end reaches 10 GiB: MMIO there, with its word",
                  ("mmio", 10 << 30, True, (0x102).to_bytes(8, "little"), 8), _mmio(crossing))
        ctx.bytes_equal("its start went to 4 GiB + 2 MiB - 16", region.mapping,
                        MB2 - 16, (0x100).to_bytes(8, "little") + (0x101).to_bytes(8, "little"))
        vmm.write(HIGH, (0x1234).to_bytes(8, "little"))
        vmm.write(machine.PDPT + 16 * 8, (HIGH | flags).to_bytes(8, "little"))  # 16 GiB: 1 GiB
        kvm_walks = ctx.caps.shadow_paging or vmm.cpl in ctx.caps.execution.emulated_cpls
        expected = ("shutdown",) if kvm_walks else ("done", [0x1234])
        ctx.equal("a 1 GiB page (PS in a PDPTE)", expected,
                  _ended(_run(ctx, vmm, p.ReadValue(16 << 30))))


ENC = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED


@case("hypercall.map_gpa_range", "private_mem_conversions_test.c (guest side); seed 001",
      "guest MAP_GPA_RANGE requests reach the VMM's tracker with their gpa/npages/size/"
      "encrypted values; bad ones get -KVM_EINVAL and change nothing",
      needs=(needs_guests,))
def map_gpa_range(ctx: Ctx) -> None:
    # The "port" doorbell reaches the VMM on every host (README: on kvm_pvm nothing else
    # does); the VMM validates it as __kvm_emulate_hypercall would before exiting.
    with Vmm(ctx.kvm, ctx.vm_type) as vmm:
        vmm.add_memory(HIGH, MB2)
        vmm.load(compile_program(p.Program.of(
            p.MapGpaRange(HIGH, 512, MB2, encrypted=True),
            p.MapGpaRange(HIGH + PS, 1, PS, encrypted=False),
            p.MapGpaRange(HIGH + 1, 1, PS, encrypted=False),
            p.MapGpaRange(HIGH, 1 << 30, 1 << 30, encrypted=False),
        ), "port"))
        result = vmm.run()
        einval = (1 << 64) - uapi.KVM_EINVAL
        ctx.equal("values returned to the guest", [0, 0, einval, 0], result.reports)
        got = [(r.gpa, r.npages, r.page_size, r.encrypted) for r in vmm.tracker.requests]
        ctx.equal("requests as the tracker saw them", [
            (HIGH, 512, MB2, True), (HIGH + PS, 1, PS, False), (HIGH + 1, 1, PS, False),
            (HIGH, 1 << 30, 1 << 30, False)], got)
        # private [4G, 4G+2M), then page 1 shared, then all of [4G, 8G) shared again
        ctx.equal("private ranges after the requests", [], vmm.tracker.ranges(Sharing.PRIVATE))


CPL3_VARIANTS = (HypercallOutcome.RETURNS_EPERM, HypercallOutcome.UD_SHUTDOWN)
_AFTER_CALL = 0x600D  # the guest reports this if it goes on after the call


def _cpl3_outcome(result: RunResult, exits: list[HypercallExit]) -> HypercallOutcome:
    """Classify what a CPL3 MAP_GPA_RANGE did, from the run the VMM saw."""
    if exits:
        return HypercallOutcome.EXITS
    if result.stop == "shutdown":
        return HypercallOutcome.UD_SHUTDOWN
    if result.stop == "done" and result.reports == [(1 << 64) - uapi.KVM_EPERM, _AFTER_CALL]:
        return HypercallOutcome.RETURNS_EPERM
    return HypercallOutcome.OTHER


@case("hypercall.native_vmcall_cpl3", "x86.c __kvm_emulate_hypercall (CPL != 0 -> -KVM_EPERM)",
      "VMCALL and VMMCALL from a CPL3 guest never reach userspace as KVM_EXIT_HYPERCALL, "
      "even with KVM_CAP_EXIT_HYPERCALL enabled, and the guest never goes on as if the "
      "call succeeded: it gets -KVM_EPERM (upstream) or #UD and shuts down (kvm_pvm, the "
      "other vendor's opcode); the variant is reported and matches the capability record",
      needs=(needs_guests,))
def native_vmcall_cpl3(ctx: Ctx) -> None:
    execution = ctx.caps.execution
    native = execution.native_hypercall
    for insn in (native, "vmmcall" if native == "vmcall" else "vmcall"):
        with Vmm(ctx.kvm, ctx.vm_type, cpl=3) as vmm:
            ctx.true("KVM_CAP_EXIT_HYPERCALL enabled for MAP_GPA_RANGE", vmm.exit_hypercall)
            exits = _record_hypercall_exits(vmm)
            vmm.load(compile_program(p.Program.of(
                p.MapGpaRange(HIGH, 1, PS, encrypted=True), p.Report(_AFTER_CALL)), insn))
            outcome = _cpl3_outcome(vmm.run(), exits)
            ctx.equal(f"{insn}: KVM_EXIT_HYPERCALL exits and tracked requests", ([], []),
                      (exits, vmm.tracker.requests))
            ctx.one_of(f"{insn} at CPL3 ({execution.cpu_vendor})",
                       [v.value for v in CPL3_VARIANTS], outcome.value)
            ctx.equal(f"{insn}: as the capability record says",
                      execution.cpl3_hypercall[insn].value, outcome.value)


def _record_hypercall_exits(vmm: Vmm) -> list[HypercallExit]:
    """The KVM_EXIT_HYPERCALL exits the VMM handles from now on, in order."""
    seen: list[HypercallExit] = []
    handler = vmm.handlers[HypercallExit]

    def record(exit: Exit, result: RunResult) -> bool:
        if isinstance(exit, HypercallExit):
            seen.append(exit)
        return handler(exit, result)

    vmm.handlers[HypercallExit] = record
    return seen


def needs_hypercall_exits(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    """KVM_EXIT_HYPERCALL reaches userspace from a CPL0 guest (probed: kvm_pvm's
    emulator retries a CPL0 VMCALL for ever)."""
    execution = caps.execution
    if not execution.hypercall_exits_at(0):
        return (f"on this host a CPL0 {execution.native_hypercall}: "
                f"{execution.cpl0_hypercall.value} (probed), so KVM_EXIT_HYPERCALL cannot "
                f"reach userspace")
    return needs_exit_hypercall(caps, vm_type, gmem_flags)


@case("hypercall.kvm_exit", "x86.c __kvm_emulate_hypercall, KVM_CAP_EXIT_HYPERCALL",
      "from a CPL0 guest, MAP_GPA_RANGE exits to userspace as KVM_EXIT_HYPERCALL with "
      "nr/args/flags; KVM itself answers a bad gpa or npages 0 with -KVM_EINVAL, no exit",
      needs=(needs_guests, needs_hypercall_exits))
def kvm_exit(ctx: Ctx) -> None:
    abi = ctx.caps.execution.native_hypercall
    with Vmm(ctx.kvm, ctx.vm_type, cpl=0) as vmm:
        vmm.add_memory(HIGH, MB2)  # memory to convert (a VMM refuses a range with none)
        seen = _record_hypercall_exits(vmm)
        vmm.load(compile_program(p.Program.of(
            p.MapGpaRange(HIGH, 512, MB2, encrypted=True),
            p.MapGpaRange(HIGH + 1, 1, PS, encrypted=False),
            p.MapGpaRange(HIGH, 0, PS, encrypted=False),
        ), abi))
        result = vmm.run()
        einval = (1 << 64) - uapi.KVM_EINVAL
        ctx.equal("guest's RAX per call", [0, einval, einval], result.reports)
        ctx.equal("KVM_EXIT_HYPERCALL exits", [(uapi.KVM_HC_MAP_GPA_RANGE, (HIGH, 512, 0x11),
                                               uapi.KVM_EXIT_HYPERCALL_LONG_MODE)],
                  [(e.nr, e.args[:3], e.flags) for e in seen])
        ctx.equal("tracker", [(HIGH, 512, True)],
                  [(r.gpa, r.npages, r.encrypted) for r in vmm.tracker.requests])
