"""`guestmem hugetlb walk`: issue 10's Done-when, step by step, on the model.

A guest_memfd of two huge pages (1 GiB or 2 MiB) on a pool with HVO on: one
4 KiB page converted to shared splits its folio and HVO's vmemmap comes back;
converted back, the folio merges and the vmemmap is freed again; a pinned piece
holds a conversion to private back with EAGAIN at its offset until the unpin;
close returns the pool to where it began. Each step checks what it claims and
carries the pool's counters, the inode's split and merge record and the model's
free memory as they are after it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from guestmem import memmap, uapi
from guestmem.api import HugetlbCounters
from guestmem.hugetlb_pools import page_order, size_name
from guestmem.model import PROFILES, Kvm
from guestmem.model.gmem import GuestMemfd, Restructure
from guestmem.model.hugetlb import STRUCT_PAGE

PAGE: Final = 4096
HUGE_PAGES: Final = 2  # the pool, and the file: a folio that splits beside one that does not
SHARED_PAGE: Final = 3  # the 4 KiB page of the second folio converted to shared and back
PIECE_PAGES: Final = 16  # the shared piece the pin is taken in
PINNED_PAGE: Final = 5  # the pin's page within the piece: error_offset must name it, not the start
PRIVATE: Final = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def vmemmap_per_split(page_size: int) -> int:
    """What a split restores of the vmemmap HVO freed: all of a huge page's struct
    pages but the one vmemmap page HVO keeps (vmemmap_dedup.rst): 4095 pages,
    16,773,120 bytes, for 1 GiB; 7 pages for 2 MiB."""
    return page_size // PAGE * STRUCT_PAGE - PAGE


@dataclass(frozen=True)
class WalkStep:
    """One step as the CLI prints it (title, detail, ok), with the state after it."""

    title: str
    detail: str
    ok: bool
    counters: HugetlbCounters
    restructure: Restructure
    memory_free: int  # bytes the model's buddy allocator has free
    split_folios: list[int]  # file offsets of the huge folios split to 4 KiB pages
    error: dict[str, Any] | None = None  # errno name and error_offset of a refused call

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "detail": self.detail, "ok": self.ok,
                "counters": vars(self.counters), "restructure": asdict(self.restructure),
                "memory_free": self.memory_free, "split_folios": self.split_folios,
                "error": self.error}


def hugetlb_kvm(page_size: int) -> Kvm:
    """The model with guest_memfd on HugeTLB (the inplace profile with gmem_hugetlb,
    not yet a named profile), HVO on and a pool of HUGE_PAGES pages of page_size."""
    kvm = Kvm(PROFILES["hugetlb"])
    kvm.hugetlb.hvo = True
    kvm.hugetlb.set_nr_hugepages(page_size, HUGE_PAGES)
    return kvm


def counters_text(c: HugetlbCounters) -> str:
    return (f"pool nr {c.nr}, free {c.free}, resv {c.resv}, surplus {c.surplus}, "
            f"overcommit {c.overcommit}")


class Walk:
    """The walk's model, file and expectations for one page size."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.kvm = hugetlb_kvm(page_size)
        self.per_split = vmemmap_per_split(page_size)
        self.first_free = self.kvm.hugetlb.memory.free_bytes
        self.gmem: GuestMemfd | None = None

    @property
    def restructure(self) -> Restructure:
        return replace(self.gmem.inode.restructure) if self.gmem else Restructure()

    def step(self, title: str, detail: str, ok: bool, want: HugetlbCounters,
             error: dict[str, Any] | None = None) -> WalkStep:
        """A step as it stands now: ok only if the pool is what the step expects too."""
        got = self.kvm.hugetlb.counters(self.page_size)
        return WalkStep(title, f"{detail}; {counters_text(got)}", ok and got == want, got,
                        self.restructure, self.kvm.hugetlb.memory.free_bytes,
                        self.split_folios(), error)

    def pool(self, pages: int, resv: int) -> HugetlbCounters:
        """The counters expected: HUGE_PAGES in the pool, `pages` of them allocated."""
        return HugetlbCounters(HUGE_PAGES, HUGE_PAGES - pages, resv, 0, 0)

    def split_folios(self) -> list[int]:
        """The file offsets of the huge folios that are split to 4 KiB pages."""
        if self.gmem is None:
            return []
        base = self.page_size // PAGE
        return [i * PAGE for lo, hi, _ in self.gmem.inode.split.items()
                for i in range(lo, hi, base)]

    def folios_text(self) -> str:
        """Which folios are split: "the folio at 0x40000000 split to 262,144 4 KiB pages"."""
        split = self.split_folios()
        if not split:
            return "no folio split"
        return (f"the folio at {', '.join(map(hex, split))} split to "
                f"{self.page_size // PAGE:,} 4 KiB pages")

    def memory_text(self) -> str:
        """The model's free memory against the walk's start (what vmemmap costs)."""
        spent = self.first_free - self.kvm.hugetlb.memory.free_bytes
        return ("the model's free memory is as at the start" if not spent
                else f"the model has {spent:,} bytes less free memory")

    def is_private(self, offset: int, length: int) -> bool:
        assert self.gmem is not None
        mm = self.gmem.memory_map(offset, length)
        return mm.pages_with(memmap.PRIVATE) == length // PAGE


