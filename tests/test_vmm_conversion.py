"""The VMM's conversion choices, its private-memory layout, several vCPUs, and
aligned mappings: what the ported private_mem_conversions_test and
test_collapse stand on."""

import errno
import gc

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm as ModelKvm
from guestmem.vmm import RunResult, Vmm
from guestmem.vmm.vmm import MAP_GPA_DO_FALLOCATE, MAP_GPA_SET_ATTRIBUTES, MAP_GPA_SHARED

PS = uapi.PAGE_SIZE
MB2 = 2 << 20
BASE = 1 << 32
SW = uapi.KVM_X86_SW_PROTECTED_VM
PRIVATE_WORD, SHARED_WORD = 0x2222222222222222, 0x1111111111111111


@pytest.fixture
def coco():
    with ModelKvm("coco") as kvm:
        yield kvm




def run(vmm, *steps, vcpu=None):
    abi = default_hypercall_abi(vmm.kvm.capabilities, vmm.cpl)
    vmm.load(compile_program(p.Program.of(*steps), abi), vcpu=vcpu)
    return vmm.run(vcpu=vcpu)


def round_trip(vmm):
    """Private, write; shared; private again: what the guest reads then."""
    first = run(vmm, p.MapGpaRange(BASE, 1), p.WritePattern(BASE, PS, PRIVATE_WORD),
                p.MapGpaRange(BASE, 1, encrypted=False), p.VerifyPattern(BASE, PS, SHARED_WORD))
    assert (first.stop, first.reports) == ("done", [0, 0, p.VERIFY_OK])
    return run(vmm, p.MapGpaRange(BASE, 1), p.ReadValue(BASE)).reports


