"""guest_memfd on HugeTLB (issue 10): the WIP branch's reporting selftest, ported,
and what a kernel without the branch does with the page_order byte.

Upstream: tools/testing/selftests/kvm/guest_memfd_hugetlb_reporting_test.c (RFC v2
and the intel/tdx copy @254a847b, read for upstream-2026-11.md §2). For each huge
page size it records the pool's counters, then asserts after each step that
free == base - faulted and resv == base + reserved - faulted, with nr, overcommit
and surplus unchanged. The cgroup counters it also reads are not ported (no
hugetlb cgroup in the API). The port sizes the pool up by one page first, so that
the file has a page to reserve, and puts it back after.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from guestmem import uapi
from guestmem.api import HugetlbCounters
from guestmem.caps import Capabilities
from guestmem.check.suite import REGISTRY, Case, Ctx, case, pool_pages

PS = uapi.PAGE_SIZE
HUGETLB = uapi.GUEST_MEMFD_FLAG_HUGETLB
SRC = "guest_memfd_hugetlb_reporting_test.c"
ORDERS = {2 << 20: uapi.HUGETLB_PAGE_ORDER_2M, 1 << 30: uapi.HUGETLB_PAGE_ORDER_1G}


def needs_gmem_hugetlb(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    """main()'s TEST_REQUIRE: KVM_CAP_GUEST_MEMFD_FLAGS has GUEST_MEMFD_FLAG_HUGETLB."""
    offered = caps.gmem_flags_for(vm_type)
    if not offered & HUGETLB:
        return (f"KVM_CAP_GUEST_MEMFD_FLAGS={offered:#x} lacks GUEST_MEMFD_FLAG_HUGETLB "
                "(guest_memfd on HugeTLB, an unmerged series)")
    return None


def needs_no_gmem_hugetlb(caps: Capabilities, vm_type: int, gmem_flags: int) -> str | None:
    if caps.gmem_flags_for(vm_type) & HUGETLB:
        return "guest_memfd takes GUEST_MEMFD_FLAG_HUGETLB here (case is for kernels without)"
    return None


def _expect(ctx: Ctx, what: str, base: HugetlbCounters, now: HugetlbCounters,
            reserved: int, faulted: int) -> None:
    """assert_stats(reserved, faulted)."""
    ctx.equal(f"{what}: free, resv, nr, overcommit, surplus",
              (base.free - faulted, base.resv + reserved - faulted, base.nr, base.overcommit,
               base.surplus),
              (now.free, now.resv, now.nr, now.overcommit, now.surplus))


@case("gmem_hugetlb.reporting", f"{SRC} test_guest_memfd_hugetlb_reporting",
      "per huge page size with a pool: a one-page HUGETLB guest_memfd reserves its page at "
      "creation (1,0), fallocate faults it (1,1), PUNCH_HOLE gives it back but keeps the "
      "reservation (1,0), close returns to the baseline; nr, overcommit, surplus unchanged",
      needs=(needs_gmem_hugetlb,))
def reporting(ctx: Ctx) -> None:
    hugetlb = ctx.kvm.hugetlb
    for size, order in ORDERS.items():
        if size not in hugetlb.page_sizes:
            continue
        found = hugetlb.counters(size)
        if hugetlb.set_nr_hugepages(size, found.nr + 1) <= found.nr:
            hugetlb.set_nr_hugepages(size, found.nr)
            continue  # the machine cannot give this size a page (no 1 GiB one here)
        try:
            _report(ctx, size, order)
        finally:
            hugetlb.set_nr_hugepages(size, found.nr)


def _report(ctx: Ctx, size: int, order: int) -> None:
    hugetlb = ctx.kvm.hugetlb
    base = hugetlb.counters(size)
    label = f"{size >> 20} MiB"
    with ctx.vm() as vm:
        _expect(ctx, f"{label}: VM created", base, hugetlb.counters(size), 0, 0)
        gmem = ctx.ok(f"{label}: create a one-page HUGETLB guest_memfd",
                      vm.create_guest_memfd, size, HUGETLB, order)
        _expect(ctx, f"{label}: created", base, hugetlb.counters(size), 1, 0)
        ctx.ok(f"{label}: fallocate", gmem.allocate, 0, size)
        _expect(ctx, f"{label}: fallocated", base, hugetlb.counters(size), 1, 1)
        ctx.ok(f"{label}: PUNCH_HOLE", gmem.punch_hole, 0, size)
        _expect(ctx, f"{label}: punched", base, hugetlb.counters(size), 1, 0)
        gmem.close()
    hugetlb.settle()  # the selftest's usleep(300 ms): deferred frees land
    _expect(ctx, f"{label}: closed", base, hugetlb.counters(size), 0, 0)


