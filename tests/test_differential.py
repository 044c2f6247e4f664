"""Differential test: the model (host profile) against the real kernel.

A hypothesis state machine applies the same random sequence of operations to
both backends — create guest_memfd, bind, delete slot, allocate, punch, mmap,
host read/write through the mapping, guest write/read, close — and compares
results, errnos and bytes; the model's invariants are checked after every step.

Knob: GUESTMEM_DIFF_EXAMPLES (sequences, default 2000) and GUESTMEM_DIFF_STEPS
(steps per sequence, default 12), e.g. for a long run:
    GUESTMEM_DIFF_EXAMPLES=50000 .venv/bin/pytest tests/test_differential.py
"""

from __future__ import annotations

import gc
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import guestmem
from guestmem import _args, memmap, uapi
from guestmem import program as p
from guestmem.exits import HostFault
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm as ModelKvm
from guestmem.model.invariants import violations
from guestmem.vmm import UnhandledExit, Vmm

from .conftest import kvm_unavailable_reason
from .test_api_args import SAMPLES, wrong_values

PS = uapi.PAGE_SIZE
GIB = 1 << 30
EXAMPLES = int(os.environ.get("GUESTMEM_DIFF_EXAMPLES", "2000"))
STEPS = int(os.environ.get("GUESTMEM_DIFF_STEPS", "12"))
MMAP, SHARED = uapi.GUEST_MEMFD_FLAG_MMAP, uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
KERNEL_VISIBLE = frozenset({memmap.UPTODATE, memmap.HOST_MAPPED})
# Values of the bad-input rules (the block at the end of Differential).
HUGE_IDS = [-1, 1 << 31, 1 << 32, (1 << 32) | 234, 1 << 63, (1 << 64) - 1, 1 << 64,
            -(1 << 63) - 1]
HUGE_SIZES = [-PS, -1, 0, PS, 1 << 40, 1 << 47, 1 << 63, (1 << 64) - PS, 1 << 64]
HUGE_FLAGS = [0, MMAP, -1, 1 << 63, 1 << 64]
TASK_SIZE = (1 << 47) - PS
STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blksize", "st_blocks",
               "st_rdev")
FILE_OPS = [
    ("read", 8), ("read", 0), ("read", -1), ("write", b"x"), ("write", b""),
    ("pread", 8, 0), ("pread", 8, -1), ("pread", 0, 1 << 62), ("pwrite", b"x", 0),
    ("pwrite", b"", -PS), ("lseek", 0, 0), ("lseek", -1, 1), ("lseek", PS, 2), ("lseek", 0, 3),
    ("lseek", 0, 4), ("lseek", 0, 5), ("lseek", 0, -1), ("ftruncate", 0), ("ftruncate", -1),
    ("ftruncate", 1 << 40), ("ioctl", 0x1234), ("ioctl", 0), ("ioctl", uapi.KVM_CREATE_VCPU, 1),
    ("ioctl", uapi.KVM_SET_MEMORY_ATTRIBUTES2), ("ioctl", (1 << 32) - 1, (1 << 64) - 1),
    ("stat",), ("close",),
]
_KINDS = {"anon_inode:[kvm-gmem]": "GuestMemfd", "anon_inode:kvm-vm": "Vm"}

pytestmark = pytest.mark.skipif(kvm_unavailable_reason() is not None,
                                reason=f"differential test needs the kernel: "
                                       f"{kvm_unavailable_reason()}")
HOST_PROFILE = guestmem.host_profile() if kvm_unavailable_reason() is None else None


def outcome(fn, *args):
    """What a call did, in a form both backends can be compared on."""
    try:
        value = fn(*args)
    except OSError as e:
        return ("errno", e.errno)
    except HostFault as e:
        return (e.signal_name,)
    except UnhandledExit as e:
        return ("unhandled exit", e.exit.reason)
    return ("ok", value)


