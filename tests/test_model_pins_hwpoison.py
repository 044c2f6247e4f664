"""GUP pins and memory errors in the model (upstream.md §2.12; DESIGN.md invariants)."""

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program
from guestmem.model import Kvm
from guestmem.model.invariants import leaks_after_close, violations
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def gmem_with_mapping(kvm, pages=8):
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(pages * PS, FLAGS)
    return vm, g, g.mmap(pages * PS)


def test_a_pinned_page_outlives_its_punch_until_unpinned():
    kvm = Kvm()
    vm, g, m = gmem_with_mapping(kvm)
    m.write(0, b"\x77" * (2 * PS))
    stats = kvm.process.stats
    pin = m.pin(0, 2 * PS)
    g.punch_hole(0, 2 * PS)
    assert g.inode.allocated_pages() == 0  # gone from the file...
    assert (stats.pages_allocated, stats.orphaned) == (2, 2)  # ...but not freed
    assert violations(kvm) == []
    assert m.read(0, 8) == bytes(8)  # the file hands out a new zeroed page
    assert stats.pages_allocated == 3
    pin.unpin()
    assert (stats.pages_allocated, stats.orphaned) == (1, 0)
    assert violations(kvm) == []
    m.munmap()
    g.close()
    vm.close()
    assert leaks_after_close(kvm) == []


def test_two_pins_free_truncated_pages_only_at_the_last_unpin():
    kvm = Kvm()
    vm, g, m = gmem_with_mapping(kvm)
    first, second = m.pin(0, PS), m.pin(0, PS)
    g.punch_hole(0, PS)
    first.unpin()
    assert kvm.process.stats.orphaned == 1
    second.unpin()
    second.unpin()  # a second unpin of the same pin is a no-op
    assert kvm.process.stats.orphaned == 0 and kvm.process.stats.pages_allocated == 0
    assert violations(kvm) == []


def test_unpin_without_truncation_frees_nothing():
    kvm = Kvm()
    vm, g, m = gmem_with_mapping(kvm)
    pin = m.pin(PS, 3 * PS)
    assert g.inode.pinned(1, 4)
    pin.unpin()
    assert not g.inode.pinned(0, 8)
    assert kvm.process.stats.pages_allocated == 3
    assert violations(kvm) == []


def test_madv_hwpoison_exists_only_where_the_profile_has_memory_failure():
    """This host's kernel answers MADV_HWPOISON with EINVAL (no CONFIG_MEMORY_FAILURE):
    the mainline profile does too; coco models a host that has it."""
    import errno

    for profile, works in (("mainline", False), ("coco", True)):
        kvm = Kvm(profile)
        vm, g, m = gmem_with_mapping(kvm)
        try:
            m.madvise(0, PS, 100)
            outcome = True
        except OSError as e:
            assert e.errno == errno.EINVAL
            outcome = False
        assert outcome is works
        assert (g.inode.poisoned(0, 8) is not None) is works


def test_madv_hwpoison_of_anonymous_memory_is_refused_by_the_model():
    """A deliberate limit of the model: memory_failure() is modelled for guest_memfd
    folios only, so MADV_HWPOISON of anonymous memory is EINVAL even in coco, and
    changes nothing (the kernel would poison the page)."""
    import errno

    from guestmem.model.snapshot import snapshot

    kvm = Kvm("coco")
    m = kvm.mmap_anonymous(2 * PS)
    m.write(0, b"x")
    before = snapshot(kvm)
    try:
        m.madvise(0, PS, 100)
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        raise AssertionError("MADV_HWPOISON of anonymous memory succeeded on the model")
    assert snapshot(kvm) == before
    assert m.read(0, 1) == b"x"


def test_hwpoison_guest_gets_ehwpoison_host_sigbus_punch_recovers():
    kvm = Kvm("coco")
    with Vmm(kvm, cpl=0) as vmm:
        region = vmm.add_memory(1 << 32, 4 * PS)
        region.mapping.write(PS, b"\x11" * PS)
        region.mapping.madvise(PS, PS, 100)  # MADV_HWPOISON
        assert violations(kvm) == []
        vmm.load(compile_program(p.Program.of(p.ReadValue((1 << 32) + PS + 8))))
        r = vmm.run()
        assert (r.stop, r.errno) == ("memory_fault", uapi.EHWPOISON)
        assert (r.memory_fault.gpa, r.memory_fault.size) == ((1 << 32) + PS, PS)
        try:
            region.mapping.read(PS, 8)
        except HostSigbus:
            pass
        else:
            raise AssertionError("host read a poisoned page")
        assert region.mapping.read(0, 8) == bytes(8)  # the neighbour is fine
        region.gmem.punch_hole(PS, PS)  # userspace drops the poisoned page
        vmm.load(compile_program(p.Program.of(p.ReadValue((1 << 32) + PS + 8))))
        r = vmm.run()
        assert (r.stop, r.reports) == ("done", [0])
        assert violations(kvm) == []


def test_madv_hwpoison_needs_a_page_gup_can_fault():
    """madvise_inject_error GUPs each page first: private memory or a page past EOF
    is EFAULT, nothing is allocated for it, and the counters still add up."""
    import errno

    kvm = Kvm("coco")  # a profile with CONFIG_MEMORY_FAILURE
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(2 * PS, FLAGS)
    m = g.mmap(4 * PS)
    m.write(0, b"\x01")
    try:
        m.madvise(0, 4 * PS, 100)
    except OSError as e:
        assert e.errno == errno.EFAULT
    else:
        raise AssertionError("MADV_HWPOISON past EOF succeeded")
    # the pages before the failing one were poisoned, as the kernel's loop does
    assert g.inode.poisoned(0, 2) == 0
    assert g.inode.allocated_pages() == 2 and violations(kvm) == []
    private = vm.create_guest_memfd(PS, uapi.GUEST_MEMFD_FLAG_MMAP)
    pm = private.mmap(PS)
    try:
        pm.madvise(0, PS, 100)
    except OSError as e:
        assert e.errno == errno.EFAULT
    assert private.inode.allocated_pages() == 0
    for obj in (m, pm):
        obj.munmap()
    g.close()
    private.close()
    vm.close()
    assert leaks_after_close(kvm) == []


def test_a_multi_page_guest_access_faults_on_the_poisoned_page_not_the_first():
    """kvm_gmem_get_pfn fails with EHWPOISON for the poisoned page the access
    reaches; the MEMORY_FAULT exit names that page, and the pages before it in the
    same write were written (the guest's loop got there first)."""
    kvm = Kvm("coco")
    with Vmm(kvm, cpl=0) as vmm:
        region = vmm.add_memory(1 << 32, 4 * PS)
        region.mapping.write(2 * PS, b"\x22" * PS)
        region.mapping.madvise(2 * PS, PS, 100)  # MADV_HWPOISON page 2
        vmm.load(compile_program(p.Program.of(p.WritePattern(1 << 32, 4 * PS, 7))))
        r = vmm.run()
        assert (r.stop, r.errno) == ("memory_fault", uapi.EHWPOISON)
        assert (r.memory_fault.gpa, r.memory_fault.size) == ((1 << 32) + 2 * PS, PS)
        assert region.mapping.read(PS, 8) == (7).to_bytes(8, "little")  # written before
        assert violations(kvm) == []
