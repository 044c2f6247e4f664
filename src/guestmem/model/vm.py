"""The VM: memslots, memory attributes, the stage-2 MMU (virt/kvm/kvm_main.c, x86 mmu)."""

from __future__ import annotations

import errno
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from sortedcontainers import SortedDict

from guestmem import _args, api, uapi
from guestmem.exits import HostSigbus, HostSigsegv, oserror
from guestmem.extents import ExtentMap
from guestmem.hypercall import GFN_LIMIT
from guestmem.model.content import PAGE, PageStore, to_runs, write_runs
from guestmem.model.gmem import GmemInode, GuestMemfd
from guestmem.model.hugetlb import Hstate
from guestmem.model.paths import complete, set_attributes_path
from guestmem.model.process import FOREIGN, TASK_SIZE_MAX
from guestmem.model.profile import VmType

if TYPE_CHECKING:
    from guestmem.model.kvm import Kvm
    from guestmem.model.vcpu import Vcpu

KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1  # include/linux/kvm_host.h
KVM_MAX_VCPUS = 1024  # KVM_CAP_MAX_VCPUS: kvm->max_vcpus
# kvm_mmu_max_gfn(): 52 address bits without TDP (this host's shadow paging); with TDP
# the host's MAXPHYADDR (shadow_phys_bits), which the model does not know: 52 there too.
MAX_GFN = (1 << (52 - 12)) - 1
KVM_MAX_VCPU_IDS = 4096  # x86: KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO (observed: 4095 ok, 4096 not)


@dataclass(eq=False)
class Memslot:
    vm: Vm
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem: GmemInode | None = None  # NULL once the file is released (kvm_gmem_release)
    gmem_pgoff: int = 0
    is_gmem_slot: bool = False  # KVM_MEM_GUEST_MEMFD was given
    gmem_only: bool = False  # KVM_MEMSLOT_GMEM_ONLY: bound to a guest_memfd with MMAP
    # The dirty bitmap, by page index within the slot: it belongs to the slot and
    # moves with it (kvm_prepare_memory_region keeps old->dirty_bitmap on MOVE).
    dirty: ExtentMap[bool] = field(default_factory=ExtentMap)

    def mark_dirty(self, first: int, last: int) -> None:
        """mark_page_dirty_in_slot for gfns [first, last) of this slot."""
        if self.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            self.dirty.set(first - self.base_gfn, last - self.base_gfn, True)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def gmem_index(self, gfn: int) -> int:
        return gfn - self.base_gfn + self.gmem_pgoff  # kvm_gmem_get_index


LEVEL_2M, LEVEL_1G = 512, 512 * 512  # base pages per PMD / PUD leaf (PG_LEVEL_2M, PG_LEVEL_1G)


