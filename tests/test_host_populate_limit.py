"""The kvm backend refuses to populate more than a bounded share of host memory.

None of these tests populates memory: each asks for more than the limit and
checks ENOMEM, the message naming the override, and that the kernel was never
asked (a spy stands in for the syscall; were the check missing, the spy fails
the test instead of the kernel allocating). st_blocks is checked too, though
on this kernel a guest_memfd's st_blocks stays 0 whatever is allocated.
"""

from __future__ import annotations

import errno

import pytest

from guestmem import uapi
from guestmem.host import Kvm as HostKvm
from guestmem.host import libc, populate

PS = uapi.PAGE_SIZE
MIB = 1 << 20
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


@pytest.fixture
def kernel_never_asked(monkeypatch):
    """Replace the populating calls by spies that fail the test if reached with
    more than a MiB (small calls, the controls, go to the kernel)."""
    calls = []

    def spy(name, real, size_arg):
        def call(*args):
            calls.append(name)
            assert args[size_arg] <= MIB, f"the kernel was asked to {name} {args[size_arg]:#x}"
            return real(*args)
        monkeypatch.setattr(libc, name, call)

    spy("fallocate", libc.fallocate, 3)
    spy("madvise", libc.madvise, 1)
    spy("memset", libc.memset, 2)
    spy("pin_user_buffer", libc.pin_user_buffer, 1)
    monkeypatch.delenv(populate.ENV, raising=False)
    return calls


def refused(fn, *args, source):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == errno.ENOMEM, f"expected ENOMEM: {e.value}"
    message = str(e.value)
    assert "Kvm(populate_limit=" in message and populate.ENV in message, message
    assert source in message, f"the message says where the limit comes from: {message}"


@pytest.fixture
def kvm_small_limit(host_kvm):
    with HostKvm(populate_limit=MIB) as kvm:
        yield kvm


def test_fallocate_above_the_limit_is_enomem(kvm_small_limit, kernel_never_asked):
    with kvm_small_limit.create_vm() as vm, vm.create_guest_memfd(64 * MIB, 0) as g:
        blocks = g.stat().st_blocks
        refused(g.allocate, 0, 64 * MIB, source="Kvm(populate_limit=...)")
        refused(g.fallocate, uapi.FALLOC_FL_KEEP_SIZE, 0, 2 * MIB, source="populate_limit")
        assert kernel_never_asked == [], "refused before the kernel was asked"
        assert g.stat().st_blocks == blocks
        g.allocate(0, MIB)  # at the limit: allowed
        assert kernel_never_asked == ["fallocate"]


def test_what_the_kernel_refuses_anyway_gets_the_kernels_errno(kvm_small_limit):
    """Beyond EOF, unaligned or a punch: nothing would be allocated, so the
    kernel answers (EINVAL, or a punch succeeds) and the model agrees."""
    with kvm_small_limit.create_vm() as vm, vm.create_guest_memfd(4 * MIB, 0) as g:
        for args, err in [((0, 8 * MIB), errno.EINVAL), ((1, 4 * MIB), errno.EINVAL)]:
            with pytest.raises(OSError) as e:
                g.allocate(*args)
            assert e.value.errno == err
        g.punch_hole(0, 4 * MIB)


def test_populating_a_mapping_above_the_limit_is_enomem(kvm_small_limit, kernel_never_asked):
    with kvm_small_limit.create_vm() as vm, vm.create_guest_memfd(64 * MIB, FLAGS) as g, \
            g.mmap() as m:
        for advice in (libc.MADV_POPULATE_READ, libc.MADV_POPULATE_WRITE):
            refused(m.madvise, 0, 64 * MIB, advice, source="populate_limit")
        refused(m.fill, 0, 0x5A, 64 * MIB, source="populate_limit")
        refused(m.touch_in_child, 0, True, 64 * MIB, source="populate_limit")
        refused(m.read, 0, 64 * MIB, source="populate_limit")
        refused(m.pin, 0, 64 * MIB, source="populate_limit")  # pinning faults every page in
        assert kernel_never_asked == []
        m.madvise(0, MIB, libc.MADV_DONTNEED)  # not populating: not limited
        assert kernel_never_asked == ["madvise"]


