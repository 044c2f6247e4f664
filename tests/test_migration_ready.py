"""How the guest's MSR_KVM_MIGRATION_CONTROL write reaches the VMM (issue 11 part 2),
on the model and on this host's kernel: a WRMSR exits to userspace from CPL0 with
KVM_CAP_X86_USER_SPACE_MSR (FILTER with a filter denying the write, or UNKNOWN
without one: KVM does not handle the MSR); from CPL3 it is #GP before any MSR
handling, a shutdown without an IDT; the port doorbell works at any CPL."""

from __future__ import annotations

import errno

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import MsrExit
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import Vmm

READY = p.Program.of(p.Report(1), p.MigrationReady(), p.Report(2))


def run(kvm, cpl, control, program=READY):
    vmm = Vmm(kvm, cpl=cpl)
    vmm.load(compile_program(program, default_hypercall_abi(kvm.capabilities, cpl), control))
    return vmm, vmm.run(timeout=20)


def test_a_cpl0_wrmsr_reaches_the_vmm_through_the_filter(any_kvm):
    vmm, result = run(any_kvm, 0, "wrmsr")
    with vmm:
        assert (result.stop, result.reports, vmm.migration_ready) == ("done", [1, 2], True)
        assert f"KVM_EXIT_X86_WRMSR {uapi.MSR_KVM_MIGRATION_CONTROL:#x} = 0x1" in result.log


def test_a_cpl3_wrmsr_is_gp_before_any_msr_handling(any_kvm):
    vmm, result = run(any_kvm, 3, "wrmsr")
    with vmm:
        assert (result.stop, result.reports, vmm.migration_ready) == ("shutdown", [1], False)


@pytest.mark.parametrize("cpl", [0, 3])
def test_the_doorbell_works_at_any_cpl(any_kvm, cpl):
    vmm, result = run(any_kvm, cpl, "port")
    with vmm:
        assert (result.stop, result.reports, vmm.migration_ready) == ("done", [1, 2], True)


def test_without_a_filter_the_write_exits_as_unknown_and_an_error_is_gp(any_kvm):
    """KVM_CAP_X86_USER_SPACE_MSR with UNKNOWN only: the exit says UNKNOWN (KVM has no
    handler for the MSR); the VMM answering error=1 gives the guest #GP."""
    vmm = Vmm(any_kvm, cpl=0)
    with vmm:
        vmm.vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_UNKNOWN)
        vmm._msr_filtered = True  # the VMM must not install its filter: this test wants none
        vmm.load(compile_program(READY, default_hypercall_abi(any_kvm.capabilities, 0), "wrmsr"))
        seen = []

        def refuse(exit, result):
            seen.append(exit)
            vmm.vcpu.complete_msr(True)
            return False

        vmm.handlers[MsrExit] = refuse
        result = vmm.run(timeout=20)
        assert [(e.msr_reason, e.index, e.data, e.is_write) for e in seen] == [
            (uapi.KVM_MSR_EXIT_REASON_UNKNOWN, uapi.MSR_KVM_MIGRATION_CONTROL, 1, True)]
        assert (result.stop, result.reports) == ("shutdown", [1])


def test_bad_msr_capability_and_filter_arguments_are_einval(any_kvm):
    with any_kvm.create_vm() as vm:
        calls = [
            lambda: vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, 1 << 3),
            lambda: vm.set_msr_filter(1 << 1, []),
            lambda: vm.set_msr_filter(0, [(0, 0x4B564D08, b"\x00")]),
            lambda: vm.set_msr_filter(0, [(1 << 2, 0x4B564D08, b"\x00")]),
            lambda: vm.set_msr_filter(0, [(uapi.KVM_MSR_FILTER_WRITE, 0, b"\x00")] * 17),
        ]
        for call in calls:
            try:
                call()
            except OSError as e:
                assert e.errno == errno.EINVAL
            else:
                raise AssertionError("accepted")
        vm.set_msr_filter(uapi.KVM_MSR_FILTER_DEFAULT_ALLOW, [])  # clearing it is fine
