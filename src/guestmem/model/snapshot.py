"""A comparable picture of the model's whole state, to prove a failed call changed nothing."""

from __future__ import annotations

from typing import Any

from guestmem.model.gmem import GmemInode
from guestmem.model.process import AnonymousMemory


def _mappings(proc: Any) -> list[Any]:
    return sorted((m.addr, m.length, m.pgoff, m.prot, m.mapped, tuple(m.ptes.items()),
                   tuple(m.policy.items()), tuple(m.dontfork.items()), tuple(m.holes.items()))
                  for m in proc.mappings.values())


def snapshot(kvm: Any) -> dict[str, Any]:
    proc = kvm.process
    state: dict[str, Any] = {
        "fds": sorted(proc.fds),
        "pages": (proc.stats.pages_allocated, proc.stats.orphaned),
        "mappings": _mappings(proc),
        "children": sorted((c.pid, _mappings(c), len(c.files)) for c in proc.children),
        "interleave": proc.node_chooser.il_prev,
    }
    state["hugetlb"] = (kvm.hugetlb.report(), kvm.hugetlb.memory.free_bytes)
    for vm in sorted(kvm.vms, key=lambda v: v._fd):
        state[f"vm{vm._fd}"] = (
            sorted((k, s.base_gfn, s.npages, s.flags, s.userspace_addr, s.gmem_pgoff,
                    s.gmem.ino if s.gmem else None, tuple(s.dirty.items()))
                   for k, s in vm.memslots.items()),
            tuple(vm.attributes.items()),
            tuple((a, b, v if v == "hva" else v.id) for a, b, v in vm.mmu.mapped.items()),
            (vm.mmu.invalidations, vm.mmu.tlb_flushes, vm.mmu.zapped_pages, vm.mmu.sequence,
             vm.mmu.in_progress, vm.mmu.leaf_splits), tuple(vm.mmu.levels.items()),
            tuple(vm.guest_pte_dirty.items()), vm.exit_hypercall_mask, vm.user_space_msr,
            vm.msr_filter, vm.sev_active, vm.refs, vm.fd_open,
            sorted((i, bytes(v.regs), bytes(v.sregs), tuple(v.encrypted_view.items()), v.closed)
                   for i, v in vm.vcpus.items()),
        )
    for b in sorted(proc.backings, key=id):
        if isinstance(b, GmemInode):
            state[f"inode{b.ino}"] = (
                tuple(b.folios.items()), tuple(b.store.extents.items()),
                {i: bytes(p) for i, p in b.store.pages.items()},
                tuple((s, e, slot.id) for s, e, slot in b.bindings.items()), b.file_open,
                b.forked_refs, b.conversion_policy, tuple(b.split.items()),
                tuple(b.pins.items()), len(b.live_pins),
                tuple(b.policy.items()) if b.policy is not None else None,
                tuple(b.private.items()), vars(b.restructure).copy(),
            )
        elif isinstance(b, AnonymousMemory):
            state[f"anon{id(b)}"] = (tuple(b.present.items()), tuple(b.store.extents.items()))
    return state
