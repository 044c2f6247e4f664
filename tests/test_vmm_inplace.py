"""The VMM converting in place (issue 9 part 6): a private VM on one guest_memfd
per memory region, guest MAP_GPA_RANGE requests as KVM_SET_MEMORY_ATTRIBUTES2,
pins that make a conversion fail, and no partial state after a failure."""

import errno

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm as ModelKvm
from guestmem.model.gmem import GmemInode
from guestmem.model.process import AnonymousMemory
from guestmem.vmm import RunResult, Sharing, Vmm
from guestmem.vmm.vmm import (
    CONVERSION_RETRIES,
    IN_PLACE,
    MAP_GPA_DO_FALLOCATE,
    MAP_GPA_SET_ATTRIBUTES,
    MAP_GPA_SHARED,
)

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
BASE = 1 << 32
SW = uapi.KVM_X86_SW_PROTECTED_VM
EINVAL_RAX = (1 << 64) - uapi.KVM_EINVAL  # -KVM_EINVAL as the guest's RAX reports it
HOST_WORD, GUEST_WORD = 0x1111111111111111, 0x2222222222222222


@pytest.fixture
def inplace():
    with ModelKvm("inplace") as kvm:
        yield kvm


def run(vmm, *steps):
    vmm.load(compile_program(p.Program.of(*steps), default_hypercall_abi(vmm.kvm.capabilities,
                                                                         vmm.cpl)))
    return vmm.run()


