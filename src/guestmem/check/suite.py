"""The conformance-suite machinery: cases, requirements, checks, results.

A case states what it expects and performs checks through a `Ctx`. It uses only
the backend-neutral API (`Kvm`, `Vm`, `GuestMemfd`, `Mapping`, `Vcpu`), so
adding a backend is one more value of `backend`. A case that needs something
the backend lacks is skipped with a reason that names the missing capability.
"""

from __future__ import annotations

import errno as errno_mod
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import ParamSpec, TypeVar

from guestmem import api, uapi
from guestmem.caps import Capabilities
from guestmem.exits import HostFault, HostSigbus, errno_name

P = ParamSpec("P")
T = TypeVar("T")


class Status(Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    what: str
    expected: str
    observed: str
    ok: bool


class CaseFailed(Exception):
    def __init__(self, check: Check) -> None:
        super().__init__(f"{check.what}: expected {check.expected}, observed {check.observed}")
        self.check = check


class CaseSkipped(Exception):
    """Raised by a case that finds, while running, that the host lacks something."""


@dataclass
class Result:
    name: str
    source: str
    expected: str
    status: Status
    observed: str
    checks: list[Check] = field(default_factory=list)


def _describe(err: int | None) -> str:
    return errno_name(err)


class Ctx:
    """What a case sees: the backend's Kvm, its capabilities, the VM type under
    test, gmem flags of the variant, and the check helpers."""

    def __init__(self, kvm: api.Kvm, vm_type: int, gmem_flags: int) -> None:
        self.kvm = kvm
        self.caps = kvm.capabilities
        self.vm_type = vm_type
        self.gmem_flags = gmem_flags
        self.checks: list[Check] = []
        # HugeTLB backing for every guest_memfd the case makes through gmem() (the
        # WIP's wrapper runs the selftests so): the page order, 0 for none.
        self.hugetlb_order = 0

    # --- resources ------------------------------------------------------------------------
    @contextmanager
    def vm(self, vm_type: int | None = None) -> Iterator[api.Vm]:
        vm = self.kvm.create_vm(self.vm_type if vm_type is None else vm_type)
        try:
            yield vm
        finally:
            vm.close()

    @contextmanager
    def gmem(self, vm: api.Vm, size: int, flags: int | None = None) -> Iterator[api.GuestMemfd]:
        flags = self.gmem_flags if flags is None else flags
        g = self._hugetlb_gmem(vm, size, flags) if self.hugetlb_order else \
            vm.create_guest_memfd(size, flags)
        try:
            yield g
        finally:
            g.close()

    @property
    def gmem_page_size(self) -> int:
        """The unit guest_memfd allocates and punches in: a huge page on HugeTLB."""
        return uapi.PAGE_SIZE << self.hugetlb_order

    def _hugetlb_gmem(self, vm: api.Vm, size: int, flags: int) -> api.GuestMemfd:
        """The file on HugeTLB: whole huge pages, and, since HUGETLB | INIT_SHARED is
        EINVAL in the WIP, INIT_SHARED done as its VMM would: the whole file
        converted to shared after creation."""
        huge = uapi.PAGE_SIZE << self.hugetlb_order
        size = -(-size // huge) * huge
        shared = flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        g = vm.create_guest_memfd(size, (flags & ~shared) | uapi.GUEST_MEMFD_FLAG_HUGETLB,
                                  self.hugetlb_order)
        if shared:
            g.set_memory_attributes2(0, size, 0)
        return g

    # --- checks ---------------------------------------------------------------------------
    def _record(self, what: str, expected: str, observed: str, ok: bool | None = None) -> None:
        check = Check(what, expected, observed, expected == observed if ok is None else ok)
        self.checks.append(check)
        if not check.ok:
            raise CaseFailed(check)

    def _call(self, what: str, expected_errno: int | None, fn: Callable[P, T], *args: P.args,
              **kwargs: P.kwargs) -> T | None:
        """Call fn; expected_errno None means it must succeed, else fail with that errno."""
        try:
            value = fn(*args, **kwargs)
        except OSError as e:
            self._record(what, _describe(expected_errno), _describe(e.errno))
            return None
        self._record(what, _describe(expected_errno), "ok")
        return value

    def ok(self, what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn must succeed: its value (a failure ends the case)."""
        value = self._call(what, None, fn, *args, **kwargs)
        return value  # type: ignore[return-value]  # _record raised unless fn returned

    def fails(self, what: str, err: int, fn: Callable[P, T], *args: P.args,
              **kwargs: P.kwargs) -> None:
        """fn must fail with errno err."""
        self._call(what, err, fn, *args, **kwargs)

    def equal(self, what: str, expected: object, observed: object) -> None:
        self._record(what, repr(expected), repr(observed))

    def one_of(self, what: str, allowed: list[str], observed: str) -> None:
        """One of several known variants (hosts differ): the check names the one seen."""
        self._record(what, "one of: " + " | ".join(allowed), observed, observed in allowed)

    def true(self, what: str, cond: bool) -> None:
        self._record(what, "true", "true" if cond else "false")

    def sigbus(self, what: str, mapping: api.Mapping, offset: int, write: bool = False) -> None:
        self.host_fault(what, mapping, offset, write, signal.SIGBUS)

    def host_fault(self, what: str, mapping: api.Mapping, offset: int, write: bool,
                   expected: int) -> None:
        """The access must be answered with signal `expected`: checked both by the
        safe accessor (HostFault) and by a real access in a child process."""
        want = _signame(expected)
        self._record(what + " (signal)", want, _signame(mapping.touch_in_child(offset, write)))
        try:
            if write:
                mapping.write(offset, b"\x5a")
            else:
                mapping.read(offset, 1)
            observed = "no fault"
        except HostFault as e:
            observed = e.signal_name
        self._record(what, want, observed)

    def signal_in_child(self, what: str, child: api.ChildProcess, mapping: api.Mapping,
                        offset: int, write: bool, expected: int | None) -> None:
        """An access in a forked child (Kvm.fork) must get signal `expected` (None: none)."""
        self._record(what, _signame(expected), _signame(child.touch(mapping, offset, write)))

    def bytes_equal(self, what: str, mapping: api.Mapping, offset: int, expected: bytes) -> None:
        try:
            data = mapping.read(offset, len(expected))
        except HostSigbus as e:
            self._record(what, _short(expected), f"SIGBUS at +{e.addr - mapping.addr:#x}")
            return
        self._record(what, _short(expected), _short(data))


def _signame(sig: int | None) -> str:
    return "no signal" if sig is None else signal.Signals(sig).name


def _short(data: bytes) -> str:
    """A compact description of a byte string: runs of one byte are shown as such."""
    if data and data == bytes([data[0]]) * len(data):
        return f"{len(data)}x{data[0]:#04x}"
    return data[:16].hex() + ("..." if len(data) > 16 else "")


# --- requirements --------------------------------------------------------------------------------
# (caps, vm_type, gmem_flags) -> the reason to skip, or None
Requirement = Callable[[Capabilities, int, int], str | None]


def _flag_names(flags: int) -> str:
    names = []
    if flags & uapi.GUEST_MEMFD_FLAG_MMAP:
        names.append("MMAP")
    if flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
        names.append("INIT_SHARED")
    return "|".join(names) or "0"


@contextmanager
def pool_pages(ctx: Ctx, size: int, pages: int) -> Iterator[None]:
    """The pool of `size` grown by `pages` for the case and put back after; the
    case skips, naming the size, where the machine cannot give them."""
    hugetlb = ctx.kvm.hugetlb
    found = hugetlb.counters(size)
    try:
        if hugetlb.set_nr_hugepages(size, found.nr + pages) < found.nr + pages:
            raise CaseSkipped(f"the {size >> 20} MiB pool cannot grow by {pages} page(s) here")
        yield
    finally:
        hugetlb.set_nr_hugepages(size, found.nr)


def needs_vm_type(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if vm_type not in caps.vm_types:
        mask = sum(1 << t for t in caps.vm_types)
        name = uapi.VM_TYPE_NAMES.get(vm_type, str(vm_type))
        return f"VM type {name} ({vm_type}) not in KVM_CAP_VM_TYPES={mask:#x}"
    return None


def needs_gmem_flags(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    supported = caps.gmem_flags_for(vm_type)
    missing = gmem_flags & ~supported
    if missing:
        return (
            f"KVM_CAP_GUEST_MEMFD_FLAGS={supported:#x} lacks {_flag_names(missing)} "
            f"for VM type {uapi.VM_TYPE_NAMES.get(vm_type, vm_type)}"
        )
    return None


def needs_private_memory(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if not caps.memory_attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
        return f"KVM_CAP_MEMORY_ATTRIBUTES={caps.memory_attributes:#x} lacks PRIVATE"
    return None


def needs_pre_fault(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    return None if caps.pre_fault_memory else "KVM_CAP_PRE_FAULT_MEMORY=0"


def needs_no_pre_fault(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    return "KVM_CAP_PRE_FAULT_MEMORY=1 (case is for hosts without it)" if caps.pre_fault_memory \
        else None


def needs_no_memory_attributes(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if caps.gmem_in_place_conversion:  # the VM ioctl exists, PRIVATE moved to the gmem
        return "in-place conversion is on: KVM_SET_MEMORY_ATTRIBUTES exists without PRIVATE"
    if caps.memory_attributes:
        attrs = caps.memory_attributes
        return f"KVM_CAP_MEMORY_ATTRIBUTES={attrs:#x} (case is for hosts without)"
    return None


def needs_no_gmem_attributes(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    """Kernels whose guest_memfd has no KVM_SET_MEMORY_ATTRIBUTES2 (probed)."""
    if caps.gmem_in_place_conversion:
        return "in-place conversion is on (case is for kernels without it)"
    return None


def needs_gmem_attributes(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if not caps.gmem_in_place_conversion:
        return ("no in-place conversion (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES; "
                "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd: ENOTTY)")
    return None


def needs_exit_hypercall(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if not caps.exit_hypercall & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
        return f"KVM_CAP_EXIT_HYPERCALL={caps.exit_hypercall:#x} lacks KVM_HC_MAP_GPA_RANGE"
    return None


def only_on(vm_type: int, why: str) -> Requirement:
    """The case is for VMs of `vm_type` only (upstream TEST_REQUIREs it), saying why."""
    name = uapi.VM_TYPE_NAMES.get(vm_type, str(vm_type))

    def requirement(caps: Capabilities, instance_type: int, gmem_flags: int) -> str | None:
        return None if instance_type == vm_type else f"case is for {name} VMs ({why})"

    return requirement


def needs_guests(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    return None if caps.runs_guests else "backend cannot run guest code"


# --- cases ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    source: str  # the upstream selftest (or spec section) it ports
    expected: str
    body: Callable[[Ctx], None]
    needs: tuple[Requirement, ...] = ()
    gmem_flags: int = 0


@dataclass(frozen=True)
class Instance:
    """A case bound to a VM type (guest_memfd_test runs every case per VM type)."""

    case: Case
    vm_type: int

    @property
    def name(self) -> str:
        vm = uapi.VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))
        if self.case.gmem_flags or self.case.name.startswith("gmem."):
            return f"{self.case.name}[{vm},{_flag_names(self.case.gmem_flags)}]"
        return f"{self.case.name}[{vm}]"


REGISTRY: list[Case] = []


def case(
    name: str,
    source: str,
    expected: str,
    needs: tuple[Requirement, ...] = (),
    flag_variants: tuple[int, ...] | None = None,
) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Register a case; `flag_variants` makes one case per guest_memfd flag set."""

    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        for flags in flag_variants if flag_variants is not None else (0,):
            REGISTRY.append(
                Case(name, source, expected, fn, (needs_vm_type, needs_gmem_flags, *needs), flags)
            )
        return fn

    return register


def instances(vm_types: tuple[int, ...] = tuple(uapi.VM_TYPE_NAMES)) -> list[Instance]:
    return [Instance(c, t) for t in vm_types for c in REGISTRY]


def run_instance(kvm: api.Kvm, inst: Instance) -> Result:
    c = inst.case
    caps = kvm.capabilities
    for need in c.needs:
        reason = need(caps, inst.vm_type, c.gmem_flags)
        if reason:
            return Result(inst.name, c.source, c.expected, Status.SKIP, reason)
    ctx = Ctx(kvm, inst.vm_type, c.gmem_flags)
    try:
        c.body(ctx)
    except CaseFailed as e:
        return Result(inst.name, c.source, c.expected, Status.FAIL, str(e), ctx.checks)
    except CaseSkipped as e:
        return Result(inst.name, c.source, c.expected, Status.SKIP, str(e), ctx.checks)
    except Exception as e:  # an unexpected error is a failure with its own description
        observed = f"{type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.errno is not None:
            observed = f"unexpected {errno_mod.errorcode.get(e.errno, e.errno)}: {e}"
        return Result(inst.name, c.source, c.expected, Status.FAIL, observed, ctx.checks)
    return Result(
        inst.name, c.source, c.expected, Status.PASS, f"as expected ({len(ctx.checks)} checks)",
        ctx.checks,
    )
