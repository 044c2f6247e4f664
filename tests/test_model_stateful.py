"""Stateful test of the model's private memory (coco profile), against an oracle.

The kernel here has no private memory, so this is the model alone: a
SW_PROTECTED VM with guest_memfd (private) + anonymous (shared) memory, driven
through the VMM by random conversions (MAP_GPA_RANGE from the guest), guest
writes and reads, host writes and reads of the shared side, punches and memory
errors. The oracle is a tiny per-page reference (one shared and one private
word per page, and who is private); invariants are checked after every step.
Knob: GUESTMEM_MODEL_EXAMPLES (default 1000).
"""

from __future__ import annotations

import errno
import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guestmem import program as p
from guestmem import uapi
from guestmem.guest import compile_program
from guestmem.model import Kvm
from guestmem.model.invariants import leaks_after_close, violations
from guestmem.vmm import Sharing, Vmm

PS = uapi.PAGE_SIZE
BASE = 1 << 32
PAGES = 2
WORD = 8  # each page is checked through the word at this offset
EXAMPLES = int(os.environ.get("GUESTMEM_MODEL_EXAMPLES", "1000"))
pages = st.integers(0, PAGES - 1)


class CocoGuestMachine(RuleBasedStateMachine):
    """What both machines share: a coco model, a VMM with a CPL0 guest, the
    invariants after every step, and nothing left behind."""

    kvm: Kvm
    vmm: Vmm

    def guest(self, *steps):
        self.vmm.load(compile_program(p.Program.of(*steps)))
        return self.vmm.run()

    def teardown(self):
        self.vmm.close()
        assert leaks_after_close(self.kvm) == []
        self.kvm.close()

    @invariant()
    def invariants_hold(self):
        assert violations(self.kvm) == []


