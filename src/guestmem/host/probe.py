"""Probes of what this host's KVM does beyond the upstream guest_memfd rules.

Kernel builds differ, even within one release (../shared/spec/host-notes.md: two
builds of 6.18.44 answer a CPL3 VMCALL differently), so the kvm backend runs
tiny guests and a few ioctls once per process and records what it saw in
`Capabilities`; nothing here assumes a particular KVM implementation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand
from iced_x86 import Register as R

from guestmem import machine, uapi
from guestmem.caps import GuestExecution, HypercallOutcome, native_hypercall
from guestmem.exits import HypercallExit, IoExit, KvmRunError, MmioExit, ShutdownExit
from guestmem.host import libc
from guestmem.host.kvm import Kvm, Vcpu, Vm

PROBE_PORT = 0x80  # the probe's guest reports by `out PROBE_PORT, al`
PROBE_GPA = 1 << 32
PROBE_TIME_LIMIT = 0.2  # seconds before a KVM_RUN that does not return is kicked
_MASK64 = (1 << 64) - 1


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPUID vendor string (leaf 0) the kernel reports for the first CPU."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def memory_failure_built() -> bool:
    """CONFIG_MEMORY_FAILURE: its sysctls exist only then (mm/memory-failure.c)."""
    return os.path.exists("/proc/sys/vm/memory_failure_recovery")


def _assemble(*instructions: Instruction) -> bytes:
    encoder = BlockEncoder(64)
    encoder.add_many([*instructions, Instruction.create_u32_reg(Code.OUT_IMM8_AL, PROBE_PORT,
                                                                R.AL)])
    return bytes(encoder.encode(machine.CODE))


def _hypercall_code(instruction: str) -> bytes:
    """KVM_HC_MAP_GPA_RANGE of one page, then report."""
    return _assemble(
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, uapi.KVM_HC_MAP_GPA_RANGE),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RBX, PROBE_GPA),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RCX, 1),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RDX, uapi.KVM_MAP_GPA_RANGE_ENCRYPTED),
        Instruction.create(Code.VMCALL if instruction == "vmcall" else Code.VMMCALL),
    )


def _load_code() -> bytes:
    """RAX = the 8 bytes at PROBE_GPA, then report."""
    return _assemble(
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R.RBX, PROBE_GPA),
        Instruction.create_reg_mem(Code.MOV_R64_RM64, R.RAX, MemoryOperand(R.RBX)),
    )


@contextlib.contextmanager
def _machine(kvm: Kvm, code: bytes, cpl: int) -> Iterator[tuple[Vm, Vcpu]]:
    """A default VM with anonymous low memory (page tables, GDT, code) and one vCPU
    in 64-bit mode at `cpl`, as guestmem.machine lays it out."""
    image = machine.GuestImage(code, 0, None, "")
    with kvm.create_vm() as vm, kvm.mmap_anonymous(machine.LOW_MEMORY_SIZE) as low:
        for gpa, data in machine.low_memory_contents(image):
            low.write(gpa, data)
        vm.set_user_memory_region2(0, 0, 0, machine.LOW_MEMORY_SIZE, low.addr)
        with vm.create_vcpu(0) as vcpu:
            vcpu.set_sregs(machine.initial_sregs(vcpu.get_sregs(), cpl))
            vcpu.set_regs(machine.initial_regs(image))
            yield vm, vcpu


def _run_once(vcpu: Vcpu) -> object:
    """One KVM_RUN, kicked after PROBE_TIME_LIMIT: the exit, or the KvmRunError."""
    timer = threading.Timer(PROBE_TIME_LIMIT, vcpu.kick)
    timer.start()
    try:
        return vcpu.run()
    except KvmRunError as e:
        return e
    finally:
        timer.cancel()
        timer.join()
        vcpu.immediate_exit = False


def hypercall_outcome(kvm: Kvm, instruction: str, cpl: int) -> HypercallOutcome:
    """Run `instruction` at `cpl` with KVM_CAP_EXIT_HYPERCALL enabled for
    MAP_GPA_RANGE (where offered) and classify what happened."""
    with _machine(kvm, _hypercall_code(instruction), cpl) as (vm, vcpu):
        want = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        if vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) & want:
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, want)
        result = _run_once(vcpu)
        if isinstance(result, HypercallExit):
            return HypercallOutcome.EXITS
        if isinstance(result, ShutdownExit):
            return HypercallOutcome.UD_SHUTDOWN
        if isinstance(result, KvmRunError) and result.errno == errno.EINTR:
            return HypercallOutcome.NEVER_RETURNS
        if isinstance(result, IoExit) and result.port == PROBE_PORT:
            rax = vcpu.get_regs().rax
            if rax == -uapi.KVM_EPERM & _MASK64:
                return HypercallOutcome.RETURNS_EPERM
            if rax == -uapi.KVM_ENOSYS & _MASK64:
                return HypercallOutcome.RETURNS_ENOSYS
        return HypercallOutcome.OTHER


def emulates(kvm: Kvm, cpl: int) -> bool:
    """Does KVM run guest code at `cpl` in its instruction emulator? The guest reads
    an ordinary memslot whose userspace_addr is PROT_NONE memory: the MMU's GUP
    fails there, and KVM_RUN returns EFAULT (kvm_handle_error_pfn); the
    emulator's copy fails too, and it turns the access into KVM_EXIT_MMIO
    (emulator_read_write_onepage). Needs no guest_memfd."""
    hole = libc.mmap(uapi.PAGE_SIZE, libc.PROT_NONE,
                     libc.MAP_SHARED | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
    try:
        with _machine(kvm, _load_code(), cpl) as (vm, vcpu):
            vm.set_user_memory_region2(1, 0, PROBE_GPA, uapi.PAGE_SIZE, hole)
            return isinstance(_run_once(vcpu), MmioExit)
    finally:
        libc.munmap(hole, uapi.PAGE_SIZE)


def shadow_paging(kvm: Kvm) -> bool:
    """Does the MMU shadow the guest's page tables (no EPT/NPT)? The vendor module's
    ept/npt parameter says; elsewhere (kvm_pvm has neither), x86
    KVM_CAP_PRE_FAULT_MEMORY, which is tdp_enabled (since 6.11)."""
    for param in ("/sys/module/kvm_intel/parameters/ept", "/sys/module/kvm_amd/parameters/npt"):
        try:
            with open(param) as f:
                return f.read().strip() in ("N", "0")
        except OSError:
            continue
    return not kvm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY)


def guest_execution(kvm: Kvm) -> GuestExecution:
    """Everything above, for this host's CPU vendor."""
    vendor = cpu_vendor()
    emulated = frozenset(cpl for cpl in (0, 3) if emulates(kvm, cpl))
    return GuestExecution(
        cpu_vendor=vendor,
        cpl3_hypercall={insn: hypercall_outcome(kvm, insn, 3) for insn in ("vmcall", "vmmcall")},
        cpl0_hypercall=hypercall_outcome(kvm, native_hypercall(vendor), 0),
        emulated_cpls=emulated,
    )


