"""In-place conversion against a per-page oracle (issue 9, part 7).

A SW_PROTECTED VM on the `inplace` profile runs on one guest_memfd that is also
the host's mapping. Random conversions (any range, either way), pins and unpins,
punches, and host and guest reads and writes are checked against what each page
should be (private or shared, its word, pinned or not) and the model's invariants
after every step. SW_PROTECTED preserves contents across conversions, so the
guest and the host see the same word whenever each may look.
"""

from __future__ import annotations

import errno
import os

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm
from guestmem.model.invariants import violations
from guestmem.vmm import Vmm

PS = uapi.PAGE_SIZE
PAGES = 4
BASE = 1 << 32
WORD = 8  # each page is checked through the word at this offset
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
EXAMPLES = int(os.environ.get("GUESTMEM_MODEL_EXAMPLES", "1000"))
pages = st.integers(0, PAGES - 1)
words = st.integers(1, 2**64 - 1)


class InPlaceConversions(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kvm = Kvm("inplace")
        self.vmm = Vmm(self.kvm, uapi.KVM_X86_SW_PROTECTED_VM, cpl=0)
        region = self.vmm.add_memory(BASE, PAGES * PS)
        assert region.backing == "gmem"
        self.gmem, self.mapping = region.guest_memfd, region.mapping
        self.private = [False] * PAGES  # INIT_SHARED
        self.word = [0] * PAGES
        self.pins: dict[int, object] = {}  # page -> its pin, while the page is in the file
        self.stale_pins: list[object] = []  # pins of pages punched since

    def teardown(self):
        for pin in [*self.pins.values(), *self.stale_pins]:
            pin.unpin()
        self.vmm.close()
        self.kvm.close()

    def guest(self, *steps):
        abi = default_hypercall_abi(self.kvm.capabilities, self.vmm.cpl)
        self.vmm.load(compile_program(p.Program.of(*steps), abi))
        return self.vmm.run()

    @invariant()
    def invariants_hold(self):
        assert violations(self.kvm) == []

    @rule(first=pages, count=st.integers(1, PAGES), to_private=st.booleans())
    def convert(self, first, count, to_private):
        last = min(first + count, PAGES)
        noop = all(self.private[i] == to_private for i in range(first, last))
        pinned = [i for i in range(first, last) if i in self.pins]
        try:
            self.gmem.set_memory_attributes2(first * PS, (last - first) * PS,
                                             PRIVATE if to_private else 0)
        except OSError as e:
            assert to_private and not noop and pinned, f"{e} for [{first}, {last})"
            assert (e.errno, e.error_offset) == (errno.EAGAIN, pinned[0] * PS)
            return
        assert noop or not to_private or not pinned, "converted a pinned page to private"
        for i in range(first, last):
            self.private[i] = to_private

    @rule(page=pages, value=words)
    def host_writes(self, page, value):
        try:
            self.mapping.write(page * PS + WORD, value.to_bytes(8, "little"))
        except HostSigbus:
            assert self.private[page]
            return
        assert not self.private[page]
        self.word[page] = value

    @rule(page=pages)
    def host_reads(self, page):
        try:
            seen = self.mapping.read(page * PS + WORD, 8)
        except HostSigbus:
            assert self.private[page]
            return
        assert not self.private[page]
        assert int.from_bytes(seen, "little") == self.word[page]

    @rule(page=pages, value=words)
    def guest_writes(self, page, value):
        assert self.guest(p.WritePattern(BASE + page * PS + WORD, 8, value)).stop == "done"
        self.word[page] = value

    @rule(page=pages)
    def guest_reads(self, page):
        result = self.guest(p.ReadValue(BASE + page * PS + WORD))
        assert result.reports == [self.word[page]]

    @rule(page=pages)
    def pin(self, page):
        if page in self.pins:
            return
        try:
            self.pins[page] = self.mapping.pin(page * PS, PS)
        except OSError as e:
            assert e.errno == errno.EFAULT and self.private[page]
            return
        assert not self.private[page]

    @rule(page=pages)
    def unpin(self, page):
        if page in self.pins:
            self.pins.pop(page).unpin()

    @rule(page=pages)
    def punch(self, page):
        """PUNCH_HOLE: a zero page next time, the attribute unchanged; a pinned page
        leaves the file, so it no longer stands in a conversion's way."""
        self.gmem.punch_hole(page * PS, PS)
        self.word[page] = 0
        if page in self.pins:
            self.stale_pins.append(self.pins.pop(page))


InPlaceConversions.TestCase.settings = settings(max_examples=max(EXAMPLES // 5, 20),
                                                stateful_step_count=25, deadline=None)
TestInPlaceConversions = InPlaceConversions.TestCase
