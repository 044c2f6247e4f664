"""The conformance suite on the real kernel: every case, each VM type."""

import pytest

from guestmem.check import Status, instances, run_instance

INSTANCES = instances()


@pytest.mark.parametrize("inst", INSTANCES, ids=[i.name for i in INSTANCES])
def test_case_on_kvm(host_kvm, inst):
    result = run_instance(host_kvm, inst)
    if result.status is Status.SKIP:
        pytest.skip(result.observed)
    assert result.status is Status.PASS, f"{result.expected}\n  observed: {result.observed}"


def test_no_case_skips_for_a_capability_this_host_has(host_kvm):
    """Cases for the host's own VM types may skip only for what the host lacks."""
    caps = host_kvm.capabilities
    for inst in instances(tuple(sorted(caps.vm_types))):
        result = run_instance(host_kvm, inst)
        if result.status is Status.SKIP:
            assert any(
                key in result.observed
                for key in ("KVM_CAP_MEMORY_ATTRIBUTES=0x0", "KVM_CAP_PRE_FAULT_MEMORY=0",
                            "case is for hosts without")
            ), f"{inst.name} skipped: {result.observed}"
