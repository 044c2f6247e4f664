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

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import guestmem
from guestmem import memmap, uapi
from guestmem import program as p
from guestmem.exits import HostFault
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm as ModelKvm
from guestmem.model.invariants import violations
from guestmem.vmm import UnhandledExit, Vmm

from .conftest import kvm_unavailable_reason

PS = uapi.PAGE_SIZE
GIB = 1 << 30
EXAMPLES = int(os.environ.get("GUESTMEM_DIFF_EXAMPLES", "2000"))
STEPS = int(os.environ.get("GUESTMEM_DIFF_STEPS", "12"))
MMAP, SHARED = uapi.GUEST_MEMFD_FLAG_MMAP, uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
KERNEL_VISIBLE = frozenset({memmap.UPTODATE, memmap.HOST_MAPPED})

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

    def both(self, what, fn):
        """Apply fn to each world; the outcomes must be equal."""
        results = [outcome(fn, w) for w in self.worlds]
        assert results[0] == results[1], f"{what}: model {results[0]} != kernel {results[1]}"
        return results[0]

    def teardown(self):
        for w in self.worlds:
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
    @rule(gib=st.integers(4, 7), page=st.integers(0, 3), cpl=st.sampled_from([3, 3, 0]))
    def guest_read(self, gib, page, cpl):
        gpa = gib * GIB + page * PS
        self.both(f"CPL{cpl} guest read {gpa:#x}", lambda w: w.run_guest(cpl, p.ReadValue(gpa)))


Differential.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDifferential = Differential.TestCase