@case("gmem_hugetlb.creation_rules", "the WIP branch's kvm_gmem_create (upstream-2026-11.md §2)",
      "EINVAL for a page_order without HUGETLB, HUGETLB with INIT_SHARED, an order no hstate "
      "has, a size that is not whole huge pages; ENOMEM when the pool cannot reserve every "
      "page; none of them reserves anything", needs=(needs_gmem_hugetlb,))
def creation_rules(ctx: Ctx) -> None:
    hugetlb = ctx.kvm.hugetlb
    size = 2 << 20
    base = hugetlb.counters(size)
    with ctx.vm() as vm:
        ctx.fails("page_order 9 without HUGETLB", errno.EINVAL, vm.create_guest_memfd, size, 0,
                  uapi.HUGETLB_PAGE_ORDER_2M)
        if ctx.caps.gmem_flags_for(ctx.vm_type) & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
            ctx.fails("HUGETLB | INIT_SHARED", errno.EINVAL, vm.create_guest_memfd, size,
                      HUGETLB | uapi.GUEST_MEMFD_FLAG_INIT_SHARED, uapi.HUGETLB_PAGE_ORDER_2M)
        ctx.fails("page_order 10 (no 4 MiB hstate)", errno.EINVAL, vm.create_guest_memfd,
                  size, HUGETLB, 10)
        ctx.fails("2 MiB + 4 KiB", errno.EINVAL, vm.create_guest_memfd, size + PS, HUGETLB,
                  uapi.HUGETLB_PAGE_ORDER_2M)
        beyond = (base.free - base.resv + 1) * size
        ctx.fails("one page more than the pool has free", errno.ENOMEM,
                  vm.create_guest_memfd, beyond, HUGETLB, uapi.HUGETLB_PAGE_ORDER_2M)
    _expect(ctx, "after the failures", base, hugetlb.counters(size), 0, 0)


@case("gmem.page_order_reserved", "kvm_gmem_create (6.18: reads size and flags only)",
      "without GUEST_MEMFD_FLAG_HUGETLB the page_order byte is reserved space that is never "
      "read: any value makes an ordinary guest_memfd (observed on 6.18.44)",
      needs=(needs_no_gmem_hugetlb,))
def page_order_reserved(ctx: Ctx) -> None:
    with ctx.vm() as vm:
        for order in (uapi.HUGETLB_PAGE_ORDER_2M, uapi.HUGETLB_PAGE_ORDER_1G, 255):
            gmem = ctx.ok(f"page_order {order}", vm.create_guest_memfd, 2 * PS, 0, order)
            ctx.ok(f"page_order {order}: a 4 KiB fallocate", gmem.allocate, PS, PS)
            ctx.equal(f"page_order {order}: st_size", 2 * PS, gmem.stat().st_size)
            gmem.close()


# --- the wrapper's no-leak check (guest_memfd_wrap_test_check_hugetlb_reporting.sh) -------
WRAP_SRC = "guest_memfd_wrap_test_check_hugetlb_reporting.sh"


def _wrapped(inner: Case) -> Callable[[Ctx], None]:
    """Run `inner` with every guest_memfd on 2 MiB HugeTLB pages, then assert that
    the five counters of the pool are what they were before it (after deferred
    work settled): no leak."""

    def body(ctx: Ctx) -> None:
        size = 2 << 20
        with pool_pages(ctx, size, 2):
            hugetlb = ctx.kvm.hugetlb
            base = hugetlb.counters(size)
            ctx.hugetlb_order = ORDERS[size]
            try:
                inner.body(ctx)
            finally:
                ctx.hugetlb_order = 0
            hugetlb.settle()
            ctx.equal(f"{inner.name}: the 2 MiB pool's counters after it", base,
                      hugetlb.counters(size))

    return body


def _register_wrapped(prefix: str) -> None:
    for inner in [c for c in REGISTRY if c.name.startswith(prefix)]:
        name = "gmem_hugetlb.wrapped." + inner.name.removeprefix("gmem_")
        REGISTRY.append(Case(name, f"{WRAP_SRC} around {inner.source}",
                             f"on 2 MiB HugeTLB pages: {inner.expected}; then the pool's five "
                             "counters are as before (no leak)", _wrapped(inner),
                             (*inner.needs, needs_gmem_hugetlb), inner.gmem_flags))


_register_wrapped("gmem_conversions.")
