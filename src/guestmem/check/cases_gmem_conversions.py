"""tools/testing/selftests/kvm/x86/guest_memfd_conversions_test.c, ported.

Upstream: the in-place conversion series' selftest (read at intel-lab-lkp/linux
@f7956d5f, the v8 shape; upstream-2026-11.md §1), plus elevated_refcount from
[PATCH v8 39/46] "KVM: selftests: Test conversion with elevated page refcount"
<20260618-gmem-inplace-conversion-v8-39-9d2959357853@google.com>, which that copy
lacks. Every case here keeps upstream's name after "gmem_conversions.", its
order of steps and its values.

The fixture (gmem_conversions_do_setup): a KVM_X86_SW_PROTECTED_VM with one vCPU,
a guest_memfd of nr_pages with GUEST_MEMFD_FLAG_MMAP (plus INIT_SHARED for the
init_shared cases), bound alone by memslot 1 at GPA 4 GiB, its userspace_addr the
guest_memfd's own mmap (t->mem): the host's accesses and the guest's meet in the
same pages, and privateness lives in the guest_memfd (KVM_SET_MEMORY_ATTRIBUTES2
on its fd, gmem_set_private / gmem_set_shared). The multipage cases set the
fixture up afresh for every test_page, as upstream's macro does.

What differs, and why:
- guest_do_rmw reads one byte, GUEST_ASSERT_EQs it and writes one byte. A guest
  program (guestmem.program) reads and writes 64-bit words, so the guest here
  verifies the word at the page's first byte (VerifyPattern of 8 bytes: the guest's
  assert, its mismatch report carrying the word read) and writes the new value as
  a word (WritePattern of 8 bytes). Bytes 1..7 of that word are zero throughout
  (the host writes only byte 0, the guest's words are values below 0x100), so the
  word compare is the byte compare plus a check that the neighbours stayed zero.
- Upstream's guest loops forever, GUEST_SYNC after each read-modify-write; here
  each run_guest_do_rmw loads a two-step program and runs it to its halt (guest
  memory carries over between runs, registers need not).
- The guest addresses the GPA itself (guestmem's page tables map it 1:1), not
  upstream's virt_map alias at GVA 0x90000000.
- pin_pages (a vmsplice into a pipe in v8) is Mapping.pin: a FOLL_LONGTERM pin
  (an io_uring registered buffer on the kvm backend); unpin_pages is Pin.unpin.
- TEST_EXPECT_SIGBUS is Ctx.sigbus: a real access in a child process and the
  backend's own accessor must both take SIGBUS.
- forked_accesses syncs parent and child with a process-shared mutex and
  condition variable; here the parent drives a Kvm.fork() child step by step
  (api.ChildProcess), which orders the same accesses without a lock.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from guestmem import api, uapi
from guestmem import program as p
from guestmem.caps import Capabilities
from guestmem.check.suite import (
    Ctx,
    Requirement,
    case,
    needs_gmem_attributes,
    needs_guests,
    only_on,
)
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import RunResult, Vmm

PS = uapi.PAGE_SIZE
SRC = "x86/guest_memfd_conversions_test.c"
GPA = 1 << 32  # SZ_4G: above APIC_DEFAULT_PHYS_BASE
SLOT = 1
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP  # GMEM_CONVERSION_TEST ors it into every case's flags
INIT_PRIVATE = MMAP
INIT_SHARED = MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
A, B, C, D, E = (ord(c) for c in "ABCDE")

needs_sw_protected = only_on(uapi.KVM_X86_SW_PROTECTED_VM,
                             "guest_memfd_conversions_test TEST_REQUIREs KVM_X86_SW_PROTECTED_VM")


def needs_flags(flags: int) -> Requirement:
    """The guest_memfd flags the case creates its file with (after in-place
    conversion itself, so a kernel without the series says that first)."""
    names = "MMAP|INIT_SHARED" if flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED else "MMAP"

    def requirement(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
        supported = caps.gmem_flags_for(vm_type)
        if flags & ~supported:
            name = uapi.VM_TYPE_NAMES.get(vm_type, str(vm_type))
            return f"KVM_CAP_GUEST_MEMFD_FLAGS={supported:#x} lacks {names} for VM type {name}"
        return None

    return requirement


def needs(flags: int) -> tuple[Requirement, ...]:
    """main()'s TEST_REQUIREs (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES has PRIVATE, the
    VM type is SW_PROTECTED), a backend that runs guests, and the case's flags."""
    return (needs_gmem_attributes, needs_sw_protected, needs_guests, needs_flags(flags))


