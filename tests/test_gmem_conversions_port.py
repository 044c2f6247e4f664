"""The gmem_conversions.* cases (guest_memfd_conversions_test.c) can fail: each one,
run on an `inplace` model broken in a way upstream's test catches, FAILs, and on
the unbroken model it PASSes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from guestmem import uapi
from guestmem.check import Status, run_instance
from guestmem.check.suite import REGISTRY, Instance
from guestmem.extents import ExtentMap
from guestmem.model import Kvm
from guestmem.model.content import ZERO
from guestmem.model.gmem import GmemInode
from guestmem.model.process import ChildProcess

SetPrivate = Callable[[GmemInode, int, int, bool], None]
REAL_SET_PRIVATE: SetPrivate = GmemInode.set_private
REAL_FREE = GmemInode._free


def no_host_zap(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """To private without unmap_mapping_pages: host PTEs of the range survive."""
    saved, inode.mappings = inode.mappings, set()
    try:
        REAL_SET_PRIVATE(inode, first, last, private)
    finally:
        inode.mappings = saved


def parent_only_zap(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """To private unmaps the calling process's mappings only: a forked child keeps its PTEs."""
    saved = inode.mappings
    inode.mappings = {m for m in saved if not isinstance(m.process, ChildProcess)}
    try:
        REAL_SET_PRIVATE(inode, first, last, private)
    finally:
        inode.mappings = saved


def no_pin_check(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """To private without looking at refcounts: a pinned page converts."""
    saved, inode.pins = inode.pins, ExtentMap()
    try:
        REAL_SET_PRIVATE(inode, first, last, private)
    finally:
        inode.pins = saved


def whole_file(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """Every conversion converts the whole file, not [first, last)."""
    REAL_SET_PRIVATE(inode, 0, inode.npages, private)


def allocated_only(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """A range with no folio yet is not recorded."""
    if inode.folios.covered(first, last):
        REAL_SET_PRIVATE(inode, first, last, private)


def scrubs(inode: GmemInode, first: int, last: int, private: bool) -> None:
    """A conversion zeroes the folios (free on conversion instead of preserve)."""
    REAL_SET_PRIVATE(inode, first, last, private)
    for lo, hi, _ in list(inode.folios.overlapping(first, last)):
        inode.store.set(lo, hi, ZERO)


def punch_forgets_private(inode: GmemInode, first: int, last: int) -> None:
    """PUNCH_HOLE puts the attributes of the range back to the INIT state."""
    REAL_FREE(inode, first, last)
    inode.private.clear(first, last)


# case -> (the GmemInode method broken, its broken version)
BREAKAGES: dict[str, tuple[str, Callable[..., None]]] = {
    "init_private": ("set_private", no_host_zap),
    "init_shared": ("set_private", no_host_zap),
    "indexing": ("set_private", whole_file),
    "before_allocation_shared": ("set_private", allocated_only),
    "before_allocation_private": ("set_private", allocated_only),
    "unallocated_folios": ("set_private", scrubs),
    "truncate": ("_free", punch_forgets_private),
    "elevated_refcount": ("set_private", no_pin_check),
    "forked_accesses": ("set_private", parent_only_zap),
}


def instance(name: str) -> Instance:
    (case,) = [c for c in REGISTRY if c.name == f"gmem_conversions.{name}"]
    return Instance(case, uapi.KVM_X86_SW_PROTECTED_VM)


def test_every_ported_case_has_a_breakage() -> None:
    ported = {c.name.removeprefix("gmem_conversions.") for c in REGISTRY
              if c.name.startswith("gmem_conversions.")}
    assert ported == set(BREAKAGES)


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_the_case_passes_on_the_model_and_fails_on_a_broken_one(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Kvm("inplace") as kvm:
        result = run_instance(kvm, instance(name))
    assert result.status is Status.PASS, result.observed
    method, broken = BREAKAGES[name]
    monkeypatch.setattr(GmemInode, method, broken)
    with Kvm("inplace") as kvm:
        result = run_instance(kvm, instance(name))
    assert result.status is Status.FAIL, f"{broken.__name__} went unnoticed"
    assert result.checks and not result.checks[-1].ok, \
        f"a check fails, not the case's own code: {result.observed}"
