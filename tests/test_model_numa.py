"""NUMA placement on the model with more nodes than this host has (one)."""

import errno
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guestmem import uapi
from guestmem.check import Status, instances, run_instance
from guestmem.model import PROFILES, Kvm
from guestmem.model.mempolicy import MAX_NUMNODES
from guestmem.model.snapshot import snapshot

PS = uapi.PAGE_SIZE
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
NUMA_CASES = ("gmem.mbind", "gmem.mbind_scope", "gmem.move_pages", "gmem.numa_allocation")
# A 6.18 build without kvm_gmem_set_policy (this project's hosts have shown one).
PER_VMA = replace(PROFILES["mainline"], name="per-vma", gmem_shared_policy=False)


@pytest.mark.parametrize("profile", [PER_VMA, PROFILES["mainline"], PROFILES["coco"]],
                         ids=lambda p: p.name)
def test_numa_cases_with_two_nodes(profile):
    with Kvm(profile, numa_nodes=2) as kvm:
        for inst in instances((0,)):
            if inst.case.name not in NUMA_CASES:
                continue
            result = run_instance(kvm, inst)
            if inst.case.name == "gmem.numa_allocation" and profile is PER_VMA:
                assert result.status is Status.SKIP
                assert "kvm_gmem_set_policy" in result.observed
            else:
                assert result.status is Status.PASS, f"{inst.name}: {result.observed}"


def test_vma_policy_does_not_steer_guest_memfd_allocations():
    """This host's kernel: mbind on a guest_memfd VMA is kept, but page-cache
    allocation follows the task's policy (the local node), not the VMA's."""
    with Kvm(PER_VMA, numa_nodes=2) as kvm:
        vm = kvm.create_vm()
        g = vm.create_guest_memfd(2 * PS, FLAGS)
        m = g.mmap()
        m.mbind(0, 2 * PS, uapi.MPOL_BIND, 0b10)
        m.write(0, b"x" * 2 * PS)
        assert m.get_mempolicy(0) == (uapi.MPOL_BIND, 0b10)
        assert m.move_pages(0, 2) == [0, 0]


