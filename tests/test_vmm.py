"""The VMM's exit dispatch, with a scripted vCPU standing in for KVM_RUN."""

import errno
import gc
import threading

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.caps import HypercallOutcome
from guestmem.exits import (
    HypercallExit,
    IoExit,
    KvmRunError,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
)
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import GuestTimeout, Sharing, UnhandledExit, Vmm

ENC = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED


class ScriptedVcpu:
    def __init__(self, script, regs=None):
        self.script = list(script)
        self.hypercall_returns = []
        self.regs = regs or uapi.kvm_regs()
        self.set_regs_calls = []

    def get_regs(self):
        return uapi.kvm_regs.from_buffer_copy(self.regs)

    def set_regs(self, regs):
        self.set_regs_calls.append(uapi.kvm_regs.from_buffer_copy(regs))

    def run(self):
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def complete_hypercall(self, ret):
        self.hypercall_returns.append(ret)

    def close(self):
        pass

    immediate_exit = False


def out(port, value):
    return IoExit(uapi.KVM_EXIT_IO, uapi.KVM_EXIT_IO_OUT, 4, port, 1, value.to_bytes(4, "little"))


def report(value):
    return [out(p.PORT_REPORT_LO, value & 0xFFFFFFFF), out(p.PORT_REPORT_HI, value >> 32)]


def hypercall(gpa, npages, attrs, nr=uapi.KVM_HC_MAP_GPA_RANGE):
    return HypercallExit(uapi.KVM_EXIT_HYPERCALL, nr, (gpa, npages, attrs, 0, 0, 0), 1)


@pytest.fixture
def vmm(host_kvm):
    """A VMM whose vCPU the test replaces with a ScriptedVcpu (an image counts as
    loaded: the script stands for the program)."""
    with Vmm(host_kvm) as v:
        v.vcpu.close()
        v.image = compile_program(p.Program.of())
        yield v


def test_map_gpa_range_requests_reach_the_tracker(vmm):
    vmm.vcpu = ScriptedVcpu([
        hypercall(1 << 32, 512, ENC | uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M),
        hypercall((1 << 32) + 4096, 1, 0),
        hypercall(3, 1, 0),  # unaligned: the VMM answers -KVM_EINVAL
        hypercall(0, 1, 0, nr=99),  # not MAP_GPA_RANGE: -KVM_ENOSYS
        *report(0x1234_5678_9ABC),
        out(p.PORT_DONE, 0),
    ])
    result = vmm.run()
    assert result.stop == "done"
    assert result.reports == [0x1234_5678_9ABC]
    assert vmm.vcpu.hypercall_returns == [0, 0, -uapi.KVM_EINVAL, -uapi.KVM_ENOSYS]
    reqs = vmm.tracker.requests
    assert [(r.gpa, r.npages, r.page_size, r.encrypted) for r in reqs] == [
        (1 << 32, 512, 2 << 20, True), ((1 << 32) + 4096, 1, 4096, False), (3, 1, 4096, False)]
    assert vmm.tracker.ranges(Sharing.PRIVATE) == [(1 << 32, 4096),
                                                   ((1 << 32) + 8192, (2 << 20) - 8192)]


def test_memory_fault_stops_the_run_with_errno_and_exit(vmm):
    fault = MemoryFaultExit(uapi.KVM_EXIT_MEMORY_FAULT, 0, 1 << 32, 4096)
    vmm.vcpu = ScriptedVcpu([KvmRunError(errno.EFAULT, fault)])
    result = vmm.run()
    assert (result.stop, result.errno, result.memory_fault) == ("memory_fault", errno.EFAULT, fault)


def test_shutdown_and_unanswered_mmio_end_the_run_in_its_result(vmm):
    eintr = KvmRunError(errno.EINTR, None)  # the immediate_exit run that completes pending I/O
    shutdown = ShutdownExit(uapi.KVM_EXIT_SHUTDOWN)
    vmm.vcpu = ScriptedVcpu([*report(5), shutdown, out(p.PORT_DONE, 0)])
    result = vmm.run()
    assert (result.stop, result.exit, result.reports) == ("shutdown", shutdown, [5])
    assert len(vmm.vcpu.script) == 1  # nothing ran after the shutdown
    mmio = MmioExit(uapi.KVM_EXIT_MMIO, 1 << 40, b"\x11" * 8, 8, True)
    vmm.vcpu = ScriptedVcpu([mmio, eintr])
    result = vmm.run()
    assert (result.stop, result.exit) == ("mmio", mmio)
    assert vmm.vcpu.script == []  # the pending MMIO was completed before giving up


def test_unexpected_exits_are_errors_not_ignored(vmm):
    eintr = KvmRunError(errno.EINTR, None)  # the immediate_exit run that completes pending I/O
    vmm.vcpu = ScriptedVcpu([out(0x80, 1), eintr])
    with pytest.raises(UnhandledExit):
        vmm.run()
    assert vmm.vcpu.script == []  # the pending exit was completed before giving up
    vmm.vcpu = ScriptedVcpu([out(p.PORT_REPORT_HI, 1), eintr])  # high half without low half
    with pytest.raises(UnhandledExit):
        vmm.run()