def run(page_size: int = 1 << 30) -> Iterator[WalkStep]:
    """The walk on a model of its own; a step whose expectation fails is not ok,
    and the walk goes on."""
    walk = Walk(page_size)
    yield from _create(walk)
    yield from _split_and_merge(walk)
    yield from _pinned_piece(walk)
    yield from _close(walk)
    walk.kvm.close()


def _create(walk: Walk) -> Iterator[WalkStep]:
    ps, name = walk.page_size, size_name(walk.page_size)
    yield walk.step("pool", f"{HUGE_PAGES} pages of {name} (nr_hugepages), HVO on; the pool's "
                    f"vmemmap is {walk.kvm.hugetlb.vmemmap_bytes(ps):,} bytes", True,
                    walk.pool(0, 0))
    vm = walk.kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    walk.gmem = vm.create_guest_memfd(HUGE_PAGES * ps, uapi.GUEST_MEMFD_FLAG_MMAP
                                      | uapi.GUEST_MEMFD_FLAG_HUGETLB, page_order(ps))
    yield walk.step("create", f"KVM_CREATE_GUEST_MEMFD of {HUGE_PAGES} x {name}, flags "
                    f"MMAP|HUGETLB, page_order {page_order(ps)}: every page reserved from "
                    "the inode's subpool", True, walk.pool(0, HUGE_PAGES))
    walk.gmem.allocate(0, HUGE_PAGES * ps)
    yield walk.step("fallocate", f"{HUGE_PAGES} whole {name} folios allocated, private "
                    "(no INIT_SHARED)", walk.is_private(0, HUGE_PAGES * ps),
                    walk.pool(HUGE_PAGES, 0))


def _split_and_merge(walk: Walk) -> Iterator[WalkStep]:
    """One 4 KiB page of the second folio to shared and back."""
    assert walk.gmem is not None
    ps, per_split = walk.page_size, walk.per_split
    offset = ps + SHARED_PAGE * PAGE
    walk.gmem.set_memory_attributes2(offset, PAGE, 0)
    r, spent = walk.restructure, walk.first_free - walk.kvm.hugetlb.memory.free_bytes
    yield walk.step("4 KiB to shared", f"KVM_SET_MEMORY_ATTRIBUTES2 of [{offset:#x}, +4 KiB): "
                    f"{walk.folios_text()}; {r.splits} split, {r.vmemmap_restored:,} bytes of "
                    f"vmemmap restored; {walk.memory_text()}",
                    (r.splits, r.merges, r.vmemmap_restored, spent) == (1, 0, per_split, per_split)
                    and walk.split_folios() == [ps] and not walk.is_private(offset, PAGE),
                    walk.pool(HUGE_PAGES, 0))
    walk.gmem.set_memory_attributes2(offset, PAGE, PRIVATE)
    r = walk.restructure
    yield walk.step("back to private", f"the folio is private whole again and merges: "
                    f"{r.merges} merge, {r.vmemmap_freed:,} bytes of vmemmap freed; "
                    f"{walk.folios_text()}; {walk.memory_text()}",
                    (r.splits, r.merges, r.vmemmap_freed) == (1, 1, per_split)
                    and walk.kvm.hugetlb.memory.free_bytes == walk.first_free
                    and walk.split_folios() == [] and walk.is_private(0, HUGE_PAGES * ps),
                    walk.pool(HUGE_PAGES, 0))