class Fixture:
    """test_data_t and the helpers of the upstream file, checking through a Ctx."""

    def __init__(self, ctx: Ctx, vmm: Vmm, gmem: api.GuestMemfd, mem: api.Mapping) -> None:
        self.ctx, self.vmm, self.gmem, self.mem = ctx, vmm, gmem, mem
        self.abi = default_hypercall_abi(ctx.caps, vmm.cpl)

    # --- conversions (gmem_set_private / gmem_set_shared) --------------------------------------
    def gmem_set_private(self, offset: int, size: int) -> None:
        self.ctx.ok(f"KVM_SET_MEMORY_ATTRIBUTES2 PRIVATE [{offset:#x}, +{size:#x})",
                    self.gmem.set_memory_attributes2, offset, size, PRIVATE)

    def gmem_set_shared(self, offset: int, size: int) -> None:
        self.ctx.ok(f"KVM_SET_MEMORY_ATTRIBUTES2 shared [{offset:#x}, +{size:#x})",
                    self.gmem.set_memory_attributes2, offset, size, 0)

    # --- the guest and the host ---------------------------------------------------------------
    def run_guest_do_rmw(self, pgoff: int, expected_val: int, write_val: int) -> None:
        """One pass of guest_do_rmw on page pgoff, to its GUEST_SYNC (here: its halt)."""
        gpa = GPA + pgoff * PS
        program = p.Program.of(p.VerifyPattern(gpa, 8, expected_val),
                               p.WritePattern(gpa, 8, write_val))
        self.vmm.load(compile_program(program, self.abi))
        result = self.vmm.run()
        self.ctx.equal(f"page {pgoff}: the guest reads {expected_val:#04x} and writes "
                       f"{write_val:#04x}", f"done, read {expected_val:#04x}",
                       _rmw_outcome(result, expected_val))

    def host_do_rmw(self, pgoff: int, expected_val: int, write_val: int) -> None:
        self.ctx.bytes_equal(f"page {pgoff}: the host reads {expected_val:#04x}", self.mem,
                             pgoff * PS, bytes([expected_val]))
        self.mem.write(pgoff * PS, bytes([write_val]))

    def test_private(self, pgoff: int, starting_val: int, write_val: int) -> None:
        self.ctx.sigbus(f"page {pgoff} (private): host write", self.mem, pgoff * PS, write=True)
        self.run_guest_do_rmw(pgoff, starting_val, write_val)
        self.ctx.sigbus(f"page {pgoff} (private): host read", self.mem, pgoff * PS)

    def test_convert_to_private(self, pgoff: int, starting_val: int, write_val: int) -> None:
        self.gmem_set_private(pgoff * PS, PS)
        self.test_private(pgoff, starting_val, write_val)

    def test_shared(self, pgoff: int, starting_val: int, host_write_val: int,
                    write_val: int) -> None:
        self.host_do_rmw(pgoff, starting_val, host_write_val)
        self.run_guest_do_rmw(pgoff, host_write_val, write_val)
        self.ctx.bytes_equal(f"page {pgoff} (shared): the host sees the guest's "
                             f"{write_val:#04x}", self.mem, pgoff * PS, bytes([write_val]))

    def test_convert_to_shared(self, pgoff: int, starting_val: int, host_write_val: int,
                               write_val: int) -> None:
        self.gmem_set_shared(pgoff * PS, PS)
        self.test_shared(pgoff, starting_val, host_write_val, write_val)

    def test_convert_to_private_fails(self, pgoff: int, nr_pages: int,
                                      expected_error_offset: int) -> None:
        """EAGAIN, and error_offset written back as the first page with an elevated
        refcount (upstream primes it with expected + 1: anything but the answer)."""
        offset, size = pgoff * PS, nr_pages * PS
        what = f"KVM_SET_MEMORY_ATTRIBUTES2 PRIVATE [{offset:#x}, +{size:#x}) with a page pinned"
        error_offset: object = None
        try:
            self.gmem.set_memory_attributes2(offset, size, PRIVATE)
            observed = "ok"
        except OSError as e:
            observed = errno.errorcode.get(e.errno or 0, str(e.errno))
            error_offset = getattr(e, "error_offset", None)
        self.ctx.equal(what, "EAGAIN", observed)
        self.ctx.equal(f"{what}: error_offset", expected_error_offset, error_offset)


