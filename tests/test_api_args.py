"""Wrong Python types fail at the API boundary, identically on both backends.

Every public method of Kvm, Vm, GuestMemfd, Mapping and Vcpu checks its
arguments against one table (guestmem._args.SPEC): a wrong type is a TypeError
naming the parameter and changes nothing; an int that no C type of the
parameter's width holds is an OverflowError; negative ints are not type errors
and get the kernel's errno.
"""

from __future__ import annotations

import errno
import gc
import inspect

import pytest

from guestmem import _args, uapi
from guestmem.host import fork as host_fork
from guestmem.host import hugetlb as host_hugetlb
from guestmem.host import kvm as host
from guestmem.model import gmem as model_gmem
from guestmem.model import hugetlb as model_hugetlb
from guestmem.model import kvm as model_kvm
from guestmem.model import process as model_process
from guestmem.model import vcpu as model_vcpu
from guestmem.model import vm as model_vm
from guestmem.model.snapshot import snapshot

from .conftest import backends, open_kvm

PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
CLASSES = {
    "Kvm": (host.Kvm, model_kvm.Kvm),
    "Vm": (host.Vm, model_vm.Vm),
    "GuestMemfd": (host.GuestMemfd, model_gmem.GuestMemfd),
    "Mapping": (host.Mapping, model_process.Mapping),
    "Vcpu": (host.Vcpu, model_vcpu.Vcpu),
    "ChildProcess": (host_fork.ChildProcess, model_process.ChildProcess),
    "Hugetlb": (host_hugetlb.Hugetlb, model_hugetlb.Hugetlb),
    "HugetlbMount": (host_hugetlb.HugetlbMount, model_hugetlb.HugetlbMount),
    "HugetlbFile": (host_hugetlb.HugetlbFile, model_hugetlb.HugetlbFile),
    "HugetlbMapping": (host_hugetlb.HugetlbMapping, model_hugetlb.HugetlbMapping),
}
# One valid call per method; each test call replaces one argument by a wrong one.
SAMPLES = {
    "Kvm.check_extension": dict(cap=1),
    "Kvm.create_vm": dict(vm_type=0),
    "Kvm.mmap_anonymous": dict(length=PS),
    "Vm.check_extension": dict(cap=1),
    "Vm.create_guest_memfd": dict(size=PS, flags=0),
    "Vm.set_user_memory_region": dict(slot=0, flags=0, guest_phys_addr=0, memory_size=PS,
                                      userspace_addr=0),
    "Vm.set_user_memory_region2": dict(slot=0, flags=0, guest_phys_addr=0, memory_size=PS,
                                       userspace_addr=0, guest_memfd=0, guest_memfd_offset=0),
    "Vm.delete_memslot": dict(slot=0),
    "Vm.set_memory_attributes": dict(address=0, size=PS, attributes=0, flags=0),
    "Vm.enable_cap": dict(cap=0, flags=0),
    "Vm.create_vcpu": dict(vcpu_id=1),
    "Vm.get_dirty_log": dict(slot=0, npages=1),
    "GuestMemfd.fallocate": dict(mode=1, offset=0, length=PS),
    "GuestMemfd.allocate": dict(offset=0, length=PS),
    "GuestMemfd.punch_hole": dict(offset=0, length=PS),
    "GuestMemfd.ioctl": dict(request=0x1234, arg=0),
    "GuestMemfd.ftruncate": dict(length=PS),
    "GuestMemfd.read": dict(n=1),
    "GuestMemfd.write": dict(data=b"x"),
    "GuestMemfd.pread": dict(n=1, offset=0),
    "GuestMemfd.pwrite": dict(data=b"x", offset=0),
    "GuestMemfd.lseek": dict(offset=0, whence=0),
    "GuestMemfd.mmap": dict(length=PS, offset=0, prot=3, shared=True),
    "Mapping.read": dict(offset=0, length=1),
    "Mapping.write": dict(offset=0, data=b"x"),
    "Mapping.fill": dict(offset=0, byte=0, length=1),
    "Mapping.touch_in_child": dict(offset=0, write=False, length=1),
    "Mapping.madvise": dict(offset=0, length=PS, advice=0),
    "Mapping.mbind": dict(offset=0, length=PS, mode=0, nodes=None, flags=0, maxnode=65),
    "Mapping.get_mempolicy": dict(offset=0),
    "Mapping.move_pages": dict(offset=0, count=1),
    "Mapping.pin": dict(offset=0, length=PS),
    "Vcpu.set_regs": dict(regs=uapi.kvm_regs()),
    "Vcpu.set_sregs": dict(sregs=uapi.kvm_sregs()),
    "Vcpu.pre_fault_memory": dict(gpa=0, size=PS, flags=0),
    "Vcpu.complete_io_in": dict(data=b"x"),
    "Vcpu.complete_hypercall": dict(ret=0),
}


def wrong_values(kind):
    """Values of the wrong Python type for a parameter of this kind."""
    if kind is _args.BOOL:
        return [1, "yes", None]
    if kind is _args.BYTES:
        return ["x", 1, None]
    if kind is _args.FILE:
        return [1.5, "3", None]
    if kind.__name__ in ("kvm_regs", "kvm_sregs", "_regs", "_sregs"):
        return [b"\0" * 8, None]
    if kind.__name__.startswith("optional"):
        return [4096.0, "1", True]
    return [4096.0, "1", None, True]


def public_methods(cls):
    return sorted(name for name, value in vars(cls).items()
                  if not name.startswith("_") and callable(value))


