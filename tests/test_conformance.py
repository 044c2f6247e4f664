"""The conformance suite, unchanged, on every backend: the kernel and the model."""

import pytest

from guestmem.check import Status, instances, run_instance
from guestmem.model import Kvm as ModelKvm

INSTANCES = instances()
IDS = [i.name for i in INSTANCES]


def check(kvm, inst):
    result = run_instance(kvm, inst)
    if result.status is Status.SKIP:
        pytest.skip(result.observed)
    assert result.status is Status.PASS, f"{result.expected}\n  observed: {result.observed}"


@pytest.mark.parametrize("inst", INSTANCES, ids=IDS)
def test_case_on_kvm(host_kvm, inst):
    check(host_kvm, inst)


@pytest.fixture(scope="module", params=["mainline", "coco"])
def model_kvm(request):
    with ModelKvm(request.param) as kvm:
        yield kvm


@pytest.mark.parametrize("inst", INSTANCES, ids=IDS)
def test_case_on_model(model_kvm, inst):
    check(model_kvm, inst)


HOST_LACKS = ("KVM_CAP_MEMORY_ATTRIBUTES=0x0", "KVM_CAP_PRE_FAULT_MEMORY=0",
              "case is for hosts without", "kvm_pvm answers VMCALL itself",
              "case is for sw-protected VMs", "needs 2 NUMA nodes, the host has 1",
              "no per-inode guest_memfd mempolicy")


def test_no_case_skips_for_a_capability_this_host_has(host_kvm):
    """Cases for the host's own VM types may skip only for what the host lacks."""
    caps = host_kvm.capabilities
    for inst in instances(tuple(sorted(caps.vm_types))):
        result = run_instance(host_kvm, inst)
        if result.status is Status.SKIP:
            assert any(key in result.observed for key in HOST_LACKS), \
                f"{inst.name} skipped: {result.observed}"


def test_model_mainline_and_kernel_agree_case_by_case(host_kvm):
    """The mainline profile is this host's kernel: the same cases pass and skip."""
    with ModelKvm("mainline") as model:
        for inst in instances((0,)):
            k, m = run_instance(host_kvm, inst), run_instance(model, inst)
            if inst.case.name == "hypercall.kvm_exit":  # kvm_pvm cannot deliver the exit
                assert (k.status, m.status) == (Status.SKIP, Status.PASS)
                continue
            assert k.status == m.status, f"{inst.name}: kernel {k.observed} / model {m.observed}"


def test_model_mainline_capabilities_match_the_host(host_kvm):
    """The mainline profile reports what this host's KVM reports, at system scope
    and on a VM (KVM_CAP_NR_VCPUS is the host's CPU count, not a KVM property)."""
    with ModelKvm("mainline") as model:
        mine, host = model.capabilities, host_kvm.capabilities
        skip = {"KVM_CAP_NR_VCPUS"}
        assert {k: v for k, v in mine.system.items() if k not in skip} == \
            {k: v for k, v in host.system.items() if k not in skip}
        assert mine.vm_types == host.vm_types
        for vm_type in host.vm_types:
            assert {k: v for k, v in mine.vm[vm_type].items() if k not in skip} == \
                {k: v for k, v in host.vm[vm_type].items() if k not in skip}