def test_port_doorbell_reads_registers_and_answers_in_rax(vmm):
    regs = uapi.kvm_regs(rax=uapi.KVM_HC_MAP_GPA_RANGE, rbx=1 << 33, rcx=16, rdx=ENC, rip=0x1234)
    vmm.vcpu = ScriptedVcpu([out(p.PORT_HYPERCALL, 12), out(p.PORT_DONE, 0)], regs)
    assert vmm.run().stop == "done"
    (answer,) = vmm.vcpu.set_regs_calls
    assert answer.rax == 0 and answer.rip == 0x1234 and answer.rbx == 1 << 33
    assert [(r.gpa, r.npages, r.encrypted) for r in vmm.tracker.requests] == [(1 << 33, 16, True)]


def test_port_doorbell_unknown_hypercall_gets_kvm_enosys(vmm):
    vmm.vcpu = ScriptedVcpu([out(p.PORT_HYPERCALL, 0), out(p.PORT_DONE, 0)],
                            uapi.kvm_regs(rax=99))
    vmm.run()
    assert vmm.vcpu.set_regs_calls[0].rax == (1 << 64) - uapi.KVM_ENOSYS
    assert vmm.tracker.requests == []


def test_a_vmm_session_leaks_no_fd_and_no_mapping(host_kvm):
    """VM, guest_memfds, their mmaps, the vCPU and its kvm_run all go on close."""
    def maps():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    abi = default_hypercall_abi(host_kvm.capabilities)

    def session():
        with Vmm(host_kvm) as v:
            v.add_memory(1 << 32, 2 << 20)
            v.add_memory(2 << 32, 4096, backing="anon")
            v.load(compile_program(p.Program.of(p.WritePattern(1 << 32, 4096, 1)), abi))
            assert v.run().stop == "done"
            assert v.read(1 << 32, 8) == (1).to_bytes(8, "little")

    session()  # one-time setup: the /proc/self/mem fd, iced-x86's native module
    gc.collect()  # earlier tests' garbage must not close its fds during the count
    fds, mapped = host_kvm.open_fd_count(), maps()
    for _ in range(3):
        session()
    assert (host_kvm.open_fd_count(), maps()) == (fds, mapped)




def in_thread(fn):
    """Run fn in a thread that is not the main one; its result or exception."""
    thread, box = start_thread(fn)
    thread.join(60)
    assert not thread.is_alive(), "the run was never interrupted"
    return box


def test_run_times_out_from_a_thread_that_is_not_main(any_kvm):
    """A guest that never halts: the timeout kicks it out of KVM_RUN whatever the
    thread, and the kick does not linger into the next run."""
    with Vmm(any_kvm) as vmm:
        abi = default_hypercall_abi(any_kvm.capabilities, vmm.cpl)
        vmm.load(compile_program(p.Program.of(p.Loop(1 << 40, (p.Tick(),))), abi))
        box = in_thread(lambda: vmm.run(timeout=0.3))
        assert isinstance(box.get("error"), GuestTimeout), box
        vmm.load(compile_program(p.Program.of(p.Report(9)), abi))
        assert vmm.run(timeout=10).reports == [9]


def never_returning_kvm(request, backend):
    if backend == "kvm":
        kvm = request.getfixturevalue("host_kvm")
        outcome = kvm.capabilities.execution.cpl0_hypercall
        if outcome is not HypercallOutcome.NEVER_RETURNS:
            pytest.skip(f"this host's CPL0 hypercall {outcome.value}: KVM_RUN returns")
        return kvm
    from dataclasses import replace

    from guestmem.model import PROFILES
    from guestmem.model import Kvm as ModelKvm

    mainline = PROFILES["mainline"]
    execution = replace(mainline.execution, cpl0_hypercall=HypercallOutcome.NEVER_RETURNS)
    return ModelKvm(replace(mainline, execution=execution))


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_a_kvm_run_that_never_returns_is_kicked_out_of_it(request, backend):
    """kvm_pvm retries an emulated CPL0 VMCALL for ever inside KVM_RUN: only a
    signal to the vCPU's thread ends it; the model's KVM_RUN blocks the same way."""
    kvm = never_returning_kvm(request, backend)
    with Vmm(kvm, cpl=0) as vmm:
        insn = kvm.capabilities.execution.native_hypercall
        vmm.load(compile_program(p.Program.of(p.MapGpaRange(1 << 32, 1, 4096)), insn))
        box = in_thread(lambda: vmm.run(timeout=0.3))
        assert isinstance(box.get("error"), GuestTimeout), box


def test_a_signal_for_someone_else_does_not_end_the_run(vmm):
    """KVM_RUN returning EINTR without the watchdog having fired is run again, as
    the selftests' _vcpu_run and VMMs do."""
    eintr = KvmRunError(errno.EINTR, None)
    vmm.vcpu = ScriptedVcpu([eintr, *report(5), eintr, out(p.PORT_DONE, 0)])
    result = vmm.run()
    assert (result.stop, result.reports) == ("done", [5])


