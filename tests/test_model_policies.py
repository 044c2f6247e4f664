"""Seed 004's designs as conversion policies of the `inplace` profile
(model/gmem.py ConversionPolicy): what each allows and what it refuses, with the
errno or signal, and that a refusal changes nothing."""

from __future__ import annotations

import errno
import signal

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.model import Kvm
from guestmem.model.invariants import violations
from guestmem.model.snapshot import snapshot
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
PAGES = 8
SW = uapi.KVM_X86_SW_PROTECTED_VM
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
MADV_DONTFORK, MADV_WILLNEED = 10, 3
GPA = 1 << 32


def gmem_with(policy, kvm=None):
    kvm = kvm or Kvm("inplace")
    gmem = kvm.create_vm(SW).create_guest_memfd(PAGES * PS, SHARED)
    gmem.set_conversion_policy(policy)
    return kvm, gmem


def refused(kvm, fn, *args):
    """The errno fn fails with; the model must not change meanwhile."""
    before = snapshot(kvm)
    try:
        fn(*args)
    except OSError as e:
        assert snapshot(kvm) == before, f"{fn.__name__} failed but changed the model"
        return e.errno
    pytest.fail(f"{fn.__name__}{args} was allowed")


# --- selecting a policy ---------------------------------------------------------------------------
def test_a_policy_is_chosen_before_the_file_is_mapped_and_only_in_place():
    kvm = Kvm("inplace")
    gmem = kvm.create_vm(SW).create_guest_memfd(PAGES * PS, SHARED)
    with pytest.raises(ValueError):
        gmem.set_conversion_policy("per-folio")
    view = gmem.mmap()
    assert refused(kvm, gmem.set_conversion_policy, "whole-file") == errno.EBUSY
    view.munmap()
    gmem.set_conversion_policy("whole-file")
    coco_kvm = Kvm("coco")
    coco = coco_kvm.create_vm(SW).create_guest_memfd(PS, uapi.GUEST_MEMFD_FLAG_MMAP)
    assert refused(coco_kvm, coco.set_conversion_policy, "whole-file") == errno.ENOTTY


# --- whole-file (seed 004 items 1, 4, 5) --------------------------------------------------------
def test_whole_file_maps_all_or_nothing_and_once():
    kvm, gmem = gmem_with("whole-file")
    assert refused(kvm, gmem.mmap, PS) == errno.EINVAL, "part of the file"
    assert refused(kvm, gmem.mmap, (PAGES - 1) * PS, PS) == errno.EINVAL, "not from offset 0"
    view = gmem.mmap()
    assert refused(kvm, gmem.mmap) == errno.EBUSY, "a second mapping"
    view.munmap()
    gmem.mmap().munmap()  # after the munmap, the file can be mapped again


def test_whole_file_refuses_to_split_its_vma():
    kvm, gmem = gmem_with("whole-file")
    view = gmem.mmap()
    assert refused(kvm, view.madvise, 0, PS, MADV_DONTFORK) == errno.EINVAL
    assert refused(kvm, view.mbind, 0, PS, uapi.MPOL_BIND, 1) == errno.EINVAL
    view.madvise(0, PS, MADV_WILLNEED)  # advice that leaves vm_flags alone: no split
    view.madvise(0, PAGES * PS, MADV_DONTFORK)  # the whole VMA: no split either
    view.mbind(0, PAGES * PS, uapi.MPOL_BIND, 1)


def test_whole_file_converts_only_once_unmapped_and_unmaps_only_without_pins():
    kvm, gmem = gmem_with("whole-file")
    view = gmem.mmap()
    view.fill(0, 0x5A, PAGES * PS)
    try:
        gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
    except OSError as e:
        assert (e.errno, e.error_offset) == (errno.EBUSY, 0)
    else:
        pytest.fail("converted a mapped whole-file guest_memfd")
    pin = view.pin(PS, PS)
    assert refused(kvm, view.munmap) == errno.EBUSY, "outstanding references at munmap"
    assert view.read(PS, 1) == b"\x5a", "the refused munmap left the mapping"
    pin.unpin()
    view.munmap()
    gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
    gmem.set_memory_attributes2(0, PS, 0)  # to shared needs nothing
    assert violations(kvm) == []