@pytest.mark.parametrize("conversion, private_read", [
    ("attributes+fallocate", 0),  # punched when it became shared: a new, zeroed page
    ("attributes", PRIVATE_WORD),  # only the attributes changed: the same folio
])
def test_conversion_with_and_without_fallocate(coco, conversion, private_read):
    with Vmm(coco, SW, conversion=conversion) as vmm:
        region = vmm.add_memory(BASE, MB2)
        region.mapping.write(0, SHARED_WORD.to_bytes(8, "little") * (PS // 8))
        assert round_trip(vmm) == [0, private_read]
        assert [r.attrs for r in vmm.tracker.requests] == [
            uapi.KVM_MAP_GPA_RANGE_ENCRYPTED, 0, uapi.KVM_MAP_GPA_RANGE_ENCRYPTED]


def test_unknown_conversion_is_refused_before_anything_is_created(coco):
    gc.collect()  # earlier tests' garbage must not close its fds during the count
    before = coco.open_fd_count()
    with pytest.raises(ValueError, match="conversion must be one of"):
        Vmm(coco, SW, conversion="fallocate")
    assert coco.open_fd_count() == before


def flagged(vmm, gpa, npages, flags):
    result = RunResult("running")
    return vmm.hypercall(uapi.KVM_HC_MAP_GPA_RANGE, (gpa, npages, flags), result), result.log


def test_guest_flags_kvm_checks_first_and_only_attribute_changes_are_tracked(coco):
    with Vmm(coco, SW, conversion="guest-flags") as vmm:
        vmm.add_private_memory(BASE, MB2)
        set_private = MAP_GPA_SET_ATTRIBUTES | MAP_GPA_DO_FALLOCATE
        assert flagged(vmm, BASE + 1, 1, set_private)[0] == -uapi.KVM_EINVAL  # unaligned
        assert flagged(vmm, BASE, 0, set_private)[0] == -uapi.KVM_EINVAL  # no pages
        assert vmm.tracker.requests == []
        assert flagged(vmm, BASE, 1, MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE)[0] == 0
        assert vmm.tracker.requests == []  # a punch without BIT0 is no conversion
        assert flagged(vmm, BASE, 2, set_private)[0] == 0
        assert [(r.gpa, r.npages, r.encrypted) for r in vmm.tracker.requests] == [(BASE, 2, True)]


def test_guest_flags_on_a_vm_without_private_memory_answer_kvm_einval(any_kvm):
    with Vmm(any_kvm, conversion="guest-flags") as vmm:
        ret, log = flagged(vmm, 1 << 20, 1, MAP_GPA_SET_ATTRIBUTES)
        assert ret == -uapi.KVM_EINVAL  # KVM_SET_MEMORY_ATTRIBUTES fails (ENOTTY/EINVAL)
        assert [r.ret for r in vmm.tracker.requests] == [-uapi.KVM_EINVAL]
        assert log == [f"MAP_GPA_RANGE gpa={1 << 20:#x} npages=1 attrs=0x1 -> -22"]


def test_private_memory_split_over_memslots_of_one_guest_memfd(coco):
    with Vmm(coco, SW) as vmm:
        regions = vmm.add_private_memory(BASE, 4 * MB2, nr_memslots=4)
        assert [(r.gpa, r.size, r.gmem_offset, r.backing) for r in regions] == [
            (BASE + i * MB2, MB2, i * MB2, "gmem+shared") for i in range(4)]
        assert len({id(r.guest_memfd) for r in regions}) == 1
        assert len({r.mapping.addr for r in regions}) == 4
        # a conversion across slots 1 and 2: private pages at the right file offsets
        result = run(vmm, p.MapGpaRange(BASE + 2 * MB2 - PS, 2),
                     p.WritePattern(BASE + 2 * MB2 - PS, 2 * PS, 5, 1),
                     p.VerifyPattern(BASE + 2 * MB2 - PS, 2 * PS, 5, 1))
        assert result.reports == [0, p.VERIFY_OK]
        assert vmm.read(BASE + 2 * MB2 - PS, 8) == bytes(8)  # the host sees shared memory


@pytest.mark.parametrize("size, nr_memslots", [(MB2, 3), (MB2 + PS, 2), (MB2, 0)])
def test_private_memory_that_does_not_split_is_refused(coco, size, nr_memslots):
    with Vmm(coco, SW) as vmm, pytest.raises(ValueError, match="do not split"):
        vmm.add_private_memory(BASE, size, nr_memslots)


def test_a_failed_private_memory_layout_leaves_nothing(coco):
    with Vmm(coco, SW) as vmm:
        blocker = vmm.add_memory(BASE + 3 * MB2, PS, backing="anon")
        gc.collect()
        fds, mappings = coco.open_fd_count(), len(coco.process.mappings)
        with pytest.raises(OSError) as err:
            vmm.add_private_memory(BASE, 4 * MB2, nr_memslots=4, shared="thp")
        assert err.value.errno == errno.EEXIST  # slot 3 overlaps the blocker
        assert (coco.open_fd_count(), len(coco.process.mappings)) == (fds, mappings)
        assert vmm.regions[-1] is blocker
        vmm.add_private_memory(BASE, 2 * MB2, nr_memslots=2)  # the GPAs are free again


def test_unknown_shared_source_is_refused(coco):
    with Vmm(coco, SW) as vmm, pytest.raises(ValueError, match="shared must be one of"):
        vmm.add_private_memory(BASE, MB2, shared="hugetlb")


def test_vcpus_take_turns(any_kvm):
    with Vmm(any_kvm) as vmm:
        vmm.add_memory(BASE, 2 * MB2)
        second = vmm.add_vcpu()
        assert second.vcpu_id == 1 and vmm.vcpus == [vmm.vcpu, second]
        for turn, vcpu in enumerate((vmm.vcpu, second, vmm.vcpu, second)):
            gpa = BASE + (turn % 2) * MB2
            result = run(vmm, p.WritePattern(gpa, PS, turn, 1), p.VerifyPattern(gpa, PS, turn, 1),
                         vcpu=vcpu)
            assert (result.stop, result.reports) == ("done", [p.VERIFY_OK]), turn
        assert vmm.read(BASE + MB2 + 8, 8) == (3 + 1).to_bytes(8, "little")


@pytest.mark.parametrize("what", ["anonymous", "guest_memfd"])
def test_aligned_mappings(any_kvm, what):
    with any_kvm.create_vm() as vm, vm.create_guest_memfd(MB2, 3) as gmem:
        mapping = any_kvm.mmap_anonymous(MB2 + PS, align=MB2) if what == "anonymous" \
            else gmem.mmap(MB2, align=MB2)
        with mapping:
            assert mapping.addr % MB2 == 0
            mapping.write(MB2 - 8, b"12345678")
            assert mapping.read(MB2 - 8, 8) == b"12345678"


def test_a_failed_aligned_mmap_leaves_no_reservation(host_kvm):
    def maps():
        with open("/proc/self/maps") as f:
            return f.read().count("\n")
    with host_kvm.create_vm() as vm, vm.create_guest_memfd(MB2, 0) as gmem:
        before = maps()
        with pytest.raises(OSError) as err:
            gmem.mmap(MB2, align=MB2)  # no GUEST_MEMFD_FLAG_MMAP
        assert err.value.errno == errno.ENODEV
        assert maps() == before