def _rmw_outcome(result: RunResult, expected_val: int) -> str:
    """How a guest_do_rmw run went, for a check: "done, read <value>" when the guest's
    assert held; else the value it read, or how the run ended."""
    reports = result.reports
    if reports == [p.VERIFY_OK]:
        return f"{result.stop}, read {expected_val:#04x}"
    if len(reports) >= 3 and reports[0] == p.MISMATCH_TAG:
        return f"{result.stop}, read {reports[2]:#04x}"
    fault = result.memory_fault
    if fault is not None:
        return f"{result.stop} (gpa {fault.gpa:#x}, flags {fault.flags:#x}), reports {reports}"
    return f"{result.stop}, reports {reports}"


@contextmanager
def gmem_conversions(ctx: Ctx, nr_pages: int, gmem_flags: int) -> Iterator[Fixture]:
    """gmem_conversions_do_setup, and the teardown (kvm_vm_free) on leaving."""
    size = nr_pages * PS
    with Vmm(ctx.kvm, ctx.vm_type) as vmm, ctx.gmem(vmm.vm, size, gmem_flags) as gmem, \
            gmem.mmap(size) as mem:
        ctx.ok(f"memslot {SLOT}: {nr_pages} pages of guest_memfd at 4 GiB",
               vmm.vm.set_user_memory_region2, SLOT, uapi.KVM_MEM_GUEST_MEMFD, GPA, size,
               mem.addr, gmem, 0)
        yield Fixture(ctx, vmm, gmem, mem)


MultipageBody = Callable[[Fixture, int, int], None]


def multipage(ctx: Ctx, nr_pages: int, body: MultipageBody) -> None:
    """GMEM_CONVERSION_MULTIPAGE_TEST_INIT_SHARED: body(t, nr_pages, test_page) for
    each test_page, each on a fresh INIT_SHARED fixture, torn down after it."""
    for test_page in range(nr_pages):
        with gmem_conversions(ctx, nr_pages, INIT_SHARED) as t:
            body(t, nr_pages, test_page)


@case("gmem_conversions.init_private", f"{SRC} init_private",
      "1 page, INIT_PRIVATE: host read and write SIGBUS, the guest reads 0 and writes 'A'; "
      "to shared: the host reads 'A' and writes 'B', the guest reads 'B' and writes 'C', "
      "the host sees 'C'; to private: SIGBUS again, the guest reads 'C', writes 'E'",
      needs=needs(INIT_PRIVATE))
