"""Every OSError of the kvm backend names the ioctl or syscall that failed, errno unchanged."""

from __future__ import annotations

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
