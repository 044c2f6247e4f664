"""The suite holds on every kind of host this project has met, not only on this
one: the model, given each known host's probed behaviour, passes every case."""

from dataclasses import replace

import pytest

from guestmem.caps import VENDOR_AMD, VENDOR_INTEL, GuestExecution, HypercallOutcome
from guestmem.check import Status, instances, run_instance
from guestmem.model import PROFILES, Kvm

EPERM, UD = HypercallOutcome.RETURNS_EPERM, HypercallOutcome.UD_SHUTDOWN
MAINLINE = PROFILES["mainline"]
PVM = replace(MAINLINE, implementation="kvm_pvm", shadow_paging=True, pre_fault_memory=False,
              gmem_shared_policy=False)


def pvm(vendor: str, vmcall: HypercallOutcome) -> GuestExecution:
    """kvm_pvm: CPL0 code is emulated and its hypercall never returns."""
    return GuestExecution(vendor, {"vmcall": vmcall, "vmmcall": EPERM},
                          HypercallOutcome.NEVER_RETURNS, frozenset({0}))


VARIANTS = {
    # 6.18.44-fc-v657 and fc-v669, Intel: both instructions return -1 at CPL3.
    "pvm-intel": replace(PVM, execution=pvm(VENDOR_INTEL, EPERM)),
    # 6.18.44-fc-v595, AMD: a native VMCALL is #UD and the guest shuts down.
    "pvm-amd": replace(PVM, execution=pvm(VENDOR_AMD, UD)),
    # Upstream on VMX and on SVM: CPL0 guests, hypercalls exit to userspace.
    "vmx": MAINLINE,
    "svm": replace(MAINLINE, execution=replace(MAINLINE.execution, cpu_vendor=VENDOR_AMD)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_case_passes_or_skips_on_each_known_host(name):
    with Kvm(VARIANTS[name]) as kvm:
        failed = [(inst.name, result.observed) for inst in instances((0,))
                  if (result := run_instance(kvm, inst)).status is Status.FAIL]
    assert failed == []


def test_the_hypercall_case_reports_the_variant_it_saw():
    with Kvm(VARIANTS["pvm-amd"]) as kvm:
        (inst,) = [i for i in instances((0,)) if i.case.name == "hypercall.native_vmcall_cpl3"]
        result = run_instance(kvm, inst)
    assert result.status is Status.PASS
    seen = {c.what: c.observed for c in result.checks if "at CPL3" in c.what}
    assert seen == {"vmmcall at CPL3 (AuthenticAMD)": EPERM.value,
                    "vmcall at CPL3 (AuthenticAMD)": UD.value}


def test_the_hypercall_case_fails_where_a_cpl3_call_reaches_userspace():
    """The property, not the variant: a KVM that exits to userspace, or answers
    anything but a known refusal, fails the case."""
    for outcome in (HypercallOutcome.EXITS, HypercallOutcome.RETURNS_ENOSYS):
        execution = replace(MAINLINE.execution, cpl3_hypercall={"vmcall": outcome,
                                                                "vmmcall": EPERM})
        with Kvm(replace(MAINLINE, execution=execution)) as kvm:
            (inst,) = [i for i in instances((0,))
                       if i.case.name == "hypercall.native_vmcall_cpl3"]
            assert run_instance(kvm, inst).status is Status.FAIL, outcome


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profile_survives_the_round_trip_through_its_capabilities(name):
    """What a model profile reports, a host profile built from it takes back: the
    fields both records share, and the errno that differs between builds."""
    from guestmem.model.profile import SHARED_WITH_CAPABILITIES, Profile

    profile = PROFILES[name]
    with Kvm(profile) as kvm:
        again = Profile.from_capabilities(kvm.capabilities)
    for field in (*SHARED_WITH_CAPABILITIES, "bind_overlap_errno"):
        assert getattr(again, field) == getattr(profile, field), field