def init_private(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c GMEM_CONVERSION_TEST_INIT_PRIVATE(init_private)."""
    with gmem_conversions(ctx, 1, INIT_PRIVATE) as t:
        t.test_private(0, 0, A)
        t.test_convert_to_shared(0, A, B, C)
        t.test_convert_to_private(0, C, E)


@case("gmem_conversions.init_shared", f"{SRC} init_shared",
      "1 page, INIT_SHARED: the host reads 0 and writes 'A', the guest reads 'A' and writes "
      "'B', the host sees 'B'; to private: host read and write SIGBUS, the guest reads 'B', "
      "writes 'C'; to shared: the host reads 'C', writes 'D', the guest reads 'D', writes "
      "'E', the host sees 'E'", needs=needs(INIT_SHARED))
def init_shared(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c GMEM_CONVERSION_TEST_INIT_SHARED(init_shared)."""
    with gmem_conversions(ctx, 1, INIT_SHARED) as t:
        t.test_shared(0, 0, A, B)
        t.test_convert_to_private(0, B, C)
        t.test_convert_to_shared(0, C, D, E)


@case("gmem_conversions.indexing", f"{SRC} indexing",
      "4 pages, INIT_SHARED, for each test_page: every page written by host and guest "
      "(highest index first); converting test_page to private and back leaves the other "
      "pages shared with their own values, and test_page keeps the guest's data",
      needs=needs(INIT_SHARED))
def indexing(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c
    GMEM_CONVERSION_MULTIPAGE_TEST_INIT_SHARED(indexing, 4). Values are
    combine(x, n) = (x << 4) + n, varying with both the page and the step."""

    def combine(x: int, n: int) -> int:
        return (x << 4) + n

    def body(t: Fixture, nr_pages: int, test_page: int) -> None:
        for i in reversed(range(nr_pages)):  # the last page first: catches "always page 0"
            t.test_shared(i, 0, combine(i, 0), combine(i, 2))
        t.test_convert_to_private(test_page, combine(test_page, 2), combine(test_page, 3))
        for i in range(nr_pages):
            if i == test_page:
                t.test_private(test_page, combine(test_page, 3), combine(test_page, 4))
            else:
                t.test_shared(i, combine(i, 2), combine(i, 3), combine(i, 4))
        t.test_convert_to_shared(test_page, combine(test_page, 4), combine(test_page, 5),
                                 combine(test_page, 6))
        for i in range(nr_pages):
            expected = combine(test_page, 6) if i == test_page else combine(i, 4)
            t.test_shared(i, expected, combine(i, 7), combine(i, 8))

    multipage(ctx, 4, body)


@case("gmem_conversions.before_allocation_shared", f"{SRC} before_allocation_shared",
      "1 page, INIT_SHARED, never faulted: converting it to private is recorded (host "
      "SIGBUS, the guest reads 0 and writes 'A')", needs=needs(INIT_SHARED))
def before_allocation_shared(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c
    GMEM_CONVERSION_TEST_INIT_SHARED(before_allocation_shared): a conversion with no
    folio yet is recorded in the guest_memfd."""
    with gmem_conversions(ctx, 1, INIT_SHARED) as t:
        t.test_convert_to_private(0, 0, A)


@case("gmem_conversions.before_allocation_private", f"{SRC} before_allocation_private",
      "1 page, INIT_PRIVATE, never faulted: converting it to shared is recorded (the host "
      "reads 0 and writes 'A', the guest reads 'A' and writes 'B', the host sees 'B')",
      needs=needs(INIT_PRIVATE))
def before_allocation_private(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c
    GMEM_CONVERSION_TEST_INIT_PRIVATE(before_allocation_private)."""
    with gmem_conversions(ctx, 1, INIT_PRIVATE) as t:
        t.test_convert_to_shared(0, 0, A, B)


@case("gmem_conversions.unallocated_folios", f"{SRC} unallocated_folios",
      "8 pages, INIT_SHARED, for each test_page: the host faults test_page and page 4 "
      "(writes 'A'); all 8 to private at once: the faulted pages keep 'A', the others read "
      "0, all SIGBUS for the host; each page back to shared keeps the guest's 'B'",
      needs=needs(INIT_SHARED))
def unallocated_folios(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c
    GMEM_CONVERSION_MULTIPAGE_TEST_INIT_SHARED(unallocated_folios, 8): one bulk
    conversion over allocated and unallocated runs of every layout."""
    second_page_to_fault = 4

    def body(t: Fixture, nr_pages: int, test_page: int) -> None:
        # Fault 2 of the pages (1 when test_page is the second page to fault).
        t.host_do_rmw(test_page, 0, A)
        if test_page != second_page_to_fault:
            t.host_do_rmw(second_page_to_fault, 0, A)
        t.gmem_set_private(0, nr_pages * PS)
        for i in range(nr_pages):
            t.test_private(i, A if i in (test_page, second_page_to_fault) else 0, B)
        for i in range(nr_pages):
            t.test_convert_to_shared(i, B, C, D)

    multipage(ctx, 8, body)


@case("gmem_conversions.truncate", f"{SRC} truncate",
      "1 page, INIT_SHARED: PUNCH_HOLE leaves it shared (the host reads 0 again); to "
      "private; PUNCH_HOLE leaves it private (host SIGBUS) and the guest reads 0",
      needs=needs(INIT_SHARED))
def truncate(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c GMEM_CONVERSION_TEST_INIT_SHARED(truncate):
    truncation does not change shared/private status."""
    page = ctx.gmem_page_size  # upstream's page_size: a huge page on HugeTLB
    with gmem_conversions(ctx, 1, INIT_SHARED) as t:
        t.host_do_rmw(0, 0, A)
        ctx.ok("PUNCH_HOLE page 0 (shared)", t.gmem.punch_hole, 0, page)
        t.host_do_rmw(0, 0, A)
        t.test_convert_to_private(0, A, B)
        ctx.ok("PUNCH_HOLE page 0 (private)", t.gmem.punch_hole, 0, page)
        t.test_private(0, 0, A)


@case("gmem_conversions.elevated_refcount", f"{SRC} elevated_refcount ([PATCH v8 39/46])",
      "4 pages, INIT_SHARED, for each test_page pinned: to private fails EAGAIN with "
      "error_offset = test_page * 4096, in bulk and for that page alone; every other page "
      "converts; after the unpin the whole range converts and every page keeps the guest's "
      "data", needs=needs(INIT_SHARED))
def elevated_refcount(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c
    GMEM_CONVERSION_MULTIPAGE_TEST_INIT_SHARED(elevated_refcount, 4), from [PATCH v8
    39/46] (not in the intel-lab-lkp copy): pin_pages is Mapping.pin."""

    def body(t: Fixture, nr_pages: int, test_page: int) -> None:
        pin = ctx.ok(f"pin page {test_page}", t.mem.pin, test_page * PS, PS)
        try:
            for i in range(nr_pages):
                t.test_shared(i, 0, A, B)
            # In bulk: fails as long as any page in the range has an unexpected refcount.
            t.test_convert_to_private_fails(0, nr_pages, test_page * PS)
            for i in range(nr_pages):  # page by page: only the pinned page fails
                if i == test_page:
                    t.test_convert_to_private_fails(i, 1, test_page * PS)
                else:
                    t.test_convert_to_private(i, B, C)
        finally:
            pin.unpin()
        t.gmem_set_private(0, nr_pages * PS)
        for i in range(nr_pages):
            t.test_private(i, B if i == test_page else C, D)

    multipage(ctx, 4, body)


@case("gmem_conversions.forked_accesses", f"{SRC} forked_accesses",
      "1 page, INIT_SHARED, a forked child: the child reads the guest's 0x0b and writes "
      "0x0c (mapping the page in its own page tables); after the parent converts the page "
      "to private (the guest reads 0x0c), the child's read and write take SIGBUS",
      needs=needs(INIT_SHARED))
def forked_accesses(ctx: Ctx) -> None:
    """x86/guest_memfd_conversions_test.c GMEM_CONVERSION_TEST_INIT_SHARED(forked_accesses):
    shared/private protections are seen from any process, because a conversion
    unmaps the guest_memfd from every process's page tables."""
    with gmem_conversions(ctx, 1, INIT_SHARED) as t, ctx.kvm.fork() as child:
        t.test_shared(0, 0, 0xA, 0xB)
        # STATE_CHECK_SHARED: host_do_rmw in the child maps the page into its page tables
        ctx.equal("the child reads the guest's 0x0b", b"\x0b",
                  ctx.ok("the child's read", child.read, t.mem, 0, 1))
        ctx.ok("the child writes 0x0c", child.write, t.mem, 0, b"\x0c")
        t.test_convert_to_private(0, 0xC, 0xD)
        for write in (False, True):  # STATE_CHECK_PRIVATE: TEST_EXPECT_SIGBUS in the child
            ctx.signal_in_child(f"the child's {'write' if write else 'read'} of the private page",
                                child, t.mem, 0, write, signal.SIGBUS)
