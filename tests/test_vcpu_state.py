"""A vCPU's registers when created, and KVM_PRE_FAULT_MEMORY's range check, on both
backends (the widened differential test found both)."""

from __future__ import annotations

import errno

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm

from .conftest import backends

PS = uapi.PAGE_SIZE




@pytest.mark.parametrize("backend", backends())
def test_a_new_vcpu_has_the_reset_state(backend):
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as bsp, vm.create_vcpu(3) as ap:
        regs, sregs = bsp.get_regs(), bsp.get_sregs()
        assert (regs.rip, regs.rflags, regs.rdx) == (0xFFF0, 0x2, 0x600)
        assert (sregs.cs.selector, sregs.cs.base, sregs.cs.limit) == (0xF000, 0xFFFF0000, 0xFFFF)
        assert (sregs.cr0, sregs.efer) == (0x60000010, 0)
        assert sregs.apic_base == 0xFEE00900, "enabled, BSP"
        assert ap.get_sregs().apic_base == 0xFEE00800, "enabled, not the BSP"
        assert (sregs.tr.type, sregs.ldt.type, sregs.ds.type) == (0xB, 0x2, 0x3)


@pytest.mark.parametrize("backend", backends())
def test_pre_fault_range_wraps_in_64_bits(backend):
    """kvm_vcpu_pre_fault_memory: gpa + size <= gpa in u64 is EINVAL, before the
    MMU is asked (which would say EOPNOTSUPP or ENOSPC here)."""
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(OSError) as e:
            vcpu.pre_fault_memory((1 << 64) - PS, PS)
        assert e.value.errno == errno.EINVAL


def test_the_model_has_no_port_in_to_complete():
    """Model guest programs never read ports: completing an IN is a usage error that
    says so, and the vCPU stays usable."""
    with ModelKvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(RuntimeError, match=r"^no KVM_EXIT_IO IN is pending: model guests do"):
            vcpu.complete_io_in(b"\x01")
        assert vcpu.get_regs().rip == vm.create_vcpu(1).get_regs().rip
