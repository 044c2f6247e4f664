"""NUMA memory policies (mm/mempolicy.c) and where pages are placed, per range.

mbind() on a guest_memfd mapping sets a policy on a range of pages. Where it is
kept depends on the kernel: upstream 6.18 keeps it per inode, keyed by file
index (guest_memfd.c kvm_gmem_set_policy -> mpol_set_shared_policy), so it
outlives the mapping and steers every later allocation; this project's host
(6.18.44-fc, no kvm_gmem_set_policy in /proc/kallsyms) keeps it on the VMA only
(vma->vm_policy), where guest_memfd allocations never look: they follow the
task's policy. The profile says which (Profile.gmem_shared_policy).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

from guestmem import uapi
from guestmem.exits import oserror

PAGE = 4096
MAX_NUMNODES = 1024  # CONFIG_NODES_SHIFT=10; bits beyond it in a nodemask are EINVAL
MAXNODE = MAX_NUMNODES + 1  # the maxnode guestmem passes by default (get_nodes reads maxnode - 1)
LOCAL_NODE = 0  # numa_node_id(): the model's task runs on node 0 (our choice)


@dataclass(frozen=True)
class MemPolicy:
    mode: int  # MPOL_*
    flags: int  # MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING
    nodes: int  # the effective nodemask (bit n = node n)
    user_nodes: int  # the mask as given, reported back for STATIC/RELATIVE (w.user_nodemask)

    def reported(self) -> tuple[int, int]:
        """get_mempolicy(MPOL_F_ADDR): mode | mode flags, and the nodemask
        (do_get_mempolicy: the user's mask when mpol_store_user_nodemask())."""
        nodes = self.user_nodes if self.flags & _STORE_USER else self.nodes
        return self.mode | self.flags, nodes if self.mode != uapi.MPOL_LOCAL else 0


DEFAULT_REPORT = (uapi.MPOL_DEFAULT, 0)  # no policy: "default_policy"
_STORE_USER = uapi.MPOL_F_STATIC_NODES | uapi.MPOL_F_RELATIVE_NODES


def _get_nodes(nodes: int | None, maxnode: int) -> int:
    """get_nodes(): a NULL mask is empty; else maxnode - 1 bits are read (an
    unsigned decrement: maxnode 0 wraps), more than a page of bits or a node
    beyond MAX_NUMNODES is EINVAL."""
    if nodes is None:
        return 0
    maxnode -= 1
    if maxnode == 0:
        return 0
    if maxnode < 0 or maxnode > PAGE * 8:
        raise oserror(errno.EINVAL, "mbind: maxnode")
    nodes &= (1 << maxnode) - 1
    if nodes >> MAX_NUMNODES:
        raise oserror(errno.EINVAL, "mbind: node beyond MAX_NUMNODES")
    return nodes


def _relative(nodes: int, allowed: int) -> int:
    """mpol_relative_nodemask: bit i means the (i mod weight)-th allowed node."""
    allowed_ids = [n for n in range(allowed.bit_length()) if allowed >> n & 1]
    out = 0
    for i in range(nodes.bit_length()):
        if nodes >> i & 1:
            out |= 1 << allowed_ids[i % len(allowed_ids)]
    return out


def mbind_policy(mode_word: int, nodes: int | None, maxnode: int, flags: int, offset: int,
                 length: int, online: int) -> MemPolicy | None | Literal[False]:
    """kernel_mbind + do_mbind up to the VMA walk, checks in their order. Returns
    the new policy (None: MPOL_DEFAULT, i.e. remove), or False when the range is
    empty and mbind succeeds doing nothing."""
    mode, mode_flags = mode_word & ~uapi.MPOL_MODE_FLAGS, mode_word & uapi.MPOL_MODE_FLAGS
    # sanitize_mpol_flags
    if mode < 0 or mode >= uapi.MPOL_MAX:
        raise oserror(errno.EINVAL, "mbind: mode")
    if mode_flags & uapi.MPOL_F_STATIC_NODES and mode_flags & uapi.MPOL_F_RELATIVE_NODES:
        raise oserror(errno.EINVAL, "mbind: STATIC and RELATIVE")
    if mode_flags & uapi.MPOL_F_NUMA_BALANCING and mode not in (uapi.MPOL_BIND,
                                                                 uapi.MPOL_PREFERRED_MANY):
        raise oserror(errno.EINVAL, "mbind: NUMA_BALANCING")
    mask = _get_nodes(nodes, maxnode)
    # do_mbind
    if flags & ~uapi.MPOL_MF_VALID:
        raise oserror(errno.EINVAL, "mbind: flags")
    if offset % PAGE:
        raise oserror(errno.EINVAL, "mbind: start")
    if length == 0:
        return False  # end == start: nothing to do, before the policy is even built
    # mpol_new
    if mode == uapi.MPOL_DEFAULT:
        if mask:
            raise oserror(errno.EINVAL, "mbind: MPOL_DEFAULT with nodes")
        return None
    if mode == uapi.MPOL_PREFERRED and not mask:
        if mode_flags & _STORE_USER:
            raise oserror(errno.EINVAL, "mbind: PREFERRED, empty, STATIC/RELATIVE")
        mode = uapi.MPOL_LOCAL  # "local allocation"
    elif mode == uapi.MPOL_LOCAL:
        if mask or mode_flags & _STORE_USER:
            raise oserror(errno.EINVAL, "mbind: MPOL_LOCAL with nodes")
    elif not mask:
        raise oserror(errno.EINVAL, "mbind: empty nodemask")
    if mode == uapi.MPOL_LOCAL:
        return MemPolicy(mode, mode_flags, 0, 0)
    # mpol_set_nodemask: only online nodes with memory count; none left is EINVAL
    relative = mode_flags & uapi.MPOL_F_RELATIVE_NODES
    effective = _relative(mask, online) if relative else mask & online
    if not effective:
        raise oserror(errno.EINVAL, "mbind: no online node in the mask")
    if mode == uapi.MPOL_PREFERRED:  # mpol_new_preferred: the first node only
        effective &= -effective
    return MemPolicy(mode, mode_flags, effective, mask)


@dataclass(frozen=True)
class Placement:
    """Where a range of pages lives: page i is on nodes[(i - origin) % len(nodes)].
    One node is the common case; interleaving is a cycle, still one extent."""

    nodes: tuple[int, ...]
    origin: int = 0

    def node_of(self, index: int) -> int:
        return self.nodes[(index - self.origin) % len(self.nodes)]


def _ids(mask: int) -> list[int]:
    return [n for n in range(mask.bit_length()) if mask >> n & 1]


class NodeChooser:
    """alloc_pages_mpol for order-0 pages allocated in ascending index order.
    Interleaving is per task (interleave_nodes: next after current->il_prev, as
    guest_memfd allocates with NO_INTERLEAVE_INDEX); weights are all 1, so
    WEIGHTED_INTERLEAVE places like INTERLEAVE. BIND and PREFERRED_MANY take the
    local node if allowed, else the lowest allowed node (equal distances: our
    choice where the zonelist order is the host's)."""

    def __init__(self) -> None:
        self.il_prev = MAX_NUMNODES - 1  # do_set_mempolicy's reset value

    def place(self, policy: MemPolicy | None, first: int, last: int) -> Placement:
        if policy is None or policy.mode == uapi.MPOL_LOCAL:
            return Placement((LOCAL_NODE,))
        nodes = _ids(policy.nodes)
        if policy.mode == uapi.MPOL_PREFERRED:
            return Placement((nodes[0],))
        if policy.mode in (uapi.MPOL_BIND, uapi.MPOL_PREFERRED_MANY):
            return Placement((LOCAL_NODE if LOCAL_NODE in nodes else nodes[0],))
        start = next((i for i, n in enumerate(nodes) if n > self.il_prev), 0)
        cycle = tuple(nodes[start:] + nodes[:start])
        self.il_prev = cycle[(last - 1 - first) % len(cycle)]
        return Placement(cycle, first % len(cycle)) if len(cycle) > 1 else Placement(cycle)