def _refusal(call: Callable[[], None]) -> dict[str, Any] | None:
    """The errno name and error_offset a call failed with; None if it succeeded."""
    try:
        call()
    except OSError as e:
        return {"errno": errno.errorcode.get(e.errno or 0, str(e.errno)),
                "error_offset": getattr(e, "error_offset", None)}
    return None


def _pinned_piece(walk: Walk) -> Iterator[WalkStep]:
    """A shared piece of the second folio, mapped and pinned (FOLL_LONGTERM): to
    private fails with EAGAIN at the pinned page and changes nothing; after the
    unpin it succeeds and the folio merges."""
    assert walk.gmem is not None
    gmem, ps = walk.gmem, walk.page_size
    start, length = ps, PIECE_PAGES * PAGE
    pinned = start + PINNED_PAGE * PAGE
    gmem.set_memory_attributes2(start, length, 0)
    view = gmem.mmap()
    pin = view.pin(pinned, PAGE)
    yield walk.step("pin a shared piece", f"[{start:#x}, +{length >> 10} KiB) to shared "
                    f"({walk.folios_text()}), mmap, pin_user_pages of page {pinned:#x}",
                    walk.restructure.splits == 2 and walk.split_folios() == [ps],
                    walk.pool(HUGE_PAGES, 0))
    before = walk.restructure
    error = _refusal(lambda: gmem.set_memory_attributes2(start, length, PRIVATE))
    unchanged = (walk.restructure == before and walk.split_folios() == [ps]
                 and not walk.is_private(start, length))
    yield walk.step("to private while pinned", f"{_outcome(error)} (the pinned page is "
                    f"{pinned:#x}); {'nothing changed' if unchanged else 'yet it changed'}: "
                    f"{walk.folios_text()}, the piece shared",
                    error == {"errno": "EAGAIN", "error_offset": pinned} and unchanged,
                    walk.pool(HUGE_PAGES, 0), error)
    pin.unpin()
    error = _refusal(lambda: gmem.set_memory_attributes2(start, length, PRIVATE))
    r = walk.restructure
    yield walk.step("unpin, to private", f"{_outcome(error)}; {r.merges} merges in all, "
                    f"{walk.folios_text()}",
                    error is None and r.merges == 2 and walk.split_folios() == []
                    and walk.is_private(start, length), walk.pool(HUGE_PAGES, 0), error)
    view.munmap()


def _outcome(error: dict[str, Any] | None) -> str:
    """"success", or "EAGAIN at error_offset 0x40005000"."""
    if error is None:
        return "success"
    offset = error["error_offset"]
    return f"{error['errno']} at error_offset {'none' if offset is None else hex(offset)}"


def _close(walk: Walk) -> Iterator[WalkStep]:
    assert walk.gmem is not None
    r = walk.restructure
    vm = walk.gmem.vm
    walk.gmem.close()
    vm.close()
    back = walk.kvm.hugetlb.memory.free_bytes == walk.first_free
    yield walk.step("close", f"the subpool's reservation returned; {r.splits} splits and "
                    f"{r.merges} merges in all, vmemmap restored {r.vmemmap_restored:,} and "
                    f"freed {r.vmemmap_freed:,} bytes; {walk.memory_text()}",
                    back and r.vmemmap_restored == r.vmemmap_freed == 2 * walk.per_split,
                    walk.pool(0, 0))
