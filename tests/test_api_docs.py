"""Every public method of both backends says, in its first lines, which kernel
call it is (STYLE.md: a docstring on every public method naming its ioctl or
syscall; the model's name the kernel function too). guestmem's own helpers,
which are no kernel call, say what they are instead."""

import inspect
import re

import pytest

from guestmem import api
from guestmem.host import fork, hugetlb
from guestmem.host import kvm as host
from guestmem.model import gmem, process, vcpu, vm
from guestmem.model import kvm as model_kvm

CLASSES = [host.Kvm, host.Vm, host.GuestMemfd, host.Mapping, host.Vcpu, model_kvm.Kvm, vm.Vm,
           gmem.GuestMemfd, process.Mapping, vcpu.Vcpu, api.Kvm, api.Vm, api.GuestMemfd,
           api.Mapping, api.Vcpu, fork.ChildProcess, api.ChildProcess, hugetlb.Hugetlb,
           hugetlb.HugetlbFile, hugetlb.HugetlbMount, hugetlb.HugetlbMapping]
# guestmem's helpers around the kernel calls: no one kernel call to name
HELPERS = {"open_fd_count", "touch_in_child", "memory_map", "load_program", "fill", "read",
           "write", "zap", "pin", "mark_dirty", "complete_io_in", "supported_attributes",
           "slot_for_gfn", "vm_extension", "system_extension", "is_private", "get_ref",
           "put_ref", "gmem_index", "memory_failure", "touch", "inherit", "copy_to",
           "all_mappings", "gmem_private_runs", "set_conversion_policy", "set_hugetlb_policy",
           # model extras for live migration (api.Firmware, api.ContentRuns, api.ProgramVcpu)
           "firmware_export", "firmware_import", "guest_view", "content_runs", "write_runs",
           "program_state", "restore_program_state"}
KERNEL_CALL = re.compile(r"KVM_\w+|\b[a-z_0-9]+\(\d?\)|\b_*kvm_\w+|\b(fstat|fallocate|mmap|"
                         r"munmap|mprotect|madvise|mbind|ioctl|close|ksys_\w+|vcpu_run)\b")


def public(cls):
    """Public methods and properties, inherited ones included (not object's or typing's)."""
    seen = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__ in ("typing", "abc", "builtins"):
            continue
        for name, obj in vars(klass).items():
            if not name.startswith("_") and name not in seen:
                seen.add(name)
                fn = obj.fget if isinstance(obj, property) else obj
                if callable(fn):
                    yield name, fn, isinstance(obj, property)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_public_method_says_which_kernel_call_it_is(cls):
    undocumented, unnamed = [], []
    for name, fn, is_property in public(cls):
        doc = inspect.getdoc(fn) or ""
        if not doc.strip():
            undocumented.append(name)
        elif not is_property and name not in HELPERS and not KERNEL_CALL.search(
                " ".join(doc.splitlines()[:3])):
            unnamed.append(name)
    assert (undocumented, unnamed) == ([], [])
