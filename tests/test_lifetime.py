"""Object lifetimes at the API boundary: failed opens, dropped objects, use after close."""

from __future__ import annotations

import errno
import gc
import os
import sys
import time

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm
from guestmem.model.invariants import leaks_after_close

from .conftest import backends, open_kvm


@pytest.fixture
def unraisable(monkeypatch):
    """What Python reports as "Exception ignored in ..." (e.g. from __del__)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    yield seen
    gc.collect()


def test_failed_host_open_reports_nothing_from_del(unraisable):
    with pytest.raises(OSError) as e:
        HostKvm(path="/nonexistent")
    assert e.value.errno == errno.ENOENT, "open of a missing path is ENOENT"
    with pytest.raises(TypeError):
        HostKvm(pth="/dev/kvm")  # a wrong keyword: the object exists, __init__ never ran
    del e
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


def test_failed_model_open_reports_nothing_from_del(unraisable):
    with pytest.raises(ValueError):
        ModelKvm(profile="no-such-profile")
    with pytest.raises(TypeError):
        ModelKvm(profil="mainline")
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


# --- the same calls on both backends ---------------------------------------------------------
PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED






def ebadf(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == errno.EBADF, f"expected EBADF: {e.value!r}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("probed_first", [False, True])
def test_a_closed_kvm_answers_ebadf(backend, probed_first):
    kvm = open_kvm(backend)
    if probed_first:
        assert kvm.capabilities.guest_memfd
    kvm.close()
    ebadf(lambda: kvm.capabilities)
    ebadf(kvm.api_version)
    ebadf(kvm.check_extension, uapi.KVM_CAP_GUEST_MEMFD)
    ebadf(kvm.vcpu_mmap_size)
    ebadf(kvm.supported_vm_types)
    ebadf(kvm.create_vm)
    kvm.mmap_anonymous(PS).munmap()  # not an ioctl on /dev/kvm: still works


@pytest.mark.parametrize("backend", backends())
def test_objects_dropped_unclosed_release_their_fds(backend):
    """The kvm backend's _Fd.__del__ closes a dropped object's fd; the model's
    objects hold a real fd each (an open /dev/null) and must release it too."""
    with open_kvm(backend) as kvm:
        gc.collect()
        before = kvm.open_fd_count()
        for _ in range(50):
            vm = kvm.create_vm()
            g = vm.create_guest_memfd(4 * PS, FLAGS)
            vm.set_user_memory_region2(1, uapi.KVM_MEM_GUEST_MEMFD, 1 << 32, PS, 0, g, 0)
            vcpu = vm.create_vcpu(0)
            del vm, g, vcpu  # never closed
        gc.collect()  # the model's VM and memslots form a cycle: collected by the GC
        assert kvm.open_fd_count() == before, "every dropped object's fd was closed"
        if backend == "model":
            assert leaks_after_close(kvm) == []


@pytest.mark.parametrize("backend", backends())
def test_a_dropped_guest_memfd_lives_on_in_its_mapping(backend):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        with kvm.mmap_anonymous(PS) as warm:
            warm.read(0, 1)  # the kvm backend opens /proc/self/mem once, for good
        gc.collect()
        before = kvm.open_fd_count()
        g = vm.create_guest_memfd(4 * PS, FLAGS)
        m = g.mmap()
        m.write(PS, b"kept")
        del g
        gc.collect()
        assert kvm.open_fd_count() == before, "the fd is closed"
        assert m.read(PS, 4) == b"kept", "the mapping still holds the file"
        m.munmap()
        if backend == "model":
            assert kvm.process.backings == set(), "the last reference gone: the inode too"


@pytest.mark.parametrize("backend", backends())
def test_a_closed_vcpus_id_stays_taken(backend):
    """Closing a vCPU fd does not free its id: the vCPU lives until its VM does."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(3).close()
        with pytest.raises(OSError) as e:
            vm.create_vcpu(3)
        assert e.value.errno == errno.EEXIST
        vm.create_vcpu(4).close()


