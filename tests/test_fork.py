"""fork() of the VMM process: a child with the parent's mappings (but MADV_DONTFORK
ones) and files, on both backends (issue 9 part 3; guest_memfd_conversions_test's
forked_accesses). On the kernel the child is a real fork that serves loads and
stores through its own page tables (host/fork.py).
"""

from __future__ import annotations

import errno
import signal

import pytest

from guestmem import uapi
from guestmem.exits import HostSigbus, HostSigsegv
from guestmem.model import Kvm as ModelKvm
from guestmem.model.invariants import leaks_after_close, violations

from .conftest import backends, open_kvm

PS = uapi.PAGE_SIZE
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
MADV_DONTFORK, MADV_DOFORK = 10, 11
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.fixture(params=backends())
def kvm(request):
    with open_kvm(request.param) as kvm:
        yield kvm


def gmem_and_mapping(kvm, pages=4):
    vm = kvm.create_vm()
    gmem = vm.create_guest_memfd(pages * PS, SHARED)
    return vm, gmem, gmem.mmap()


def test_the_child_shares_guest_memfd_pages_both_ways(kvm):
    vm, gmem, view = gmem_and_mapping(kvm)
    view.write(PS, b"parent")
    with kvm.fork() as child:
        assert child.pid > 0
        assert child.read(view, PS, 6) == b"parent"
        child.write(view, 2 * PS, b"child")
        assert view.read(2 * PS, 5) == b"child", "MAP_SHARED: one page cache"
    view.munmap()
    gmem.close()
    vm.close()


def test_dontfork_leaves_the_mapping_out_of_the_child(kvm):
    vm, gmem, view = gmem_and_mapping(kvm)
    view.madvise(PS, PS, MADV_DONTFORK)  # splits the VMA: only page 1 is left out
    with kvm.fork() as child:
        assert child.touch(view, 0) is None
        assert child.touch(view, PS) == signal.SIGSEGV
        assert child.touch(view, PS, write=True) == signal.SIGSEGV
        try:
            child.read(view, PS, 8)
        except HostSigsegv:
            pass
        else:
            pytest.fail("a DONTFORK page was readable in the child")
    view.madvise(PS, PS, MADV_DOFORK)
    with kvm.fork() as child:
        assert child.touch(view, PS) is None, "DOFORK undoes it"
    view.munmap()
    gmem.close()
    vm.close()


def test_a_punch_in_the_parent_reaches_the_childs_page_tables(kvm):
    vm, gmem, view = gmem_and_mapping(kvm)
    with kvm.fork() as child:
        child.write(view, 0, b"\x77" * 8)  # the child's PTE now maps the page
        gmem.punch_hole(0, PS)
        assert child.read(view, 0, 8) == bytes(8), "the child sees the new, zeroed page"
    view.munmap()
    gmem.close()
    vm.close()


def test_the_child_keeps_the_file_after_the_parent_lets_go(kvm):
    """dup_fd and dup_mmap: the child's fd and VMA hold the guest_memfd; the parent's
    close and munmap do not take its pages away."""
    vm, gmem, view = gmem_and_mapping(kvm)
    view.write(0, b"kept")
    child = kvm.fork()
    try:
        addr_holder = view  # the child's VMA is at the same address
        view.munmap()
        gmem.close()
        vm.close()
        assert child.read(addr_holder, 0, 4) == b"kept"
    finally:
        child.exit()


def test_an_exited_child_answers_esrch(kvm):
    vm, gmem, view = gmem_and_mapping(kvm)
    child = kvm.fork()
    child.exit()
    child.exit()  # again: nothing
    try:
        child.read(view, 0, 1)
    except OSError as e:
        assert e.errno == errno.ESRCH
    else:
        pytest.fail("an exited child answered")
    view.munmap()
    gmem.close()
    vm.close()


def test_anonymous_shared_memory_is_shared_with_the_child(kvm):
    view = kvm.mmap_anonymous(2 * PS)
    with kvm.fork() as child:
        child.write(view, 0, b"anon")
        assert view.read(0, 4) == b"anon"
        view.munmap()
        assert child.read(view, 0, 4) == b"anon", "the child's mapping keeps the shmem"


def test_arguments_are_checked_before_the_child_is_asked(kvm):
    vm, gmem, view = gmem_and_mapping(kvm)
    with kvm.fork() as child:
        with pytest.raises(TypeError, match="mapping"):
            child.read(object(), 0, 1)
        with pytest.raises(ValueError):
            child.read(view, 4 * PS, 1)
    view.munmap()
    gmem.close()
    vm.close()


# --- the model: references, invariants, in-place conversion --------------------------------------
def test_model_child_holds_the_inode_and_the_vm_until_it_exits():
    kvm = ModelKvm("mainline")
    vm, gmem, view = gmem_and_mapping(kvm)
    inode = gmem.inode
    child = kvm.fork()
    view.munmap()
    gmem.close()
    vm.close()
    assert not inode.released and kvm.vms, "the child's fds and VMA hold them"
    child.exit()
    assert inode.released and not kvm.vms
    assert leaks_after_close(kvm) == []


@pytest.mark.parametrize("backend", backends())
def test_forked_accesses_on_in_place_conversion(backend):
    """guest_memfd_conversions_test forked_accesses: the child maps the page, the
    parent converts it to private, and the child's next access is SIGBUS, because
    the conversion zaps every process's mappings. Only where conversion is in place."""
    if backend == "kvm":
        from guestmem.host import Kvm as HostKvm
        kvm = HostKvm()
        if not kvm.capabilities.gmem_in_place_conversion:
            kvm.close()
            pytest.skip("no in-place conversion (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES; "
                        "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: ENOTTY)")
        vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    else:
        kvm, vm_type = ModelKvm("inplace"), uapi.KVM_X86_SW_PROTECTED_VM
    vm = kvm.create_vm(vm_type)
    gmem = vm.create_guest_memfd(PS, SHARED)
    view = gmem.mmap()
    with kvm.fork() as child:
        view.write(0, b"\x0b")
        assert child.read(view, 0, 1) == b"\x0b"
        child.write(view, 0, b"\x0c")
        gmem.set_memory_attributes2(0, PS, PRIVATE)
        if backend == "model":
            assert violations(kvm) == []
        for write in (False, True):
            assert child.touch(view, 0, write=write) == signal.SIGBUS
        try:
            child.read(view, 0, 1)
        except HostSigbus:
            pass
        else:
            pytest.fail("the child read a private page")
    view.munmap()
    gmem.close()
    vm.close()
    kvm.close()


def test_model_invariants_see_the_childs_page_tables():
    """A child PTE left on a page that became private breaks confidentiality, and the
    invariants look at every process: here a conversion that misses the child's
    VMA (taken out of the inode's i_mmap by hand) is caught."""
    kvm = ModelKvm("inplace")
    gmem = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(PS, SHARED)
    view = gmem.mmap()
    child = kvm.fork()
    child.read(view, 0, 8)
    child_mapping = next(m for m in gmem.inode.mappings if m.process is not kvm.process)
    gmem.inode.mappings.discard(child_mapping)
    gmem.set_memory_attributes2(0, PS, PRIVATE)
    assert any("host PTEs on private pages" in v for v in violations(kvm))
    gmem.inode.mappings.add(child_mapping)
    child.exit()
