"""Every public method of both backends says, in its first line, which kernel
call it is (STYLE.md: a docstring on every public method naming its ioctl)."""

import inspect

import pytest

from guestmem import api
from guestmem.host import kvm as host
from guestmem.model import gmem, process, vcpu, vm
from guestmem.model import kvm as model_kvm

CLASSES = [host.Kvm, host.Vm, host.GuestMemfd, host.Mapping, host.Vcpu, model_kvm.Kvm, vm.Vm,
           gmem.GuestMemfd, process.Mapping, vcpu.Vcpu, api.Kvm, api.Vm, api.GuestMemfd,
           api.Mapping, api.Vcpu]


def public_methods(cls):
    for name, obj in vars(cls).items():
        if name.startswith("_"):
            continue
        fn = obj.fget if isinstance(obj, property) else obj
        if callable(fn):
            yield name, fn


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_public_method_has_a_docstring(cls):
    missing = [name for name, fn in public_methods(cls) if not (inspect.getdoc(fn) or "").strip()]
    assert missing == []