@pytest.mark.parametrize("backend", backends())
def test_stat_is_a_full_stat_result(backend):
    """Observed on 6.18.44: a regular file, mode 0600, one link, owned by the
    creator, st_blocks 0 whatever is allocated or faulted (guest_memfd never
    accounts i_blocks), atime fixed at creation."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, \
            vm.create_guest_memfd(64 * PS, FLAGS) as g, g.mmap() as m:
        first = g.stat()
        assert isinstance(first, os.stat_result)
        g.allocate(0, 4 * PS)
        m.write(10 * PS, b"x")
        m.madvise(20 * PS, 4 * PS, 23)  # MADV_POPULATE_WRITE
        g.punch_hole(0, PS)
        st = g.stat()
        assert (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blksize,
                st.st_blocks, st.st_rdev) == (0o100600, 1, os.geteuid(), os.getegid(),
                                              64 * PS, PS, 0, 0)
        assert st.st_atime_ns == first.st_atime_ns, "atime never moves"
        with vm.create_guest_memfd(PS, 0) as other:
            assert other.stat().st_ino != st.st_ino, "a new inode per guest_memfd"
            assert other.stat().st_dev == st.st_dev


TICK = 0.02  # more than a jiffy: the kernel's file times are coarse


@pytest.mark.parametrize("backend", backends())
def test_what_moves_mtime_and_ctime(backend):
    """file_update_time on a successful fallocate and on a host write fault
    (fault_dirty_shared_page); not on a read fault, a write to a page a read
    fault already mapped (writable), a failed fallocate, or a guest write."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, \
            vm.create_guest_memfd(64 * PS, FLAGS) as g, g.mmap() as m:
        def moved(what, fn, *args, err=None):
            before = g.stat()
            time.sleep(TICK)
            if err is None:
                fn(*args)
            else:
                with pytest.raises(OSError) as e:
                    fn(*args)
                assert e.value.errno == err, what
            after = g.stat()
            assert after.st_ctime_ns == after.st_mtime_ns, what
            return after.st_mtime_ns != before.st_mtime_ns

        assert moved("allocate", g.allocate, 0, PS)
        assert moved("punch a hole", g.punch_hole, 32 * PS, PS)
        assert not moved("failed allocate", g.allocate, 0, 128 * PS, err=errno.EINVAL)
        assert not moved("read fault", m.read, 40 * PS, 8)
        assert not moved("write after a read fault", m.write, 40 * PS, b"x")
        assert moved("write fault", m.write, 41 * PS, b"x")
        assert not moved("write again", m.write, 41 * PS, b"y")
        assert moved("MADV_POPULATE_WRITE", m.madvise, 50 * PS, PS, 23)
        assert moved("MADV_REMOVE", m.madvise, 50 * PS, PS, 9)


@pytest.mark.parametrize("backend", backends())
def test_a_guest_write_leaves_the_times_alone(backend):
    from guestmem import program as p
    from guestmem.guest import compile_program, default_hypercall_abi
    from guestmem.vmm import Vmm

    with open_kvm(backend) as kvm, Vmm(kvm) as vmm:
        abi = default_hypercall_abi(kvm.capabilities)
        vmm.load(compile_program(p.Program.of(p.WritePattern(0x200000, 16, 5, 1)), abi))
        before = vmm.low.gmem.stat()
        time.sleep(TICK)
        assert vmm.run().stop == "done"
        assert vmm.low.gmem.stat().st_mtime_ns == before.st_mtime_ns
        assert vmm.read(0x200000, 8) == (5).to_bytes(8, "little"), "the guest did write"


def in_child(fn):
    """fn() in a forked child: (the signal that killed it or None, repr of its result).
    A use after close that touches unmapped memory kills the child, not pytest."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(wfd, repr(fn()).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    return (os.WTERMSIG(status) if os.WIFSIGNALED(status) else None), out


VCPU_OPS = {
    "run": lambda v: v.run(),
    "get_regs": lambda v: v.get_regs(),
    "set_regs": lambda v: v.set_regs(uapi.kvm_regs()),
    "get_sregs": lambda v: v.get_sregs(),
    "set_sregs": lambda v: v.set_sregs(uapi.kvm_sregs()),
    "pre_fault_memory": lambda v: v.pre_fault_memory(0, PS),
    "complete_io_in": lambda v: v.complete_io_in(b"\0" * 4),
    "complete_hypercall": lambda v: v.complete_hypercall(0),
    "immediate_exit": lambda v: setattr(v, "immediate_exit", True),
}


@pytest.mark.parametrize("backend", backends())
def test_a_closed_vcpu_answers_ebadf(backend):
    """KVM_RUN on a closed vCPU wrote to its unmapped kvm_run (a segfault on the kvm
    backend); the model answered registers. Every vCPU call is EBADF once closed."""
    def errnos():
        with open_kvm(backend) as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.close()
            out = {}
            for name, op in VCPU_OPS.items():
                try:
                    op(vcpu)
                    out[name] = None
                except OSError as e:
                    out[name] = e.errno
            return out

    killed, out = in_child(errnos)
    assert killed is None, f"the child died of signal {killed}"
    assert out == repr(dict.fromkeys(VCPU_OPS, errno.EBADF))


@pytest.mark.parametrize("backend", backends())
def test_a_vm_outlives_its_kvm_fd(backend, unraisable):
    """A VM fd needs no open /dev/kvm: vCPUs can still be made and run."""
    kvm = open_kvm(backend)
    vm = kvm.create_vm()
    kvm.close()
    with vm, vm.create_vcpu(0) as vcpu:
        vcpu.immediate_exit = True
        with pytest.raises(OSError) as e:
            vcpu.run()
        assert e.value.errno == errno.EINTR
    gc.collect()
    assert [u.exc_value for u in unraisable] == []