def words(word, size=PS):
    return word.to_bytes(8, "little") * (size // 8)


def host_reads(vmm, gpa):
    """The host's 8 bytes at gpa through the VMM's mapping, or "SIGBUS"."""
    try:
        return vmm.read(gpa, 8)
    except HostSigbus:
        return "SIGBUS"


def test_a_private_vm_runs_on_one_guest_memfd_per_region_without_anonymous_memory(inplace):
    with Vmm(inplace, SW) as vmm:
        regions = vmm.add_private_memory(BASE, 2 * MB2, nr_memslots=2)
        assert (vmm.in_place, vmm.converts) == (True, True)
        assert [r.backing for r in [vmm.low, *regions]] == [IN_PLACE] * 3
        assert regions[0].gmem is regions[1].gmem, "the memslots share one guest_memfd"
        assert [r.gmem_offset for r in regions] == [0, MB2]
        backings = inplace.process.backings
        assert not [b for b in backings if isinstance(b, AnonymousMemory)]
        assert len([b for b in backings if isinstance(b, GmemInode)]) == 2  # low, private


def test_add_private_memory_in_place_has_no_other_shared_source(inplace):
    with Vmm(inplace, SW) as vmm:
        before = inplace.open_fd_count()
        with pytest.raises(ValueError, match="no 'thp' source"):
            vmm.add_private_memory(BASE, MB2, shared="thp")
        assert (inplace.open_fd_count(), len(vmm.regions)) == (before, 1)


def test_default_vm_on_inplace_does_not_convert(inplace):
    """A VM without private memory has no PRIVATE in its guest_memfds
    (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES is 0): plain "gmem", nothing converts."""
    with Vmm(inplace) as vmm:
        assert (vmm.in_place, vmm.converts, vmm.low.backing) == (False, False, "gmem")


def test_map_gpa_range_converts_in_place_and_the_page_keeps_its_contents(inplace):
    """SW_PROTECTED preserves contents across conversions (the series: KVM leaves
    them alone); the host sees the one page while it is shared and SIGBUS while
    private, through the same mapping the VMM reads and writes with."""
    with Vmm(inplace, SW) as vmm:
        vmm.add_private_memory(BASE, MB2)
        vmm.write(BASE, words(HOST_WORD))
        first = run(vmm, p.MapGpaRange(BASE, 1), p.VerifyPattern(BASE, PS, HOST_WORD),
                    p.WritePattern(BASE, PS, GUEST_WORD))
        assert (first.stop, first.reports) == ("done", [0, p.VERIFY_OK])
        assert host_reads(vmm, BASE) == "SIGBUS"
        assert host_reads(vmm, BASE + PS) == bytes(8), "the next page is still shared"
        second = run(vmm, p.MapGpaRange(BASE, 1, encrypted=False))
        assert second.reports == [0]
        assert vmm.read(BASE, PS) == words(GUEST_WORD), "shared again: the guest's data"
        assert [(r.encrypted, r.ret, r.failed_gpa) for r in vmm.tracker.requests] == [
            (True, 0, None), (False, 0, None)]


def test_default_conversion_does_not_punch_in_place(inplace):
    """"attributes+fallocate" frees the other backing; in place there is none, and a
    punch would destroy the data the guest just shared."""
    with Vmm(inplace, SW, conversion="attributes+fallocate") as vmm:
        vmm.add_private_memory(BASE, MB2)
        result = run(vmm, p.MapGpaRange(BASE, 1), p.WritePattern(BASE, PS, GUEST_WORD),
                     p.MapGpaRange(BASE, 1, encrypted=False))
        assert result.reports == [0, 0]
        assert vmm.read(BASE, 8) == words(GUEST_WORD, 8)


def pinned_vmm(kvm, vm_type=SW):
    """Two memslots of 2 MiB on one guest_memfd, the host's pattern in the three
    pages around the slot boundary, the last of them pinned by someone else."""
    vmm = Vmm(kvm, vm_type)
    regions = vmm.add_private_memory(BASE, 2 * MB2, nr_memslots=2)
    for i in range(3):  # Vmm.write stays within one memslot
        vmm.write(BASE + MB2 + (i - 1) * PS, words(HOST_WORD))
    return vmm, regions[1].mapping.pin(PS, PS)


def test_a_pinned_page_fails_the_request_after_the_retries(inplace):
    vmm, pin = pinned_vmm(inplace)
    with vmm:
        gpa, pinned_gpa = BASE + MB2 - PS, BASE + MB2 + PS
        result = run(vmm, p.MapGpaRange(gpa, 3))
        assert result.reports == [EINVAL_RAX], "the guest sees the failure"
        assert sum("EAGAIN" in line for line in result.log) == 1 + CONVERSION_RETRIES
        assert result.log[-1] == (f"MAP_GPA_RANGE gpa={gpa:#x} npages=3 attrs=0x10 -> "
                                  f"{-uapi.KVM_EINVAL} (failed at gpa {pinned_gpa:#x})")
        request = vmm.tracker.requests[-1]
        assert (request.ret, request.failed_gpa) == (-uapi.KVM_EINVAL, pinned_gpa)
        assert vmm.tracker.ranges(Sharing.PRIVATE) == []
        pin.unpin()


def test_a_failed_multi_region_request_leaves_the_attributes_unchanged(inplace):
    """The first memslot's piece converted before the second failed: it is put back
    (shared, readable, the host's data), and the guest reads it as shared memory."""
    vmm, pin = pinned_vmm(inplace)
    with vmm:
        gpa = BASE + MB2 - PS
        assert run(vmm, p.MapGpaRange(gpa, 3)).reports == [EINVAL_RAX]
        assert [host_reads(vmm, gpa + i * PS) for i in range(3)] == \
            [words(HOST_WORD, 8)] * 3, "every page still shared, with its data"
        result = run(vmm, p.VerifyPattern(gpa, 3 * PS, HOST_WORD))
        assert result.reports == [p.VERIFY_OK]
        pin.unpin()


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM])
def test_a_failed_request_keeps_the_hosts_data_where_conversion_reinitialises(
        inplace, vm_type):
    """Memslots contiguous in one guest_memfd are one KVM_SET_MEMORY_ATTRIBUTES2,
    all or nothing: the first memslot's piece is never converted and undone, which
    on SNP and TDX would have re-initialised it (found in review)."""
    vmm, pin = pinned_vmm(inplace, vm_type)
    with vmm:
        gpa = BASE + MB2 - PS
        assert run(vmm, p.MapGpaRange(gpa, 3)).reports == [EINVAL_RAX]
        assert [host_reads(vmm, gpa + i * PS) for i in range(3)] == \
            [words(HOST_WORD, 8)] * 3, "every page still shared, with the host's data"
        pin.unpin()


def test_after_the_unpin_the_same_request_succeeds(inplace):
    vmm, pin = pinned_vmm(inplace)
    with vmm:
        gpa = BASE + MB2 - PS
        assert run(vmm, p.MapGpaRange(gpa, 3)).reports == [EINVAL_RAX]
        pin.unpin()
        result = run(vmm, p.MapGpaRange(gpa, 3), p.VerifyPattern(gpa, 3 * PS, HOST_WORD))
        assert result.reports == [0, p.VERIFY_OK], "private, across both memslots, data kept"
        assert [host_reads(vmm, gpa + i * PS) for i in range(3)] == ["SIGBUS"] * 3
        assert [(r.ret, r.failed_gpa) for r in vmm.tracker.requests] == [
            (-uapi.KVM_EINVAL, BASE + MB2 + PS), (0, None)]


