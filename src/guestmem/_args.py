"""Argument checks at the API boundary: one table for both backends (layer 1).

Every public method of Kvm, Vm, GuestMemfd, Mapping and Vcpu, on either backend,
is wrapped by the class decorator `checked`, which checks its arguments against
`SPEC` before the method runs. A wrong Python type is a TypeError naming the
parameter, raised before anything happens, identically on both backends: the
kvm backend no longer fails deep inside ctypes, and the model no longer
computes with a float.

Integers are checked against the C type the kernel receives and converted to it
as C converts: any value with a two's complement representation in that many
bits is accepted, so a negative value for an unsigned parameter reaches the
kernel (and the model) as the kernel sees it (-1 as a __u64 is 2**64 - 1) and
gets the kernel's errno. Negative numbers are never type errors. A value no C
type of that width can hold (2**64 for a __u64) is an OverflowError, as
Python raises for any int too large to convert to C; before, ctypes silently
truncated it (a __u32 slot of 2**32 was slot 0).

Choices of ours, where no kernel source decides:
- bool is not an integer here: `create_guest_memfd(True)` is a TypeError, not a
  one-byte file. Parameters declared `bool` take only a bool.
- Offsets and lengths inside a Mapping are Python-level (the mapping is ours):
  they must be ints, and a range outside the mapping is ValueError (Mapping._check).
- `n` of read/pread is the buffer Python allocates: 0..1 GiB, else ValueError.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Kind = Callable[[str, Any], Any]


def _index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return operator.index(value)


def _fits(name: str, value: int, bits: int) -> None:
    if not -(1 << (bits - 1)) <= value < 1 << bits:
        raise OverflowError(f"{name}={value:#x} does not fit in {bits} bits")


def unsigned(bits: int) -> Kind:
    """A __u<bits> (or unsigned long) kernel parameter, as the kernel reads it."""
    mask = (1 << bits) - 1

    def kind(name: str, value: Any) -> int:
        v = _index(name, value)
        _fits(name, v, bits)
        return v & mask

    kind.__name__ = f"u{bits}"
    return kind


def signed(bits: int) -> Kind:
    """A signed kernel parameter (loff_t, int), as the kernel reads it."""
    half, mask = 1 << (bits - 1), (1 << bits) - 1

    def kind(name: str, value: Any) -> int:
        v = _index(name, value)
        _fits(name, v, bits)
        v &= mask
        return v - (1 << bits) if v >= half else v

    kind.__name__ = f"s{bits}"
    return kind


U64, U32, S64, S32 = unsigned(64), unsigned(32), signed(64), signed(32)
U8 = unsigned(8)


def INT(name: str, value: Any) -> int:  # noqa: N802 - a kind, named like U64
    """A Python-level integer (an offset inside a mapping): any int, not bool."""
    return _index(name, value)


def BYTE(name: str, value: Any) -> int:  # noqa: N802
    """A byte value for memset-like fills: 0..255."""
    v = _index(name, value)
    if not 0 <= v <= 0xFF:
        raise ValueError(f"{name}={v} is not a byte value (0..255)")
    return v


def BUFSIZE(name: str, value: Any) -> int:  # noqa: N802
    """The size of the buffer read(2)/pread(2) fill, which Python allocates first:
    0..1 GiB, else a ValueError on both backends (not a MemoryError on one)."""
    v = _index(name, value)
    if not 0 <= v <= MAX_BUFFER:
        raise ValueError(f"{name}={v} is not a buffer size: 0..{MAX_BUFFER:#x}")
    return v


MAX_BUFFER = 1 << 30


def ALIGN(name: str, value: Any) -> int:  # noqa: N802
    """guestmem's mmap alignment (not a syscall argument): 0 for none, else a power
    of two of at least a page, as vm_unmapped_area's align_mask needs; anything
    else is a ValueError on both backends."""
    v = _index(name, value)
    if v and (v < _PAGE or v & (v - 1)):
        raise ValueError(f"{name}={v:#x} must be 0 or a power of two of at least {_PAGE:#x}")
    return v


_PAGE = 4096


def BOOL(name: str, value: Any) -> bool:  # noqa: N802
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def BYTES(name: str, value: Any) -> Any:  # noqa: N802
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}")
    return value


def FILE(name: str, value: Any) -> Any:  # noqa: N802
    """An fd (a __u32 in the uAPI struct) or an object of the API that has one."""
    if hasattr(value, "fd") and not isinstance(value, int):
        return value
    try:
        return U32(name, value)
    except TypeError:
        raise TypeError(f"{name} must be a guest_memfd or an fd (int), "
                        f"not {type(value).__name__}") from None


def optional(kind: Kind) -> Kind:
    def check(name: str, value: Any) -> Any:
        return None if value is None else kind(name, value)

    check.__name__ = f"optional({kind.__name__})"
    return check


def instance(cls: type) -> Kind:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be {cls.__name__}, not {type(value).__name__}")
        return value

    check.__name__ = cls.__name__
    return check


def at_most(count: int, kind: Kind) -> Kind:
    """*args of `kind`, at most `count` of them (a fixed-size array in the uAPI)."""
    def check(name: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(values) > count:
            raise TypeError(f"at most {count} {name}, got {len(values)}")
        return tuple(kind(f"{name}[{i}]", v) for i, v in enumerate(values))

    check.__name__ = f"at_most({count}, {kind.__name__})"
    return check


def MAPPING(name: str, value: Any) -> Any:  # noqa: N802 (a kind, named like the others)
    """A Mapping of either backend (anything with an int `addr`)."""
    if not isinstance(getattr(value, "addr", None), int):
        raise TypeError(f"{name} must be a Mapping, not {type(value).__name__}")
    return value


def _msr_ranges(name: str, value: Any) -> list[tuple[int, int, bytes]]:
    """KVM_X86_SET_MSR_FILTER's ranges: a list of (flags, base MSR, bitmap bytes)."""
    if not isinstance(value, list) or not all(isinstance(r, tuple) and len(r) == 3
                                              for r in value):
        raise TypeError(f"{name} must be a list of (flags, base, bitmap) tuples, "
                        f"not {type(value).__name__}")
    return [(U32(f"{name} flags", f), U32(f"{name} base", b), BYTES(f"{name} bitmap", m))
            for f, b, m in value]