def gmem_in_place_conversion(kvm: Kvm) -> bool:
    """Does a guest_memfd take KVM_SET_MEMORY_ATTRIBUTES2? ENOTTY says no (mainline:
    no unlocked_ioctl; the series with the mode off). Asked with flags 1, which the
    series refuses (EINVAL) before it changes anything. The capability alone cannot
    say: it is 0 on a VM without private memory even where the mode is on."""
    if not kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
        return False
    with kvm.create_vm() as vm, vm.create_guest_memfd(uapi.PAGE_SIZE) as gmem:
        try:
            gmem.set_memory_attributes2(0, uapi.PAGE_SIZE, 0, flags=1)
        except OSError as e:
            return e.errno != errno.ENOTTY
        return True


def gmem_bind_overlap_errno(kvm: Kvm) -> int | None:
    """The errno of binding a guest_memfd range that is already bound
    (kvm_gmem_bind: EINVAL on 6.18, EEXIST in kvm-x86/next); 0 if accepted;
    None without guest_memfd."""
    if not kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
        return None
    page = uapi.PAGE_SIZE
    with kvm.create_vm() as vm, vm.create_guest_memfd(2 * page) as gmem:
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, PROBE_GPA, page, 0, gmem, 0)
        try:
            vm.set_user_memory_region2(2, uapi.KVM_MEM_GUEST_MEMFD, 2 * PROBE_GPA, page, 0,
                                       gmem, 0)
        except OSError as e:
            return e.errno or 0
        return 0