def test_interleaving_a_terabyte_is_one_extent():
    """Placement is per range: an interleaved 1 TiB allocation costs one extent."""
    tib = 1 << 40
    with Kvm("coco", numa_nodes=3) as kvm:
        vm = kvm.create_vm()
        g = vm.create_guest_memfd(tib, FLAGS)
        m = g.mmap()
        m.mbind(0, tib, uapi.MPOL_INTERLEAVE, 0b111)
        m.mbind(PS, PS, uapi.MPOL_BIND, 0b100)  # page 1 on node 2
        g.allocate(0, tib)
        assert g.inode.folios.boundaries() <= 4
        nodes = [g.inode.node_of(i) for i in (0, 1, 2, 3, 4, tib // PS - 1)]
        assert nodes[1] == 2
        assert nodes[2:5] == [(nodes[2] + k) % 3 for k in range(3)]  # the cycle goes on
        assert [(r.first, r.last, r.nodes) for r in g.memory_map().runs] == [
            (0, 1, str(nodes[0])), (1, 2, "2"), (2, tib // PS, "0,1,2 interleaved")], \
            "a page of an interleaved range is on one node; a run of them, on all three"
        assert m.move_pages(0, 1) == [-errno.ENOENT]  # allocated, not mapped here
        m.read(0, PS)
        assert m.move_pages(0, 1) == [nodes[0]]


def test_failed_mbind_changes_nothing():
    with Kvm("coco", numa_nodes=2) as kvm:
        vm = kvm.create_vm()
        g = vm.create_guest_memfd(4 * PS, FLAGS)
        m = g.mmap()
        m.mbind(0, 2 * PS, uapi.MPOL_INTERLEAVE, 0b11)
        m.write(0, b"x" * 4 * PS)
        before = snapshot(kvm)
        for args in ((0, PS, 999, 1), (0, PS, uapi.MPOL_BIND, 0b100),
                     (0, 2 * PS, uapi.MPOL_BIND, 0b10, uapi.MPOL_MF_STRICT)):
            with pytest.raises(OSError) as e:
                m.mbind(*args)
            assert e.value.errno in (errno.EINVAL, errno.EIO)
        assert snapshot(kvm) == before
    with Kvm(PER_VMA, numa_nodes=2) as kvm:  # per-VMA policies, in the snapshot too
        vm = kvm.create_vm()
        m = vm.create_guest_memfd(2 * PS, FLAGS).mmap()
        m.mbind(0, PS, uapi.MPOL_BIND, 0b10)
        before = snapshot(kvm)
        with pytest.raises(OSError) as e:
            m.mbind(0, 2 * PS, uapi.MPOL_DEFAULT, 0b1)
        assert e.value.errno == errno.EINVAL
        assert snapshot(kvm) == before
        m.mbind(0, 2 * PS, uapi.MPOL_DEFAULT)
        assert snapshot(kvm) != before  # the snapshot sees policies


def test_interleave_continues_across_allocations():
    """interleave_nodes: each page goes to the node after the task's il_prev, and
    il_prev carries over from one allocation to the next: separate allocations of
    1, 2 and 3 pages over nodes {0, 1, 2} continue one cycle."""
    with Kvm("coco", numa_nodes=3) as kvm:
        vm = kvm.create_vm()
        g = vm.create_guest_memfd(8 * PS, FLAGS)
        with g.mmap() as m:
            m.mbind(0, 8 * PS, uapi.MPOL_INTERLEAVE, 0b111)
            for first, count in ((0, 1), (1, 2), (3, 3)):
                g.allocate(first * PS, count * PS)
        assert [g.inode.node_of(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]


class InterleavedAllocations(RuleBasedStateMachine):
    """Allocations, punches and new interleave masks in any order: every page lands
    where interleave_nodes puts it (the node after the task's il_prev, il_prev
    carried from one allocation to the next; upstream 6.18's per-inode policy)."""

    NODES, PAGES = 3, 16

    def __init__(self):
        super().__init__()
        self.kvm = Kvm("coco", numa_nodes=self.NODES)
        vm = self.kvm.create_vm()
        self.g = vm.create_guest_memfd(self.PAGES * PS, FLAGS)
        self.m = self.g.mmap()
        self.mask = 0b111
        self.m.mbind(0, self.PAGES * PS, uapi.MPOL_INTERLEAVE, self.mask)
        self.il_prev = MAX_NUMNODES - 1  # do_set_mempolicy's reset value
        self.node: dict[int, int] = {}  # oracle: page -> node

    def next_node(self):
        nodes = [n for n in range(self.NODES) if self.mask >> n & 1]
        node = next((n for n in nodes if n > self.il_prev), nodes[0])
        self.il_prev = node
        return node

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, 4))
    def allocate(self, first, n):
        n = min(n, self.PAGES - first)
        self.g.allocate(first * PS, n * PS)
        for page in range(first, first + n):
            if page not in self.node:
                self.node[page] = self.next_node()

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, 4))
    def punch(self, first, n):
        self.g.punch_hole(first * PS, n * PS)
        for page in range(first, first + n):
            self.node.pop(page, None)

    @rule(mask=st.sampled_from([0b11, 0b101, 0b110, 0b111]))
    def interleave_over(self, mask):
        self.mask = mask
        self.m.mbind(0, self.PAGES * PS, uapi.MPOL_INTERLEAVE, mask)

    @invariant()
    def pages_are_where_interleave_put_them(self):
        assert {i: self.g.inode.node_of(i) for i in self.node} == self.node
        assert all(self.g.inode.node_of(i) is None for i in range(self.PAGES)
                   if i not in self.node)


InterleavedAllocations.TestCase.settings = settings(max_examples=300, stateful_step_count=20,
                                                    deadline=None)
TestInterleavedAllocations = InterleavedAllocations.TestCase


@pytest.mark.parametrize("relative, node", [(0b1, 0), (0b10, 1), (0b100, 2), (0b1000, 0),
                                            (0b10000, 1)])
def test_relative_nodes_wrap_around_the_allowed_ones(relative, node):
    """MPOL_F_RELATIVE_NODES (mpol_relative_nodemask): bit i names the (i mod n)-th of
    the n allowed nodes, here all three."""
    with Kvm("coco", numa_nodes=3) as kvm:
        g = kvm.create_vm().create_guest_memfd(4 * PS, FLAGS)
        g.mmap().mbind(0, PS, uapi.MPOL_BIND | uapi.MPOL_F_RELATIVE_NODES, relative, 0, 64)
        g.allocate(0, PS)
        assert g.inode.node_of(0) == node