def _regs(name: str, value: Any) -> Any:
    from guestmem import uapi

    return instance(uapi.kvm_regs)(name, value)


def _sregs(name: str, value: Any) -> Any:
    from guestmem import uapi

    return instance(uapi.kvm_sregs)(name, value)


# The kernel type of each parameter (include/uapi/linux/kvm.h for the structs;
# the syscall's own types for ioctl args, fallocate, mmap, lseek, pread/pwrite).
SPEC: dict[str, dict[str, Kind]] = {
    "Kvm.api_version": {},
    "Kvm.check_extension": {"cap": U64},  # ioctl arg: unsigned long
    "Kvm.vcpu_mmap_size": {},
    "Kvm.supported_vm_types": {},
    "Kvm.create_vm": {"vm_type": U64},
    "Kvm.mmap_anonymous": {"length": U64, "align": ALIGN},  # size_t
    "Kvm.open_fd_count": {},
    "Kvm.fork": {},
    "Kvm.close": {},
    "Vm.check_extension": {"cap": U64},
    "Vm.create_guest_memfd": {"size": U64, "flags": U64, "page_order": U8},
    "Vm.set_user_memory_region": {"slot": U32, "flags": U32, "guest_phys_addr": U64,
                                  "memory_size": U64, "userspace_addr": U64},
    "Vm.set_user_memory_region2": {"slot": U32, "flags": U32, "guest_phys_addr": U64,
                                   "memory_size": U64, "userspace_addr": U64,
                                   "guest_memfd": FILE, "guest_memfd_offset": U64},
    "Vm.delete_memslot": {"slot": U32},
    "Vm.set_memory_attributes": {"address": U64, "size": U64, "attributes": U64,
                                 "flags": U64},
    "Vm.enable_cap": {"cap": U32, "args": at_most(4, U64), "flags": U32},
    "Vm.create_vcpu": {"vcpu_id": U64},  # ioctl arg: unsigned long
    "Vm.get_dirty_log": {"slot": U32, "npages": INT},
    "Vm.get_dirty_log_ranges": {"slot": U32},
    "Vm.set_msr_filter": {"flags": U32, "ranges": _msr_ranges},
    "Vm.close": {},
    "GuestMemfd.stat": {},
    "GuestMemfd.fallocate": {"mode": S32, "offset": S64, "length": S64},
    "GuestMemfd.allocate": {"offset": S64, "length": S64},
    "GuestMemfd.punch_hole": {"offset": S64, "length": S64},
    "GuestMemfd.ioctl": {"request": U32, "arg": U64},  # ioctl(int, unsigned int, unsigned long)
    "GuestMemfd.set_memory_attributes2": {"offset": U64, "size": U64, "attributes": U64,
                                          "flags": U64},
    "GuestMemfd.ftruncate": {"length": S64},
    "GuestMemfd.read": {"n": BUFSIZE},
    "GuestMemfd.write": {"data": BYTES},
    "GuestMemfd.pread": {"n": BUFSIZE, "offset": S64},
    "GuestMemfd.pwrite": {"data": BYTES, "offset": S64},
    "GuestMemfd.lseek": {"offset": S64, "whence": S32},
    "GuestMemfd.mmap": {"length": optional(U64), "offset": U64, "prot": S32, "shared": BOOL,
                        "align": ALIGN},
    "GuestMemfd.memory_map": {"offset": INT, "length": optional(INT)},  # Python-level
    "GuestMemfd.close": {},
    "Mapping.read": {"offset": INT, "length": INT},
    "Mapping.write": {"offset": INT, "data": BYTES},
    "Mapping.fill": {"offset": INT, "byte": BYTE, "length": INT},
    "Mapping.touch_in_child": {"offset": INT, "write": BOOL, "length": INT},
    "Mapping.madvise": {"offset": INT, "length": INT, "advice": S32},
    "Mapping.mprotect": {"prot": S32},
    "Mapping.mbind": {"offset": INT, "length": INT, "mode": U64, "nodes": optional(INT),
                      "flags": U32, "maxnode": U64},
    "Mapping.get_mempolicy": {"offset": INT},
    "Mapping.move_pages": {"offset": INT, "count": INT},
    "Mapping.pin": {"offset": INT, "length": INT},
    "Mapping.munmap": {},
    "Hugetlb.counters": {"page_size": U64},
    "Hugetlb.set_nr_hugepages": {"page_size": U64, "count": U64},  # sysfs: an unsigned long
    "Hugetlb.set_nr_overcommit_hugepages": {"page_size": U64, "count": U64},
    "Hugetlb.memfd_create": {"page_size": U64},
    "Hugetlb.mount": {"page_size": U64, "size": optional(U64), "min_size": optional(U64)},
    "Hugetlb.settle": {},
    "HugetlbMount.create": {},
    "HugetlbMount.close": {},
    "HugetlbFile.ftruncate": {"length": S64},
    "HugetlbFile.fallocate": {"mode": S32, "offset": S64, "length": S64},
    "HugetlbFile.mmap": {"length": U64, "offset": U64},
    "HugetlbFile.close": {},
    "HugetlbMapping.touch": {"offset": INT},
    "HugetlbMapping.touch_in_child": {"offset": INT},
    "HugetlbMapping.madvise": {"offset": INT, "length": INT, "advice": S32},
    "HugetlbMapping.munmap": {},
    "HugetlbMapping.close": {},
    "ChildProcess.read": {"mapping": MAPPING, "offset": INT, "length": INT},
    "ChildProcess.write": {"mapping": MAPPING, "offset": INT, "data": BYTES},
    "ChildProcess.touch": {"mapping": MAPPING, "offset": INT, "write": BOOL, "length": INT},
    "ChildProcess.exit": {},
    "Vcpu.get_regs": {},
    "Vcpu.set_regs": {"regs": _regs},
    "Vcpu.get_sregs": {},
    "Vcpu.set_sregs": {"sregs": _sregs},
    "Vcpu.pre_fault_memory": {"gpa": U64, "size": U64, "flags": U64},
    "Vcpu.run": {},
    "Vcpu.kick": {},
    "Vcpu.complete_io_in": {"data": BYTES},
    "Vcpu.complete_hypercall": {"ret": U64},
    "Vcpu.complete_msr": {"error": BOOL, "data": U64},
    "Vcpu.close": {},
}

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


