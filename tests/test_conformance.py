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


@pytest.fixture(scope="module", params=["mainline", "coco", "inplace", "hugetlb"])
def model_kvm(request):
    with ModelKvm(request.param) as kvm:
        yield kvm


@pytest.mark.parametrize("inst", INSTANCES, ids=IDS)
def test_case_on_model(model_kvm, inst):
    check(model_kvm, inst)


def test_mainline_derives_the_generic_capabilities_this_kernel_reports(host_kvm):
    """The capabilities mainline and coco derive (model/kvm.py _derived_system) are
    what a 6.18 kernel reports, except where this host departs from upstream on
    a TDP host, which the probe records."""
    with ModelKvm("mainline") as model:
        mine, host = model.capabilities, host_kvm.capabilities
    probed = {"KVM_CAP_NR_VCPUS"}  # the host's CPU count, not a KVM rule
    if host.pre_fault_memory != mine.pre_fault_memory:
        probed.add("KVM_CAP_PRE_FAULT_MEMORY")  # tdp_enabled
    named = set(mine.system) - probed
    assert {k: mine.system[k] for k in named} == {k: host.system[k] for k in named}
    assert {k: mine.vm[0][k] for k in named} == {k: host.vm[0][k] for k in named}


HOST_LACKS = ("KVM_CAP_MEMORY_ATTRIBUTES=0x0", "KVM_CAP_PRE_FAULT_MEMORY=0",
              "case is for hosts without", "KVM_EXIT_HYPERCALL cannot reach userspace",
              "case is for sw-protected VMs", "case is for SNP/TDX VMs",
              "needs 2 NUMA nodes, the host has 1",
              "no per-inode guest_memfd mempolicy", "no in-place conversion",
              "lacks GUEST_MEMFD_FLAG_HUGETLB")


def test_no_case_skips_for_a_capability_this_host_has(host_kvm):
    """Cases for the host's own VM types may skip only for what the host lacks."""
    caps = host_kvm.capabilities
    for inst in instances(tuple(sorted(caps.vm_types))):
        result = run_instance(host_kvm, inst)
        if result.status is Status.SKIP:
            assert any(key in result.observed for key in HOST_LACKS), \
                f"{inst.name} skipped: {result.observed}"


def test_model_host_profile_and_kernel_agree_case_by_case(host_kvm, host_profile):
    """The host profile is this machine's kernel: every case of every VM type the
    kernel has passes, fails and skips alike on both, with the same checks."""
    with ModelKvm(host_profile) as model:
        for inst in instances(tuple(sorted(host_kvm.capabilities.vm_types))):
            k, m = run_instance(host_kvm, inst), run_instance(model, inst)
            assert (k.status, k.observed if k.status is Status.SKIP else "") == \
                (m.status, m.observed if m.status is Status.SKIP else ""), \
                f"{inst.name}: kernel {k.observed} / model {m.observed}"
            assert [(c.what, c.ok) for c in k.checks] == [(c.what, c.ok) for c in m.checks], \
                inst.name


def test_host_profile_round_trips_every_probed_answer(host_kvm, host_profile):
    """Profile.from_capabilities keeps everything the probe found: every
    KVM_CHECK_EXTENSION number, named or not, at system scope and on a VM of each
    type (asked through the model's own ioctls), and the probed behaviours."""
    from guestmem.host.kvm import CAPABILITY_SCAN

    with ModelKvm(host_profile) as model:
        for nr in range(CAPABILITY_SCAN):
            assert model.check_extension(nr) == host_kvm.check_extension(nr), nr
        for vm_type in host_kvm.capabilities.vm_types:
            with model.create_vm(vm_type) as mvm, host_kvm.create_vm(vm_type) as kvm_vm:
                for nr in range(CAPABILITY_SCAN):
                    assert mvm.check_extension(nr) == kvm_vm.check_extension(nr), (vm_type, nr)
        mine, host = model.capabilities, host_kvm.capabilities
        assert mine.vm_types == host.vm_types
        assert mine.execution == host.execution
        assert (mine.shadow_paging, mine.gmem_bind_overlap_errno, mine.gmem_shared_policy,
                mine.memory_failure, mine.implementation) == \
            (host.shadow_paging, host.gmem_bind_overlap_errno, host.gmem_shared_policy,
             host.memory_failure, host.implementation)


def test_the_mode_off_case_skips_on_a_kernel_with_in_place_conversion():
    """A kernel whose guest_memfd takes KVM_SET_MEMORY_ATTRIBUTES2 (a CI build may
    carry the series; the probe asks) skips gmem.attributes2_without_in_place."""
    import dataclasses

    from guestmem import uapi
    from guestmem.check.suite import needs_no_gmem_attributes

    caps = ModelKvm("mainline").capabilities
    assert needs_no_gmem_attributes(caps, uapi.KVM_X86_DEFAULT_VM, 0) is None
    with_series = dataclasses.replace(caps, gmem_in_place_conversion=True)
    assert needs_no_gmem_attributes(with_series, uapi.KVM_X86_DEFAULT_VM, 0) == \
        "in-place conversion is on (case is for kernels without it)"
    assert ModelKvm("inplace").capabilities.gmem_in_place_conversion
