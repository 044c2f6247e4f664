"""Bad input gets the kernel's errno and changes nothing (DESIGN.md "Errors and bad input").

A populated model (coco profile: attributes too) receives random calls with
mostly invalid arguments; whenever a call fails, the model's whole state must
be exactly what it was before.
"""

import errno

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from guestmem import _args, uapi
from guestmem.exits import HostFault
from guestmem.model import Kvm
from guestmem.model.invariants import violations
from guestmem.model.snapshot import snapshot

PS = uapi.PAGE_SIZE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
ints = st.one_of(st.integers(-PS, 16 * PS), st.sampled_from([1, PS - 1, 1 << 63, (1 << 64) - PS]))
# ranges of the 8-page guest_memfd, many over its pinned page 3, and bad ones
gmem_offsets = st.one_of(st.sampled_from([0, PS, 3 * PS]), ints)
gmem_sizes = st.one_of(st.sampled_from([PS, 4 * PS, 5 * PS]), ints)


def populated(profile="coco"):
    """coco: PRIVATE in the VM's attributes; inplace: in the guest_memfd's, whose
    other pages are shared and one of them pinned (so conversions can EAGAIN)."""
    kvm = Kvm(profile)
    vm = kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    in_place = profile == "inplace"
    flags = uapi.GUEST_MEMFD_FLAG_MMAP | (uapi.GUEST_MEMFD_FLAG_INIT_SHARED if in_place else 0)
    g = vm.create_guest_memfd(8 * PS, flags)
    vm.set_user_memory_region2(1, GMEM, 1 << 32, 4 * PS, 0, g, 0)
    g.allocate(0, 2 * PS)
    m = g.mmap(8 * PS)
    if in_place:
        g.set_memory_attributes2(0, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        m.pin(3 * PS, PS)
    else:
        vm.set_memory_attributes(1 << 32, PS, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu = vm.create_vcpu(0)
    kvm.fork()  # a child with the mapping, for ChildProcess's entry points
    return kvm, vm, g, m, vcpu


calls = st.one_of(
    st.tuples(st.just("bind"), st.integers(0, 40000), st.integers(0, 1 << 8), ints, ints, ints,
              ints),
    st.tuples(st.just("create_gmem"), ints, st.integers(0, 1 << 8)),
    st.tuples(st.just("fallocate"), st.integers(0, 0x7F), ints, ints),
    st.tuples(st.just("attributes"), ints, ints, st.integers(0, 16), st.integers(0, 1)),
    st.tuples(st.just("attributes2"), gmem_offsets, gmem_sizes, st.sampled_from([8, 8, 0, 16]),
              st.sampled_from([0, 0, 0, 1])),
    st.tuples(st.just("mmap"), ints, st.integers(0, 7), st.booleans()),
    st.tuples(st.just("enable_cap"), st.integers(0, 300), st.integers(0, 1 << 13)),
    st.tuples(st.just("create_vcpu"), st.integers(0, 2000)),
    st.tuples(st.just("pre_fault"), ints, ints, st.integers(0, 1)),
    st.tuples(st.just("create_vm"), st.integers(0, 8)),
    st.tuples(st.just("madvise"), st.sampled_from([0, 1, 3, 9, 25, 200]), ints, ints),
    st.tuples(st.just("mbind"), st.integers(0, 8) | st.integers(0, 1 << 16), st.integers(0, 7),
              st.integers(0, 4), st.integers(0, 9), ints, ints),
)


# Every entry point of the API (guestmem._args.SPEC), with arguments of any kind:
# valid-looking ints, bad ints, wrong Python types, bytes.
OWNERS = ("Kvm", "Vm", "GuestMemfd", "Mapping", "Vcpu", "ChildProcess")  # HugeTLB: its own
ENTRY_POINTS = sorted(q for q in _args.SPEC if q.split(".")[0] in OWNERS
                      and q.split(".")[1] not in ("close", "munmap", "kick", "touch_in_child",
                                                  "exit"))
anything = st.one_of(ints, st.sampled_from([None, 1.5, "x", b"\x01" * 9, True, -1, 0]))
calls = st.one_of(calls, st.tuples(st.just("entry"), st.sampled_from(ENTRY_POINTS),
                                   st.lists(anything, max_size=7)))


def apply_entry(objects, qualname, values):
    """Call one entry point with as many of `values` as it has parameters."""
    owner, method = qualname.split(".")
    names = [n for n in _args.SPEC[qualname] if n != "args"]
    args = values[: len(names)]
    getattr(objects[owner], method)(*args)


def apply(kvm, vm, g, m, vcpu, call):
    kind, *a = call
    if kind == "entry":
        objects = {"Kvm": kvm, "Vm": vm, "GuestMemfd": g, "Mapping": m, "Vcpu": vcpu,
                   "ChildProcess": next(iter(kvm.process.children))}
        apply_entry(objects, *a)
    elif kind == "bind":
        slot, flags, gpa, size, hva, offset = a
        vm.set_user_memory_region2(slot, flags, gpa, size, hva, g, offset)
    elif kind == "create_gmem":
        vm.create_guest_memfd(a[0], a[1])
    elif kind == "fallocate":
        g.fallocate(*a)
    elif kind == "attributes":
        vm.set_memory_attributes(*a)
    elif kind == "attributes2":  # in place (KVM_SET_MEMORY_ATTRIBUTES2): ENOTTY on coco
        g.set_memory_attributes2(*a)
    elif kind == "mmap":
        g.mmap(a[0], 0, a[1], a[2])
    elif kind == "enable_cap":
        vm.enable_cap(a[0], a[1])
    elif kind == "create_vcpu":
        vm.create_vcpu(a[0])
    elif kind == "pre_fault":
        vcpu.pre_fault_memory(*a)
    elif kind == "create_vm":
        kvm.create_vm(a[0])
    elif kind == "madvise":  # advice guest_memfd mappings refuse (or a bad range)
        m.madvise(max(a[1], 0) % (8 * PS), min(max(a[2], 0), 8 * PS), a[0])
    elif kind == "mbind":  # mode (with flag bits), nodemask, maxnode, mbind flags, range
        mode, nodes, maxnode, flags, offset, length = a
        m.mbind(max(offset, 0) % (8 * PS), min(max(length, 0), 4 * PS), mode, nodes, flags,
                maxnode)


@pytest.mark.parametrize("profile, examples", [("coco", 1500), ("inplace", 500)])
def test_a_failed_call_changes_nothing(profile, examples):
    @settings(max_examples=examples, deadline=None)
    @given(st.lists(calls, min_size=1, max_size=6))
    def failed_calls_change_nothing(sequence):
        kvm, vm, g, m, vcpu = populated(profile)
        failures = 0
        for call in sequence:
            before = snapshot(kvm)
            try:
                apply(kvm, vm, g, m, vcpu, call)
            except HostFault:
                # a host store that faults midway keeps what it wrote (as the kernel's copy)
                if call[:2] != ("entry", "Mapping.write"):
                    failures += 1
                    assert snapshot(kvm) == before, f"{call} faulted but changed the model"
            except OSError as e:
                failures += 1
                after = snapshot(kvm)
                if e.errno == errno.EAGAIN and (call[0] == "attributes2" or call[:2] == (
                        "entry", "GuestMemfd.set_memory_attributes2")):
                    # kvm_gmem_set_attributes unmaps the host before it finds the pin:
                    # only the host PTEs may differ
                    before.pop("mappings"), after.pop("mappings")
                assert after == before, f"{call} failed but changed the model"
            except (ValueError, TypeError, OverflowError, RuntimeError):
                failures += 1
                assert snapshot(kvm) == before, f"{call} failed but changed the model"
            assert violations(kvm) == []
        assume(failures > 0)  # only sequences with a failing call test the rule

    failed_calls_change_nothing()


def test_known_bad_calls_fail_with_the_kernels_errno_and_change_nothing():
    kvm, vm, g, m, vcpu = populated()
    before = snapshot(kvm)
    cases = [
        (errno.EEXIST, vm.set_user_memory_region2, 2, GMEM, 1 << 32, PS, 0, g, 4 * PS),
        (errno.EINVAL, vm.set_user_memory_region2, 2, GMEM, 1 << 33, PS, 0, g, 0),  # bound
        (errno.EINVAL, vm.set_user_memory_region2, 2, GMEM, 1 << 33, 8 * PS, 0, g, 4 * PS),
        (errno.EINVAL, vm.set_memory_attributes, 0, PS, 1),
        (errno.EINVAL, vm.set_memory_attributes, 0, PS, 8, 1),
        (errno.EINVAL, g.fallocate, uapi.FALLOC_FL_KEEP_SIZE, 7 * PS, 2 * PS),
        (errno.EOPNOTSUPP, g.fallocate, uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_ZERO_RANGE, 0,
         PS),
        (errno.EINVAL, vm.create_guest_memfd, PS, uapi.GUEST_MEMFD_FLAG_INIT_SHARED),
        (errno.EEXIST, vm.create_vcpu, 0),
        (errno.EINVAL, kvm.create_vm, 6),
    ]
    for err, fn, *args in cases:
        try:
            fn(*args)
        except OSError as e:
            assert e.errno == err, (fn.__name__, args, e)
        else:
            raise AssertionError(f"{fn.__name__}{args} succeeded")
        assert snapshot(kvm) == before, (fn.__name__, args)