def test_whole_file_mapping_is_not_inherited():
    kvm, gmem = gmem_with("whole-file")
    view = gmem.mmap()
    with kvm.fork() as child:
        assert child.touch(view, 0) == signal.SIGSEGV, "at most one mapping: VM_DONTCOPY"
    view.munmap()


# --- no-get-pfn-while-mapped (seed 004 item 2) ------------------------------------------------
def _vmm_on(policy):
    kvm = Kvm("inplace")
    vmm = Vmm(kvm, SW, cpl=0)
    gmem = vmm.vm.create_guest_memfd(PAGES * PS, SHARED)
    gmem.set_conversion_policy(policy)
    return kvm, vmm, gmem


def _guest_writes(vmm, gpa):
    from guestmem.guest import compile_program, default_hypercall_abi
    abi = default_hypercall_abi(vmm.kvm.capabilities, vmm.cpl)
    vmm.load(compile_program(p.Program.of(p.WritePattern(gpa, 8, 7)), abi))
    return vmm.run()


def test_no_get_pfn_while_mapped_stops_the_guest_while_the_host_maps_the_file():
    kvm, vmm, gmem = _vmm_on("no-get-pfn-while-mapped")
    anon = kvm.mmap_anonymous(PAGES * PS)  # gmem-only faults: the file is not at userspace_addr
    vmm.vm.set_user_memory_region2(5, uapi.KVM_MEM_GUEST_MEMFD, GPA, PAGES * PS, anon.addr,
                                   gmem, 0)
    gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
    view = gmem.mmap()
    result = _guest_writes(vmm, GPA)
    assert (result.stop, result.errno) == ("memory_fault", errno.EBUSY)
    assert result.memory_fault is not None and result.memory_fault.gpa == GPA
    view.munmap()
    assert _guest_writes(vmm, GPA).stop == "done", "no mapping: get_pfn works"
    assert violations(kvm) == []
    vmm.close()


def test_no_get_pfn_while_mapped_leaves_pages_the_guest_already_has():
    """Only a new fault asks kvm_gmem_get_pfn: an SPTE made before the host mapped
    the file keeps working; the next page needs a pfn and fails."""
    kvm, vmm, gmem = _vmm_on("no-get-pfn-while-mapped")
    anon = kvm.mmap_anonymous(PAGES * PS)
    vmm.vm.set_user_memory_region2(5, uapi.KVM_MEM_GUEST_MEMFD, GPA, PAGES * PS, anon.addr,
                                   gmem, 0)
    gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
    assert _guest_writes(vmm, GPA).stop == "done"
    view = gmem.mmap()
    assert _guest_writes(vmm, GPA).stop == "done", "its SPTE is still there"
    result = _guest_writes(vmm, GPA + PS)
    assert (result.stop, result.errno) == ("memory_fault", errno.EBUSY)
    view.munmap()
    vmm.close()


# --- rmap-switch (seed 004, the reply) ----------------------------------------------------------
def test_rmap_switch_maps_freely_but_never_pins_so_conversion_never_waits():
    kvm, gmem = gmem_with("rmap-switch")
    views = [gmem.mmap(PS, i * PS) for i in range(2)]  # ordinary, partial mappings
    views[0].fill(0, 0x11, PS)
    assert refused(kvm, views[0].pin, 0, PS) == errno.EFAULT
    with kvm.fork() as child:
        assert child.read(views[1], 0, 1) == b"\x00"
        gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)  # no reference can be in the way
        assert child.touch(views[1], 0) == signal.SIGBUS, "unmapped in every process"
    assert kvm.process.stats.ptes_zapped == 2
    assert violations(kvm) == []


def test_per_page_is_upstream_pins_make_conversion_wait():
    kvm, gmem = gmem_with("per-page")
    view = gmem.mmap()
    pin = view.pin(3 * PS, PS)
    try:
        gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
    except OSError as e:
        assert (e.errno, e.error_offset) == (errno.EAGAIN, 3 * PS)
    else:
        pytest.fail("a pinned page was converted")
    pin.unpin()
    gmem.set_memory_attributes2(0, PAGES * PS, PRIVATE)
