"""`guestmem demo`: a real guest on guest_memfd memory, step by step.

A scenario over the VMM and guest layers; it yields (title, detail, ok) steps
and the CLI prints them. Every claim a step makes is checked, not assumed.
"""

from __future__ import annotations

import errno
import signal as signal_module
from collections.abc import Iterator
from dataclasses import dataclass

from guestmem import api, memmap, uapi
from guestmem import program as p
from guestmem.caps import Capabilities
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import PROFILES
from guestmem.model import Kvm as ModelKvm
from guestmem.model.profile import Conversion
from guestmem.vmm import RunResult, Sharing, Vmm

HIGH = 1 << 32
SIZE = 2 << 20
PS = uapi.PAGE_SIZE
PATTERN = 0x6775657374000000  # "guest" << 24, plus the word index


@dataclass(frozen=True)
class Step:
    title: str
    detail: str
    ok: bool = True


def _guest(vmm: Vmm, abi: str, *steps: p.Step) -> RunResult:
    vmm.load(compile_program(p.Program.of(*steps), abi))
    return vmm.run()


def _ret(value: int) -> str:
    signed = value - (1 << 64) if value >> 63 else value
    names = {0: "0 (success)", -uapi.KVM_EPERM: "-KVM_EPERM", -uapi.KVM_EINVAL: "-KVM_EINVAL",
             -uapi.KVM_ENOSYS: "-KVM_ENOSYS"}
    return names.get(signed, str(signed))


def has_private_memory(caps: Capabilities) -> bool:
    """A SW_PROTECTED VM with KVM_MEMORY_ATTRIBUTE_PRIVATE (the coco profile)."""
    return (uapi.KVM_X86_SW_PROTECTED_VM in caps.vm_types
            and bool(caps.memory_attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))


def run(kvm: api.Kvm) -> Iterator[Step]:
    """The private-memory scenario where the backend has private memory, else the
    shared one."""
    caps = kvm.capabilities
    abi = default_hypercall_abi(caps)
    execution = caps.execution
    what = (f"{kvm.profile.name} profile" if isinstance(kvm, ModelKvm)
            else caps.implementation)
    yield Step("host", f"{kvm.backend} backend, {what} on "
                       f"{execution.cpu_vendor}, guest_memfd flags {caps.guest_memfd_flags:#x}, "
                       f"guest at CPL{execution.default_cpl}, hypercall ABI '{abi}'")
    if caps.gmem_in_place_conversion:
        yield from _in_place(kvm, abi)
    elif has_private_memory(caps):
        yield from _private(kvm, abi)
    else:
        yield from _shared(kvm, abi)


