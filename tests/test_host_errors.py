"""Every OSError of the kvm backend names the ioctl or syscall that failed, errno unchanged."""

from __future__ import annotations

import ctypes
import errno

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm

PS = uapi.PAGE_SIZE


def fails(err, name, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, f"{name}: expected {errno.errorcode[err]}, got {e.value!r}"
    assert name in str(e.value), f"the message names {name}: {e.value}"


def test_open_names_the_path():
    fails(errno.ENOENT, "open /nonexistent", HostKvm, "/nonexistent")


def test_ioctls_name_themselves(host_kvm):
    fails(errno.EINVAL, "KVM_CREATE_VM", host_kvm.create_vm, 99)
    with host_kvm.create_vm() as vm:
        fails(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD", vm.create_guest_memfd, 1)
        fails(errno.EINVAL, "KVM_CREATE_VCPU", vm.create_vcpu, 4096)
        fails(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2", vm.set_user_memory_region2,
              0, uapi.KVM_MEM_GUEST_MEMFD, 1, PS)
        fails(errno.EINVAL, "KVM_ENABLE_CAP", vm.enable_cap, 9999)
        fails(errno.ENOENT, "KVM_GET_DIRTY_LOG", vm.get_dirty_log, 0, 1)
        with vm.create_guest_memfd(PS, 0) as g:
            fails(errno.ENOTTY, "ioctl 0x1234", g.ioctl, 0x1234)


def test_file_operations_name_themselves(host_kvm):
    with host_kvm.create_vm() as vm, vm.create_guest_memfd(PS, 0) as g:
        fails(errno.EINVAL, "read", g.read, 8)
        fails(errno.EINVAL, "write", g.write, b"x")
        fails(errno.ESPIPE, "pread64", g.pread, 8, 0)
        fails(errno.ESPIPE, "pwrite64", g.pwrite, b"x", 0)
        fails(errno.EINVAL, "ftruncate", g.ftruncate, 0)
        fails(errno.EINVAL, "fallocate", g.fallocate, uapi.FALLOC_FL_KEEP_SIZE, 0, 2 * PS)
        fails(errno.ENODEV, "mmap", g.mmap, PS)
        g.close()
        fails(errno.EBADF, "fstat", g.stat)
        fails(errno.EBADF, "fallocate", g.allocate, 0, PS)


def test_use_after_close_names_the_ioctl(host_kvm):
    vm = host_kvm.create_vm()
    vm.close()
    fails(errno.EBADF, "KVM_CREATE_GUEST_MEMFD", vm.create_guest_memfd, PS)
    fails(errno.EBADF, "KVM_CHECK_EXTENSION", vm.check_extension, 1)


def test_failed_run_names_kvm_run(host_kvm):
    with host_kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.immediate_exit = True
        with pytest.raises(OSError) as e:
            vcpu.run()
        assert e.value.errno == errno.EINTR, "immediate_exit: KVM_RUN returns EINTR"
        assert "KVM_RUN" in str(e.value)


class _InterruptedOnce:
    """A libc whose ioctl fails with EINTR the first time, then answers 7."""

    def __init__(self):
        self.calls = 0

    def ioctl(self, fd, request, arg):
        self.calls += 1
        if self.calls == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return 7


def test_an_interrupted_ioctl_is_retried_but_kvm_run_reports_the_kick(monkeypatch):
    """PEP 475 for the integer-argument ioctls (a signal once interrupted
    KVM_CREATE_VM here); KVM_RUN's EINTR is a kick the VMM must see."""
    from guestmem.host import libc

    fake = _InterruptedOnce()
    monkeypatch.setattr(libc, "_libc", fake)
    assert libc.ioctl(3, uapi.KVM_CREATE_VM, 0, "KVM_CREATE_VM") == 7 and fake.calls == 2
    fake.calls = 0
    try:
        libc.ioctl(3, uapi.KVM_RUN, 0, "KVM_RUN", retry_eintr=False)
    except InterruptedError as e:
        assert e.errno == errno.EINTR and fake.calls == 1
    else:
        pytest.fail("KVM_RUN's EINTR was retried away")
