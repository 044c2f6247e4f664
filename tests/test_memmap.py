"""memory_map(): a guest_memfd's pages as runs of alike pages, on both backends."""

import pytest

from guestmem import memmap, uapi
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.memmap import PageRun, intervals_of, runs_of
from guestmem.model import Kvm as ModelKvm
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def test_runs_merge_alike_neighbours_and_cover_the_window():
    runs = runs_of(0, 10, {"a": [(0, 4), (4, 6)], "b": [(2, 8)]}, [(0, 10, "0")])
    assert runs == (PageRun(0, 2, frozenset({"a"}), "0"), PageRun(2, 6, frozenset({"a", "b"}), "0"),
                    PageRun(6, 8, frozenset({"b"}), "0"), PageRun(8, 10, frozenset(), "0"))


def test_per_page_answers_become_intervals():
    assert intervals_of(100, b"\x00\x01\x01\x00\x05") == [(101, 103), (104, 105)]


def test_a_restricted_view_merges_runs_again():
    mm = memmap.MemoryMap(3 * PS, 0, 3, runs_of(0, 3, {"a": [(0, 1)], "b": [(1, 2)]}),
                          frozenset({"a", "b"}))
    assert mm.restricted(frozenset({"b"})).runs == (
        PageRun(0, 1, frozenset()), PageRun(1, 2, frozenset({"b"})), PageRun(2, 3, frozenset()))


def test_model_shows_every_property_per_range_at_terabyte_scale():
    with ModelKvm("coco", numa_nodes=2) as kvm:
        vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        g = vm.create_guest_memfd(1 << 40, uapi.GUEST_MEMFD_FLAG_MMAP)
        vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, 1 << 40, 1 << 40, 0, g, 0)
        g.allocate(0, 1 << 39)  # half a TiB: one run
        vm.set_memory_attributes((1 << 40) + PS, 2 * PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        mm = g.memory_map()
        assert mm.runs == (
            PageRun(0, 1, frozenset({"allocated"}), "0"),
            PageRun(1, 3, frozenset({"allocated", "private"}), "0"),
            PageRun(3, (1 << 39) // PS, frozenset({"allocated"}), "0"),
            PageRun((1 << 39) // PS, (1 << 40) // PS, frozenset()))
        assert mm.pages_with("private") == 2
        assert mm.known == frozenset(memmap.PROPERTIES)


def test_model_shows_pins_poison_host_and_stage2_mappings():
    with ModelKvm("coco") as kvm, Vmm(kvm) as vmm:
        region = vmm.add_memory(1 << 32, 8 * PS)
        abi = default_hypercall_abi(kvm.capabilities, vmm.cpl)
        vmm.load(compile_program(p.Program.of(p.WritePattern(1 << 32, 2 * PS, 1)), abi))
        assert vmm.run().stop == "done"
        region.mapping.read(4 * PS, 8)
        pin = region.mapping.pin(5 * PS, PS)
        region.mapping.madvise(6 * PS, PS, 100)  # MADV_HWPOISON (coco: CONFIG_MEMORY_FAILURE)
        states = {r.first: r.state for r in region.guest_memfd.memory_map().runs}
        assert states[0] == {"allocated", "uptodate", "stage2-mapped"}
        assert states[4] == {"allocated", "uptodate", "host-mapped"}
        assert states[5] == {"allocated", "uptodate", "host-mapped", "pinned"}
        assert states[6] == {"allocated", "uptodate", "hwpoison"}
        pin.unpin()


def test_kernel_shows_uptodate_pages_and_this_process_mappings(host_kvm):
    """mincore reports a guest_memfd folio only once it is uptodate: fallocate's
    folios stay invisible until something touches them."""
    vm = host_kvm.create_vm()
    with vm, vm.create_guest_memfd(8 * PS, MMAP_SHARED) as g, g.mmap() as m:
        g.allocate(0, 2 * PS)
        m.write(3 * PS, b"x")
        other = g.mmap(2 * PS, 4 * PS)
        other.read(PS, 8)  # file page 5
        mm = g.memory_map()
        assert mm.known == {"uptodate", "host-mapped"}
        assert [(r.first, r.last, set(r.state)) for r in mm.runs] == [
            (0, 3, set()), (3, 4, {"uptodate", "host-mapped"}), (4, 5, set()),
            (5, 6, {"uptodate", "host-mapped"}), (6, 8, set())]
        other.munmap()
        assert g.memory_map(5 * PS, PS).runs == (PageRun(5, 6, frozenset({"uptodate"})),)


def test_kernel_without_mmap_shows_only_mappings_and_bad_windows_are_refused(host_kvm):
    vm = host_kvm.create_vm()
    with vm, vm.create_guest_memfd(4 * PS, 0) as g:
        assert g.memory_map().known == {"host-mapped"}
        for offset, length in ((1, PS), (0, 5 * PS), (-PS, PS)):
            with pytest.raises(ValueError):
                g.memory_map(offset, length)


def test_model_refuses_bad_windows_as_the_kernel_backend_does():
    with ModelKvm() as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4 * PS) as g:
        for offset, length in ((1, PS), (0, 5 * PS), (-PS, PS)):
            with pytest.raises(ValueError):
                g.memory_map(offset, length)