@dataclass
class Stage2Mmu:
    """Which gfns have a stage-2 (SPTE) mapping, at what leaf size, and what
    invalidating them cost."""

    mapped: ExtentMap[Any] = field(default_factory=ExtentMap)  # gfn -> memslot or "hva"
    # gfn -> base pages per leaf, where the leaf is huge (LEVEL_2M, LEVEL_1G); a mapped
    # gfn not here is a 4 KiB leaf. Leaves are aligned to their size in gfn space.
    levels: ExtentMap[int] = field(default_factory=ExtentMap)
    invalidations: int = 0
    tlb_flushes: int = 0
    zapped_pages: int = 0
    leaf_splits: int = 0  # huge leaves demoted (kvm_split_cross_boundary_leafs)
    in_progress: int = 0  # mmu_invalidate_in_progress: faults retry while > 0
    sequence: int = 0  # mmu_invalidate_seq: bumped when an invalidation ends

    def map(self, first: int, last: int, source: Any, level: int = 1) -> None:
        """Install SPTEs for [first, last), leaves of `level` base pages (the range
        is aligned to it); `source` is the memslot for guest_memfd pages, "hva"
        for pages reached through userspace_addr."""
        if level > 1:
            self.mapped.set(first, last, source)
            self.levels.set(first, last, level)
            return
        for lo, hi in list(self.levels.gaps(first, last)):  # a huge leaf there stays
            self.mapped.set(lo, hi, source)

    def _leaf_bounds(self, first: int, last: int) -> tuple[int, int]:
        """[first, last) widened to the huge leaves it cuts: zapping part of a leaf
        zaps the leaf (the TDP MMU removes whole leaf SPTEs)."""
        for lo, hi, level in self.levels.overlapping(first, last):
            first = min(first, max(lo, first // level * level))
            last = max(last, min(hi, -(-last // level) * level))
        return first, last

    def invalidate_begin(self, ranges: list[tuple[int, int]]) -> None:
        """kvm_mmu_invalidate_begin + unmap of every range, then one TLB flush."""
        self.in_progress += 1
        self.invalidations += 1
        zapped = 0
        if not self.mapped.boundaries():
            return  # nothing mapped: nothing to zap or flush
        for first, last in ranges:
            if self.levels.boundaries():
                first, last = self._leaf_bounds(first, last)
                self.levels.clear(first, last)
            zapped += self.mapped.covered(first, last)
            self.mapped.clear(first, last)
        if zapped:
            self.zapped_pages += zapped
            self.tlb_flushes += 1

    def invalidate_end(self) -> None:
        self.in_progress -= 1
        self.sequence += 1

    def zap(self, ranges: list[tuple[int, int]]) -> None:
        self.invalidate_begin(ranges)
        self.invalidate_end()

    def split_leaf(self, start: int, level: int, leaves: list[tuple[int, int, int]],
                   point: int) -> None:
        """Split the huge leaf [start, start + level) (kvm_split_cross_boundary_leafs):
        `leaves` are the smaller huge leaves it becomes, the rest 4 KiB; none of
        them crosses `point`."""
        self.levels.clear(start, start + level)
        for a, b, size in leaves:
            self.levels.set(a, b, size)
        around = point // LEVEL_2M * LEVEL_2M
        if point % LEVEL_2M and self.levels.get(around):
            self.levels.clear(around, around + LEVEL_2M)
        self.leaf_splits += 1

    def pages_by_level(self) -> dict[int, int]:
        """Mapped base pages by leaf size (1, LEVEL_2M, LEVEL_1G): the TLB reach."""
        out = {1: 0, LEVEL_2M: 0, LEVEL_1G: 0}
        for lo, hi, level in self.levels.items():
            out[level] += hi - lo
        out[1] = self.mapped.covered(0, 1 << 62) - out[LEVEL_2M] - out[LEVEL_1G]
        return out


_MEMORY_KEYS = itertools.count(1)
_MSR_EXIT_REASONS = (uapi.KVM_MSR_EXIT_REASON_INVAL | uapi.KVM_MSR_EXIT_REASON_UNKNOWN
                     | uapi.KVM_MSR_EXIT_REASON_FILTER)


@_args.checked
class Vm:
    def __init__(self, kvm: Kvm, vm_type: VmType) -> None:
        self.kvm = kvm
        self.vm_type_info = vm_type
        self.vm_type = vm_type.number
        self.memslots: dict[tuple[int, int], Memslot] = {}  # (as_id, id) -> slot
        # The same slots ordered by base_gfn (the kernel's gfn tree, kvm_memslots.gfn_tree):
        # overlap checks and gfn lookups in O(log n). Slots never overlap, so base_gfn
        # is a key and the slot before a gfn is the only one that can contain it.
        self.by_gfn: SortedDict = SortedDict()
        self.attributes: ExtentMap[int] = ExtentMap()  # gfn -> attrs, absent = 0
        self.mmu = Stage2Mmu()
        self.exit_hypercall_mask = 0
        self.user_space_msr = 0  # KVM_CAP_X86_USER_SPACE_MSR: the reasons that exit
        # KVM_X86_SET_MSR_FILTER: (default flags, ((flags, base, bitmap), ...))
        self.msr_filter: tuple[int, tuple[tuple[int, int, bytes], ...]] = (0, ())
        # Open vCPU fds by id (a dropped one is collected), and every id ever created:
        # a vCPU outlives its fd until the VM dies (kvm->vcpu_array).
        self.vcpus: weakref.WeakValueDictionary[int, Vcpu] = weakref.WeakValueDictionary()
        self.vcpu_ids: set[int] = set()
        # Dirty bits of the guest's 2 MiB page-table entries (guestmem machines map
        # guest memory with 2 MiB identity pages, written once per VM), by 2 MiB frame.
        self.guest_pte_dirty: ExtentMap[bool] = ExtentMap()
        # SEV: the VM's memory encryption key (the ASID's VEK), distinct per VM, in
        # use once the SEV context is launched (launch_start)
        self.memory_key = next(_MEMORY_KEYS)
        self.sev_active = False
        self.refs = 1  # the fd; guest_memfd files and vCPUs take more (kvm_get_kvm)
        self.fd_open = True
        self._fd = kvm.process.install(self)

    @property
    def fd(self) -> int:
        """The VM fd (EBADF once closed)."""
        if not self.fd_open:
            raise oserror(errno.EBADF, "closed VM fd")
        return self._fd

    @property
    def closed(self) -> bool:
        """close() was called."""
        return not self.fd_open

    def _live(self) -> None:
        if not self.fd_open:
            raise oserror(errno.EBADF, "closed VM fd")

    # --- references ---------------------------------------------------------------------------
    def get_ref(self) -> None:
        """kvm_get_kvm: a guest_memfd or vCPU holds the VM."""
        self.refs += 1

    def put_ref(self) -> None:
        """kvm_put_kvm: the last reference destroys the VM (kvm_destroy_vm)."""
        self.refs -= 1
        if self.refs == 0:
            self._destroy()

    def _destroy(self) -> None:
        """kvm_destroy_vm: free every memslot (unbinding guest_memfd ranges)."""
        for slot in list(self.memslots.values()):
            self._delete_slot(slot)
        self.kvm.vms.discard(self)

    def inherit(self) -> Callable[[], None]:
        """fork(2) gives the child the VM fd (dup_fd): a reference until it exits."""
        self.get_ref()
        return self.put_ref

    def close(self) -> None:
        """close(2) of the VM fd (kvm_vm_release: kvm_put_kvm)."""
        if self.fd_open:
            self.fd_open = False
            self.kvm.process.release_fd(self._fd)
            self.put_ref()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- capabilities ----------------------------------------------------------------------------
    def supported_attributes(self) -> int:
        """kvm_supported_mem_attributes (Profile.vm_attributes)."""
        return self.kvm.profile.vm_attributes(self.vm_type_info)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (kvm_vm_ioctl_check_extension_generic)."""
        self._live()
        return self.kvm.vm_extension(self.vm_type, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP (x86 kvm_vm_ioctl_enable_cap: KVM_CAP_EXIT_HYPERCALL and
        KVM_CAP_X86_USER_SPACE_MSR here)."""
        self._live()
        if cap == uapi.KVM_CAP_X86_USER_SPACE_MSR and not flags and \
                self.kvm.system_extension(cap):
            mask = args[0] if args else 0
            if mask & ~_MSR_EXIT_REASONS:
                raise oserror(errno.EINVAL, "enable_cap")  # x86.c: outside the valid mask
            self.user_space_msr = mask
            return
        if cap != uapi.KVM_CAP_EXIT_HYPERCALL or flags:
            raise oserror(errno.EINVAL, "enable_cap")  # kvm_vm_ioctl_enable_cap: unknown
        mask = args[0] if args else 0
        if mask & ~self.kvm.system_extension(uapi.KVM_CAP_EXIT_HYPERCALL):
            raise oserror(errno.EINVAL, "enable_cap")  # x86.c: outside VALID_MASK
        self.exit_hypercall_mask = mask

    def set_msr_filter(self, flags: int, ranges: list[tuple[int, int, bytes]]) -> None:
        """KVM_X86_SET_MSR_FILTER (kvm_vm_ioctl_set_msr_filter, kvm_add_msr_filter):
        unknown default flags, more than 16 ranges, unknown range flags, or a range
        with MSRs and no flags: EINVAL, nothing changed."""
        self._live()
        if not self.kvm.system_extension(uapi.KVM_CAP_X86_MSR_FILTER):
            raise oserror(errno.ENOTTY, "KVM_X86_SET_MSR_FILTER")
        valid = uapi.KVM_MSR_FILTER_READ | uapi.KVM_MSR_FILTER_WRITE
        if flags & ~uapi.KVM_MSR_FILTER_DEFAULT_DENY or \
                len(ranges) > uapi.KVM_MSR_FILTER_MAX_RANGES:
            raise oserror(errno.EINVAL, "KVM_X86_SET_MSR_FILTER")
        for range_flags, _, bitmap in ranges:
            if bitmap and (range_flags & ~valid or not range_flags):
                raise oserror(errno.EINVAL, "KVM_X86_SET_MSR_FILTER range")
        self.msr_filter = (flags, tuple((f, b, bytes(m)) for f, b, m in ranges if m))

    def msr_write_exit(self, index: int) -> int | None:
        """kvm_msr_allowed then the MSR's handler, for a guest's WRMSR of `index`:
        the KVM_MSR_EXIT_REASON_* it exits to userspace with, or None where KVM
        injects #GP. Only MSRs KVM does not handle are modelled (the guest's
        MSR_KVM_MIGRATION_CONTROL: kvm_set_msr_common does not know it)."""
        default, ranges = self.msr_filter
        allowed = not default & uapi.KVM_MSR_FILTER_DEFAULT_DENY
        for range_flags, base, bitmap in ranges:
            if range_flags & uapi.KVM_MSR_FILTER_WRITE and base <= index < base + 8 * len(bitmap):
                bit = index - base
                allowed = bool(bitmap[bit // 8] >> (bit % 8) & 1)
                break
        reason = uapi.KVM_MSR_EXIT_REASON_UNKNOWN if allowed else uapi.KVM_MSR_EXIT_REASON_FILTER
        return reason if self.user_space_msr & reason else None

    # --- guest_memfd ------------------------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0, page_order: int = 0) -> GuestMemfd:
        """kvm_gmem_create: unsupported flags, size <= 0, unaligned -> EINVAL; with
        HugeTLB (the WIP branch), the page order's rules and the reservation of
        every huge page (_hugetlb_backing)."""
        self._live()
        size_bits = self._hugetlb_size_bits(flags)
        if flags & ~size_bits & ~self.kvm.profile.gmem_flags_of(self.vm_type_info):
            raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD flags")
        hstate = self._hugetlb_hstate(flags, page_order)
        if size <= 0 or size >= 1 << 63 or size % PAGE:
            raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD size")
        if hstate is not None and size % hstate.page_size:
            raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD size: not whole huge pages")
        spool = None if hstate is None else self.kvm.hugetlb.gmem_subpool(
            hstate, size // hstate.page_size)
        inode = GmemInode(self.kvm.process, self, size, flags, spool)
        self.get_ref()  # "the file pins KVM"
        return GuestMemfd(self, inode)

    def _hugetlb_hstate(self, flags: int, page_order: int) -> Hstate | None:
        """The WIP branch's kvm_gmem_create checks (upstream-2026-11.md §2): a page
        order without HUGETLB, HUGETLB with INIT_SHARED, or an order no hstate has:
        EINVAL. Order 0 is the default hstate (2 MiB). A kernel without the branch
        never reads the byte (observed here: any value is accepted)."""
        if not self.kvm.profile.gmem_hugetlb:
            return None
        if not flags & uapi.GUEST_MEMFD_FLAG_HUGETLB:
            if self._hugetlb_size_bits(flags):  # our reading of the RFC: size needs HUGETLB
                raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD page size without HUGETLB")
            if page_order and self.kvm.profile.gmem_hugetlb_encoding == "page_order":
                raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD page_order without HUGETLB")
            return None
        if flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
            raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD: HUGETLB with INIT_SHARED")
        if self.kvm.profile.gmem_hugetlb_encoding == "flags":
            return self._hugetlb_hstate_of_flags(flags)
        hstate = self.kvm.hugetlb.hstate_of_order(page_order or uapi.HUGETLB_PAGE_ORDER_2M)
        if hstate is None:
            raise oserror(errno.EINVAL, "KVM_CREATE_GUEST_MEMFD page_order: no such hstate")
        return hstate

    def _hugetlb_size_bits(self, flags: int) -> int:
        """The RFC encoding's size field in flags (bits 58-63), where it is the one."""
        profile = self.kvm.profile
        if not profile.gmem_hugetlb or profile.gmem_hugetlb_encoding != "flags":
            return 0
        return flags & (uapi.GUESTMEM_HUGETLB_FLAG_MASK << uapi.GUESTMEM_HUGETLB_FLAG_SHIFT)

    def _hugetlb_hstate_of_flags(self, flags: int) -> Hstate:
        """RFC v2's encoding: log2 of the page size in bytes in bits 58-63, 0 for the
        default hstate (as MAP_HUGE_*); a size no hstate has: EINVAL. The
        page_order byte is reserved there and unread."""
        log2 = flags >> uapi.GUESTMEM_HUGETLB_FLAG_SHIFT & uapi.GUESTMEM_HUGETLB_FLAG_MASK
        hstate = self.kvm.hugetlb.hstates.get(1 << log2 if log2 else 2 << 20)
        if hstate is None:
            raise oserror(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: no hstate of 2^{log2} bytes")
        return hstate

    # --- memslots (kvm_set_memory_region, checks in the kernel's order) ------------------------
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION (kvm_vm_ioctl_set_memory_region: no gmem)."""
        self._live()
        if flags & ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
            raise oserror(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION flags")  # v1 has no gmem
        self._set_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr, 0, 0)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int,
                                memory_size: int, userspace_addr: int = 0,
                                guest_memfd: api.GuestMemfd | int = 0,
                                guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (kvm_set_memory_region, in its order)."""
        self._live()
        fd = guest_memfd if isinstance(guest_memfd, int) else guest_memfd.fd
        self._set_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                fd & 0xFFFFFFFF, guest_memfd_offset)

    def delete_memslot(self, slot: int) -> None:
        """KVM_SET_USER_MEMORY_REGION2 with memory_size 0 (KVM_MR_DELETE)."""
        self.set_user_memory_region2(slot, 0, 0, 0)

    def _valid_flags(self, flags: int) -> int:
        """check_memory_region_flags."""
        valid = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_GUEST_MEMFD
        if flags & uapi.KVM_MEM_GUEST_MEMFD and not self.kvm.profile.gmem_dirty_logging:
            valid &= ~uapi.KVM_MEM_LOG_DIRTY_PAGES  # no dirty logging of gmem slots
        elif self.kvm.system_extension(uapi.KVM_CAP_READONLY_MEM):
            valid |= uapi.KVM_MEM_READONLY
        return valid

    def _set_memory_region(self, slot_word: int, flags: int, gpa: int, size: int, hva: int,
                           gmem_fd: int, offset: int) -> None:
        einval = oserror(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2")
        as_id, id_ = slot_word >> 16, slot_word & 0xFFFF
        is_gmem = bool(flags & uapi.KVM_MEM_GUEST_MEMFD)
        if flags & ~self._valid_flags(flags):
            raise einval
        if size % PAGE or size >= 1 << 64:
            raise einval
        if gpa % PAGE:
            raise einval
        if hva % PAGE or hva + size > TASK_SIZE_MAX:  # access_ok, checked for gmem slots too
            raise einval
        if is_gmem and (offset % PAGE or offset + size >= 1 << 64):
            raise einval
        if as_id >= 1 or id_ >= self.kvm.profile.nr_memslots:
            raise einval
        if gpa + size >= 1 << 64:  # base_gfn + npages wraps
            raise einval
        npages = size // PAGE
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise einval
        old = self.memslots.get((as_id, id_))
        if size == 0:
            if old is None:
                raise einval
            self._delete_slot(old)
            return
        base_gfn = gpa // PAGE
        if old is not None:
            if is_gmem and self._gmem_log_toggle(old, base_gfn, npages, flags):
                return
            if is_gmem:
                raise einval  # guest_memfd slots are immutable, only deletable
            if (hva != old.userspace_addr or npages != old.npages
                    or (flags ^ old.flags) & (uapi.KVM_MEM_READONLY | uapi.KVM_MEM_GUEST_MEMFD)):
                raise einval
            if base_gfn == old.base_gfn and flags == old.flags:
                return
            self._check_overlap(base_gfn, npages, old)
            if base_gfn != old.base_gfn and not _below_max_gfn(base_gfn, npages):
                raise einval
            self._move_or_flags(old, base_gfn, flags)
            return
        self._check_overlap(base_gfn, npages, None)
        slot = Memslot(self, id_, base_gfn, npages, flags, hva, is_gmem_slot=is_gmem)
        if is_gmem:
            self._gmem_bind(slot, gmem_fd, offset)
        if not _below_max_gfn(base_gfn, npages):  # after the bind: kvm_set_memslot
            if is_gmem:
                self._gmem_unbind(slot)
            raise einval
        self.memslots[(as_id, id_)] = slot
        self.by_gfn[base_gfn] = slot

    def _gmem_log_toggle(self, old: Memslot, base_gfn: int, npages: int, flags: int) -> bool:
        """The gmem_dirty_logging extension (R10): a guest_memfd slot may change
        KVM_MEM_LOG_DIRTY_PAGES alone, in place, as other slots do (KVM_MR_FLAGS_ONLY);
        upstream it is immutable. Our choice: the guest_memfd and offset given
        are not compared with the bound ones."""
        if not self.kvm.profile.gmem_dirty_logging or base_gfn != old.base_gfn or \
                npages != old.npages or (flags ^ old.flags) & ~uapi.KVM_MEM_LOG_DIRTY_PAGES:
            return False
        self._move_or_flags(old, base_gfn, flags)
        return True

    def _check_overlap(self, base_gfn: int, npages: int, skip: Memslot | None) -> None:
        """kernel: kvm_main.c kvm_set_memory_region: a CREATE or MOVE whose gfns
        meet another slot's is EEXIST (kvm_check_memslot_overlap, a gfn-tree walk).
        Only the last slot starting below the end can reach into the range (slots
        never overlap), or the one before it when that one is the slot moving."""
        i = self.by_gfn.bisect_left(base_gfn + npages) - 1
        while i >= 0:
            other = self.by_gfn.peekitem(i)[1]
            if other is not skip:
                if other.end_gfn > base_gfn:
                    raise oserror(errno.EEXIST, "memslot overlaps another")
                return
            i -= 1

    def _move_or_flags(self, slot: Memslot, base_gfn: int, flags: int) -> None:
        """KVM_MR_MOVE / KVM_MR_FLAGS_ONLY of a non-gmem slot."""
        if base_gfn != slot.base_gfn:
            self.mmu.zap([(slot.base_gfn, slot.end_gfn)])
            del self.by_gfn[slot.base_gfn]
            self.by_gfn[base_gfn] = slot
        if not flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:  # the dirty bitmap is freed
            slot.dirty = ExtentMap()
        slot.base_gfn, slot.flags = base_gfn, flags

    def _gmem_bind(self, slot: Memslot, fd: int, offset: int) -> None:
        """kvm_gmem_bind (upstream.md §2.8)."""
        file = self.kvm.process.fget(fd)
        if file is FOREIGN or not isinstance(file, GuestMemfd) or file.closed:
            raise oserror(errno.EINVAL, "not a guest_memfd")
        inode = file.inode
        if inode.vm is not self:
            raise oserror(errno.EINVAL, "guest_memfd of another VM")
        if offset < 0 or offset % PAGE or offset + slot.npages * PAGE > inode.size:
            raise oserror(errno.EINVAL, "guest_memfd offset")
        first = offset // PAGE
        if not inode.bindings.all_equal(first, first + slot.npages, None):
            raise oserror(self.kvm.profile.bind_overlap_errno, "guest_memfd range already bound")
        slot.gmem, slot.gmem_pgoff = inode, first
        slot.gmem_only = inode.mmap_supported
        inode.bindings.set(first, first + slot.npages, slot)

    def _gmem_unbind(self, slot: Memslot) -> None:
        """kvm_gmem_unbind."""
        if slot.gmem is not None:
            slot.gmem.bindings.clear(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages)
            slot.gmem = None

    def _delete_slot(self, slot: Memslot) -> None:
        """KVM_MR_DELETE: zap the slot's mappings, kvm_gmem_unbind, free the slot."""
        self.mmu.zap([(slot.base_gfn, slot.end_gfn)])
        self._gmem_unbind(slot)
        del self.memslots[(0, slot.id)]  # address space 0: the only one (as_id >= 1 is EINVAL)
        del self.by_gfn[slot.base_gfn]

    def slot_for_gfn(self, gfn: int) -> Memslot | None:
        """kernel: kvm_host.h search_memslots (gfn_to_memslot), in O(log n)."""
        i = self.by_gfn.bisect_right(gfn) - 1
        if i < 0:
            return None
        slot: Memslot = self.by_gfn.peekitem(i)[1]
        return slot if gfn < slot.end_gfn else None

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap, cleared as it is read."""
        memslot = self._dirty_logged(slot)
        bits = 0  # one bit per page, built per dirty range with big-int arithmetic
        for lo, hi, _ in memslot.dirty.items():
            bits |= ((1 << (hi - lo)) - 1) << lo
        memslot.dirty = ExtentMap()
        return bits.to_bytes(((memslot.npages + 63) // 64) * 8, "little")

    def get_dirty_log_ranges(self, slot: int) -> list[tuple[int, int]]:
        """api.DirtyLogRanges: KVM_GET_DIRTY_LOG's pages as ranges, cleared as read."""
        memslot = self._dirty_logged(slot)
        ranges = [(lo, hi) for lo, hi, _ in memslot.dirty.items()]
        memslot.dirty = ExtentMap()
        return ranges

    def _dirty_logged(self, slot: int) -> Memslot:
        """kvm_get_dirty_log's checks: as_id beyond the address spaces (one here) or
        id beyond KVM_USER_MEM_SLOTS: EINVAL; no such slot or no dirty bitmap: ENOENT."""
        self._live()
        if slot >> 16 >= 1 or slot & 0xFFFF >= self.kvm.profile.nr_memslots:
            raise oserror(errno.EINVAL, "KVM_GET_DIRTY_LOG")
        memslot = self.memslots.get((slot >> 16, slot & 0xFFFF))
        if memslot is None or not memslot.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            raise oserror(errno.ENOENT, "KVM_GET_DIRTY_LOG")  # no dirty_bitmap
        return memslot

    # --- memory attributes (kvm_vm_ioctl_set_mem_attributes) ---
    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes)."""
        self._live()
        if not self.kvm.profile.memory_attributes:
            raise oserror(errno.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES")  # not built
        # kvm_vm_ioctl_set_mem_attributes, checks in order (upstream.md §2.13):
        if flags:
            raise oserror(errno.EINVAL, "flags")
        if attributes & ~self.supported_attributes():
            raise oserror(errno.EINVAL, "attributes")
        if size == 0 or address + size >= 1 << 64:
            raise oserror(errno.EINVAL, "range")
        if address % PAGE or size % PAGE:
            raise oserror(errno.EINVAL, "alignment")
        first, last = address // PAGE, (address + size) // PAGE
        if self.attributes.all_equal(first, last, attributes or None):
            return  # kvm_vm_set_mem_attributes: nothing to change, no invalidation
        complete(set_attributes_path(self, first, last, attributes))

    # --- the firmware's view (api.Firmware; model extension) ---
    def firmware_export(self, gpa: int, length: int, private: bool) -> list[api.Run]:
        """api.Firmware: SEND_UPDATE_DATA's read of [gpa, +length), decrypted.
        kernel: none for guest_memfd (upstream-2026-11.md §4); SEV's
        KVM_SEV_SEND_UPDATE_DATA has the PSP read the pages under the VM's key."""
        self._live()
        runs: list[api.Run] = []
        for store, offset, seg, n, key in self._firmware_segments(gpa, length, private):
            runs += [api.Run(*run) for run in to_runs(store, offset, n, key, seg - gpa)]
        return runs

    def firmware_import(self, gpa: int, runs: list[api.Run], private: bool) -> None:
        """api.Firmware: RECEIVE_UPDATE_DATA's write of runs (offsets from gpa),
        under the VM's key if private (SEV), into guest_memfd where the VM keeps
        private memory there. Nothing is written unless every run has memory."""
        self._live()
        segments = [(run, self._firmware_segments(gpa + run.start, run.end - run.start, private))
                    for run in runs]
        for run, pieces in segments:
            for store, offset, seg, n, key in pieces:
                self._populate(seg, n, private)
                start = seg - gpa - run.start
                piece = api.Run(0, n, None if run.data is None else run.data[start:start + n],
                                run.word + (start // 8) * run.step, run.step)
                write_runs(store, offset, [(piece.start, piece.end, piece.data, piece.word,
                                            piece.step)], key)

    def _populate(self, gpa: int, length: int, private: bool) -> None:
        """The pages the firmware writes are there first: the guest_memfd's folios
        allocated (kvm_gmem_get_pfn), or the host pages faulted in for writing (SEV
        pins them: sev_pin_memory)."""
        slot = self.slot_for_gfn(gpa // PAGE)
        assert slot is not None  # _firmware_segments found it
        if slot.gmem is not None and (slot.gmem_only or private and
                                      self.vm_type_info.has_private_mem):
            first = slot.gmem_index(gpa // PAGE)
            slot.gmem.get_pages(first, first + -(-length // PAGE))
            return
        found = self.kvm.process.mapping_at(slot.userspace_addr + gpa - slot.base_gfn * PAGE)
        assert found is not None
        try:
            found[0]._fault(found[1], length, True)
        except (HostSigbus, HostSigsegv) as e:
            raise oserror(errno.EFAULT, f"host memory behind gpa {gpa:#x}: {e}") from None

    def _firmware_segments(self, gpa: int, length: int, private: bool) -> list[
            tuple[PageStore, int, int, int, int | None]]:
        """(store, byte offset, gpa, length, key) of each memslot piece of the range;
        EFAULT (nothing done) where no memslot or host memory backs it."""
        out = []
        pos, end = gpa, gpa + length
        while pos < end:
            slot = self.slot_for_gfn(pos // PAGE)
            if slot is None:
                raise oserror(errno.EFAULT, f"no memslot at gpa {pos:#x}")
            n = min(end, slot.end_gfn * PAGE) - pos
            key = self.memory_key if private and self.sev_active else None
            if slot.gmem is not None and (slot.gmem_only or private and
                                          self.vm_type_info.has_private_mem):
                out.append((slot.gmem.store, slot.gmem_index(pos // PAGE) * PAGE + pos % PAGE,
                            pos, n, key))
            else:
                found = self.kvm.process.mapping_at(slot.userspace_addr +
                                                    pos - slot.base_gfn * PAGE)
                if found is None or found[0].length - found[1] < n:
                    raise oserror(errno.EFAULT, f"no host memory behind gpa {pos:#x}")
                mapping, moff = found
                out.append((mapping.backing.store, mapping.pgoff * PAGE + moff, pos, n, key))
            pos += n
        return out

    def launch_start(self) -> None:
        """api.Firmware: KVM_SEV_INIT2 and KVM_SEV_LAUNCH_START (or RECEIVE_START on
        a migration's destination): memory encryption on, under the VM's key; the
        guest's C-bit is set wherever it does not clear it ("by default all guest
        pages are considered encrypted", commit 0dbb11230437). Only SEV types
        (ENOTTY, as sev_mem_enc_ioctl's checks), once (EINVAL: sev_guest_init on an
        active SEV VM)."""
        self._live()
        if not self.vm_type_info.c_bit_encrypts:
            raise oserror(errno.ENOTTY, "KVM_SEV_LAUNCH_START: not an SEV VM")
        if self.sev_active:
            raise oserror(errno.EINVAL, "KVM_SEV_LAUNCH_START: already launched")
        self.sev_active = True
        for vcpu in list(self.vcpus.values()):
            vcpu.encrypted_view.set(0, GFN_LIMIT, True)

    def launch_update_data(self, gpa: int, length: int) -> None:
        """api.Firmware: KVM_SEV_LAUNCH_UPDATE_DATA (sev_launch_update_data): the
        PSP encrypts the pages in place under the VM's key; only a launched SEV VM
        (EINVAL otherwise: sev_guest is false)."""
        self._live()
        if not self.sev_active:
            raise oserror(errno.EINVAL, "KVM_SEV_LAUNCH_UPDATE_DATA: no SEV context launched")
        segments = self._firmware_segments(gpa, length, False)
        for store, offset, _, n, _ in segments:
            write_runs(store, offset, to_runs(store, offset, n), self.memory_key)

    def guest_view(self, gpa: int, length: int) -> list[tuple[api.Run, bool]]:
        """api.Firmware: what the guest reads at [gpa, +length), and whether private:
        the first vCPU's C-bit view for SEV (hardware truth, invisible to KVM),
        kvm_mem_is_private for VMs with private memory, shared otherwise."""
        self._live()
        view: list[tuple[api.Run, bool]] = []
        first, last = gpa // PAGE, -(-(gpa + length) // PAGE)
        for lo, hi, private in self._privateness(first, last):
            lo_b, hi_b = max(lo * PAGE, gpa), min(hi * PAGE, gpa + length)
            for run in self.firmware_export(lo_b, hi_b - lo_b, private):
                view.append((api.Run(run.start + lo_b - gpa, run.end + lo_b - gpa, run.data,
                                     run.word, run.step), private))
        return view

    def _privateness(self, first: int, last: int) -> list[tuple[int, int, bool]]:
        marks: list[tuple[int, int]] = []
        if self.sev_active:
            vcpu = min(self.vcpus.items(), default=None)
            if vcpu is not None:
                marks = [(s, e) for s, e, _ in vcpu[1].encrypted_view.overlapping(first, last)]
        elif self.vm_type_info.has_private_mem:
            pos = first
            while pos < last:  # per memslot: in-place keeps the state in each guest_memfd
                slot = self.slot_for_gfn(pos)
                end = min(last, slot.end_gfn) if slot is not None else last
                if slot is not None and self.kvm.profile.gmem_in_place_conversion:
                    marks += self.gmem_private_runs(pos, end)
                else:
                    marks += [(s, e) for s, e, a in self.attributes.overlapping(pos, end)
                              if a & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE]
                pos = end
        out, pos = [], first
        for s, e in marks:
            s, e = max(s, first), min(e, last)
            if s > pos:
                out.append((pos, s, False))
            out.append((s, e, True))
            pos = e
        if pos < last:
            out.append((pos, last, False))
        return out

    def is_private(self, gfn: int) -> bool:
        """kvm_mem_is_private: KVM_MEMORY_ATTRIBUTE_PRIVATE at gfn; with in-place
        conversion, the guest_memfd's attribute at the gfn's index (the series'
        kvm_gmem_is_private), and shared where no guest_memfd backs the gfn (a
        deleted memslot: the access is MMIO, not a memory fault)."""
        if self.kvm.profile.gmem_in_place_conversion:
            slot = self.slot_for_gfn(gfn)
            if slot is None or slot.gmem is None:
                return False
            return slot.gmem.is_private(slot.gmem_index(gfn))
        return bool((self.attributes.get(gfn) or 0) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def gmem_private_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        """With in-place conversion, the private gfn runs of [first, last) within one
        memslot, from its guest_memfd's attributes (INIT state included); else none."""
        if not self.kvm.profile.gmem_in_place_conversion:
            return []
        slot = self.slot_for_gfn(first)
        if slot is None or slot.gmem is None:
            return []
        last = min(last, slot.end_gfn)
        to_gfn = slot.base_gfn - slot.gmem_pgoff
        return [(lo + to_gfn, hi + to_gfn) for lo, hi in
                slot.gmem.private_ranges(slot.gmem_index(first), slot.gmem_index(last))]

    def huge_leaves(self, slot: Memslot, first: int, last: int) -> list[tuple[int, int, int]]:
        """kvm_mmu_max_mapping_level for guest_memfd pages around [first, last): the
        aligned gfn ranges a fault maps with huge leaves, and their size. A leaf
        is as large as the folio's mapping order allows (GmemInode.huge_mappable),
        no larger than the VM type allows private memory (TDX: 2 MiB), where the
        memslot's base_gfn and file offset agree modulo the leaf and the leaf lies
        inside the memslot (lpage_info's disallow_lpage), and, without in-place
        conversion, where the VM's attributes are alike across it
        (hugepage_has_attrs)."""
        inode = slot.gmem
        if inode is None or inode.spool is None:
            return []
        to_gfn = slot.base_gfn - slot.gmem_pgoff
        leaves: ExtentMap[int] = ExtentMap()
        for level in (LEVEL_1G, LEVEL_2M):
            if level > min(inode.huge_pages, self.vm_type_info.max_private_leaf) or \
                    to_gfn % level:
                continue
            lo = max(first // level * level, -(-slot.base_gfn // level) * level)
            hi = min(-(-last // level) * level, slot.end_gfn // level * level)
            for a, b, piece in inode.huge_mappable(lo - to_gfn, hi - to_gfn) if lo < hi else []:
                if piece < level:
                    continue
                a, b = max(a + to_gfn, lo), min(b + to_gfn, hi)
                for g0, g1 in list(leaves.gaps(a, b)):
                    leaves.set(g0, g1, level)
                if not self.kvm.profile.gmem_in_place_conversion:
                    self._mixed_attributes_not_huge(leaves, a, b, level)
        return list(leaves.items())

    def _mixed_attributes_not_huge(self, leaves: ExtentMap[int], first: int, last: int,
                                   level: int) -> None:
        """Drop the leaves of [first, last) across which the attributes change."""
        for lo, hi, _ in list(self.attributes.overlapping(first, last)):
            for point in (lo, hi):
                if first < point < last and point % level:
                    start = point // level * level
                    leaves.clear(start, start + level)

    # --- vCPUs ---------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU (kvm_vm_ioctl_create_vcpu)."""
        from guestmem.model.vcpu import Vcpu

        self._live()
        # kvm_vm_ioctl_create_vcpu: id beyond KVM_MAX_VCPU_IDS or max_vcpus created:
        # EINVAL; an id in use, even with its fd closed: EEXIST (kvm_get_vcpu_by_id).
        if vcpu_id >= KVM_MAX_VCPU_IDS or len(self.vcpu_ids) >= KVM_MAX_VCPUS:
            raise oserror(errno.EINVAL, "KVM_CREATE_VCPU")
        if vcpu_id in self.vcpu_ids:
            raise oserror(errno.EEXIST, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = vcpu
        self.vcpu_ids.add(vcpu_id)
        self.get_ref()
        return vcpu


def _below_max_gfn(base_gfn: int, npages: int) -> bool:
    """kernel: arch/x86/kvm/x86.c kvm_arch_prepare_memory_region: a CREATE or MOVE
    whose last gfn is beyond kvm_mmu_max_gfn() is EINVAL."""
    return base_gfn + npages - 1 <= MAX_GFN
