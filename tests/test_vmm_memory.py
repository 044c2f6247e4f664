"""Vmm.add_memory leaves nothing behind when it fails, on both backends."""

from __future__ import annotations

import errno
import gc

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm
from guestmem.vmm import Vmm

from .conftest import backends

PS = uapi.PAGE_SIZE




def mappings(kvm):
    """The process's mappings: the model's VMA table, the kernel's /proc/self/maps."""
    if kvm.backend == "model":
        return len(kvm.process.mappings)
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("backing", ["gmem", "anon"])
def test_failed_add_memory_leaves_nothing_behind(backend, backing):
    kvm = ModelKvm() if backend == "model" else HostKvm()
    with kvm, Vmm(kvm) as vmm:
        gc.collect()  # earlier tests' garbage must not close its fds during the count
        fds, maps = kvm.open_fd_count(), mappings(kvm)
        for _ in range(50):  # GPA 0 is the low memory slot: the bind fails with EEXIST
            with pytest.raises(OSError) as e:
                vmm.add_memory(0, 2 * PS, backing)
            assert e.value.errno == errno.EEXIST, f"the original error is re-raised: {e.value}"
        assert kvm.open_fd_count() == fds, "no guest_memfd left open"
        assert mappings(kvm) == maps, "no mapping left behind"
        if backend == "model":
            assert len(kvm.process.backings) == 1, "only the low memory's guest_memfd lives"
        region = vmm.add_memory(1 << 32, 2 * PS, backing)  # and the next call works
        assert region.slot == 1, "failed calls used no slot number"
