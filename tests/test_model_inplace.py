"""The `inplace` profile: PRIVATE kept per guest_memfd, converted in place with
KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd (upstream.md §7.1,
upstream-2026-11.md §1), after guest_memfd_conversions_test.c.

The kernel here has no in-place conversion (the probe: ENOTTY), so these run on
the model; `gmem.attributes2_without_in_place` checks the kernel's side.
"""

from __future__ import annotations

import errno

import pytest

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm
from guestmem.model.invariants import violations
from guestmem.model.snapshot import snapshot
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
SW = uapi.KVM_X86_SW_PROTECTED_VM
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GPA = 1 << 32


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno, getattr(e, "error_offset", None)
    return None


def host_reads(mapping, offset):
    try:
        return mapping.read(offset, 8)
    except HostSigbus:
        return "SIGBUS"


def guest(vmm, *steps):
    abi = default_hypercall_abi(vmm.kvm.capabilities, vmm.cpl)
    vmm.load(compile_program(p.Program.of(*steps), abi))
    return vmm.run()


def test_the_profile_moves_private_from_the_vm_to_the_guest_memfd():
    kvm = Kvm("inplace")
    vm = kvm.create_vm(SW)
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == PRIVATE
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == SHARED, "INIT_SHARED allowed"
    assert errno_of(vm.set_memory_attributes, GPA, PS, PRIVATE) == (errno.EINVAL, None)
    assert errno_of(vm.set_memory_attributes, GPA, PS, 0) is None, "RWX stay at VM level"
    default = kvm.create_vm()
    assert default.check_extension(uapi.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0


def test_bad_input_is_einval_in_the_kernels_order_and_changes_nothing():
    kvm = Kvm("inplace")
    vm = kvm.create_vm(SW)
    g = vm.create_guest_memfd(4 * PS, SHARED)
    no_private = kvm.create_vm().create_guest_memfd(4 * PS, SHARED)
    before = snapshot(kvm)
    set2 = g.set_memory_attributes2
    for call, args in [
        (set2, (0, PS, PRIVATE, 1)),  # flags, before everything else
        (no_private.set_memory_attributes2, (0, PS, PRIVATE)),  # VM without private memory
        (set2, (0, PS, 1 << 4)),  # unknown attribute
        (set2, (0, 0, PRIVATE)),  # size 0
        (set2, (PS, (1 << 64) - PS, PRIVATE)),  # offset + size wraps
        (set2, (1, PS, PRIVATE)),  # unaligned offset
        (set2, (0, PS + 1, PRIVATE)),  # unaligned size
        (set2, (4 * PS, PS, PRIVATE)),  # offset at i_size
        (set2, (2 * PS, 4 * PS, PRIVATE)),  # end beyond i_size
    ]:
        assert errno_of(call, *args) == (errno.EINVAL, 0), args
    assert snapshot(kvm) == before


def test_init_shared_then_private_then_shared_keeps_the_contents():
    """init_shared / init_private: the host sees a shared page and takes SIGBUS on a
    private one; the guest's data survives both conversions (SW_PROTECTED preserves)."""
    kvm = Kvm("inplace")
    with Vmm(kvm, SW, cpl=0) as vmm:
        region = vmm.add_memory(GPA, 4 * PS)
        assert region.backing == "gmem-inplace", "one guest_memfd, shared with the host in place"
        g, m = region.guest_memfd, region.mapping
        assert guest(vmm, p.WritePattern(GPA, 4 * PS, 0x100, 1)).stop == "done"
        g.set_memory_attributes2(0, PS, PRIVATE)
        assert host_reads(m, 0) == "SIGBUS"
        assert host_reads(m, PS) == (0x100 + PS // 8).to_bytes(8, "little"), "page 1 shared"
        result = guest(vmm, p.VerifyPattern(GPA, PS, 0x100, 1),
                       p.WritePattern(GPA, PS, 0xAA))
        assert result.reports == [p.VERIFY_OK], "private now, and still the guest's data"
        g.set_memory_attributes2(0, PS, 0)
        assert host_reads(m, 0) == (0xAA).to_bytes(8, "little")
        assert violations(kvm) == []


def test_init_private_pages_sigbus_until_converted_and_conversions_are_per_page():
    kvm = Kvm("inplace")
    vm = kvm.create_vm(SW)
    g = vm.create_guest_memfd(4 * PS, MMAP)
    m = g.mmap()
    assert [host_reads(m, i * PS) for i in range(4)] == ["SIGBUS"] * 4
    g.set_memory_attributes2(2 * PS, PS, 0)  # indexing: only page 2
    assert [host_reads(m, i * PS) for i in range(4)] == ["SIGBUS", "SIGBUS", bytes(8),
                                                          "SIGBUS"]
    m.write(2 * PS, b"host")
    g.set_memory_attributes2(0, 4 * PS, 0)
    assert host_reads(m, 2 * PS)[:4] == b"host"
    assert host_reads(m, 0) == bytes(8), "converted before allocation: a zero page"
    assert violations(kvm) == []


def test_a_conversion_before_allocation_is_recorded_and_punch_keeps_it():
    """before_allocation_*, truncate: attributes of pages never faulted are kept, and
    PUNCH_HOLE does not change them; a punched private page reads zero to the guest."""
    kvm = Kvm("inplace")
    with Vmm(kvm, SW, cpl=0) as vmm:
        region = vmm.add_memory(GPA, 2 * PS)
        g, m = region.guest_memfd, region.mapping
        g.set_memory_attributes2(0, PS, PRIVATE)
        assert not g.inode.folios.boundaries(), "nothing allocated"
        assert host_reads(m, 0) == "SIGBUS"
        assert guest(vmm, p.WritePattern(GPA, PS, 7)).stop == "done"
        g.punch_hole(0, PS)
        assert host_reads(m, 0) == "SIGBUS", "still private after the punch"
        assert guest(vmm, p.ReadValue(GPA)).reports == [0]
        assert violations(kvm) == []


def test_a_pinned_page_makes_the_conversion_eagain_at_its_offset():
    """elevated_refcount: to-private unmaps the host, then finds the pin: EAGAIN,
    error_offset = the pinned page, no attribute changed; other pages convert; after
    the unpin the whole range converts and keeps its contents."""
    kvm = Kvm("inplace")
    vm = kvm.create_vm(SW)
    g = vm.create_guest_memfd(4 * PS, SHARED)
    m = g.mmap()
    m.write(0, b"A" * 4 * PS)
    pin = m.pin(2 * PS, PS)
    for offset, size in ((0, 4 * PS), (2 * PS, PS)):
        assert errno_of(g.set_memory_attributes2, offset, size, PRIVATE) == \
            (errno.EAGAIN, 2 * PS)
        assert g.inode.private_ranges(0, 4) == [], "nothing converted"
        assert not m.ptes.boundaries(), "the host mappings were zapped first, as the kernel does"
    g.set_memory_attributes2(0, 2 * PS, PRIVATE)
    g.set_memory_attributes2(3 * PS, PS, PRIVATE)
    pin.unpin()
    g.set_memory_attributes2(0, 4 * PS, PRIVATE)
    g.set_memory_attributes2(0, 4 * PS, 0)
    assert m.read(0, 4 * PS) == b"A" * 4 * PS
    assert violations(kvm) == []


def test_a_conversion_zaps_the_stage2_mappings_of_the_range_once():
    kvm = Kvm("inplace")
    with Vmm(kvm, SW, cpl=0) as vmm:
        region = vmm.add_memory(GPA, 4 * PS)
        assert guest(vmm, p.WritePattern(GPA, 4 * PS, 1)).stop == "done"
        mmu = vmm.vm.mmu
        before = (mmu.invalidations, mmu.zapped_pages)
        region.guest_memfd.set_memory_attributes2(PS, 2 * PS, PRIVATE)
        assert (mmu.invalidations, mmu.zapped_pages) == (before[0] + 1, before[1] + 2)
        region.guest_memfd.set_memory_attributes2(PS, 2 * PS, PRIVATE)  # already so
        assert mmu.invalidations == before[0] + 1, "nothing to change: no invalidation"


@pytest.mark.parametrize("profile, stop", [("coco", "memory_fault"), ("inplace", "mmio")])
def test_after_its_memslot_is_deleted_a_private_gpa_is_mmio_in_place(profile, stop):
    """v8 private_mem_kvm_exits_test: with PRIVATE in the guest_memfd, a deleted
    memslot leaves nothing private at the GPA, so the access is MMIO; with VM-level
    attributes it stays private: a MEMORY_FAULT exit."""
    kvm = Kvm(profile)
    with Vmm(kvm, SW, cpl=0) as vmm:
        region = vmm.add_memory(GPA, PS)
        if profile == "inplace":
            region.guest_memfd.set_memory_attributes2(0, PS, PRIVATE)
        else:
            vmm.vm.set_memory_attributes(GPA, PS, PRIVATE)
        vmm.vm.delete_memslot(region.slot)
        vmm.regions.remove(region)
        result = guest(vmm, p.ReadValue(GPA))
        assert result.stop == stop, result
        if stop == "mmio":
            assert result.exit.phys_addr == GPA
        else:
            assert (result.memory_fault.gpa, result.memory_fault.flags) == (GPA, PRIVATE)


def test_init_private_the_guest_writes_and_the_host_sees_it_once_shared():
    """init_private: without INIT_SHARED every page starts private (the INIT state,
    no attribute set): the guest reads zeros and writes; the host takes SIGBUS until
    the page is converted, then reads what the guest wrote."""
    kvm = Kvm("inplace")
    with Vmm(kvm, SW, cpl=0) as vmm:
        g = vmm.vm.create_guest_memfd(PS, MMAP)
        m = g.mmap()
        vmm.vm.set_user_memory_region2(9, uapi.KVM_MEM_GUEST_MEMFD, GPA, PS, m.addr, g, 0)
        result = guest(vmm, p.ReadValue(GPA), p.WritePattern(GPA, PS, 0x55))
        assert (result.stop, result.reports) == ("done", [0])
        assert host_reads(m, 0) == "SIGBUS"
        g.set_memory_attributes2(0, PS, 0)
        assert host_reads(m, 0) == (0x55).to_bytes(8, "little")
        assert violations(kvm) == []
        vmm.vm.delete_memslot(9)
        m.munmap()
        g.close()


def test_init_private_guest_accesses_go_to_the_guest_memfd_not_userspace_addr():
    """A guest_memfd without MMAP behind a memslot whose userspace_addr is other
    memory: a page in the INIT state is private, so the guest's write lands in the
    guest_memfd and the shared memory stays zero; once converted to shared, the
    guest's accesses go through userspace_addr."""
    kvm = Kvm("inplace")
    with Vmm(kvm, SW, cpl=0) as vmm:
        g = vmm.vm.create_guest_memfd(PS, 0)
        anon = kvm.mmap_anonymous(PS)
        vmm.vm.set_user_memory_region2(9, uapi.KVM_MEM_GUEST_MEMFD, GPA, PS, anon.addr, g, 0)
        assert guest(vmm, p.WritePattern(GPA, PS, 0x55)).stop == "done"
        assert anon.read(0, 8) == bytes(8), "the private write went to the guest_memfd"
        g.set_memory_attributes2(0, PS, 0)
        assert guest(vmm, p.WritePattern(GPA, PS, 0x66)).stop == "done"
        assert anon.read(0, 8) == (0x66).to_bytes(8, "little"), "shared: userspace_addr"
        assert violations(kvm) == []
        vmm.vm.delete_memslot(9)
        g.close()


# --- content across a conversion, per VM type (profile.Conversion) -------------------------------
def _host_written_and_round_tripped(vm_type, profile="inplace"):
    """Host writes a word, the page goes private and back; what the host reads then."""
    kvm = Kvm(profile)
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(4 * PS, SHARED)
    view = gmem.mmap()
    view.write(PS + 8, (0x1122334455667788).to_bytes(8, "little"))
    gmem.set_memory_attributes2(0, 4 * PS, PRIVATE)
    assert violations(kvm) == []
    gmem.set_memory_attributes2(0, 4 * PS, 0)
    assert violations(kvm) == []
    return int.from_bytes(view.read(PS + 8, 8), "little"), view.read(3 * PS, 8)


@pytest.mark.parametrize("vm_type", [SW, uapi.GUESTMEM_PKVM_VM])
def test_sw_protected_and_pkvm_keep_the_bytes_across_conversions(vm_type):
    assert _host_written_and_round_tripped(vm_type) == (0x1122334455667788, bytes(8))


def test_tdx_gives_either_side_a_zeroed_page():
    """TDH.MEM.PAGE.AUG + ACCEPT zero it for the guest, tdx_clear_page for the host."""
    assert _host_written_and_round_tripped(uapi.KVM_X86_TDX_VM) == (0, bytes(8))


def test_snp_leaves_noise_that_is_not_the_previous_owners_data():
    """RMPUPDATE keeps the bytes; read through the other key they are noise. A page
    never touched (page 3) has no folio to convert: it reads zero when first used."""
    word, untouched = _host_written_and_round_tripped(uapi.KVM_X86_SNP_VM)
    assert word not in (0x1122334455667788, 0)
    assert word >> 32 == 0x43495048, "the model's ciphertext tag, \"CIPH\""
    assert untouched == bytes(8)


def test_seed_003s_option_zeroes_what_sw_protected_would_keep():
    from dataclasses import replace

    from guestmem.model import PROFILES
    zeroing = replace(PROFILES["inplace"], gmem_zero_on_conversion=True)
    assert _host_written_and_round_tripped(SW, zeroing) == (0, bytes(8))


def test_each_snp_conversion_is_a_new_key_stream():
    kvm = Kvm("inplace")
    gmem = kvm.create_vm(uapi.KVM_X86_SNP_VM).create_guest_memfd(PS, SHARED)
    view = gmem.mmap()
    view.fill(0, 0xAB, PS)
    seen = []
    for _ in range(2):
        gmem.set_memory_attributes2(0, PS, PRIVATE)
        gmem.set_memory_attributes2(0, PS, 0)
        seen.append(view.read(0, 8))
    assert seen[0] != seen[1]


def test_pkvm_hands_a_buffer_to_the_guest_without_a_copy():
    """Seed 004: the host fills a buffer, converts it to private in place, and the
    guest reads what the host wrote; the host can no longer touch it."""
    kvm = Kvm("inplace")
    vmm = Vmm(kvm, uapi.GUESTMEM_PKVM_VM, cpl=0)
    region = vmm.add_memory(GPA, 64 * PS)
    region.mapping.fill(0, 0x5A, 64 * PS)
    region.guest_memfd.set_memory_attributes2(region.gmem_offset, 64 * PS, PRIVATE)
    assert guest(vmm, p.VerifyPattern(GPA, 64 * PS, int.from_bytes(b"\x5a" * 8, "little"), 0),
                 ).reports == [0]
    assert host_reads(region.mapping, 0) == "SIGBUS"
    assert violations(kvm) == []


def test_the_host_fault_on_private_memory_names_what_hardware_would_do():
    kvm = Kvm("inplace")
    for vm_type, hardware in ((uapi.KVM_X86_SNP_VM, "RMP #PF"), (uapi.KVM_X86_TDX_VM, "#MC"),
                              (uapi.GUESTMEM_PKVM_VM, "stage-2 abort"), (SW, None)):
        gmem = kvm.create_vm(vm_type).create_guest_memfd(PS, MMAP)
        try:
            gmem.mmap().read(0, 8)
        except HostSigbus as e:
            assert (hardware in str(e)) if hardware else "hardware" not in str(e), str(e)
        else:
            pytest.fail("a private page was readable")


@pytest.mark.parametrize("profile", ["mainline", "coco"])
def test_pkvm_exists_only_with_in_place_conversion(profile):
    kvm = Kvm(profile)
    assert uapi.GUESTMEM_PKVM_VM not in kvm.supported_vm_types()
    assert errno_of(kvm.create_vm, uapi.GUESTMEM_PKVM_VM) == (errno.EINVAL, None)


def test_a_fault_over_a_shared_and_a_private_run_takes_each_from_its_source():
    """Without MMAP the memslot's shared pages come through userspace_addr and its
    private ones from the guest_memfd: a pre-fault over both splits where the
    guest_memfd's attributes change (found by bench/conversion.py's author)."""
    kvm = Kvm("inplace")
    vm = kvm.create_vm(SW)
    gmem = vm.create_guest_memfd(4 * PS, uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
    anon = kvm.mmap_anonymous(4 * PS)
    vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, GPA, 4 * PS, anon.addr, gmem, 0)
    gmem.set_memory_attributes2(PS, 3 * PS, PRIVATE)
    assert vm.create_vcpu().pre_fault_memory(GPA, 4 * PS) == (GPA + 4 * PS, 0)
    gfn = GPA // PS
    sources = [(lo - gfn, hi - gfn, "hva" if s == "hva" else "gmem")
               for lo, hi, s in vm.mmu.mapped.items()]
    assert sources == [(0, 1, "hva"), (1, 4, "gmem")]
    assert violations(kvm) == []


def test_the_memory_map_shows_the_files_own_privateness_bound_or_not():
    kvm = Kvm("inplace")
    gmem = kvm.create_vm(SW).create_guest_memfd(4 * PS, SHARED)
    gmem.set_memory_attributes2(PS, 2 * PS, PRIVATE)
    runs = [(r.first, r.last, "private" in r.state) for r in gmem.memory_map().runs]
    assert runs == [(0, 1, False), (1, 3, True), (3, 4, False)]


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM])
def test_the_invariant_catches_a_conversion_that_skips_the_vm_types_hook(vm_type, monkeypatch):
    """The record of what a page held is taken apart from the make_private /
    make_shared hook, so a hook that does nothing is a visible leak (review)."""
    from guestmem.model.gmem import GmemInode
    monkeypatch.setattr(GmemInode, "_change_owner", lambda self, first, last: None)
    kvm = Kvm("inplace")
    gmem = kvm.create_vm(vm_type).create_guest_memfd(PS, SHARED)
    gmem.mmap().write(0, b"secret!!")
    gmem.set_memory_attributes2(0, PS, PRIVATE)
    assert any("kept the previous owner's data" in v for v in violations(kvm))


