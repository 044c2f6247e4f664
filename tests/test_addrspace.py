"""The model's address space: mappings placed as the kernel places them.

Top-down below mmap_base, holes reused after munmap, ENOMEM when nothing fits,
and the errnos of do_mmap for bad lengths and offsets, checked against the
kernel (the same calls on both backends) and against a naive reference.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import uapi
from guestmem.model import Kvm as ModelKvm
from guestmem.model.addrspace import (
    MMAP_BASE,
    MMAP_MIN_ADDR,
    TASK_SIZE,
    TASK_UNMAPPED_BASE,
    AddressSpace,
    FreeSpace,
)
from guestmem.vmm import Vmm

from .conftest import backends, open_kvm

PS = uapi.PAGE_SIZE
TIB = 1 << 40
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD






def errno_of(fn, *args):
    try:
        mapping = fn(*args)
    except OSError as e:
        return e.errno
    mapping.munmap()
    return None


# --- against a naive reference -------------------------------------------------------------
class Naive:
    """Every VMA in a list; the gaps found by scanning them all."""

    def __init__(self):
        self.vmas = []  # (start, end)

    def gaps(self):
        pos = 0
        for start, end in sorted(self.vmas):
            yield pos, start
            pos = end
        yield pos, TASK_SIZE

    def place(self, size, align=PS):
        """The highest aligned address that fits below mmap_base, else the lowest
        above TASK_UNMAPPED_BASE (vm_unmapped_area asks for size + align - PAGE:
        a gap that only fits by luck of its alignment is not taken)."""
        need = size + align - PS
        top = [(min(e, MMAP_BASE) - size) // align * align for s, e in self.gaps()
               if min(e, MMAP_BASE) - max(s, MMAP_MIN_ADDR) >= need]
        if top:
            return max(top)
        bottom = [-(-max(s, TASK_UNMAPPED_BASE) // align) * align for s, e in self.gaps()
                  if min(e, TASK_SIZE) - max(s, TASK_UNMAPPED_BASE) >= need]
        return min(bottom) if bottom else None


sizes = st.one_of(st.integers(1, 64).map(lambda n: n * PS),
                  st.sampled_from([TIB, 8 * TIB, 32 * TIB, 40 * TIB, 100 * TIB]))


aligns = st.sampled_from([0, 0, 0, 1 << 21, 1 << 30])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), sizes, st.integers(0, 1000), aligns), max_size=60))
def test_placement_matches_a_naive_scan(ops):
    space, naive, live = AddressSpace(), Naive(), []
    for unmap, size, pick, align in ops:
        if unmap and live:
            addr, end = live.pop(pick % len(live))
            space.remove(addr)
            naive.vmas.remove((addr, end))
            continue
        want = naive.place(size, align or PS)
        try:
            addr = space.get_unmapped_area(size, align)
        except OSError as e:
            assert e.errno == errno.ENOMEM and want is None, f"ENOMEM, naive says {want}"
            continue
        assert addr == want
        space.insert(addr, size, object())
        naive.vmas.append((addr, addr + size))
        live.append((addr, addr + size))
        assert space.find(addr + size - 1)[1] == size - 1
        assert space.find(addr - 1) is None or space.find(addr - 1)[0] is not space.find(addr)[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 63), st.integers(1, 8)), max_size=40),
       st.lists(st.tuples(st.integers(1, 16), st.integers(0, 64), st.integers(0, 64)),
                min_size=1, max_size=20))
def test_gap_searches_match_a_scan_of_every_gap(ops, queries):
    """FreeSpace.highest and .lowest (unmapped_area_topdown / unmapped_area) against
    every gap clipped to [low, high), after random maps and unmaps of small ranges."""
    free, mapped = FreeSpace(), []
    for unmap, first, pages in ops:
        if unmap and mapped:
            free.give(*mapped.pop(first % len(mapped)))
            continue
        start, end = first * PS, (first + pages) * PS
        if all(end <= s or e <= start for s, e in mapped):
            free.take(start, end)
            mapped.append((start, end))
    gaps, pos = [], 0
    for s, e in sorted(mapped):
        if s > pos:
            gaps.append((pos, s))
        pos = e
    gaps.append((pos, TASK_SIZE))
    for pages, low, high in queries:
        length, low, high = pages * PS, low * PS, max(low, high) * PS + PS
        clipped = [(max(s, low), min(e, high)) for s, e in gaps]
        fits = [(s, e) for s, e in clipped if e - s >= length]
        assert free.highest(length, low, high) == (max(e for _, e in fits) - length
                                                   if fits else None)
        assert free.lowest(length, low, high) == (min(s for s, _ in fits) if fits else None)


def test_top_down_below_mmap_base_and_holes_reused():
    kvm = ModelKvm()
    a, b, c = (kvm.mmap_anonymous(n * PS) for n in (1, 2, 3))
    assert a.addr + PS == MMAP_BASE, "the first mapping ends at mmap_base"
    assert (b.addr + 2 * PS, c.addr + 3 * PS) == (a.addr, b.addr), "each one right below"
    b.munmap()
    again = kvm.mmap_anonymous(2 * PS)
    assert again.addr == b.addr, "the hole is the highest gap that fits: reused"
    assert kvm.process.mapping_at(b.addr + PS)[0] is again
    assert kvm.process.mapping_at(a.addr + PS) is None, "past the end of the last mapping"


# --- the same calls on both backends ---------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
def test_munmap_makes_room_for_the_next_mapping(backend):
    with open_kvm(backend) as kvm:
        first = kvm.mmap_anonymous(16 * PS)
        addr = first.addr
        first.munmap()
        second = kvm.mmap_anonymous(16 * PS)
        assert second.addr == addr, "the same hole, reused"
        second.munmap()


@pytest.mark.parametrize("backend", backends())
def test_terabyte_mappings_bind_again_and_again(backend):
    """The model handed out addresses upward from 0x7f00_0000_0000: a 1 TiB
    mapping ended beyond TASK_SIZE (bind EINVAL), and so did every later one.
    The slot binds the mapping's last 2 MiB (access_ok checks its end): a 1 TiB
    slot would cost the kernel 2 GiB of rmap arrays under shadow paging."""
    tail = 2 << 20
    with open_kvm(backend) as kvm, kvm.create_vm() as vm:
        for round_ in range(40):
            with vm.create_guest_memfd(TIB, FLAGS) as g, g.mmap() as m:
                assert m.addr + TIB <= TASK_SIZE, f"round {round_}: {m.addr:#x} + 1 TiB"
                vm.set_user_memory_region2(1, GMEM, 1 << 40, tail, m.addr + TIB - tail, g,
                                           TIB - tail)
                vm.delete_memslot(1)


@pytest.mark.parametrize("backend", backends())
def test_vmm_with_64_gib_opens_and_closes_20_times(backend):
    with open_kvm(backend) as kvm:
        for _ in range(20):
            with Vmm(kvm) as vmm:
                vmm.add_memory(1 << 36, 64 << 30)


LENGTHS = [(0, errno.EINVAL), (-PS, errno.ENOMEM), (-1, errno.ENOMEM),
           (1 << 47, errno.ENOMEM), (TASK_SIZE, errno.ENOMEM), (1 << 63, errno.ENOMEM),
           ((1 << 64) - PS, errno.ENOMEM)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(("length", "err"), LENGTHS, ids=[hex(n) for n, _ in LENGTHS])
def test_mmap_lengths(backend, length, err):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(PS, FLAGS) as g:
        assert errno_of(g.mmap, length) == err, "guest_memfd"
        assert errno_of(kvm.mmap_anonymous, length) == err, "anonymous"
        with vm.create_guest_memfd(PS, 0) as no_mmap:  # placement fails before kvm_gmem_mmap
            assert errno_of(no_mmap.mmap, length) == err, "guest_memfd without MMAP"


MMAPS = [  # (length, offset, prot, shared) -> errno, in do_mmap's order
    ((PS, 1 << 63, 3, True), errno.EOVERFLOW),
    ((PS, -PS, 3, True), errno.EOVERFLOW),
    ((PS, (1 << 63) - PS, 3, True), errno.EOVERFLOW),
    ((PS, 1 << 62, 3, True), None),
    ((PS, 1, 3, True), errno.EINVAL),
    ((0, 1, 3, True), errno.EINVAL),
    ((1 << 63, 0, 7, True), errno.ENOMEM),
    ((1 << 63, 0, 3, False), errno.ENOMEM),
    ((PS, -PS, 7, True), errno.EOVERFLOW),
    ((PS, -PS, 3, False), errno.EOVERFLOW),
    ((PS, 0, 7, False), errno.EPERM),
    ((PS, 0, 3, False), errno.EINVAL),
    ((PS, 0, 0x10, True), None),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(("args", "err"), MMAPS, ids=[str(a) for a, _ in MMAPS])
def test_mmap_errno_order(backend, args, err):
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(PS, FLAGS) as g:
        assert errno_of(g.mmap, *args) == err


def exhaust(kvm, g):
    """Map 16 TiB views of g until ENOMEM; then unmapping one makes room again.
    Returns (views that fit, errno at the end, address reused)."""
    views = []
    err = None
    while len(views) < 16:
        try:
            views.append(g.mmap(16 * TIB))
        except OSError as e:
            err = e.errno
            break
    freed = views.pop(len(views) // 2)
    addr = freed.addr
    freed.munmap()
    again = g.mmap(16 * TIB)
    reused = again.addr == addr
    for m in [*views, again]:
        m.munmap()
    return len(views) + 1, err, reused


@pytest.mark.parametrize("backend", backends())
def test_address_space_exhaustion_is_enomem(backend):
    """A mapping may be larger than its file: 16 TiB views of a 1 TiB guest_memfd
    fill the 128 TiB address space. The kvm backend does it in a child process,
    whose address space it can fill without harm."""
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(TIB, FLAGS) as g:
        if backend == "model":
            fitted, err, reused = exhaust(kvm, g)
            assert fitted == 7, "[4 KiB, mmap_base) holds 7 x 16 TiB; bottom-up finds no more"
        else:
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.write(wfd, repr(exhaust(kvm, g)).encode())
                finally:
                    os._exit(0)
            os.close(wfd)
            answer = os.read(rfd, 200).decode()
            os.close(rfd)
            os.waitpid(pid, 0)
            fitted, err, reused = eval(answer)  # noqa: S307 - our own child's repr
            assert 2 <= fitted <= 7
        assert err == errno.ENOMEM, "no room left: ENOMEM"
        assert reused, "the freed range is found again"


@pytest.mark.parametrize("backend", backends())
def test_a_private_writable_mapping_larger_than_memory_is_enomem(backend):
    """mmap_region accounts a private writable mapping (OVERCOMMIT_GUESS refuses
    more than RAM + swap) before kvm_gmem_mmap refuses MAP_PRIVATE: the
    differential test found it with a 1 TiB MAP_PRIVATE mmap."""
    from guestmem.model.process import TOTAL_RAM_PAGES

    if backend == "model":
        ram = TOTAL_RAM_PAGES * PS
    else:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":") for line in meminfo)
        ram = sum(int(fields[f].split()[0]) * 1024 for f in ("MemTotal", "SwapTotal"))
    with open_kvm(backend) as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(PS, FLAGS) as g, \
            vm.create_guest_memfd(PS, 0) as no_mmap:
        assert errno_of(g.mmap, ram, 0, 3, False) == errno.EINVAL, "fits: kvm_gmem_mmap says"
        assert errno_of(g.mmap, ram + PS, 0, 3, False) == errno.ENOMEM
        assert errno_of(g.mmap, ram + PS, 0, 1, False) == errno.EINVAL, "read-only: no account"
        assert errno_of(no_mmap.mmap, ram + PS, 0, 2, False) == errno.ENOMEM
        assert errno_of(no_mmap.mmap, ram + PS, 0, 7, False) == errno.EPERM, "noexec first"
