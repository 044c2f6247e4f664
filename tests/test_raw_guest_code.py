"""Raw x86 code (a GuestImage without a program) runs on the kvm backend only:
the model's vCPU interprets guestmem programs, and says so."""

from __future__ import annotations

import dataclasses

import pytest

from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm
from guestmem.vmm import Vmm


def raw_image(kvm):
    """Machine code only: what a VMM loading its own x86 would pass."""
    image = compile_program(p.Program.of(p.Report(7)),
                            default_hypercall_abi(kvm.capabilities))
    return dataclasses.replace(image, program=None)


def test_raw_code_on_the_model_is_a_clear_type_error_that_writes_nothing():
    from guestmem import machine

    with ModelKvm() as kvm, Vmm(kvm) as vmm:
        before = vmm.read(machine.CODE, 64), vmm.read(machine.PML4, 8)
        with pytest.raises(TypeError, match="interprets guestmem programs, not x86"):
            vmm.load(raw_image(kvm))
        assert (vmm.read(machine.CODE, 64), vmm.read(machine.PML4, 8)) == before


def test_raw_code_runs_on_the_kernel(host_kvm):
    with HostKvm() as kvm, Vmm(kvm) as vmm:
        vmm.load(raw_image(kvm))
        result = vmm.run()
        assert (result.stop, result.reports) == ("done", [7])