C = TypeVar("C", bound=type)


def checked(cls: C) -> C:
    """Class decorator: wrap each method of cls that SPEC lists."""
    for qualname in SPEC:
        owner, _, method = qualname.partition(".")
        if owner == cls.__name__ and method in vars(cls):
            setattr(cls, method, _wrap(vars(cls)[method], qualname))
    return cls


def _wrap(fn: F, qualname: str) -> F:
    """Check fn's arguments against SPEC[qualname] on every call. The table must
    name exactly fn's parameters (checked here, at import)."""
    spec = SPEC[qualname]
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    names = [p.name for p in params if p.kind in _NAMED]
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    var = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if set(spec) != set(names) | ({var} if var else set()):
        raise TypeError(f"{qualname}: SPEC names {sorted(spec)}, the method "
                        f"takes {sorted(names)}")
    checks = [(i, name, spec[name]) for i, name in enumerate(positional)]
    var_kind = spec[var] if var else None
    if not spec:
        fn.__api_checked__ = True  # type: ignore[attr-defined]
        return fn

    @functools.wraps(fn)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            given = list(args[: len(positional)])
            for i, name, kind in checks[: len(given)]:
                given[i] = kind(name, given[i])
            rest = args[len(positional):]
            if var is not None and var_kind is not None:
                rest = var_kind(var, rest)
            args = (*given, *rest)
        elif var is not None and var_kind is not None:
            var_kind(var, ())
        for name, value in kwargs.items():
            named = spec.get(name)
            if named is not None and name != var:
                kwargs[name] = named(name, value)
        return fn(self, *args, **kwargs)

    checked.__api_checked__ = True  # type: ignore[attr-defined]
    return checked  # type: ignore[return-value]