def test_an_unrelated_signal_during_kvm_run_is_not_an_error(request):
    """A real signal (with a handler) lands in KVM_RUN: the run goes on and only the
    timeout ends it."""
    import os
    import signal

    kvm = never_returning_kvm(request, "kvm")
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with Vmm(kvm, cpl=0) as vmm:
            insn = kvm.capabilities.execution.native_hypercall
            vmm.load(compile_program(p.Program.of(p.MapGpaRange(1 << 32, 1, 4096)), insn))
            timer.start()
            with pytest.raises(GuestTimeout):
                vmm.run(timeout=0.6)
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, old)


def test_a_failed_conversion_puts_the_attributes_back():
    """The VMM's conversion is attributes then fallocate; when the fallocate fails
    the guest gets -KVM_EINVAL and the attributes are as before."""
    from guestmem.model import Kvm as ModelKvm

    with ModelKvm("coco") as kvm, Vmm(kvm, uapi.KVM_X86_SW_PROTECTED_VM) as vmm:
        region = vmm.add_memory(1 << 32, 8 * 4096)
        assert vmm.convert(1 << 32, 2 * 4096, private=True) == 0
        vmm.tracker.apply(1 << 32, 2, ENC, 0)

        def no_memory(offset, length):
            raise OSError(errno.ENOMEM, "fallocate")

        region.guest_memfd.allocate = no_memory
        assert vmm.convert(1 << 32, 8 * 4096, private=True) == -uapi.KVM_EINVAL
        gfn = (1 << 32) // 4096
        assert [vmm.vm.is_private(gfn + i) for i in range(8)] == [True, True] + [False] * 6


def test_a_kick_between_runs_interrupts_only_the_next_kvm_run(host_kvm):
    """The kick signal is blocked outside KVM_RUN (KVM_SET_SIGNAL_MASK unblocks it
    inside): a kick that lands while the VMM is in another blocking syscall does
    not interrupt it, and the next KVM_RUN returns EINTR once."""
    import ctypes
    import os

    from guestmem.host import libc

    with Vmm(host_kvm) as vmm:
        abi = default_hypercall_abi(host_kvm.capabilities, vmm.cpl)
        vmm.load(compile_program(p.Program.of(p.Report(1)), abi))
        assert vmm.run().reports == [1]  # this thread has run the vCPU: the mask is set
        read_end, write_end = os.pipe()
        me = threading.get_ident()

        def kick_then_write():
            libc.kick_thread(me)
            os.write(write_end, b"x")

        timer = threading.Timer(0.2, kick_then_write)
        timer.start()
        buf = ctypes.create_string_buffer(1)
        got = ctypes.CDLL(None, use_errno=True).read(read_end, buf, 1)  # no EINTR retry here
        timer.join()
        os.close(read_end)
        os.close(write_end)
        assert (got, buf.raw) == (1, b"x"), f"read interrupted: errno {ctypes.get_errno()}"
        with pytest.raises(KvmRunError) as caught:
            vmm.vcpu.run()
        assert caught.value.errno == errno.EINTR
        vmm.load(compile_program(p.Program.of(p.Report(2)), abi))
        assert vmm.run().reports == [2]


def start_thread(fn):
    """Run fn in another thread; returns (thread, box) for its value or exception."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_closing_a_vcpu_that_another_thread_runs(request, backend):
    """close() kicks the KVM_RUN in flight and waits for it before unmapping
    kvm_run: the running thread gets an error, the interpreter does not crash."""
    kvm = never_returning_kvm(request, backend)
    with Vmm(kvm, cpl=0) as vmm:
        insn = kvm.capabilities.execution.native_hypercall
        vmm.load(compile_program(p.Program.of(p.MapGpaRange(1 << 32, 1, 4096)), insn))
        vcpu = vmm.vcpu
        thread, box = start_thread(vcpu.run)
        threading.Event().wait(0.2)
        vcpu.close()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(box.get("error"), OSError), box
        with pytest.raises(OSError) as closed:
            vcpu.run()
        assert closed.value.errno == errno.EBADF


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_closing_a_vmm_that_another_thread_runs(request, backend):
    kvm = never_returning_kvm(request, backend)
    vmm = Vmm(kvm, cpl=0)
    insn = kvm.capabilities.execution.native_hypercall
    vmm.load(compile_program(p.Program.of(p.MapGpaRange(1 << 32, 1, 4096)), insn))
    thread, box = start_thread(lambda: vmm.run(timeout=10))
    threading.Event().wait(0.2)
    vmm.close()
    thread.join(10)
    assert not thread.is_alive()
    error = box.get("error")
    assert isinstance(error, OSError) and error.errno == errno.EBADF, box


def test_running_before_loading_says_so(any_kvm):
    with Vmm(any_kvm) as vmm, pytest.raises(RuntimeError, match="load"):
        vmm.run()
