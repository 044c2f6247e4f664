"""`guestmem hugetlb` and `info`'s HugeTLB lines: a backend's huge page pools as one record.

Per page size the sysfs counters (hugepages-<size>kB: nr, free, resv, surplus,
overcommit), the vmemmap behind the pool and whether HVO frees most of it
(vm.hugetlb_optimize_vmemmap), and /proc/meminfo's HugeTLB lines; and which of
those sizes guest_memfd may be created on (GUEST_MEMFD_FLAG_HUGETLB with a
page_order). The model knows all of it; of the host, the kernel reports no
vmemmap per pool, so that stays unknown (None) rather than guessed.

The kernel keeps the counters as unsigned longs and prints them with %lu, so one
an accounting bug took below zero reads as 2**64 - n. Such a value is kept as -n
and listed as underflowed, never shown as a plain number.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final

from guestmem import api, uapi
from guestmem.model import Kvm as ModelKvm
from guestmem.model.hugetlb import Hugetlb as ModelHugetlb

PAGE: Final = 4096
PROC_MEMINFO: Final = "/proc/meminfo"
HVO_SYSCTL: Final = "/proc/sys/vm/hugetlb_optimize_vmemmap"
# /proc/meminfo's HugeTLB lines (hugetlb_report_meminfo): counts, then sizes in kB.
MEMINFO_COUNTS: Final = ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp")
MEMINFO_KB: Final = ("Hugepagesize", "Hugetlb")
SYSFS_FILES: Final = {"nr": "nr_hugepages", "free": "free_hugepages", "resv": "resv_hugepages",
                      "surplus": "surplus_hugepages", "overcommit": "nr_overcommit_hugepages"}
COUNTERS: Final = tuple(f.name for f in fields(api.HugetlbCounters))


def size_name(page_size: int) -> str:
    """2M, 1G: a page size as hugetlbfs's pagesize= and the CLI take it."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if page_size and page_size % (1 << shift) == 0:
            return f"{page_size >> shift}{suffix}"
    return str(page_size)


def sysfs_name(page_size: int) -> str:
    """The hstate's sysfs directory: hugepages-<size>kB."""
    return f"hugepages-{page_size >> 10}kB"


def page_order(page_size: int) -> int:
    """kvm_create_guest_memfd.page_order of a size: log2 of its base pages."""
    return (page_size // PAGE).bit_length() - 1


def as_signed(value: int) -> int:
    """An unsigned long printed with %lu, as the signed value it went below zero to."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class Pool:
    """One hstate: its counters and the vmemmap (struct pages) behind its pages."""

    page_size: int
    counters: api.HugetlbCounters
    vmemmap_bytes: int | None  # None: the backend does not report it

    @property
    def underflowed(self) -> tuple[str, ...]:
        """The counters that went below zero (read as 2**64 - n on the kernel)."""
        return tuple(name for name in COUNTERS if getattr(self.counters, name) < 0)

    def as_json(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "name": size_name(self.page_size),
                "sysfs": sysfs_name(self.page_size), **vars(self.counters),
                "vmemmap_bytes": self.vmemmap_bytes, "underflowed": list(self.underflowed)}


@dataclass(frozen=True)
class Pools:
    """A backend's HugeTLB: its pools, HVO (None: not built, or unknown) and meminfo."""

    backend: str
    pools: tuple[Pool, ...]
    hvo: bool | None
    meminfo: dict[str, int]

    @property
    def meminfo_underflowed(self) -> tuple[str, ...]:
        return tuple(key for key in MEMINFO_COUNTS if self.meminfo.get(key, 0) < 0)

    @property
    def underflowed(self) -> bool:
        return bool(self.meminfo_underflowed) or any(p.underflowed for p in self.pools)

    def as_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "hvo": self.hvo,
                "pools": [p.as_json() for p in self.pools], "meminfo": self.meminfo,
                "meminfo_underflowed": list(self.meminfo_underflowed)}