def test_every_public_method_is_in_the_table():
    """The table covers the kvm backend's whole surface, and both backends have it."""
    for owner, (host_cls, model_cls) in CLASSES.items():
        for name in public_methods(host_cls):
            if name == "close" and owner in ("Mapping", "ChildProcess"):  # close = munmap, exit
                continue
            assert f"{owner}.{name}" in _args.SPEC, f"{owner}.{name} is not in SPEC"
            for cls in (host_cls, model_cls):
                method = getattr(cls, name)
                params = list(inspect.signature(method).parameters)[1:]
                assert not params or getattr(method, "__api_checked__", False), \
                    f"{cls.__module__}.{owner}.{name} does not check its arguments"


def test_the_table_names_the_parameters():
    """A method whose parameters differ from its SPEC entry fails at import: here,
    a made-up one."""
    class Vm:
        def create_vcpu(self, vcpu: int) -> None:
            pass

    with pytest.raises(TypeError, match="create_vcpu"):
        _args.checked(Vm)


class Objects:
    def __init__(self, kvm):
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.gmem = self.vm.create_guest_memfd(4 * PS, FLAGS)
        self.mapping = self.gmem.mmap()
        self.vcpu = self.vm.create_vcpu(0)

    def of(self, owner):
        return {"Kvm": self.kvm, "Vm": self.vm, "GuestMemfd": self.gmem,
                "Mapping": self.mapping, "Vcpu": self.vcpu}[owner]

    def close(self):
        self.vcpu.close()
        self.mapping.munmap()
        self.gmem.close()
        self.vm.close()






def state(kvm):
    gc.collect()  # earlier tests' garbage must not close its fds between two counts
    picture = snapshot(kvm) if kvm.backend == "model" else None
    return kvm.open_fd_count(), picture


@pytest.mark.parametrize("backend", backends())
def test_wrong_types_are_type_errors_naming_the_parameter(backend):
    with open_kvm(backend) as kvm:
        objs = Objects(kvm)
        before = state(kvm)
        for qualname, sample in SAMPLES.items():
            owner, _, method = qualname.partition(".")
            target = getattr(objs.of(owner), method, None)
            if target is None:  # model-only (Mapping.pin)
                continue
            for param, kind in _args.SPEC[qualname].items():
                if param == "args":
                    continue
                for bad in wrong_values(kind):
                    call = {**sample, param: bad}
                    with pytest.raises(TypeError, match=param):
                        target(**call)
                    if "args" in _args.SPEC[qualname]:  # flags is keyword-only there
                        continue
                    with pytest.raises(TypeError, match=param):
                        target(*call.values())
        assert state(kvm) == before, "a rejected call changed nothing"
        objs.close()


@pytest.mark.parametrize("backend", backends())
def test_enable_cap_args(backend):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        with pytest.raises(TypeError, match=r"args\[1\]"):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, 1.5)
        with pytest.raises(TypeError, match="at most 4 args"):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("backend", backends())
def test_ints_beyond_the_c_type_overflow(backend):
    """2**64 fits no __u64 and 2**32 no __u32 slot: ctypes used to truncate them
    (slot 2**32 was slot 0, a guest_memfd of 2**64 + 4096 bytes had 4096)."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(PS, 0) as g:
        before = state(kvm)
        with pytest.raises(OverflowError, match="size"):
            vm.create_guest_memfd((1 << 64) + PS)
        with pytest.raises(OverflowError, match="slot"):
            vm.delete_memslot(1 << 32)
        with pytest.raises(OverflowError, match="vcpu_id"):
            vm.create_vcpu(1 << 64)
        with pytest.raises(OverflowError, match="offset"):
            g.fallocate(1, -(1 << 63) - 1, PS)
        assert state(kvm) == before


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(("call", "err"), [
    (lambda vm: vm.create_vcpu(-1), errno.EINVAL),
    (lambda vm: vm.create_vcpu(1 << 32), errno.EINVAL),
    (lambda vm: vm.create_guest_memfd(-PS), errno.EINVAL),
    (lambda vm: vm.create_guest_memfd(PS, -1), errno.EINVAL),
    (lambda vm: vm.set_user_memory_region2(-1, 0, 0, PS, 0), errno.EINVAL),
    (lambda vm: vm.check_extension(-1), None),
    (lambda vm: vm.kvm.create_vm(-1), errno.EINVAL),
], ids=["vcpu -1", "vcpu 2^32", "gmem size -4096", "gmem flags -1", "slot -1",
        "check_extension -1", "vm type -1"])
def test_negative_and_huge_ints_get_the_kernel_errno(backend, call, err):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        if err is None:
            assert call(vm) == 0, "an unknown capability is 0"
            return
        with pytest.raises(OSError) as e:
            call(vm)
        assert e.value.errno == err, f"expected {errno.errorcode[err]}: {e.value}"


@pytest.mark.parametrize("backend", backends())
def test_mmap_alignment_is_a_power_of_two_of_a_page_or_more(backend):
    """align is guestmem's (not a syscall's): both backends refuse the same values,
    and place a mapping at a multiple of the ones they take."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, \
            vm.create_guest_memfd(1 << 21, uapi.GUEST_MEMFD_FLAG_MMAP) as g:
        for align in (1, 6000, 3 * 4096, -4096):
            with pytest.raises(ValueError, match="power of two"):
                g.mmap(4096, align=align)
            with pytest.raises(ValueError, match="power of two"):
                kvm.mmap_anonymous(4096, align=align)
        for align in (0, 4096, 1 << 21):
            with g.mmap(4096, align=align) as m, kvm.mmap_anonymous(4096, align=align) as a:
                assert m.addr % max(align, 4096) == 0 and a.addr % max(align, 4096) == 0