def _shared(kvm: api.Kvm, abi: str) -> Iterator[Step]:
    """A guest on MMAP|INIT_SHARED guest_memfd memory, shared with the host."""
    with Vmm(kvm) as vmm:
        region = vmm.add_memory(HIGH, SIZE)
        yield Step("memory", f"guest_memfd of {SIZE >> 20} MiB (MMAP|INIT_SHARED) bound at GPA "
                             f"{HIGH:#x} as memslot {region.slot}; userspace_addr = its own mmap")

        r = _guest(vmm, abi, p.WritePattern(HIGH, SIZE, PATTERN, 1),
                   p.VerifyPattern(HIGH, SIZE, PATTERN, 1))
        yield Step("guest writes and verifies", f"{SIZE >> 20} MiB at {HIGH:#x}: guest reported "
                   f"{'OK' if r.reports == [p.VERIFY_OK] else r.reports} in {r.exits} exits",
                   r.reports == [p.VERIFY_OK])

        words = [int.from_bytes(vmm.read(HIGH + 8 * i, 8), "little") for i in range(3)]
        expected = [p.pattern_word(PATTERN, 1, i) for i in range(3)]
        yield Step("host reads through the mmap",
                   "first words " + ", ".join(f"{w:#x}" for w in words), words == expected)

        r = _guest(vmm, abi, p.MapGpaRange(HIGH, SIZE // PS, SIZE, encrypted=True),
                   p.MapGpaRange(HIGH + PS, 1, PS, encrypted=False))
        yield from _conversions(vmm, r, abi)

        region.guest_memfd.punch_hole(0, PS)
        r = _guest(vmm, abi, p.VerifyPattern(HIGH, PS, 0),
                   p.VerifyPattern(HIGH + PS, SIZE - PS, p.pattern_word(PATTERN, 1, PS // 8), 1))
        yield Step("PUNCH_HOLE page 0", "guest now reads zeros there and the pattern elsewhere: "
                   f"{'OK' if r.reports == [p.VERIFY_OK] * 2 else r.reports}",
                   r.reports == [p.VERIFY_OK] * 2)

        region.mapping.munmap()
        region.guest_memfd.close()
        r = _guest(vmm, abi, p.ReadValue(HIGH + 3 * PS))
        fault = r.memory_fault
        good = r.errno == errno.EFAULT and fault is not None and fault.gpa == HIGH + 3 * PS
        detail = (f"KVM_RUN failed with {errno.errorcode.get(r.errno or 0, r.errno)}, "
                  f"MEMORY_FAULT gpa={fault.gpa:#x} size={fault.size:#x} flags={fault.flags:#x}"
                  if fault else f"run ended with {r.stop}")
        yield Step("guest_memfd closed for good", detail, good)


def _conversions(vmm: Vmm, r: RunResult, abi: str) -> Iterator[Step]:
    """MAP_GPA_RANGE: what the guest got back, and what reached the VMM's tracker."""
    rets = ", ".join(_ret(v) for v in r.reports)
    path = ("through guestmem's port doorbell (this KVM cannot deliver KVM_EXIT_HYPERCALL)"
            if abi == "port" else f"as KVM_EXIT_HYPERCALL ({abi})")
    private = [(hex(a), hex(s)) for a, s in vmm.tracker.ranges(Sharing.PRIVATE)]
    expected = [(hex(HIGH), hex(PS)), (hex(HIGH + 2 * PS), hex(SIZE - 2 * PS))]
    yield Step("MAP_GPA_RANGE", f"guest asked for 2 MiB private, then page 1 shared, {path}; "
               f"guest got {rets}; tracker's private ranges: {private}",
               private == expected and all(v == 0 for v in r.reports))


SECRET = 0x5EC2E7000000  # what the guest writes into its private memory


def _private(kvm: api.Kvm, abi: str) -> Iterator[Step]:
    """A SW_PROTECTED guest converts memory to private (MAP_GPA_RANGE → the VMM
    sets KVM_MEMORY_ATTRIBUTE_PRIVATE and allocates the guest_memfd), writes a
    secret there, and the host cannot see it."""
    with Vmm(kvm, uapi.KVM_X86_SW_PROTECTED_VM) as vmm:
        region = vmm.add_memory(HIGH, SIZE)
        yield Step("memory", f"SW_PROTECTED VM: a guest_memfd for private pages and anonymous "
                             f"memory for shared ones, {SIZE >> 20} MiB at GPA {HIGH:#x}")
        r = _guest(vmm, abi, p.WritePattern(HIGH, SIZE, PATTERN, 1))
        shared = int.from_bytes(vmm.read(HIGH, 8), "little")
        yield Step("guest writes shared memory", f"the host reads {shared:#x} through "
                   "userspace_addr", r.stop == "done" and shared == PATTERN)
        r = _guest(vmm, abi, p.MapGpaRange(HIGH, 256, PS, encrypted=True),
                   p.WritePattern(HIGH, 1 << 20, SECRET, 1),
                   p.VerifyPattern(HIGH, 1 << 20, SECRET, 1))
        private = [(hex(a), hex(n)) for a, n in vmm.tracker.ranges(Sharing.PRIVATE)]
        yield Step("guest converts 1 MiB to private", f"MAP_GPA_RANGE returned "
                   f"{_ret(r.reports[0]) if r.reports else r.stop}; private ranges {private}; "
                   f"the guest wrote and verified a secret there",
                   r.reports == [0, p.VERIFY_OK] and private == [(hex(HIGH), hex(1 << 20))])
        seen = int.from_bytes(vmm.read(HIGH, 8), "little")
        yield Step("host reads the same GPA", f"{seen:#x}: the shared copy, never the secret "
                   f"(private pages live in the guest_memfd)", seen == PATTERN)
        yield from _memory_map(region.guest_memfd, 0, 512)
        yield from _host_cannot_map_private(vmm)
        r = _guest(vmm, abi, p.MapGpaRange(HIGH, 256, PS, encrypted=False),
                   p.VerifyPattern(HIGH, 1 << 20, PATTERN, 1))
        yield Step("guest converts it back to shared", "the VMM punched the private pages; the "
                   "guest reads the shared copy again: "
                   f"{'OK' if r.reports == [0, p.VERIFY_OK] else r.reports}",
                   r.reports == [0, p.VERIFY_OK])


def _memory_map(gmem: api.GuestMemfd, first: int, last: int) -> Iterator[Step]:
    mm = gmem.memory_map(first * PS, (last - first) * PS)
    runs = "; ".join(f"pages {r.first}-{r.last - 1}: {', '.join(sorted(r.state)) or '-'}"
                     for r in mm.runs)
    yield Step("the guest_memfd's pages", runs, mm.pages_with(memmap.PRIVATE) == 256)


def _host_cannot_map_private(vmm: Vmm) -> Iterator[Step]:
    """The VMM's guest_memfd cannot even be mapped (no MMAP); one made with MMAP
    but not INIT_SHARED can, and its pages are still the guest's: a host access
    faults (kvm_gmem_fault_user_mapping: SIGBUS)."""
    with (vmm.vm.create_guest_memfd(PS, uapi.GUEST_MEMFD_FLAG_MMAP) as gmem,
          gmem.mmap(PS) as view):
        try:
            view.read(0, 8)
            outcome = "no fault"
        except HostSigbus as e:
            outcome = f"SIGBUS ({e.reason or 'private memory'})"
        signal = view.touch_in_child(0)
    killed = signal_module.Signals(signal).name if signal else "nothing"
    yield Step("host touches a guest_memfd page that is not shared",
               f"a second guest_memfd, MMAP without INIT_SHARED: {outcome}; a real load in a child "
               f"process is killed by {killed}", outcome.startswith("SIGBUS") and
               killed == "SIGBUS")


BUFFER = 256 << 20  # seed 004: "hand off a large buffer (hundreds of MiB)"
FILL = 0x42  # the byte the host fills the buffer with
PINNED_PAGE = 210  # any page of the 2 MiB but the first: error_offset must name it


def _fill_word(byte: int) -> int:
    return int.from_bytes(bytes([byte]) * 8, "little")


def _in_place(kvm: api.Kvm, abi: str) -> Iterator[Step]:
    """In-place conversion (KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd): a 256 MiB
    buffer handed to the guest without a copy on the pkvm VM type, re-initialised
    on SNP; a pinned page holding a conversion back; a forked VMM child."""
    yield from _hand_over(kvm, abi, uapi.GUESTMEM_PKVM_VM)
    yield from _hand_over(kvm, abi, uapi.KVM_X86_SNP_VM)
    yield from _pinned_and_forked(kvm)


def _hand_over(kvm: api.Kvm, abi: str, vm_type: int) -> Iterator[Step]:
    """The host fills the buffer through the VMM's mapping of the guest_memfd; the
    guest asks for it private (MAP_GPA_RANGE; the VMM converts in place) and reads it."""
    name = uapi.VM_TYPE_NAMES[vm_type]
    with Vmm(kvm, vm_type) as vmm:
        region = vmm.add_memory(HIGH, BUFFER)
        region.mapping.fill(0, FILL, BUFFER)
        r = _guest(vmm, abi, p.MapGpaRange(HIGH, BUFFER // PS, PS, encrypted=True),
                   p.VerifyPattern(HIGH, BUFFER, _fill_word(FILL)))
        converted = bool(r.reports) and r.reports[0] == 0
        found = r.reports[3] if len(r.reports) >= 4 and r.reports[1] == p.MISMATCH_TAG else None
        try:
            region.mapping.read(0, 1)
            host = "the host still reads it"
        except HostSigbus:
            host = "the host's access is SIGBUS"
        profile = kvm.profile if isinstance(kvm, ModelKvm) else PROFILES["inplace"]
        preserves = profile.conversion_of(profile.vm_type(vm_type)) is Conversion.PRESERVE
        if preserves:
            seen = "reads the host's bytes, all 256 MiB" if r.reports[1:] == [p.VERIFY_OK] \
                else f"reports {r.reports[1:]}"
            ok = converted and r.reports[1:] == [p.VERIFY_OK]
        else:
            seen = (f"reads {found:#x}, not the host's {_fill_word(FILL):#x}: the firmware's "
                    "RMPUPDATE left ciphertext" if found is not None else f"reports {r.reports}")
            ok = converted and found is not None and found != _fill_word(FILL)
        yield Step(f"{name}: 256 MiB shared -> private",
                   f"in {region.backing} memory, the host filled the buffer with {FILL:#04x}; "
                   f"MAP_GPA_RANGE returned {_ret(r.reports[0]) if r.reports else r.stop}; "
                   f"the guest {seen}; {host}", ok and host.endswith("SIGBUS"))


def _pinned_and_forked(kvm: api.Kvm) -> Iterator[Step]:
    """elevated_refcount and forked_accesses of guest_memfd_conversions_test, on a
    2 MiB guest_memfd the host maps (INIT_SHARED)."""
    with kvm.create_vm(uapi.GUESTMEM_PKVM_VM) as vm, \
            vm.create_guest_memfd(SIZE, uapi.GUEST_MEMFD_FLAG_MMAP
                                  | uapi.GUEST_MEMFD_FLAG_INIT_SHARED) as gmem, \
            gmem.mmap() as view, kvm.fork() as child:
        view.fill(0, 0x11, SIZE)
        page = PINNED_PAGE
        pin = view.pin(page * PS, PS)
        try:
            gmem.set_memory_attributes2(0, SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            outcome, offset = "success", None
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, str(e.errno))
            offset = getattr(e, "error_offset", None)
        still = view.read(0, 1) == b"\x11"
        yield Step("a pinned page holds the conversion back",
                   f"page {page} pinned (FOLL_LONGTERM); to private of the 2 MiB: {outcome}, "
                   f"error_offset {offset if offset is None else hex(offset)} "
                   f"(= page {page} * 4096); nothing changed, the host still reads the buffer",
                   outcome == "EAGAIN" and offset == page * PS and still)
        before = child.read(view, 0, 1)  # the child maps page 0 in its own page tables
        pin.unpin()
        gmem.set_memory_attributes2(0, SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        private = gmem.memory_map().pages_with(memmap.PRIVATE)
        yield Step("after the unpin", f"the same conversion succeeds: {private} of "
                   f"{SIZE // PS} pages private", private == SIZE // PS)
        sig = child.touch(view, 0)
        killed = signal_module.Signals(sig).name if sig else "nothing"
        yield Step("a forked child", f"child {child.pid} read {before.hex()} from page 0 "
                   f"before the conversion; its load now gets {killed} (the conversion "
                   "zapped every process's page tables)",
                   before == b"\x11" and killed == "SIGBUS")