def test_the_vmm_drops_its_own_pins_to_convert(inplace):
    with Vmm(inplace, SW) as vmm:
        vmm.add_private_memory(BASE, MB2)
        vmm.pin(BASE + PS, PS)
        kept = vmm.pin(BASE + 8 * PS, PS)
        result = run(vmm, p.MapGpaRange(BASE, 4))
        assert result.reports == [0]
        assert vmm.pins == [kept], "only the pin in the way is dropped"
        assert result.log[:2] == [
            f"KVM_SET_MEMORY_ATTRIBUTES2 [{BASE:#x}, +{4 * PS:#x}) private: EAGAIN at gpa "
            f"{BASE + PS:#x} (attempt 1)",
            f"dropped the VMM's pin on [{BASE + PS:#x}, +{PS:#x})"]


def test_vmm_pin_must_lie_in_one_memslot(inplace):
    with Vmm(inplace, SW) as vmm:
        vmm.add_private_memory(BASE, 2 * MB2, nr_memslots=2)
        with pytest.raises(ValueError, match="not within memslot"):
            vmm.pin(BASE + MB2 - PS, 2 * PS)
        assert vmm.pins == []


def test_to_private_over_memory_without_a_guest_memfd_fails_and_to_shared_is_ignored(inplace):
    """Only a guest_memfd has private pages (QEMU kvm_convert_memory refuses to-private
    on other memory, ignores to-shared)."""
    with Vmm(inplace, SW) as vmm:
        vmm.add_private_memory(BASE, MB2)
        vmm.add_memory(BASE + MB2, MB2, backing="anon")
        assert run(vmm, p.MapGpaRange(BASE + MB2 - PS, 2)).reports == [EINVAL_RAX]
        assert host_reads(vmm, BASE + MB2 - PS) == bytes(8), "nothing became private"
        assert run(vmm, p.MapGpaRange(BASE + MB2 - PS, 2, encrypted=False)).reports == [0]


def flagged(vmm, gpa, npages, flags):
    result = RunResult("running")
    return vmm.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, (gpa, npages, flags), result), result.log


def test_guest_flags_convert_and_punch_the_one_guest_memfd(inplace):
    with Vmm(inplace, SW, conversion="guest-flags") as vmm:
        vmm.add_private_memory(BASE, MB2)
        vmm.write(BASE, words(HOST_WORD))
        assert flagged(vmm, BASE, 1, MAP_GPA_SET_ATTRIBUTES)[0] == 0  # private, attributes
        assert host_reads(vmm, BASE) == "SIGBUS"
        assert flagged(vmm, BASE, 1, MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED)[0] == 0
        assert vmm.read(BASE, PS) == words(HOST_WORD), "converted in place: kept"
        assert flagged(vmm, BASE, 1, MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE)[0] == 0  # punch
        assert vmm.read(BASE, PS) == bytes(PS), "the same page punched: zeros"
        assert len(vmm.tracker.requests) == 2, "a punch alone is no conversion"


def test_guest_flags_set_attributes_fails_on_a_pin_with_the_gpa(inplace):
    with Vmm(inplace, SW, conversion="guest-flags") as vmm:
        region, = vmm.add_private_memory(BASE, MB2)
        pin = region.mapping.pin(2 * PS, PS)
        ret, log = flagged(vmm, BASE, 4, MAP_GPA_SET_ATTRIBUTES)
        assert ret == -uapi.KVM_EINVAL
        assert f"failed at gpa {BASE + 2 * PS:#x}" in log[-1]
        assert vmm.tracker.requests[-1].failed_gpa == BASE + 2 * PS
        pin.unpin()
        assert flagged(vmm, BASE, 4, MAP_GPA_SET_ATTRIBUTES)[0] == 0


def test_the_vm_ioctl_takes_no_private_and_to_shared_keeps_the_vmms_pins(inplace):
    """In place, PRIVATE is the guest_memfd's: KVM_SET_MEMORY_ATTRIBUTES on the VM
    refuses it (EINVAL), so the VMM never asks; a to-shared conversion meets no
    refcount check, so the VMM keeps its pins."""
    with Vmm(inplace, SW) as vmm:
        vmm.add_private_memory(BASE, MB2)
        try:
            vmm.vm.set_memory_attributes(BASE, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        except OSError as e:
            assert e.errno == errno.EINVAL, "in place, the VM ioctl takes no PRIVATE"
        else:
            pytest.fail("KVM_SET_MEMORY_ATTRIBUTES took PRIVATE in place")
        held = vmm.pin(BASE, PS)
        assert vmm.convert(BASE, PS, private=False) == 0
        assert vmm.pins == [held]
