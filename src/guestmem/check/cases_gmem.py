"""Cases ported from tools/testing/selftests/kvm/guest_memfd_test.c (upstream.md §4.1).

guest_memfd_test runs its file cases once per VM type and per flag set
(0, MMAP, MMAP|INIT_SHARED); so do we. Every errno below was observed on this
project's host kernel (Linux 6.18, kvm_pvm); where it differs from the spec
document the case says so.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal

from guestmem import api, uapi
from guestmem.check.suite import Ctx, case, needs_no_gmem_attributes, pool_pages

PS = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
ALL_VARIANTS = (0, MMAP, MMAP | SHARED)
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
SRC = "guest_memfd_test.c"
PMD_SIZE = 2 << 20  # get_trans_hugepagesz() on x86
HUGETLB = uapi.GUEST_MEMFD_FLAG_HUGETLB  # the HugeTLB WIP branch (upstream-2026-11.md §2)
HUGE_2M = 2 << 20
MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h (not in Python's mmap module)


@case("gmem.flags", f"{SRC} test_guest_memfd_flags",
      "create succeeds iff the flag bit is in KVM_CAP_GUEST_MEMFD_FLAGS, else EINVAL")
def flags(ctx: Ctx) -> None:
    with ctx.vm() as vm:
        supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        for bit in range(64):
            flag = 1 << bit
            if flag == HUGETLB and flag & supported:
                _hugetlb_flag(ctx, vm, bit)
            elif flag & supported:
                ctx.ok(f"flag bit {bit}", vm.create_guest_memfd, PS, flag).close()
            else:
                ctx.fails(f"flag bit {bit}", errno.EINVAL, vm.create_guest_memfd, PS, flag)
        # Observed on 6.18: INIT_SHARED without MMAP is accepted (kvm_gmem_create checks
        # only flags & ~supported); the spec document implies nothing else.
        together = supported & ~HUGETLB  # HUGETLB | INIT_SHARED is EINVAL (the WIP)
        ctx.ok("all supported flags together", vm.create_guest_memfd, PS, together).close()


def _hugetlb_flag(ctx: Ctx, vm: api.Vm, bit: int) -> None:
    """GUEST_MEMFD_FLAG_HUGETLB (the WIP branch) takes whole huge pages, reserved at
    creation: one page of the default (2 MiB) hstate, from a pool grown by one."""
    with pool_pages(ctx, HUGE_2M, 1):
        ctx.fails(f"flag bit {bit} (HUGETLB), one 4 KiB page", errno.EINVAL,
                  vm.create_guest_memfd, PS, HUGETLB)
        ctx.ok(f"flag bit {bit} (HUGETLB), one 2 MiB page", vm.create_guest_memfd,
               HUGE_2M, HUGETLB).close()


@case("gmem.create_multiple", f"{SRC} test_create_guest_memfd_multiple",
      "two guest_memfds of 1 and 2 pages: own sizes, distinct inodes", flag_variants=ALL_VARIANTS)
def create_multiple(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, PS) as a, ctx.gmem(vm, 2 * PS) as b:
        sa, sb = a.stat(), b.stat()
        ctx.equal("st_size of 1-page file", PS, sa.st_size)
        ctx.equal("st_size of 2-page file", 2 * PS, sb.st_size)
        ctx.true("st_ino differ", sa.st_ino != sb.st_ino)


@case("gmem.invalid_sizes", f"{SRC} test_create_guest_memfd_invalid_sizes",
      "sizes 1..PAGE_SIZE-1, 0 and >= 2^63 fail with EINVAL", flag_variants=ALL_VARIANTS)
def invalid_sizes(ctx: Ctx) -> None:
    with ctx.vm() as vm:
        for size in range(1, PS):
            ctx.fails(f"size {size}", errno.EINVAL, vm.create_guest_memfd, size, ctx.gmem_flags)
        ctx.fails("size 0", errno.EINVAL, vm.create_guest_memfd, 0, ctx.gmem_flags)
        ctx.fails("size 2^63", errno.EINVAL, vm.create_guest_memfd, 1 << 63, ctx.gmem_flags)
        ctx.fails("size PS+1", errno.EINVAL, vm.create_guest_memfd, PS + 1, ctx.gmem_flags)
        # A 1 TiB file is cheap: guest_memfd allocates nothing at creation.
        ctx.ok("size 1 TiB", vm.create_guest_memfd, 1 << 40, ctx.gmem_flags).close()


@case("gmem.file_read_write", f"{SRC} test_file_read_write",
      "read/write EINVAL, pread/pwrite/lseek ESPIPE (no read_iter/write_iter, no llseek)",
      flag_variants=ALL_VARIANTS)
def file_read_write(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        ctx.fails("read", errno.EINVAL, g.read, 8)
        ctx.fails("write", errno.EINVAL, g.write, b"x" * 8)
        ctx.fails("pread", errno.ESPIPE, g.pread, 8, 0)
        ctx.fails("pwrite", errno.ESPIPE, g.pwrite, b"x" * 8, 0)
        for whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            ctx.fails(f"lseek whence {whence}", errno.ESPIPE, g.lseek, 0, whence)


@case("gmem.file_ops", "upstream.md §2.3 (kvm_gmem_setattr, no unlocked_ioctl)",
      "ftruncate EINVAL and the size never changes; unknown ioctl ENOTTY",
      flag_variants=ALL_VARIANTS)
def file_ops(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        ctx.fails("ftruncate to 2 pages", errno.EINVAL, g.ftruncate, 2 * PS)
        ctx.fails("ftruncate to 8 pages", errno.EINVAL, g.ftruncate, 8 * PS)
        ctx.equal("size after failed truncates", 4 * PS, g.stat().st_size)
        ctx.fails("ioctl 0x1234", errno.ENOTTY, g.ioctl, 0x1234)


@case("gmem.attributes2_without_in_place", "upstream-2026-11.md §1 (kvm_gmem_ioctl: ENOTTY "
      "while in-place conversion is off; mainline has no unlocked_ioctl)",
      "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd is ENOTTY whatever it asks, and "
      "changes nothing", needs=(needs_no_gmem_attributes,), flag_variants=ALL_VARIANTS)
def attributes2_without_in_place(ctx: Ctx) -> None:
    private = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        g.allocate(0, PS)
        before = g.memory_map()
        ctx.fails("to private", errno.ENOTTY, g.set_memory_attributes2, 0, PS, private)
        ctx.fails("to shared", errno.ENOTTY, g.set_memory_attributes2, 0, 4 * PS, 0)
        ctx.fails("bad flags, unaligned", errno.ENOTTY, g.set_memory_attributes2, 1, 1,
                  private, 1)
        ctx.fails("the raw ioctl", errno.ENOTTY, g.ioctl, uapi.KVM_SET_MEMORY_ATTRIBUTES2, 0)
        ctx.equal("the memory map after", before, g.memory_map())


@case("gmem.file_size", f"{SRC} test_file_size",
      "st_size == size, st_blksize == PAGE_SIZE, regular file", flag_variants=ALL_VARIANTS)
def file_size(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        st = g.stat()
        ctx.equal("st_size", 4 * PS, st.st_size)
        ctx.equal("st_blksize", PS, st.st_blksize)
        ctx.equal("S_IFREG", 0o100000, st.st_mode & 0o170000)


@case("gmem.fallocate", f"{SRC} test_fallocate",
      "KEEP_SIZE inside the file ok, at/after EOF EINVAL; PUNCH beyond EOF ok; unaligned EINVAL",
      flag_variants=ALL_VARIANTS)
def fallocate(ctx: Ctx) -> None:
    size = 4 * PS
    with ctx.vm() as vm, ctx.gmem(vm, size) as g:
        ctx.ok("allocate [0,size)", g.fallocate, KEEP, 0, size)
        ctx.fails("punch at PS-1", errno.EINVAL, g.fallocate, PUNCH, PS - 1, PS)
        ctx.fails("allocate at size", errno.EINVAL, g.fallocate, KEEP, size, PS)
        ctx.fails("allocate at size+PS", errno.EINVAL, g.fallocate, KEEP, size + PS, PS)
        ctx.fails("allocate crossing EOF", errno.EINVAL, g.fallocate, KEEP, size - PS, 2 * PS)
        ctx.ok("punch at size", g.fallocate, PUNCH, size, PS)
        ctx.ok("punch beyond size", g.fallocate, PUNCH, size + PS, PS)
        ctx.fails("punch len PS-1", errno.EINVAL, g.fallocate, PUNCH, PS, PS - 1)
        ctx.ok("punch page 1", g.fallocate, PUNCH, PS, PS)
        ctx.ok("re-allocate page 1", g.fallocate, KEEP, PS, PS)
        # VFS and kvm_gmem_fallocate mode checks (upstream.md §2.4).
        ctx.fails("no KEEP_SIZE", errno.EOPNOTSUPP, g.fallocate, 0, 0, PS)
        ctx.fails("PUNCH without KEEP_SIZE", errno.EOPNOTSUPP, g.fallocate,
                  uapi.FALLOC_FL_PUNCH_HOLE, 0, PS)
        for name, mode in (("ZERO_RANGE", uapi.FALLOC_FL_ZERO_RANGE),
                           ("COLLAPSE_RANGE", uapi.FALLOC_FL_COLLAPSE_RANGE),
                           ("INSERT_RANGE", uapi.FALLOC_FL_INSERT_RANGE),
                           ("UNSHARE_RANGE", uapi.FALLOC_FL_UNSHARE_RANGE)):
            ctx.fails(name, errno.EOPNOTSUPP, g.fallocate, KEEP | mode, 0, PS)
        ctx.fails("negative offset", errno.EINVAL, g.fallocate, KEEP, -PS, PS)
        ctx.fails("zero length", errno.EINVAL, g.fallocate, KEEP, 0, 0)
        ctx.fails("punch zero length", errno.EINVAL, g.fallocate, PUNCH, 0, 0)
        ctx.fails("offset+len beyond s_maxbytes", errno.EFBIG, g.fallocate, PUNCH, 1 << 62,
                  1 << 62)
        # vfs_fallocate's mode switch comes before EFBIG; guest_memfd's own checks after.
        huge = 1 << 62
        ctx.fails("unknown mode bit 0x100", errno.EOPNOTSUPP, g.fallocate, 0x100, huge, huge)
        ctx.fails("COLLAPSE_RANGE|KEEP_SIZE", errno.EOPNOTSUPP, g.fallocate,
                  KEEP | uapi.FALLOC_FL_COLLAPSE_RANGE, huge, huge)
        ctx.fails("ZERO_RANGE|PUNCH_HOLE|KEEP_SIZE", errno.EOPNOTSUPP, g.fallocate,
                  PUNCH | uapi.FALLOC_FL_ZERO_RANGE, huge, huge)
        ctx.fails("ZERO_RANGE|KEEP_SIZE past s_maxbytes", errno.EFBIG, g.fallocate,
                  KEEP | uapi.FALLOC_FL_ZERO_RANGE, huge, huge)
        ctx.fails("WRITE_ZEROES past s_maxbytes", errno.EFBIG, g.fallocate,
                  uapi.FALLOC_FL_WRITE_ZEROES, huge, huge)
        ctx.fails("negative offset before mode checks", errno.EINVAL, g.fallocate, 0x100, -PS, PS)


@case("gmem.invalid_punch_hole", f"{SRC} test_invalid_punch_hole",
      "unaligned PUNCH_HOLE offsets/lengths fail with EINVAL", flag_variants=ALL_VARIANTS)
def invalid_punch_hole(ctx: Ctx) -> None:
    cases = [(0, 1), (0, PS - 1), (0, PS + 1), (1, 1), (1, PS - 1), (1, PS), (1, PS + 1),
             (PS, 1), (PS, PS - 1), (PS, PS + 1)]
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        for offset, length in cases:
            ctx.fails(f"punch ({offset},{length})", errno.EINVAL, g.fallocate, PUNCH, offset,
                      length)


@case("gmem.mmap_supported", f"{SRC} test_mmap_supported",
      "MAP_SHARED RW mmap; fill 0xaa; punch page 0 reads zeros, others keep 0xaa; rewrite",
      flag_variants=(MMAP | SHARED,))
def mmap_supported(ctx: Ctx) -> None:
    size = 4 * PS
    with ctx.vm() as vm, ctx.gmem(vm, size) as g, g.mmap(size) as m:
        m.write(0, b"\xaa" * size)
        ctx.bytes_equal("after fill", m, 0, b"\xaa" * size)
        ctx.ok("punch page 0", g.punch_hole, 0, PS)
        ctx.bytes_equal("page 0 after punch", m, 0, bytes(PS))
        ctx.bytes_equal("pages 1-3 after punch", m, PS, b"\xaa" * (size - PS))
        m.write(0, b"\xaa" * PS)
        ctx.bytes_equal("page 0 rewritten", m, 0, b"\xaa" * PS)


@case("gmem.fault_overflow", f"{SRC} test_fault_overflow",
      "mmap 4x size: access beyond EOF SIGBUS, the first size bytes usable",
      flag_variants=(MMAP | SHARED,))
def fault_overflow(ctx: Ctx) -> None:
    size = 4 * PS
    with ctx.vm() as vm, ctx.gmem(vm, size) as g, g.mmap(4 * size) as m:
        m.write(0, b"\xaa" * size)
        ctx.sigbus("write at size", m, size, write=True)
        ctx.sigbus("read at size", m, size)
        ctx.sigbus("read at last mapped page", m, 4 * size - PS)
        ctx.bytes_equal("first size bytes", m, 0, b"\xaa" * size)


@case("gmem.collapse", f"{SRC} test_collapse",
      "a PMD-size file mapped at a PMD-aligned address from offset 0, every page populated "
      "by reads: MADV_HUGEPAGE ok, MADV_COLLAPSE EINVAL, MADV_DONTNEED ok, mem[0] reads again",
      flag_variants=(MMAP | SHARED,))
def collapse(ctx: Ctx) -> None:
    """Upstream reserves 2 PMDs of PROT_NONE address space and maps the file
    MAP_FIXED at the first PMD-aligned address in it; GuestMemfd.mmap(align=)
    does that. The populating reads are one host read of the whole mapping: its
    GUP read-faults every page, as the loop of READ_ONCEs does, dirtying none."""
    pmd = PMD_SIZE
    with ctx.vm() as vm, ctx.gmem(vm, pmd) as g, g.mmap(pmd, align=pmd) as m:
        ctx.equal("userspace address PMD-aligned", 0, m.addr % pmd)
        ctx.bytes_equal("read-populate every page (a new file reads zeros)", m, 0, bytes(pmd))
        ctx.ok("MADV_HUGEPAGE", m.madvise, 0, pmd, mmap.MADV_HUGEPAGE)
        ctx.fails("MADV_COLLAPSE", errno.EINVAL, m.madvise, 0, pmd, MADV_COLLAPSE)
        ctx.ok("MADV_DONTNEED", m.madvise, 0, pmd, mmap.MADV_DONTNEED)
        ctx.bytes_equal("READ_ONCE(mem[0]) after DONTNEED", m, 0, b"\0")


@case("gmem.fault_private", f"{SRC} test_fault_private",
      "MMAP without INIT_SHARED: every host access SIGBUS (memory starts private)",
      flag_variants=(MMAP,))
def fault_private(ctx: Ctx) -> None:
    size = 4 * PS
    with ctx.vm() as vm, ctx.gmem(vm, size) as g, g.mmap(size) as m:
        ctx.sigbus("read page 0", m, 0)
        ctx.sigbus("write page 0", m, 0, write=True)
        ctx.sigbus("read last page", m, size - PS)


@case("gmem.mmap_cow", f"{SRC} test_mmap_cow",
      "MAP_PRIVATE mmap fails with EINVAL", flag_variants=(MMAP, MMAP | SHARED))
def mmap_cow(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        ctx.fails("MAP_PRIVATE", errno.EINVAL, g.mmap, 4 * PS, 0, 3, False)


@case("gmem.mmap_exec", "upstream.md §2.6 (noexec mount)",
      "PROT_EXEC mmap fails with EPERM", flag_variants=(MMAP, MMAP | SHARED))
def mmap_exec(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        ctx.fails("PROT_READ|PROT_EXEC", errno.EPERM, g.mmap, PS, 0, 5)


MADV_NO_EFFECT = (0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21)
MADV_REFUSED = (8, 18, 25, 26, 101, 9999)  # FREE, WIPEONFORK, COLLAPSE, unknown, SOFT_OFFLINE


@case("gmem.madvise", "madvise on a guest_memfd mapping (observed on 6.18)",
      "hints are accepted and change nothing; DONTNEED keeps the data; REMOVE punches the "
      "hole; POPULATE faults pages in, EINVAL without the protection it needs; FREE, "
      "WIPEONFORK, COLLAPSE and unknown advice EINVAL",
      flag_variants=(MMAP | SHARED,))
def madvise(ctx: Ctx) -> None:
    size = 4 * PS
    with ctx.vm() as vm, ctx.gmem(vm, size) as g, g.mmap(size) as m:
        m.write(0, b"\x11" * size)
        for advice in MADV_NO_EFFECT:
            ctx.ok(f"advice {advice}", m.madvise, 0, PS, advice)
        ctx.ok("DONTNEED", m.madvise, 0, PS, 4)
        ctx.ok("DONTNEED_LOCKED", m.madvise, 0, PS, 24)
        ctx.bytes_equal("data kept through all of them", m, 0, b"\x11" * PS)
        for advice in MADV_REFUSED:
            ctx.fails(f"advice {advice}", errno.EINVAL, m.madvise, 0, PS, advice)
        ctx.ok("REMOVE page 1", m.madvise, PS, PS, 9)
        ctx.bytes_equal("page 1 punched", m, PS, bytes(PS))
        ctx.bytes_equal("page 2 kept", m, 2 * PS, b"\x11" * PS)
        ctx.ok("POPULATE_WRITE", m.madvise, 0, size, 23)
        ctx.ok("POPULATE_READ", m.madvise, 0, size, 22)
    with ctx.vm() as vm, ctx.gmem(vm, 2 * PS) as g, g.mmap(4 * PS) as m:
        ctx.fails("POPULATE_READ past EOF", errno.EFAULT, m.madvise, 2 * PS, PS, 22)
        ctx.fails("POPULATE_WRITE past EOF", errno.EFAULT, m.madvise, 2 * PS, PS, 23)
        ctx.ok("REMOVE past EOF", m.madvise, 2 * PS, 2 * PS, 9)
        ctx.ok("DONTNEED past EOF", m.madvise, 2 * PS, PS, 4)
    _populate_needs_protection(ctx)


@case("gmem.madvise_private", "madvise on a guest_memfd without INIT_SHARED (observed on 6.18)",
      "POPULATE of private memory EFAULT (the fault would SIGBUS); REMOVE and DONTNEED ok; "
      "POPULATE without the protection it needs EINVAL, before the fault",
      flag_variants=(MMAP,))
def madvise_private(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 2 * PS) as g, g.mmap(2 * PS) as m:
        ctx.fails("POPULATE_READ", errno.EFAULT, m.madvise, 0, PS, 22)
        ctx.fails("POPULATE_WRITE", errno.EFAULT, m.madvise, 0, PS, 23)
        ctx.ok("REMOVE", m.madvise, 0, PS, 9)
        ctx.ok("DONTNEED", m.madvise, 0, PS, 4)
    _populate_needs_protection(ctx)


def _populate_needs_protection(ctx: Ctx) -> None:
    """POPULATE_READ needs PROT_READ and POPULATE_WRITE PROT_WRITE: EINVAL otherwise,
    checked before the fault (mm/gup.c faultin_page_range: check_vma_flags)."""
    with ctx.vm() as vm, ctx.gmem(vm, PS) as g:
        for prot, refused in ((0, (22, 23)), (1, (23,)), (2, (22,))):
            with g.mmap(PS, prot=prot) as m:
                for advice in refused:
                    name = "READ" if advice == 22 else "WRITE"
                    ctx.fails(f"POPULATE_{name} with prot {prot}", errno.EINVAL,
                              m.madvise, 0, PS, advice)


@case("gmem.mmap_readonly", "mm: VMA protection (observed on 6.18)",
      "a PROT_READ mapping reads the file's data; a store to it is SIGSEGV",
      flag_variants=(MMAP | SHARED,))
def mmap_readonly(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g, g.mmap(4 * PS) as rw, \
            g.mmap(4 * PS, 0, 1) as ro:
        rw.write(PS, b"\x5b" * 8)
        ctx.bytes_equal("read through PROT_READ", ro, PS, b"\x5b" * 8)
        ctx.host_fault("store through PROT_READ", ro, PS, write=True, expected=signal.SIGSEGV)
        ctx.bytes_equal("data unchanged", rw, PS, b"\x5b" * 8)


@case("gmem.mprotect", "mm/mprotect.c do_mprotect_pkey (observed on 6.18)",
      "mprotect of a guest_memfd mapping: PROT_READ makes a store SIGSEGV, PROT_NONE a "
      "load too, back to RW both work and the data is there; PROT_EXEC is EACCES (the "
      "mount is noexec), unknown bits EINVAL, each changing nothing",
      flag_variants=(MMAP | SHARED,))
def mprotect(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g, g.mmap(4 * PS) as m:
        m.write(0, b"\x6d" * 8)
        ctx.ok("PROT_READ", m.mprotect, mmap.PROT_READ)
        ctx.host_fault("store after PROT_READ", m, 0, write=True, expected=signal.SIGSEGV)
        ctx.bytes_equal("load after PROT_READ", m, 0, b"\x6d" * 8)
        ctx.fails("PROT_EXEC", errno.EACCES, m.mprotect, mmap.PROT_READ | mmap.PROT_EXEC)
        ctx.fails("unknown bit 0x10", errno.EINVAL, m.mprotect, mmap.PROT_READ | 0x10)
        ctx.host_fault("still read-only after the failures", m, 0, write=True,
                       expected=signal.SIGSEGV)
        ctx.ok("PROT_NONE", m.mprotect, 0)
        ctx.host_fault("load after PROT_NONE", m, 0, write=False, expected=signal.SIGSEGV)
        ctx.ok("back to PROT_READ|PROT_WRITE", m.mprotect, mmap.PROT_READ | mmap.PROT_WRITE)
        m.write(8, b"\x6e" * 8)
        ctx.bytes_equal("data kept, store works", m, 0, b"\x6d" * 8 + b"\x6e" * 8)


@case("gmem.mmap_not_supported", f"{SRC} test_mmap_not_supported",
      "without GUEST_MEMFD_FLAG_MMAP: mmap fails with ENODEV", flag_variants=(0,))
def mmap_not_supported(ctx: Ctx) -> None:
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        ctx.fails("mmap 1 page", errno.ENODEV, g.mmap, PS)
        ctx.fails("mmap whole file", errno.ENODEV, g.mmap, 4 * PS)
        # The mmap syscall's own checks come before the file's (observed on 6.18).
        ctx.fails("length 0", errno.EINVAL, g.mmap, 0)
        ctx.fails("unaligned offset", errno.EINVAL, g.mmap, PS, 1)


# --- NUMA memory policy (upstream.md §2.7; guest_memfd_test.c test_mbind, test_numa_allocation) --
def needs_two_nodes(caps: object, vm_type: int, gmem_flags: int) -> str | None:
    nodes = caps.numa_nodes  # type: ignore[attr-defined]
    return None if nodes >= 2 else f"needs 2 NUMA nodes, the host has {nodes}"


def needs_shared_policy(caps: object, vm_type: int, gmem_flags: int) -> str | None:
    if caps.gmem_shared_policy:  # type: ignore[attr-defined]
        return None
    return "no per-inode guest_memfd mempolicy (kvm_gmem_set_policy) in this kernel"


BIND, INTERLEAVE, DEFAULT = uapi.MPOL_BIND, uapi.MPOL_INTERLEAVE, uapi.MPOL_DEFAULT


@case("gmem.mbind", f"{SRC} test_mbind, plus mm/mempolicy.c's checks (observed on 6.18)",
      "INTERLEAVE and BIND to node 0 read back with get_mempolicy; DEFAULT clears; invalid "
      "mode, empty or offline nodemask, bad flags, unaligned start EINVAL; a policy works "
      "where faults would SIGBUS", flag_variants=(MMAP, MMAP | SHARED))
def mbind(ctx: Ctx) -> None:
    offline = 1 << ctx.caps.numa_nodes  # the first node that does not exist
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g, g.mmap(4 * PS) as m:
        ctx.equal("no policy yet", (DEFAULT, 0), m.get_mempolicy(0))
        ctx.ok("INTERLEAVE node 0, pages 0-1", m.mbind, 0, 2 * PS, INTERLEAVE, 1)
        ctx.equal("read back", (INTERLEAVE, 1), m.get_mempolicy(0))
        ctx.ok("BIND node 0, pages 2-3", m.mbind, 2 * PS, 2 * PS, BIND, 1)
        ctx.equal("read back", (BIND, 1), m.get_mempolicy(2 * PS))
        ctx.equal("page 1 keeps its own", (INTERLEAVE, 1), m.get_mempolicy(PS))
        ctx.ok("DEFAULT, whole mapping, NULL mask", m.mbind, 0, 4 * PS, DEFAULT, None, 0, 0)
        ctx.equal("read back", (DEFAULT, 0), m.get_mempolicy(0))
        ctx.fails("mode 999", errno.EINVAL, m.mbind, 0, PS, 999, 1)
        ctx.fails("mode MPOL_MAX", errno.EINVAL, m.mbind, 0, PS, uapi.MPOL_MAX, 1)
        ctx.fails("BIND, empty nodemask", errno.EINVAL, m.mbind, 0, PS, BIND, 0)
        ctx.fails("BIND, offline node only", errno.EINVAL, m.mbind, 0, PS, BIND, offline)
        ctx.fails("DEFAULT with a node", errno.EINVAL, m.mbind, 0, PS, DEFAULT, 1)
        ctx.fails("LOCAL with a node", errno.EINVAL, m.mbind, 0, PS, uapi.MPOL_LOCAL, 1)
        ctx.fails("STATIC and RELATIVE", errno.EINVAL, m.mbind, 0, PS,
                  BIND | uapi.MPOL_F_STATIC_NODES | uapi.MPOL_F_RELATIVE_NODES, 1)
        ctx.fails("NUMA_BALANCING with INTERLEAVE", errno.EINVAL, m.mbind, 0, PS,
                  INTERLEAVE | uapi.MPOL_F_NUMA_BALANCING, 1)
        ctx.fails("unknown mbind flag", errno.EINVAL, m.mbind, 0, PS, BIND, 1, 8)
        ctx.fails("maxnode 1 reads no bits", errno.EINVAL, m.mbind, 0, PS, BIND, 1, 0, 1)
        ctx.fails("maxnode 0 with a mask (wraps)", errno.EINVAL, m.mbind, 0, PS, DEFAULT, 1, 0, 0)
        ctx.fails("maxnode beyond a page of bits", errno.EINVAL, m.mbind, 0, PS, DEFAULT, 0, 0,
                  PS * 8 + 2)
        ctx.ok("maxnode 0 with a NULL mask", m.mbind, 0, PS, DEFAULT, None, 0, 0)
        ctx.fails("unaligned start", errno.EINVAL, m.mbind, 1, PS, BIND, 1)
        ctx.equal("nothing changed by the failures", (DEFAULT, 0), m.get_mempolicy(0))
        ctx.ok("length 0 with a bad mask: nothing to do", m.mbind, 0, 0, DEFAULT, 1)
        ctx.ok("BIND nodes 0 and offline: online ones kept", m.mbind, 0, PS, BIND, 1 | offline)
        ctx.equal("read back", (BIND, 1), m.get_mempolicy(0))
        ctx.ok("PREFERRED, empty nodemask", m.mbind, 0, PS, uapi.MPOL_PREFERRED, 0)
        ctx.equal("becomes LOCAL", (uapi.MPOL_LOCAL, 0), m.get_mempolicy(0))
        ctx.ok("BIND|STATIC_NODES", m.mbind, 0, PS, BIND | uapi.MPOL_F_STATIC_NODES, 1 | offline)
        ctx.equal("reads back the mask as given", (BIND | uapi.MPOL_F_STATIC_NODES, 1 | offline),
                  m.get_mempolicy(0))
        ctx.ok("BIND|NUMA_BALANCING", m.mbind, 0, PS, BIND | uapi.MPOL_F_NUMA_BALANCING, 1)
        ctx.equal("read back", (BIND | uapi.MPOL_F_NUMA_BALANCING, 1), m.get_mempolicy(0))
        ctx.ok("a partial page rounds up", m.mbind, 3 * PS, 100, INTERLEAVE, 1)
        ctx.equal("read back", (INTERLEAVE, 1), m.get_mempolicy(3 * PS))
        ctx.ok("MPOL_MF_STRICT|MPOL_MF_MOVE, nothing misplaced", m.mbind, 0, PS, BIND, 1,
               uapi.MPOL_MF_STRICT | uapi.MPOL_MF_MOVE)


@case("gmem.mbind_scope", "upstream.md §2.7 (kvm_gmem_set_policy) vs this host (observed)",
      "per-inode policy: seen through every mapping and after munmap; per-VMA policy: only "
      "through the mapping it was set on, gone with it", flag_variants=(MMAP | SHARED,))
def mbind_scope(ctx: Ctx) -> None:
    shared = ctx.caps.gmem_shared_policy
    seen = (BIND, 1) if shared else (DEFAULT, 0)
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g:
        with g.mmap(4 * PS) as m, g.mmap(2 * PS, offset=2 * PS) as tail:
            m.mbind(2 * PS, PS, BIND, 1)
            ctx.equal("file page 2 through a second mapping", seen, tail.get_mempolicy(0))
            ctx.equal("file page 3 (never bound)", (DEFAULT, 0), tail.get_mempolicy(PS))
        with g.mmap(4 * PS) as again:
            ctx.equal("file page 2 after munmap, through a new mapping", seen,
                      again.get_mempolicy(2 * PS))


@case("gmem.move_pages", "move_pages(2) query on guest_memfd pages (observed on 6.18)",
      "a page this process has mapped reports its node; a page only allocated (fallocate) "
      "or punched reports ENOENT", flag_variants=(MMAP | SHARED,))
def move_pages(ctx: Ctx) -> None:
    enoent = -errno.ENOENT
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g, g.mmap(4 * PS) as m:
        ctx.equal("nothing mapped", [enoent] * 4, m.move_pages(0, 4))
        g.allocate(0, 4 * PS)
        ctx.equal("allocated, not mapped here", [enoent] * 4, m.move_pages(0, 4))
        m.write(0, b"\xaa" * PS)
        m.read(2 * PS, 1)
        ctx.equal("written page 0, read page 2: node 0", [0, enoent, 0, enoent],
                  m.move_pages(0, 4))
        g.punch_hole(0, PS)
        ctx.equal("page 0 punched", [enoent, enoent, 0, enoent], m.move_pages(0, 4))


@case("gmem.numa_allocation", f"{SRC} test_numa_allocation (multi-node only)",
      "new pages go to the nodes the per-inode policy names, before and after a punch; "
      "existing pages stay; STRICT finds misplaced pages (EIO)",
      needs=(needs_two_nodes, needs_shared_policy), flag_variants=(MMAP | SHARED,))
def numa_allocation(ctx: Ctx) -> None:
    node0, node1 = 1, 2
    with ctx.vm() as vm, ctx.gmem(vm, 4 * PS) as g, g.mmap(4 * PS) as m:
        m.write(0, b"\xaa" * PS)  # allocated before any policy: the local node
        ctx.ok("BIND page 0 to node 0 after allocation", m.mbind, 0, PS, BIND, node0)
        g.punch_hole(0, PS)
        ctx.ok("BIND pages 0-1 to node 1", m.mbind, 0, 2 * PS, BIND, node1)
        ctx.ok("BIND pages 2-3 to node 0", m.mbind, 2 * PS, 2 * PS, BIND, node0)
        m.write(0, b"\xaa" * 4 * PS)
        ctx.equal("pages on the nodes asked for", [1, 1, 0, 0], m.move_pages(0, 4))
        ctx.fails("STRICT: page 0 is on node 1", errno.EIO, m.mbind, 0, PS, BIND, node0,
                  uapi.MPOL_MF_STRICT)
        g.punch_hole(0, 4 * PS)
        ctx.ok("BIND pages 0-1 to node 0", m.mbind, 0, 2 * PS, BIND, node0)
        ctx.ok("BIND pages 2-3 to node 1", m.mbind, 2 * PS, 2 * PS, BIND, node1)
        m.write(0, b"\xaa" * 4 * PS)
        ctx.equal("new pages follow the new policy", [0, 0, 1, 1], m.move_pages(0, 4))
        ctx.ok("INTERLEAVE nodes 0 and 1", m.mbind, 0, 4 * PS, INTERLEAVE, node0 | node1)
        ctx.equal("existing pages do not move", [0, 0, 1, 1], m.move_pages(0, 4))
        g.punch_hole(0, 4 * PS)
        g.allocate(0, 4 * PS)  # fallocate allocates by the policy too
        m.read(0, 4 * PS)
        nodes = m.move_pages(0, 4)
        ctx.equal("interleaved: alternating nodes", {0, 1}, set(nodes))
        ctx.true("interleaved: no two neighbours on one node",
                 all(a != b for a, b in zip(nodes, nodes[1:], strict=False)))