class PrivateMemory(CocoGuestMachine):
    def __init__(self):
        super().__init__()
        self.kvm = Kvm("coco")
        self.vmm = Vmm(self.kvm, uapi.KVM_X86_SW_PROTECTED_VM, cpl=0)
        self.region = self.vmm.add_memory(BASE, PAGES * PS)
        assert self.region.backing == "gmem+shared"
        self.shared = [0] * PAGES  # oracle: word at WORD in the shared page
        self.private_word = [0] * PAGES  # ... and in the private (guest_memfd) page
        self.private = [False] * PAGES
        self.has_folio = [False] * PAGES  # a guest_memfd folio exists for the page
        self.poisoned: set[int] = set()

    @invariant()
    def tracker_matches_the_oracle(self):
        private = [False] * PAGES
        for gpa, size in self.vmm.tracker.ranges(Sharing.PRIVATE, BASE, BASE + PAGES * PS):
            for i in range((gpa - BASE) // PS, (gpa - BASE + size) // PS):
                private[i] = True
        assert private == self.private

    # --- conversions from the guest ----------------------------------------------------------
    @rule(page=pages)
    def toggle(self, page):
        """Flip one page between shared and private (the common case, kept simple so
        that round trips happen often)."""
        self.convert(page, 1, not self.private[page])

    @rule(first=pages, n=st.integers(1, 2), to_private=st.booleans())
    def convert(self, first, n, to_private):
        n = min(n, PAGES - first)
        r = self.guest(p.MapGpaRange(BASE + first * PS, n, PS, encrypted=to_private))
        assert (r.stop, r.reports) == ("done", [0])
        for i in range(first, first + n):
            if not to_private:  # the VMM punches the private side of every page it
                self.private_word[i] = 0  # makes shared, already shared or not,
                self.poisoned.discard(i)  # which also drops a poisoned folio
            self.private[i] = to_private
            self.has_folio[i] = to_private  # to private: the VMM allocates
        self.guest_read(first)  # what the guest sees right after converting

    # --- guest accesses ---------------------------------------------------------------------------
    @rule(page=pages, value=st.integers(0, 2**64 - 1))
    def guest_write(self, page, value):
        r = self.guest(p.WritePattern(BASE + page * PS + WORD, 8, value))
        if self.private[page] and page in self.poisoned:
            assert (r.stop, r.errno) == ("memory_fault", uapi.EHWPOISON)
            return
        assert r.stop == "done"
        if self.private[page]:
            self.private_word[page] = value
            self.has_folio[page] = True
        else:
            self.shared[page] = value

    @rule(page=pages)
    def guest_read(self, page):
        r = self.guest(p.ReadValue(BASE + page * PS + WORD))
        if self.private[page] and page in self.poisoned:
            assert (r.stop, r.errno) == ("memory_fault", uapi.EHWPOISON)
            assert r.memory_fault.flags == uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
            return
        expected = self.private_word[page] if self.private[page] else self.shared[page]
        assert (r.stop, r.reports) == ("done", [expected])
        if self.private[page]:
            self.has_folio[page] = True  # the fault allocated it

    @rule(first=pages, value=st.integers(0, 2**64 - 1))
    def guest_write_across(self, first, value):
        """One write over the tracked word of every page from `first` on, shared and
        private mixed: each page's word goes to its own side, in order, and a
        poisoned private page stops it there (EHWPOISON naming that page), the
        pages before it written."""
        length = (PAGES - 1 - first) * PS + 8
        r = self.guest(p.WritePattern(BASE + first * PS + WORD, length, value, 1))
        for i in range(first, PAGES):
            if self.private[i] and i in self.poisoned:
                assert (r.stop, r.errno) == ("memory_fault", uapi.EHWPOISON)
                assert r.memory_fault.gpa == BASE + i * PS
                return
            word = (value + (i - first) * PS // 8) % 2**64
            if self.private[i]:
                self.private_word[i] = word
                self.has_folio[i] = True
            else:
                self.shared[i] = word
        assert r.stop == "done"

    # --- the host -------------------------------------------------------------------------------
    @rule(page=pages, value=st.integers(0, 2**64 - 1))
    def host_write_shared(self, page, value):
        self.region.mapping.write(page * PS + WORD, value.to_bytes(8, "little"))
        self.shared[page] = value

    @rule(page=pages)
    def host_read_shared(self, page):
        data = self.region.mapping.read(page * PS + WORD, 8)
        assert int.from_bytes(data, "little") == self.shared[page]  # never the private word

    @rule(first=pages, n=st.integers(1, 2))
    def punch_private_side(self, first, n):
        n = min(n, PAGES - first)
        self.region.gmem.punch_hole(first * PS, n * PS)
        for i in range(first, first + n):
            self.private_word[i] = 0
            self.poisoned.discard(i)
            self.has_folio[i] = False

    @rule(page=pages)
    def memory_error(self, page):
        """A hardware error in the page's guest_memfd folio (the machine-check path,
        kvm_gmem_error_folio); with no folio there is no memory to fail."""
        self.region.gmem.inode.memory_failure(page, page + 1)
        if self.has_folio[page]:
            self.poisoned.add(page)

    @rule()
    def host_cannot_map_private_memory(self):
        """The guest_memfd has no MMAP here: the host has no view of private memory."""
        try:
            self.region.gmem.mmap(PS)
        except OSError as e:
            assert e.errno == errno.ENODEV
        else:
            raise AssertionError("mmap of a guest_memfd without MMAP succeeded")


PrivateMemory.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=25,
                                           deadline=None)
TestPrivateMemory = PrivateMemory.TestCase


class HardwarePrivateness(CocoGuestMachine):
    """SNP/TDX guests, whose accesses are private or shared by their own C-bit /
    shared-bit view, while the host may change the attributes behind their back:
    an access whose privateness disagrees with the attributes, either way, is a
    MEMORY_FAULT exit (flags PRIVATE for a private access), never data."""

    VM_TYPE = uapi.KVM_X86_SNP_VM

    def __init__(self):
        super().__init__()
        self.kvm = Kvm("coco")
        self.vmm = Vmm(self.kvm, self.VM_TYPE, cpl=0)
        self.vmm.add_memory(BASE, PAGES * PS)
        self.view = [False] * PAGES  # the guest's: private or shared
        self.attr = [False] * PAGES  # KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.shared = [0] * PAGES
        self.private_word = [0] * PAGES

    @rule(page=pages, to_private=st.booleans())
    def guest_converts(self, page, to_private):
        r = self.guest(p.MapGpaRange(BASE + page * PS, 1, PS, encrypted=to_private))
        assert r.reports == [0]
        if not to_private:
            self.private_word[page] = 0  # the VMM punched the private side
        self.view[page] = self.attr[page] = to_private

    @rule(page=pages)
    def host_flips_the_attribute(self, page):
        self.attr[page] = not self.attr[page]
        self.vmm.vm.set_memory_attributes(BASE + page * PS, PS,
                                          uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if self.attr[page]
                                          else 0)

    def mismatch(self, r, page):
        flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if self.view[page] else 0
        assert (r.stop, r.errno) == ("memory_fault", errno.EFAULT)
        assert (r.memory_fault.gpa, r.memory_fault.flags) == (BASE + page * PS, flags)

    @rule(page=pages)
    def guest_read(self, page):
        r = self.guest(p.ReadValue(BASE + page * PS + WORD))
        if self.view[page] != self.attr[page]:
            self.mismatch(r, page)
            return
        expected = self.private_word[page] if self.view[page] else self.shared[page]
        assert (r.stop, r.reports) == ("done", [expected])

    @rule(page=pages, value=st.integers(0, 2**64 - 1))
    def guest_write(self, page, value):
        r = self.guest(p.WritePattern(BASE + page * PS + WORD, 8, value))
        if self.view[page] != self.attr[page]:
            self.mismatch(r, page)
            return
        assert r.stop == "done"
        if self.view[page]:
            self.private_word[page] = value
        else:
            self.shared[page] = value


class TdxPrivateness(HardwarePrivateness):
    VM_TYPE = uapi.KVM_X86_TDX_VM


for machine in (HardwarePrivateness, TdxPrivateness):
    machine.TestCase.settings = settings(max_examples=max(EXAMPLES // 4, 20),
                                         stateful_step_count=20, deadline=None)
TestSnpPrivateness = HardwarePrivateness.TestCase
TestTdxPrivateness = TdxPrivateness.TestCase
