"""In-place conversion against a per-page oracle (issue 9, part 7).

A VM on the `inplace` profile runs on one guest_memfd that is also the host's
mapping. Random conversions (any range, either way), pins and unpins, punches,
forks of the VMM process and the child's exit, and host (parent and child) and
guest reads and writes are checked against what each page should
be (private or shared, its word, pinned or not, initialised or not) and the
model's invariants after every step. The machine runs once per content rule
(profile.Conversion): SW_PROTECTED and pkvm preserve, so the guest and the host
see the same word whenever each may look; TDX and seed 003's option zero an
initialised page that changes owner; SNP leaves noise that is not the previous
owner's word. On SNP and TDX the guest's accesses are shared ones (its C-bit /
shared-bit view is never flipped here), so guest steps touch shared pages only.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guestmem import program as p
from guestmem import uapi
from guestmem.exits import HostSigbus
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import PROFILES, Kvm
from guestmem.model.invariants import violations
from guestmem.model.profile import Conversion
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
    VM_TYPE = uapi.KVM_X86_SW_PROTECTED_VM
    ZERO_ON_CONVERSION = False

    def __init__(self):
        super().__init__()
        zeroing = self.ZERO_ON_CONVERSION
        self.kvm = Kvm(replace(PROFILES["inplace"], gmem_zero_on_conversion=zeroing))
        self.vmm = Vmm(self.kvm, self.VM_TYPE, cpl=0)
        self.rule = self.kvm.profile.conversion_of(self.kvm.profile.vm_type(self.VM_TYPE))
        self.hardware_private = self.kvm.profile.vm_type(self.VM_TYPE).private_from_hardware
        region = self.vmm.add_memory(BASE, PAGES * PS)
        assert region.gmem is not None and region.gmem_offset == 0
        self.gmem, self.mapping = region.guest_memfd, region.mapping
        self.private = [False] * PAGES  # INIT_SHARED
        self.word: list[int | None] = [0] * PAGES  # None: noise (SNP ciphertext)
        self.noise_over = [0] * PAGES  # the word the noise replaced
        self.present = [False] * PAGES  # an initialised folio is in the file
        self.view = [False] * PAGES  # the guest's C-bit / shared-bit view (SNP, TDX)
        self.child = None  # a forked VMM process with the mapping, while alive
        self.pins: dict[int, object] = {}  # page -> its pin, while the page is in the file
        self.stale_pins: list[object] = []  # pins of pages punched since

    def teardown(self):
        if self.child is not None:
            self.child.exit()
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
            if self.private[i] != to_private and self.present[i]:
                self.change_owner(i)
            self.private[i] = to_private

    def change_owner(self, page):
        if self.rule is Conversion.ZERO:
            self.word[page] = 0
        elif self.rule is Conversion.CIPHERTEXT:
            if self.word[page] is not None:
                self.noise_over[page] = self.word[page]
            self.word[page] = None

    def check_word(self, page, seen):
        if self.word[page] is None:
            assert seen != self.noise_over[page] or seen == 0, "kept across an SNP conversion"
        else:
            assert seen == self.word[page]

    def store(self, write, page, value):
        """A host store by `write` (the VMM's or its child's): SIGBUS iff private."""
        try:
            write(page * PS + WORD, value.to_bytes(8, "little"))
        except HostSigbus:
            assert self.private[page]
            return
        assert not self.private[page]
        self.word[page] = value
        self.present[page] = True

    def load(self, read, page):
        """A host load by `read`: SIGBUS iff private, else the page's word."""
        try:
            seen = read(page * PS + WORD, 8)
        except HostSigbus:
            assert self.private[page]
            return
        assert not self.private[page]
        self.check_word(page, int.from_bytes(seen, "little"))
        self.present[page] = True

    @rule(page=pages, value=words)
    def host_writes(self, page, value):
        self.store(self.mapping.write, page, value)

    @rule(page=pages)
    def host_reads(self, page):
        self.load(self.mapping.read, page)

    def guest_mismatch(self, page, steps):
        """SNP/TDX: an access whose view differs from the attribute is a memory
        fault at that page (kvm_mmu_faultin_pfn: fault->is_private mismatch)."""
        if not (self.hardware_private and self.view[page] != self.private[page]):
            return False
        result = self.guest(*steps)
        assert result.stop == "memory_fault" and result.memory_fault.gpa == BASE + page * PS
        return True

    @rule(page=pages, value=words)
    def guest_writes(self, page, value):
        steps = (p.WritePattern(BASE + page * PS + WORD, 8, value),)
        if self.guest_mismatch(page, steps):
            return
        assert self.guest(*steps).stop == "done"
        self.word[page] = value
        self.present[page] = True

    @rule(page=pages)
    def guest_reads(self, page):
        steps = (p.ReadValue(BASE + page * PS + WORD),)
        if self.guest_mismatch(page, steps):
            return
        result = self.guest(*steps)
        assert len(result.reports) == 1
        self.check_word(page, result.reports[0])
        self.present[page] = True

    @rule(page=pages, to_private=st.booleans())
    def guest_maps(self, page, to_private):
        """MAP_GPA_RANGE: the VMM converts in place (KVM_SET_MEMORY_ATTRIBUTES2); a page
        pinned by someone else fails it after the VMM's retries, changing nothing."""
        result = self.guest(p.MapGpaRange(BASE + page * PS, 1, PS, encrypted=to_private))
        refused = to_private and not self.private[page] and page in self.pins
        assert result.reports == [(1 << 64) - uapi.KVM_EINVAL if refused else 0]
        if refused:
            return
        if self.private[page] != to_private and self.present[page]:
            self.change_owner(page)
        self.private[page] = self.view[page] = to_private

    @rule()
    def fork_or_exit(self):
        """A child with the mapping comes and goes; conversions zap its PTEs too."""
        if self.child is None:
            self.child = self.kvm.fork()
        else:
            self.child.exit()
            self.child = None

    @rule(page=pages, value=words)
    def child_writes(self, page, value):
        if self.child is not None:
            self.store(lambda offset, data: self.child.write(self.mapping, offset, data),
                       page, value)

    @rule(page=pages)
    def child_reads(self, page):
        if self.child is not None:
            self.load(lambda offset, n: self.child.read(self.mapping, offset, n), page)

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
        self.present[page] = True

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
        self.present[page] = False
        if page in self.pins:
            self.stale_pins.append(self.pins.pop(page))


class PkvmConversions(InPlaceConversions):
    VM_TYPE = uapi.GUESTMEM_PKVM_VM


class ZeroOnConversion(InPlaceConversions):
    ZERO_ON_CONVERSION = True


class TdxConversions(InPlaceConversions):
    VM_TYPE = uapi.KVM_X86_TDX_VM


class SnpConversions(InPlaceConversions):
    VM_TYPE = uapi.KVM_X86_SNP_VM


def _settings(share: int) -> settings:
    return settings(max_examples=max(EXAMPLES // share, 20), stateful_step_count=25,
                    deadline=None)


InPlaceConversions.TestCase.settings = _settings(5)
for _machine in (PkvmConversions, ZeroOnConversion, TdxConversions, SnpConversions):
    _machine.TestCase.settings = _settings(20)
TestInPlaceConversions = InPlaceConversions.TestCase
TestPkvmConversions = PkvmConversions.TestCase
TestZeroOnConversion = ZeroOnConversion.TestCase
TestTdxConversions = TdxConversions.TestCase
TestSnpConversions = SnpConversions.TestCase