def read_pools(kvm: api.Kvm) -> Pools:
    """The pools of kvm.hugetlb: the model's own, or the host's sysfs and procfs.
    OSError where the host's files cannot be read."""
    hugetlb = kvm.hugetlb
    if isinstance(hugetlb, ModelHugetlb):
        return _model_pools(kvm.backend, hugetlb)
    pools = tuple(Pool(size, hugetlb.counters(size), None) for size in hugetlb.page_sizes)
    return Pools(kvm.backend, pools, host_hvo(), host_meminfo())


def _model_pools(backend: str, hugetlb: ModelHugetlb) -> Pools:
    pools = tuple(Pool(size, hugetlb.counters(size), hugetlb.vmemmap_bytes(size))
                  for size in hugetlb.page_sizes)
    return Pools(backend, pools, hugetlb.hvo, hugetlb.report()["meminfo"])


def host_hvo(path: str = HVO_SYSCTL) -> bool | None:
    """vm.hugetlb_optimize_vmemmap; None where the kernel has no HVO
    (CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP unset: the sysctl is absent)."""
    try:
        with open(path) as f:
            return int(f.read()) != 0
    except FileNotFoundError:
        return None


def host_meminfo(path: str = PROC_MEMINFO) -> dict[str, int]:
    """/proc/meminfo's HugeTLB lines, counts as signed values (see as_signed), sizes in kB."""
    wanted = {*MEMINFO_COUNTS, *MEMINFO_KB}
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in wanted:
                found[key] = as_signed(int(rest.split()[0]))
    return {key: found[key] for key in (*MEMINFO_COUNTS, *MEMINFO_KB) if key in found}


# --- what guest_memfd is offered ---------------------------------------------------------------
@dataclass(frozen=True)
class GmemHugetlb:
    """The HugeTLB page sizes guest_memfd may be created on, and why those."""

    page_sizes: tuple[int, ...]  # offered to KVM_CREATE_GUEST_MEMFD
    pool_sizes: tuple[int, ...]  # the machine's hstates
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"page_sizes": list(self.page_sizes),
                "page_orders": [page_order(s) for s in self.page_sizes],
                "pool_sizes": list(self.pool_sizes), "reason": self.reason}


def gmem_hugetlb(kvm: api.Kvm) -> GmemHugetlb:
    """kvm_gmem_create's rule (the WIP branch): GUEST_MEMFD_FLAG_HUGETLB in
    KVM_CAP_GUEST_MEMFD_FLAGS, and a page_order some hstate has; every size with a
    pool then. Without the flag, none, whatever pools the machine has."""
    caps = kvm.capabilities
    pools = tuple(kvm.hugetlb.page_sizes)
    flag = uapi.GUEST_MEMFD_FLAG_HUGETLB
    whose = (f"the {kvm.profile.name} profile's " if isinstance(kvm, ModelKvm)
             else "this kernel's ")
    if not caps.guest_memfd_flags & flag:
        return GmemHugetlb((), pools, f"none: {whose}KVM_CAP_GUEST_MEMFD_FLAGS "
                                      f"({caps.guest_memfd_flags:#x}) lacks "
                                      f"GUEST_MEMFD_FLAG_HUGETLB ({flag:#x})")
    if not pools:
        return GmemHugetlb((), pools, "none: GUEST_MEMFD_FLAG_HUGETLB is there, but no "
                                      "HugeTLB pool (no hstate)")
    orders = ", ".join(f"{size_name(s)} (page_order {page_order(s)})" for s in pools)
    caveat = "" if isinstance(kvm, ModelKvm) else (
        "; bit 2 is also the direct-map series' GUEST_MEMFD_FLAG_NO_DIRECT_MAP, and which "
        "one this kernel means is not probed")
    return GmemHugetlb(pools, pools, f"{orders}, with GUEST_MEMFD_FLAG_HUGETLB{caveat}")