class World:
    """One backend: a VMM (VM, low memory, vCPU) and the objects made on it."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.vmm = Vmm(kvm)
        self.abi = default_hypercall_abi(kvm.capabilities)
        self.gmems: list = []
        self.mappings: list = []
        self.anon = None

    def anon_addr(self):
        """Four pages of anonymous memory, made on first use."""
        if self.anon is None:
            self.anon = self.kvm.mmap_anonymous(4 * PS)
        return self.anon.addr

    def close(self):
        for m in self.mappings + [self.anon]:
            if m is not None:
                m.munmap()
        for g in self.gmems:
            g.close()
        self.vmm.close()
        self.kvm.close()

    def run_guest(self, cpl, *steps):
        """Run at `cpl`: where KVM emulates that CPL (kvm_pvm: CPL0), accesses go
        through userspace_addr instead of the MMU."""
        self.vmm.cpl = cpl
        self.vmm.load(compile_program(p.Program.of(*steps), self.abi))
        r = self.vmm.run()
        fault = r.memory_fault
        return (r.stop, r.reports, r.errno,
                (fault.gpa, fault.size, fault.flags) if fault else None, r.exit)


class Differential(RuleBasedStateMachine):
    gmems = Bundle("gmems")
    mappings = Bundle("mappings")

    def __init__(self):
        super().__init__()
        from guestmem.host import Kvm as HostKvm

        self.worlds = (World(ModelKvm(HOST_PROFILE)), World(HostKvm()))
        self.bound_slots: set[int] = set()
        self.gmem_slots: dict[int, tuple[int, int, int, int]] = {}  # slot: gpa, pages, g, offset

    def both(self, what, fn):
        """Apply fn to each world; the outcomes must be equal."""
        results = [outcome(fn, w) for w in self.worlds]
        assert results[0] == results[1], f"{what}: model {results[0]} != kernel {results[1]}"
        return results[0]

    def teardown(self):
        for w in self.worlds:
            close_extras(w)  # objects of the bad-input and lifetime rules below
            w.close()

    @invariant()
    def model_invariants_hold(self):
        assert violations(self.worlds[0].kvm) == []

    # --- guest_memfd ---------------------------------------------------------------------
    @rule(target=gmems, pages=st.integers(1, 8),
          flags=st.sampled_from([0, MMAP, MMAP | SHARED, SHARED, 4]))
    def create(self, pages, flags):
        def make(w):
            g = w.vmm.vm.create_guest_memfd(pages * PS, flags)
            w.gmems.append(g)
            return len(w.gmems) - 1

        result = self.both(f"create {pages} pages flags {flags}", make)
        return result[1] if result[0] == "ok" else -1

    @rule(g=gmems, offset=st.integers(-1, 9), length=st.integers(0, 4),
          mode=st.sampled_from([uapi.FALLOC_FL_KEEP_SIZE,
                                uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE,
                                uapi.FALLOC_FL_PUNCH_HOLE, 0]),
          unaligned=st.booleans())
    def fallocate(self, g, offset, length, mode, unaligned):
        if g < 0:
            return
        off, n = offset * PS + (1 if unaligned else 0), length * PS
        self.both(f"fallocate mode {mode} ({off}, {n})",
                  lambda w: w.gmems[g].fallocate(mode, off, n))

    @rule(g=gmems)
    def close(self, g):
        if g < 0:
            return
        self.both("close", lambda w: w.gmems[g].close())

    # --- memslots ------------------------------------------------------------------------
    @rule(g=gmems, slot=st.integers(1, 4), npages=st.integers(1, 4), offset=st.integers(0, 8),
          gib=st.integers(4, 7), hva=st.sampled_from(["null", "null", "anon"]))
    def bind(self, g, slot, npages, offset, gib, hva):
        """A guest_memfd slot; its userspace_addr is NULL (upstream's selftests) or
        other memory, which only KVM's instruction emulator reads."""
        if g < 0:
            return
        result = self.both(
            f"bind slot {slot} gpa {gib} GiB npages {npages} offset {offset} hva {hva}",
            lambda w: w.vmm.vm.set_user_memory_region2(slot, GMEM, gib * GIB, npages * PS,
                                                       w.anon_addr() if hva == "anon" else 0,
                                                       w.gmems[g], offset * PS))
        if result[0] == "ok":
            self.bound_slots.add(slot)
            self.gmem_slots[slot] = (gib * GIB, npages, g, offset)

    @precondition(lambda self: self.gmem_slots)
    @rule(data=st.data(), slot=st.integers(1, 4), npages=st.integers(1, 4),
          shift=st.sampled_from([0, 0, -1]), side=st.sampled_from(["after", "before"]))
    def bind_adjacent(self, data, slot, npages, shift, side):
        """A guest_memfd slot right against a bound one, in GPA and in file offset,
        or one page into it: touching is fine, overlapping is not."""
        other = data.draw(st.sampled_from(sorted(self.gmem_slots)))
        gpa, other_pages, g, offset = self.gmem_slots[other]
        if side == "after":
            new_gpa, new_offset = gpa + (other_pages + shift) * PS, offset + other_pages + shift
        else:
            new_gpa, new_offset = gpa - (npages + shift) * PS, offset - npages - shift
        if new_offset < 0:
            return
        result = self.both(
            f"bind slot {slot} {side} slot {other}, shift {shift}",
            lambda w: w.vmm.vm.set_user_memory_region2(slot, GMEM, new_gpa, npages * PS, 0,
                                                       w.gmems[g], new_offset * PS))
        if result[0] == "ok":
            self.bound_slots.add(slot)
            self.gmem_slots[slot] = (new_gpa, npages, g, new_offset)

    @rule(slot=st.integers(5, 6), gib=st.integers(4, 7),
          flags=st.sampled_from([0, uapi.KVM_MEM_READONLY, uapi.KVM_MEM_LOG_DIRTY_PAGES, 8]))
    def bind_anonymous(self, slot, gib, flags):
        """An ordinary memslot over anonymous memory (read-only or dirty-logged)."""
        def make(w):
            w.vmm.vm.set_user_memory_region2(slot, flags, gib * GIB, 4 * PS, w.anon_addr())

        if self.both(f"bind anonymous slot {slot} at {gib} GiB flags {flags}", make)[0] == "ok":
            self.bound_slots.add(slot)

    @rule(slot=st.integers(1, 6))
    def dirty_log(self, slot):
        self.both(f"dirty log of slot {slot}", lambda w: w.vmm.vm.get_dirty_log(slot, 4))

    @rule(gpa=st.sampled_from([0, 4 * GIB, 4 * GIB + 1, 5 * GIB]), flags=st.integers(0, 1))
    def pre_fault(self, gpa, flags):
        self.both(f"pre-fault {gpa:#x}", lambda w: w.vmm.vcpu.pre_fault_memory(gpa, PS, flags))

    @rule(attrs=st.sampled_from([0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE]))
    def set_attributes(self, attrs):
        self.both("set attributes", lambda w: w.vmm.vm.set_memory_attributes(4 * GIB, PS, attrs))

    @rule(slot=st.integers(1, 6))
    def delete(self, slot):
        self.both(f"delete slot {slot}", lambda w: w.vmm.vm.delete_memslot(slot))
        self.bound_slots.discard(slot)
        self.gmem_slots.pop(slot, None)

    # --- host mappings ---------------------------------------------------------------------
    @rule(target=mappings, g=gmems, twice=st.booleans(), prot=st.sampled_from([3, 3, 1, 5, 0]),
          shared=st.booleans(), offset=st.sampled_from([0, 0, PS, 1]))
    def mmap(self, g, twice, prot, shared, offset):
        if g < 0:
            return -1

        def make(w):
            size = w.gmems[g].stat().st_size
            w.mappings.append(w.gmems[g].mmap(size * (2 if twice else 1), offset, prot, shared))
            return len(w.mappings) - 1

        result = self.both("mmap", make)
        return result[1] if result[0] == "ok" else -1

    @rule(m=mappings, page=st.integers(0, 15), byte=st.integers(0, 255), straddle=st.booleans())
    def host_write(self, m, page, byte, straddle):
        """16 bytes in a page, or straddling its end into the next (which may SIGBUS
        after the first half was written)."""
        if m < 0:
            return
        offset = page * PS + (PS - 8 if straddle else 8)

        def write(w):
            mapping = w.mappings[m]
            if offset + 16 > mapping.length:
                return "outside"
            mapping.write(offset, bytes([byte]) * 16)
            return None

        self.both(f"host write at {offset:#x}", write)

    @rule(m=mappings, page=st.integers(0, 15))
    def host_read(self, m, page):
        if m < 0:
            return

        def read(w):
            mapping = w.mappings[m]
            if page * PS >= mapping.length:
                return "outside"
            return mapping.read(page * PS, 64)

        self.both(f"host read page {page}", read)

    @rule(m=mappings, advice=st.sampled_from([0, 3, 4, 8, 9, 14, 18, 21, 22, 23, 24, 25, 9999]),
          page=st.integers(0, 3))
    def madvise(self, m, advice, page):
        if m < 0:
            return

        def advise(w):
            mapping = w.mappings[m]
            if (page + 1) * PS > mapping.length:
                return "outside"
            mapping.madvise(page * PS, PS, advice)
            return None

        self.both(f"madvise {advice} page {page}", advise)

    @rule(m=mappings, prot=st.sampled_from([0, 1, 3, 5, 7, 0x10, 8]))
    def mprotect(self, m, prot):
        if m < 0:
            return
        self.both(f"mprotect {prot:#x}", lambda w: w.mappings[m].mprotect(prot))

    @rule(prot=st.sampled_from([0, 1, 3, 3]))
    def mprotect_anonymous(self, prot):
        """The memory behind the anonymous slots (and the gmem slots bound with it)."""
        def protect(w):
            w.anon_addr()
            w.anon.mprotect(prot)

        self.both(f"mprotect anonymous {prot:#x}", protect)

    @rule(g=gmems)
    def memory_map(self, g):
        """What the kernel shows of the file's pages (uptodate by mincore, host-mapped
        by pagemap) is what the model keeps."""
        if g < 0:
            return

        model, kernel = (outcome(lambda w: w.gmems[g].memory_map(), w) for w in self.worlds)
        if model[0] == kernel[0] == "ok":
            visible = model[1].known & kernel[1].known
            model, kernel = (model[1].restricted(visible).runs, kernel[1].restricted(visible).runs)
        assert model == kernel, f"memory map: model {model} != kernel {kernel}"

    @rule(m=mappings)
    def munmap(self, m):
        if m < 0:
            return
        self.both("munmap", lambda w: w.mappings[m].munmap())

    # --- the guest ---------------------------------------------------------------------------
    @precondition(lambda self: self.bound_slots)
    @rule(gib=st.integers(4, 7), page=st.integers(0, 3), value=st.integers(0, 2**64 - 1),
          cpl=st.sampled_from([3, 3, 0]))
    def guest_write_read(self, gib, page, value, cpl):
        gpa = gib * GIB + page * PS + 16
        self.both(f"CPL{cpl} guest write+read {gpa:#x}",
                  lambda w: w.run_guest(cpl, p.WritePattern(gpa, 16, value, 1),
                                        p.ReadValue(gpa + 8)))

    @precondition(lambda self: self.bound_slots)
    @rule(gib=st.integers(4, 7), page=st.integers(0, 3), pages=st.integers(1, 4),
          value=st.integers(0, 2**64 - 1), cpl=st.sampled_from([3, 3, 0]))
    def guest_write_across(self, gib, page, pages, value, cpl):
        """A write from the last word of a page over the next pages, which may be in
        another slot, none, or a file gone: what it stores before the page that
        fails, and how it ends; then what each page's first word reads."""
        gpa = gib * GIB + page * PS + PS - 8
        self.both(f"CPL{cpl} guest write across {gpa:#x} +{pages} pages",
                  lambda w: w.run_guest(cpl, p.WritePattern(gpa, 8 + pages * PS, value, 1)))
        for i in range(page, page + pages + 1):
            word = gib * GIB + i * PS
            self.both(f"CPL{cpl} read back {word:#x}",
                      lambda w, word=word: w.run_guest(cpl, p.ReadValue(word)))

    @precondition(lambda self: self.bound_slots)
    @rule(gib=st.integers(4, 7), page=st.integers(0, 3), cpl=st.sampled_from([3, 3, 0]))
    def guest_read(self, gib, page, cpl):
        gpa = gib * GIB + page * PS
        self.both(f"CPL{cpl} guest read {gpa:#x}", lambda w: w.run_guest(cpl, p.ReadValue(gpa)))

    # --- bad input, lifetimes and file operations (issue 7) ----------------------------------
    # Wrong Python types, negative and huge ints, use after close, objects dropped
    # unclosed, and every file operation on a guest_memfd. Objects made here live in
    # extras(w) and are closed in teardown.
    vms = Bundle("vms")
    vcpus = Bundle("vcpus")

    def both_any(self, what, fn):
        """both(), where raising TypeError/OverflowError/ValueError is an outcome too."""
        results = [outcome_any(fn, w) for w in self.worlds]
        assert results[0] == results[1], f"{what}: model {results[0]} != kernel {results[1]}"
        return results[0]

    @rule(g=gmems, data=st.data())
    def wrong_type(self, g, data):
        """One argument of the wrong Python type: a TypeError on both, nothing done."""
        qualname = data.draw(st.sampled_from(sorted(q for q in SAMPLES if q != "Mapping.pin")))
        owner, _, method = qualname.partition(".")
        param = data.draw(st.sampled_from([n for n in _args.SPEC[qualname] if n != "args"]))
        bad = data.draw(st.sampled_from(wrong_values(_args.SPEC[qualname][param])))

        def call(w):
            target = {"Kvm": w.kvm, "Vm": w.vmm.vm, "Vcpu": w.vmm.vcpu,
                      "GuestMemfd": w.gmems[g] if g >= 0 else None,
                      "Mapping": w.mappings[-1] if w.mappings else None}[owner]
            if target is None:
                return "no such object"
            return getattr(target, method)(**{**SAMPLES[qualname], param: bad})

        self.both_any(f"{qualname}({param}={bad!r})", call)

    @rule(target=vcpus, vcpu_id=st.sampled_from(HUGE_IDS + [1, 2, 4095, 4096])
          | st.integers(0, 5000))
    def create_vcpu_any_id(self, vcpu_id):
        def make(w):
            extras(w)["vcpus"].append(w.vmm.vm.create_vcpu(vcpu_id))
            return len(extras(w)["vcpus"]) - 1

        result = self.both_any(f"create_vcpu({vcpu_id:#x})", make)
        return result[1] if result[0] == "ok" else -1

    @rule(v=vcpus, op=st.sampled_from(["get_regs", "get_sregs", "set_regs", "run", "close",
                                       "pre_fault", "complete_hypercall", "set_sregs"]),
          closed=st.booleans())
    def vcpu_op(self, v, op, closed):
        """A vCPU of create_vcpu_any_id, open or closed: what works, and EBADF after close."""
        if v < 0:
            return

        def call(w):
            vcpu = extras(w)["vcpus"][v]
            if closed:
                vcpu.close()
            if op == "run":
                vcpu.immediate_exit = True  # returns at once (EINTR), guest code or not
                return vcpu.run()
            if op == "pre_fault":
                return vcpu.pre_fault_memory(4 * GIB, PS)
            if op in ("set_regs", "set_sregs"):
                return getattr(vcpu, op)(getattr(vcpu, op.replace("set", "get"))())
            if op == "complete_hypercall":
                return vcpu.complete_hypercall(0)
            got = getattr(vcpu, op)()
            return None if got is None else bytes(got)  # registers, byte for byte

        self.both_any(f"vcpu {v} {op}", call)

    @rule(size=st.sampled_from(HUGE_SIZES), flags=st.sampled_from(HUGE_FLAGS))
    def create_gmem_any_size(self, size, flags):
        def make(w):
            extras(w)["gmems"].append(w.vmm.vm.create_guest_memfd(size, flags))

        self.both_any(f"create_guest_memfd({size:#x}, {flags:#x})", make)

    @rule(g=gmems, slot=st.sampled_from([-1, 7, 0xFFFF, 32763, 32764, 1 << 16 | 7, 1 << 32]),
          gpa=st.sampled_from([-PS, 8 * GIB, 1 << 52, (1 << 64) - PS, 1 << 64]),
          size=st.sampled_from([-PS, 0, PS, 1 << 47, (1 << 64) - PS]),
          hva=st.sampled_from([0, -PS, TASK_SIZE - PS, TASK_SIZE, 1 << 64]),
          offset=st.sampled_from([0, -PS, PS, 1 << 63]),
          fd=st.sampled_from(["g", "g", -1, 0, 999, 1 << 31, 1 << 32]))
    def bind_any(self, g, slot, gpa, size, hva, offset, fd):
        """A guest_memfd slot from edge values, the file given as itself or a raw fd."""
        if g < 0:
            return
        result = self.both_any(
            f"bind slot {slot:#x} gpa {gpa:#x} size {size:#x} hva {hva:#x} offset {offset:#x} "
            f"fd {fd}",
            lambda w: w.vmm.vm.set_user_memory_region2(
                slot, GMEM, gpa, size, hva, w.gmems[g] if fd == "g" else fd, offset))
        if result[0] == "ok":
            self.both(f"delete slot {slot:#x}", lambda w: w.vmm.vm.delete_memslot(slot))

    @rule(cap=st.sampled_from(sorted(uapi.CAPABILITY_NAMES)) | st.sampled_from(HUGE_IDS),
          scope=st.sampled_from(["kvm", "vm"]))
    def check_extension(self, cap, scope):
        self.both_any(f"{scope} check_extension({cap:#x})",
                      lambda w: (w.kvm if scope == "kvm" else w.vmm.vm).check_extension(cap))

    @rule(g=gmems, length=st.sampled_from(HUGE_SIZES + [None]),
          offset=st.sampled_from([0, PS, -PS, 1 << 62, 1 << 63, (1 << 64) - PS]),
          prot=st.sampled_from([0, 1, 3, 7, 8, -1, 1 << 31]), shared=st.booleans())
    def mmap_any(self, g, length, offset, prot, shared):
        if g < 0:
            return

        def make(w):
            w.mappings.append(w.gmems[g].mmap(length, offset, prot, shared))

        self.both_any(f"mmap({length}, {offset:#x}, {prot:#x}, {shared})", make)

    @rule(g=gmems, mode=st.sampled_from([0, 1, 2, 3, -1, 0x7F, 1 << 31]),
          offset=st.sampled_from([0, -1, -PS, PS, 1 << 62, (1 << 63) - PS, (1 << 64) - PS]),
          length=st.sampled_from([0, -PS, PS, 1 << 62, (1 << 63) - PS, (1 << 64) - PS]))
    def fallocate_any(self, g, mode, offset, length):
        if g < 0:
            return
        self.both_any(f"fallocate({mode:#x}, {offset:#x}, {length:#x})",
                      lambda w: w.gmems[g].fallocate(mode, offset, length))

    @rule(slot=st.sampled_from([-1, 0, 1, 0xFFFF, 32764, 1 << 16 | 1]),
          gpa=st.sampled_from([0, -PS, 1 << 52, (1 << 64) - PS]),
          size=st.sampled_from([0, PS, -PS, (1 << 64) - PS]),
          flags=st.sampled_from([0, 1, -1]))
    def other_vm_ioctls_any(self, slot, gpa, size, flags):
        self.both_any(f"get_dirty_log({slot:#x})", lambda w: w.vmm.vm.get_dirty_log(slot, 4))
        self.both_any(f"set_memory_attributes({gpa:#x}, {size:#x}, {flags})",
                      lambda w: w.vmm.vm.set_memory_attributes(gpa, size, 0, flags))
        self.both_any(f"pre_fault_memory({gpa:#x}, {size:#x}, {flags})",
                      lambda w: w.vmm.vcpu.pre_fault_memory(gpa, size, flags))
        self.both_any(f"enable_cap({slot:#x}, {gpa:#x}, flags={flags})",
                      lambda w: w.vmm.vm.enable_cap(slot, gpa, flags=flags))

    @rule(target=vms)
    def spare_vm(self):
        def make(w):
            extras(w)["vms"].append(w.kvm.create_vm())
            return len(extras(w)["vms"]) - 1

        result = self.both("create a spare VM", make)
        return result[1] if result[0] == "ok" else -1

    @rule(v=vms, op=st.sampled_from(["close", "create_guest_memfd", "create_vcpu", "bind",
                                     "delete", "check_extension", "dirty_log", "enable_cap",
                                     "attributes", "drop"]), closed=st.booleans())
    def spare_vm_op(self, v, op, closed):
        """Use after close (EBADF) and drop (the fds go) of a VM of its own."""
        if v < 0:
            return

        def call(w):
            vm = extras(w)["vms"][v]
            if vm is None:
                return "dropped"
            if closed:
                vm.close()
            if op == "drop":
                extras(w)["vms"][v] = None
                return None
            return {"close": vm.close,
                    "create_guest_memfd": lambda: extras(w)["gmems"].append(
                        vm.create_guest_memfd(PS)),
                    "create_vcpu": lambda: extras(w)["vcpus"].append(vm.create_vcpu(1)),
                    "bind": lambda: vm.set_user_memory_region2(1, 0, 0, PS, 0),
                    "delete": lambda: vm.delete_memslot(1),
                    "check_extension": lambda: vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD),
                    "dirty_log": lambda: vm.get_dirty_log(1, 1),
                    "enable_cap": lambda: vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0),
                    "attributes": lambda: vm.set_memory_attributes(0, PS, 0),
                    }[op]()

        if op != "drop":
            self.both_any(f"spare VM {v} {op}", call)
            return
        vms_ = [extras(w)["vms"][v] for w in self.worlds]
        fds = [None if vm is None or vm.closed else vm._fd for vm in vms_]
        del vms_
        self.both_any(f"spare VM {v} drop", call)
        self.same_fds("after dropping a VM", lambda i, w, before, after: fds[i] in after)

    @rule(op=st.sampled_from(["capabilities", "api_version", "check_extension",
                              "vcpu_mmap_size", "supported_vm_types", "create_vm",
                              "mmap_anonymous"]))
    def closed_kvm(self, op):
        def call(w):
            kvm = type(w.kvm)()
            kvm.close()
            if op == "capabilities":
                return kvm.capabilities.api_version
            if op == "check_extension":
                return kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)
            if op == "mmap_anonymous":
                kvm.mmap_anonymous(PS).munmap()
                return None
            result = getattr(kvm, op)()
            return "a VM" if op == "create_vm" else result

        self.both_any(f"closed Kvm: {op}", call)

    @rule(target=mappings, bind=st.booleans(), mapped=st.booleans(), vcpu=st.booleans())
    def drop_unclosed(self, bind, mapped, vcpu):
        """A guest_memfd (bound, mapped, or not) and a vCPU dropped without close():
        their fds go, a mapping keeps the file alive, the vCPU's id stays taken."""
        self.next_id = getattr(self, "next_id", 100) + 1
        slot, vcpu_id = 7 + self.next_id % 20, self.next_id

        def make(w):
            g = w.vmm.vm.create_guest_memfd(2 * PS, MMAP | SHARED)
            if bind:
                w.vmm.vm.delete_memslot(slot) if slot in extras(w)["slots"] else None
                w.vmm.vm.set_user_memory_region2(slot, GMEM, (8 + slot) * GIB, PS, 0, g, 0)
                extras(w)["slots"].add(slot)
            if mapped:
                w.mappings.append(g.mmap())
            if vcpu:
                w.vmm.vm.create_vcpu(vcpu_id)  # dropped at once
            return len(w.mappings) - 1 if mapped else -1

        before = [open_fds(w) for w in self.worlds]
        result = self.both("drop unclosed objects", make)
        self.same_fds("after dropping a guest_memfd and a vCPU",  # the step's fds still open
                      lambda i, w, _, after: Counter(k for fd, k in after.items()
                                                     if fd not in before[i]))
        if vcpu and result[0] == "ok":
            self.both_any("the dropped vCPU's id", lambda w: w.vmm.vm.create_vcpu(vcpu_id))
        return result[1] if result[0] == "ok" else -1

    def same_fds(self, what, view):
        """view(index, world, _, open fds of the world) must agree between the worlds.
        Both worlds share this process, so each compares only fds it can attribute."""
        def seen():
            return [view(i, w, None, open_fds(w)) for i, w in enumerate(self.worlds)]

        got = seen()
        if got[0] != got[1]:  # a model VM and its memslots form a cycle: collect it
            gc.collect()
            got = seen()
        assert got[0] == got[1], f"{what}: model {got[0]} != kernel {got[1]}"

    @rule(g=gmems, op=st.sampled_from(FILE_OPS), closed=st.booleans())
    def file_op(self, g, op, closed):
        """Every file operation on a guest_memfd, open or closed."""
        if g < 0:
            return
        name, *args = op

        def call(w):
            gmem = w.gmems[g]
            if closed:
                gmem.close()
            if name == "stat":
                st_ = gmem.stat()
                return tuple(getattr(st_, f) for f in STAT_FIELDS)
            return getattr(gmem, name)(*args)

        self.both_any(f"{name}{tuple(args)}", call)



def outcome_any(fn, w):
    try:
        return outcome(fn, w)
    except (TypeError, OverflowError, ValueError) as e:
        return ("raises", type(e).__name__)


def extras(w):
    """What the rules of the bad-input block made in world w."""
    if not hasattr(w, "extras"):
        w.extras = {"vms": [], "vcpus": [], "gmems": [], "slots": set()}
    return w.extras


def close_extras(w):
    made = extras(w)
    for obj in [*made["vcpus"], *made["gmems"], *made["vms"]]:
        if obj is not None:
            obj.close()


def open_fds(w):
    """Open guest_memfd, VM and vCPU fds, fd -> kind: the model world's fd table, or
    for the kernel world the KVM anon inodes of /proc/self/fd (the whole process's:
    objects of other examples may still be there, so callers compare what they can
    attribute to a step)."""
    if w.kvm.backend == "model":
        return {fd: type(obj).__name__ for fd, obj in list(w.kvm.process.fds.items())
                if type(obj).__name__ != "Kvm"}
    kinds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = "Vcpu" if link.startswith("anon_inode:kvm-vcpu") else _KINDS.get(link)
        if kind:
            kinds[int(fd)] = kind
    return kinds


Differential.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDifferential = Differential.TestCase