@pytest.mark.parametrize(("vm_type", "expect"), [
    (uapi.KVM_X86_TDX_VM, lambda word: word == 0),
    (uapi.KVM_X86_SNP_VM, lambda word: word >> 32 == 0x43495048)])
def test_the_guest_reads_a_reinitialised_page_after_it_converts_to_private(vm_type, expect):
    """The guest's side of the hand-over: the host wrote the page, the guest asks
    for it private (MAP_GPA_RANGE; its C-bit / shared-bit view flips) and reads
    TDX's zeros or SNP's ciphertext, never the host's word."""
    kvm = Kvm("inplace")
    with Vmm(kvm, vm_type, cpl=0) as vmm:
        region = vmm.add_memory(GPA, 4 * PS)
        region.mapping.write(PS, (0x1122334455667788).to_bytes(8, "little"))
        result = guest(vmm, p.MapGpaRange(GPA + PS, 1, PS, encrypted=True),
                       p.ReadValue(GPA + PS))
        assert result.reports[0] == 0 and expect(result.reports[1]), hex(result.reports[1])
        assert violations(kvm) == []


def test_the_raw_ioctl_reaches_kvm_gmem_ioctl_only_in_place():
    """By number, KVM_SET_MEMORY_ATTRIBUTES2 is the series' one guest_memfd ioctl:
    in place it reads its struct (EFAULT: the model has no user memory at `arg`),
    elsewhere, and for any other number, ENOTTY."""
    gmem = Kvm("inplace").create_vm(SW).create_guest_memfd(PS, SHARED)
    assert errno_of(gmem.ioctl, uapi.KVM_SET_MEMORY_ATTRIBUTES2, 0) == (errno.EFAULT, None)
    assert errno_of(gmem.ioctl, uapi.KVM_SET_MEMORY_ATTRIBUTES, 0) == (errno.ENOTTY, None)
    coco = Kvm("coco").create_vm(SW).create_guest_memfd(PS, 0)
    assert errno_of(coco.ioctl, uapi.KVM_SET_MEMORY_ATTRIBUTES2, 0) == (errno.ENOTTY, None)
