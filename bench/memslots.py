"""Benchmark: create, look up and delete 16,384 one-page memslots.

Each memslot creation checks for overlap with every other memslot of the VM
(kvm_set_memory_region: KVM_MR_CREATE): the kernel does it in its gfn tree, in
O(log n). The slots are guest_memfd slots over one file, spaced with one-page
holes; lookups go through the model's `Vm.slot_for_gfn` (the kernel's
gfn_to_memslot), which the kvm backend has no call for.

    .venv/bin/python bench/memslots.py [--slots N] [--backend model|kvm]
"""

from __future__ import annotations

import argparse
import time

import guestmem
from guestmem import uapi

PS = uapi.PAGE_SIZE
BASE = 1 << 32


def run(backend: str, slots: int) -> dict[str, float]:
    times: dict[str, float] = {}
    with guestmem.Kvm(backend) as kvm, kvm.create_vm() as vm, \
            vm.create_guest_memfd(slots * PS) as g:
        t0 = time.perf_counter()
        for i in range(slots):
            vm.set_user_memory_region2(i, uapi.KVM_MEM_GUEST_MEMFD, BASE + 2 * i * PS, PS, 0, g,
                                       i * PS)
        times["create"] = time.perf_counter() - t0
        if backend == "model":
            t0 = time.perf_counter()
            for i in range(slots):
                assert vm.slot_for_gfn(BASE // PS + 2 * i).id == i
                assert vm.slot_for_gfn(BASE // PS + 2 * i + 1) is None
            times["lookup x2"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(slots):
            vm.delete_memslot(i)
        times["delete"] = time.perf_counter() - t0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=16384)
    parser.add_argument("--backend", choices=guestmem.BACKENDS, default="model")
    args = parser.parse_args()
    times = run(args.backend, args.slots)
    print(f"{args.backend}: {args.slots} one-page memslots: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