def test_the_default_is_half_of_mem_available_at_call_time(host_kvm, kernel_never_asked,
                                                           monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(populate, "MEMINFO", str(meminfo))
    with host_kvm.create_vm() as vm, vm.create_guest_memfd(8 * MIB, 0) as g:
        meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable:    4096 kB\n")
        refused(g.allocate, 0, 4 * MIB, source="half of MemAvailable")
        meminfo.write_text("MemAvailable:    2048 kB\n")  # less available: a lower limit
        refused(g.allocate, 0, 2 * MIB, source="half of MemAvailable")
        assert kernel_never_asked == []
        g.allocate(0, MIB)
    monkeypatch.undo()
    real = populate.mem_available()
    assert abs(populate.PopulateLimit().current()[0] - real // 2) < real // 10


def test_the_environment_variable_overrides_the_default(host_kvm, kernel_never_asked,
                                                        monkeypatch):
    monkeypatch.setenv(populate.ENV, "1M")
    with host_kvm.create_vm() as vm, vm.create_guest_memfd(8 * MIB, 0) as g:
        refused(g.allocate, 0, 2 * MIB, source=f"{populate.ENV}=1M")
        assert kernel_never_asked == []
    monkeypatch.setenv(populate.ENV, "lots")
    with pytest.raises(ValueError, match=populate.ENV):
        populate.PopulateLimit().current()


def test_a_terabyte_allocate_is_refused_by_default(host_kvm, kernel_never_asked):
    """The issue: allocate(0, 1 << 40) on a 24 GiB host started the OOM killer."""
    assert populate.PopulateLimit().current()[0] < 1 << 40, "this host has less than 2 TiB"
    with host_kvm.create_vm() as vm, vm.create_guest_memfd(1 << 40, 0) as g:
        refused(g.allocate, 0, 1 << 40, source="half of MemAvailable")
    assert kernel_never_asked == []


def test_populate_limit_must_be_bytes():
    for bad, exc in [(1.5, TypeError), (True, TypeError), ("1G", TypeError), (-1, ValueError)]:
        with pytest.raises(exc, match="populate_limit"):
            HostKvm(populate_limit=bad)


def test_a_bad_environment_value_fails_when_kvm_opens_and_decimals_are_bytes(monkeypatch):
    monkeypatch.setenv(populate.ENV, "1.5G")
    assert populate.PopulateLimit().current()[0] == 3 << 29
    monkeypatch.setenv(populate.ENV, "1.5X")
    with pytest.raises(ValueError, match=populate.ENV):
        HostKvm()


def test_pre_fault_above_the_limit_is_enomem_before_the_kernel(kvm_small_limit):
    """KVM_PRE_FAULT_MEMORY faults in the whole range on a TDP host; above the limit
    it is refused first (its own EINVALs still come from the kernel)."""
    with kvm_small_limit.create_vm() as vm, vm.create_vcpu(0) as vcpu, \
            kvm_small_limit.mmap_anonymous(64 * MIB) as memory:
        vm.set_user_memory_region2(1, 0, 1 << 32, 64 * MIB, memory.addr)  # populates nothing
        refused(vcpu.pre_fault_memory, 1 << 32, 64 * MIB, source="Kvm(populate_limit=...)")
        with pytest.raises(OSError) as beyond:  # past the memslot: nothing to fault in
            vcpu.pre_fault_memory(2 << 32, 64 * MIB)
        assert beyond.value.errno != errno.ENOMEM
        with pytest.raises(OSError) as bad:
            vcpu.pre_fault_memory(1 << 32, 64 * MIB, 1)  # flags: the kernel's EINVAL
        assert bad.value.errno == errno.EINVAL
