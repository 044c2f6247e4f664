"""Seed 001's races, and the ones after it, as deterministic scenarios with a
checker (issue 11 parts 3 and 4).

A scenario is a guest program with numbered checkpoints and a schedule saying
which migration step runs at each: so "the guest converts between userspace's
two harvests" is an exact interleaving, run the same way for every protocol
variant. After stop-and-copy the checker compares the destination with the
source at pause; a replay of the guest's own steps says which pages it still
owns and which of seed 001's obligations it broke. The verdict splits the
damage: on pages the guest owns, the protocol is to blame; on pages the
guest disowned by its own actions, the guest is.

The guest's obligations (seed 001, and commit f4495615d76c for READY):
- O1 announce before use: once it has reported READY, a guest writes a page
  under a C-bit only after announcing that state (Sean's #1: writing, then
  the hypercall, loses the data written before it);
- O2 data is gone once a conversion is announced: a page's contents are
  undefined from its announcement until the guest writes it again, so
  converting twice is not a no-op (Sean's #3; Steve Rutherford: "the kernel
  must reinitialize that page");
- O3 READY last: the guest reports READY only when every page's C-bit is
  announced (R2);
- O4 announce what it converts: the announced range is the converted one,
  computed from bytes, not rounded page counts (R1, commit ac3f9c9f1b37).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from guestmem import api, uapi
from guestmem import program as p
from guestmem.extents import ExtentMap
from guestmem.machine import GuestImage
from guestmem.vmm.migration import (
    SAFE_GMEM,
    SAFE_SEV,
    VARIANTS,
    Design,
    Destination,
    MigrationRefused,
    Sent,
    Source,
    Stats,
    Variant,
)
from guestmem.vmm.transport import TransportKey
from guestmem.vmm.vmm import Vmm

PAGE = uapi.PAGE_SIZE
DATA = 0x1_0000_0000  # the scenarios' guest memory, 1 MiB of it
DATA_SIZE = 1 << 20
P = DATA + 0x10000  # "the page" of each scenario
Q = P + PAGE  # its neighbour


# --- the guest's obligations ---------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    obligation: str  # "O1".."O4"
    gfn: int
    pages: int
    step: int  # index of the guest's step that broke it
    detail: str


@dataclass
class GuestAccount:
    """What a replay of the guest's steps knows: the state it announced per gfn,
    its C-bit view, which pages it still owns (wrote since their last
    announcement, under the announced state), and what it broke."""

    sev: bool
    preserves: bool = False  # a conversion keeps the data (pKVM, SW_PROTECTED in place)
    announced: ExtentMap[bool] = field(default_factory=ExtentMap)  # gfn -> private
    view: ExtentMap[bool] = field(default_factory=ExtentMap)
    owned: ExtentMap[bool] = field(default_factory=ExtentMap)
    written: ExtentMap[bool] = field(default_factory=ExtentMap)
    ready: bool = False
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sev:  # SEV memory starts private, and the guest's C-bit set
            self.announced.set(0, 1 << 40, True)
            self.view.set(0, 1 << 40, True)

    def replay(self, steps: tuple[p.Step, ...], reports: Iterator[int], first: int = 0) -> None:
        for index, step in enumerate(steps, first):
            self._step(index, step, reports)

    def _step(self, index: int, step: p.Step, reports: Iterator[int]) -> None:
        match step:
            case p.MapGpaRange(gpa=gpa, npages=npages, encrypted=private):
                if next(reports, 0) != 0:
                    return  # refused: nothing changed, the guest knows it
                gfn = gpa // PAGE
                if not step.sets_view:
                    for lo, hi in self._differing(self.view, gfn, gfn + npages, private):
                        self._broke("O4", lo, hi, index, "announced pages it did not convert")
                        self.owned.clear(lo, hi)  # it gave their protection away
                if not self.sev and not self.preserves:  # the conversion itself: O2
                    for lo, hi in self._differing(self.announced, gfn, gfn + npages, private):
                        self.owned.clear(lo, hi)
                self.announced.set(gfn, gfn + npages, True if private else None)
                if step.sets_view and self.sev:
                    self._set_view(gfn, gfn + npages, private)
            case p.SetCBit(gpa=gpa, npages=npages, encrypted=private):
                self._set_view(gpa // PAGE, gpa // PAGE + npages, private)
            case p.WritePattern(gpa=gpa, length=length):
                lo, hi = gpa // PAGE, -(-(gpa + length) // PAGE)
                self.written.set(lo, hi, True)
                self.owned.set(lo, hi, True)
                if self.ready and self.sev:
                    for a, b in self._mismatched(lo, hi):
                        self._broke("O1", a, b, index, "wrote under a C-bit it had not announced")
                        self.owned.clear(a, b)
            case p.VerifyPattern(gpa=gpa, length=length):
                first = next(reports, 0)
                if first == p.MISMATCH_TAG:
                    next(reports, 0)
                    next(reports, 0)
                lo, hi = gpa // PAGE, -(-(gpa + length) // PAGE)
                for a, b in self.owned.gaps(lo, hi):
                    self._broke("O2", a, b, index, "expects data it no longer owns (converted "
                                "since, or written against O1/O4)")
            case p.ReadValue() | p.Report():
                next(reports, 0)
            case p.MigrationReady():
                if self.sev:
                    for a, b in self._mismatched(DATA // PAGE, (DATA + DATA_SIZE) // PAGE):
                        self._broke("O3", a, b, index, "reported READY with pages unannounced")
                self.ready = True
            case _:
                pass

    def _set_view(self, lo: int, hi: int, private: bool) -> None:
        """A C-bit flip: what the page held under the old bit is gone for the guest
        (O2); an unchanged bit keeps it (reporting an already shared page)."""
        for a, b in self._differing(self.view, lo, hi, private):
            self.owned.clear(a, b)
        self.view.set(lo, hi, True if private else None)

    def _mismatched(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """gfns of [lo, hi) whose C-bit differs from what the guest announced."""
        out = []
        for a, b, v in _spans(self.view, lo, hi):
            out += [(x, y) for x, y in self._differing(self.announced, a, b, v)]
        return out

    @staticmethod
    def _differing(emap: ExtentMap[bool], lo: int, hi: int, value: bool) -> list[tuple[int, int]]:
        return [(a, b) for a, b, v in _spans(emap, lo, hi) if v != value]

    def _broke(self, obligation: str, lo: int, hi: int, step: int, detail: str) -> None:
        self.violations.append(Violation(obligation, lo, hi - lo, step, detail))

    def owns(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _ in self.owned.overlapping(lo, hi)]


def _spans(emap: ExtentMap[bool], lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    """[lo, hi) cut where emap changes: (start, end, value or False)."""
    pos = lo
    for a, b, v in emap.overlapping(lo, hi):
        if a > pos:
            yield pos, a, False
        yield max(a, lo), min(b, hi), bool(v)
        pos = min(b, hi)
    if pos < hi:
        yield pos, hi, False


# --- the checker -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    kind: str  # "lost", "corrupted", "state", "list", "leaked"
    gfn: int
    pages: int
    detail: str = ""


View = list[tuple[int, int, api.Run, bool]]  # (gpa lo, gpa hi, run, private)


def guest_memory(vmm: Vmm) -> View:
    """What the guest reads in every memslot, and where it is private: the
    firmware's view where the backend has one (the model), else the host
    mapping (a VM whose memory nothing protects)."""
    out: View = []
    for region in vmm.regions:
        if isinstance(vmm.vm, api.Firmware):
            pieces = vmm.vm.guest_view(region.gpa, region.size)
        else:
            pieces = [(api.Run(0, region.size, region.mapping.read(0, region.size)), False)]
        out += [(region.gpa + r.start, region.gpa + r.end, r, private) for r, private in pieces]
    return out


def compare(before: View, after: View, owned: Callable[[int, int], list[tuple[int, int]]]
            ) -> list[Finding]:
    """Pages whose state differs (any page), or whose contents differ (pages the
    guest owns): "lost" where the destination reads zeros, else "corrupted"."""
    findings: list[Finding] = []
    for lo, hi, a, b in _aligned(before, after):
        g0, g1 = lo // PAGE, -(-hi // PAGE)
        if a[1] != b[1]:
            findings.append(Finding("state", g0, g1 - g0, f"{'private' if a[1] else 'shared'} "
                                    f"at pause, {'private' if b[1] else 'shared'} after"))
            continue
        if _same(a[0], a[2], b[0], b[2], lo, hi):
            continue
        for o0, o1 in owned(g0, g1):
            kind = "lost" if _zero(b[0], b[2], o0 * PAGE, o1 * PAGE) else "corrupted"
            findings.append(Finding(kind, o0, o1 - o0))
    return _merge_findings(findings)


def _aligned(before: View, after: View) -> Iterator[tuple[int, int, tuple[api.Run, bool, int],
                                                     tuple[api.Run, bool, int]]]:
    """Both views cut at each other's boundaries: (lo, hi, (run, private, base) x2)."""
    i = j = 0
    while i < len(before) and j < len(after):
        a, b = before[i], after[j]
        lo, hi = max(a[0], b[0]), min(a[1], b[1])
        if lo < hi:
            yield lo, hi, (a[2], a[3], a[0] - a[2].start), (b[2], b[3], b[0] - b[2].start)
        if a[1] <= b[1]:
            i += 1
        else:
            j += 1


def _same(run_a: api.Run, base_a: int, run_b: api.Run, base_b: int, lo: int, hi: int) -> bool:
    if run_a.data is None and run_b.data is None:
        return run_a.step == run_b.step and _word(run_a, base_a, lo) == _word(run_b, base_b, lo)
    return _bytes(run_a, base_a, lo, hi) == _bytes(run_b, base_b, lo, hi)


def _word(run: api.Run, base: int, at: int) -> int:
    return (run.word + (at - base - run.start) // 8 * run.step) & (2**64 - 1)


def _bytes(run: api.Run, base: int, lo: int, hi: int) -> bytes:
    if run.data is not None:
        return run.data[lo - base - run.start:hi - base - run.start]
    first = _word(run, base, lo)
    words = -(-(hi - lo) // 8)
    return struct.pack(f"<{words}Q", *((first + i * run.step) & (2**64 - 1)
                                      for i in range(words)))[:hi - lo]


def _zero(run: api.Run, base: int, lo: int, hi: int) -> bool:
    if run.data is None:
        return run.word == 0 and run.step == 0
    return not any(_bytes(run, base, lo, hi))


def _merge_findings(findings: list[Finding]) -> list[Finding]:
    out: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.kind, f.gfn)):
        last = out[-1] if out else None
        if last is not None and last.kind == f.kind and last.gfn + last.pages == f.gfn and \
                last.detail == f.detail:
            out[-1] = replace(last, pages=last.pages + f.pages)
        else:
            out.append(f)
    return out


class LeakWatch:
    """Sees every record the source sends: a plaintext one must not carry what the
    guest holds private at that moment (zeros are nobody's data)."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.leaks: list[Finding] = []

    def __call__(self, sent: Sent) -> None:
        if sent.private or not isinstance(self.vmm.vm, api.Firmware):
            return
        gpa = sent.gfn * PAGE
        truth = [(gpa + r.start, gpa + r.end, r, private)
                 for r, private in self.vmm.vm.guest_view(gpa, sent.pages * PAGE)]
        wire = [(gpa + r.start, gpa + r.end, r, False) for r in sent.runs]
        for lo, hi, t, w in _aligned(truth, wire):
            if t[1] and not _zero(t[0], t[2], lo, hi) and _same(t[0], t[2], w[0], w[2], lo, hi):
                self.leaks.append(Finding("leaked", lo // PAGE, -(-hi // PAGE) - lo // PAGE,
                                          f"round {sent.round}"))


# --- scenarios ---------------------------------------------------------------------------------
# Schedule actions: "begin" (start; may be refused), "first"/"second" (the two
# harvests of a round, in the variant's order; the second sends), "round" (both),
# "pause" (stop the vCPU here; stop-and-copy follows).
Schedule = dict[int, tuple[str, ...]]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    source: str
    sev: bool  # an SEV VM (C-bit only) or a guest_memfd VM converting in place
    steps: tuple[p.Step, ...]
    schedule: Schedule
    setup: Callable[[Vmm], None] | None = None
    expects: str = ""  # what the seed says happens: for the README

    @property
    def program(self) -> p.Program:
        return p.Program.of(*self.steps)


def _ready_boot() -> tuple[p.Step, ...]:
    """An SEV guest at boot: its data private (the default), READY reported."""
    return (p.WritePattern(DATA, DATA_SIZE, 0x1000, 1), p.MigrationReady())


def _device_pin(vmm: Vmm) -> None:
    """R9: a device holds P pinned (a VFIO DMA mapping the VMM did not make, so
    it cannot drop it: to-private conversions of P fail with EAGAIN)."""
    region = vmm.region_of(P)
    region.mapping.pin(P - region.gpa, PAGE)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "seed1-write-then-announce", "#1: the guest writes under its new C-bit, then announces",
        "seed 001 (Sean, scenario #1)", True,
        (*_ready_boot(), p.Checkpoint(1), p.SetCBit(P, 1, encrypted=False),
         p.WritePattern(P, PAGE // 2, 0xA1, 1), p.Checkpoint(2),
         p.WritePattern(P + PAGE // 2, PAGE // 2, 0xA1 + PAGE // 16, 1),
         p.MapGpaRange(P, 1, encrypted=False, sets_view=False),
         p.VerifyPattern(P, PAGE, 0xA1, 1)),
        {1: ("begin",), 2: ("round", "pause")},
        expects="the half written before the hypercall arrives as garbage: O1"),
    Scenario(
        "seed1-announce-then-write", "#1 done right: announce, then write",
        "seed 001 (Sean, scenario #1, the guest's fix)", True,
        (*_ready_boot(), p.Checkpoint(1), p.MapGpaRange(P, 1, encrypted=False),
         p.WritePattern(P, PAGE // 2, 0xA1, 1), p.Checkpoint(2),
         p.WritePattern(P + PAGE // 2, PAGE // 2, 0xA1 + PAGE // 16, 1),
         p.VerifyPattern(P, PAGE, 0xA1, 1)),
        {1: ("begin",), 2: ("round", "pause")},
        expects="every variant keeps the page"),
    Scenario(
        "seed2-list-then-dirty", "#2: list harvested, the guest converts and writes, "
        "dirty log harvested", "seed 001 (Sean, scenario #2)", True,
        (*_ready_boot(), p.Checkpoint(1), p.MapGpaRange(P, 1, encrypted=False),
         p.WritePattern(P, PAGE, 0xB2, 1), p.Checkpoint(2), p.Checkpoint(3),
         p.VerifyPattern(P, PAGE, 0xB2, 1)),
        {1: ("begin", "first"), 2: ("second",), 3: ("pause",)},
        expects="with the list first and no resync, the page goes as private: garbage"),
    Scenario(
        "seed3-convert-between-harvests", "#3: the guest converts between the dirty-log "
        "harvest and the list harvest", "seed 001 (Sean, scenario #3)", True,
        (*_ready_boot(), p.Checkpoint(1), p.WritePattern(P, PAGE, 0xC3, 1), p.Checkpoint(2),
         p.MapGpaRange(P, 1, encrypted=False), p.Checkpoint(3), p.Checkpoint(4),
         p.MapGpaRange(P, 1, encrypted=True), p.VerifyPattern(P, PAGE, 0xC3, 1)),
        {1: ("begin",), 2: ("first",), 3: ("second",), 4: ("pause",)},
        expects="the guest reads garbage after converting back: O2 (data is gone once "
                "announced); a variant that keeps a stale list is wrong too"),
    Scenario(
        "convert-twice", "a page converted twice, read expecting the old data",
        "seed 001 (Steve Rutherford: converting twice is not a no-op)", True,
        (*_ready_boot(), p.Checkpoint(1), p.WritePattern(P, PAGE, 0xD4, 1),
         p.MapGpaRange(P, 1, encrypted=False), p.Checkpoint(2),
         p.MapGpaRange(P, 1, encrypted=True), p.Checkpoint(3),
         p.VerifyPattern(P, PAGE, 0xD4, 1)),
        {1: ("begin",), 2: ("round",), 3: ("pause",)},
        expects="the old data is gone on the destination: O2"),
    Scenario(
        "r1-rounded-range", "R1: a rounded page count announces the neighbour shared",
        "R1, commit ac3f9c9f1b37", True,
        (*_ready_boot(), p.Checkpoint(1), p.SetCBit(P, 1, encrypted=False),
         p.MapGpaRange(P, 2, encrypted=False, sets_view=False),
         p.WritePattern(P, PAGE, 0xE5, 1), p.Checkpoint(2),
         p.VerifyPattern(Q, PAGE, 0x1000 + (Q - DATA) // 8, 1)),
        {1: ("begin",), 2: ("round", "pause")},
        expects="the neighbour, still private, goes as plaintext ciphertext: corrupted: O4"),
    Scenario(
        "r2-before-ready", "R2: migration starts before the guest has reported its shared "
        "regions", "R2, commit f4495615d76c", True,
        (p.WritePattern(DATA, DATA_SIZE, 0x1000, 1), p.SetCBit(P, 1, encrypted=False),
         p.WritePattern(P, PAGE, 0xF6, 1), p.Checkpoint(1),
         p.MapGpaRange(P, 1, encrypted=False), p.MigrationReady(), p.Checkpoint(2),
         p.Checkpoint(3), p.VerifyPattern(P, PAGE, 0xF6, 1)),
        {1: ("begin",), 2: ("begin",), 3: ("round", "pause")},
        expects="ungated and without resync the shared page goes as private: garbage"),
    Scenario(
        "r2-paused-before-ready", "R2: the guest is paused before it has reported its "
        "shared regions", "R2, commit f4495615d76c", True,
        (p.WritePattern(DATA, DATA_SIZE, 0x1000, 1), p.SetCBit(P, 1, encrypted=False),
         p.WritePattern(P, PAGE, 0xF7, 1), p.Checkpoint(1), p.Checkpoint(2),
         p.MapGpaRange(P, 1, encrypted=False), p.MigrationReady(),
         p.VerifyPattern(P, PAGE, 0xF7, 1)),
        {1: ("begin",), 2: ("round", "pause")},
        expects="only READY gating saves it: it refuses, and the guest runs on at the source"),
    Scenario(
        "r9-two-meanings", "R9: MAP_GPA_RANGE as conversion and as SEV-LM notification on "
        "one VM; a conversion fails", "R9, QEMU kvm_handle_hc_map_gpa_range", False,
        (p.WritePattern(DATA, DATA_SIZE, 0x2000, 1), p.MigrationReady(), p.Checkpoint(1),
         p.MapGpaRange(P, 1, encrypted=True), p.WritePattern(P, PAGE, 0x97, 1),
         p.Checkpoint(2), p.VerifyPattern(P, PAGE, 0x97, 1)),
        {1: ("begin",), 2: ("round", "pause")}, setup=_device_pin,
        expects="a list of requests says private where the conversion failed"),
    Scenario(
        "convert-without-write", "guest_memfd: a page converted between rounds and never "
        "written", "ecosystem.md §3.3 (classification dirty)", False,
        (p.MapGpaRange(P, 1, encrypted=True), p.WritePattern(P, PAGE, 0x88, 1),
         p.MigrationReady(), p.Checkpoint(1), p.MapGpaRange(P, 1, encrypted=False), p.Checkpoint(2),
         p.VerifyPattern(P, PAGE, 0x88, 1)),
        {1: ("begin", "round"), 2: ("round", "pause")},
        expects="without classification dirty the destination keeps the page private"),
)}


# --- running one -------------------------------------------------------------------------------
@dataclass
class Verdict:
    scenario: str
    variant: str
    migrated: bool
    refused: list[int]  # checkpoints where the source refused to start
    damage: list[Finding]  # on pages the guest owns, or of state / list: the protocol's
    disowned: list[Finding]  # on pages the guest gave up: its own doing
    leaks: list[Finding]
    violations: list[Violation]
    guest_failures: list[int]  # gpas where the destination's guest read wrong data
    stats: Stats
    # what the destination noticed: pages placed in a state the source's final
    # attributes contradict (a conversion that never reached it)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The protocol lost, corrupted and leaked nothing the guest still owns (a
        refusal to start loses nothing: the guest runs on at the source)."""
        return not self.damage and not self.leaks and (self.migrated or
                                                       not self.guest_failures)

    @property
    def outcome(self) -> str:
        if not self.migrated:
            return "refused"
        kinds = sorted({f.kind for f in self.damage + self.leaks})
        return "ok" if not kinds else "+".join(kinds)

    def guest_blame(self) -> str:
        return ",".join(sorted({v.obligation for v in self.violations}))

    def as_json(self) -> dict[str, object]:
        def f(x: Finding) -> dict[str, object]:
            return {"kind": x.kind, "gpa": x.gfn * PAGE, "pages": x.pages, "detail": x.detail}
        return {"scenario": self.scenario, "variant": self.variant, "outcome": self.outcome,
                "passed": self.passed, "refused_at": self.refused,
                "damage": [f(x) for x in self.damage], "leaks": [f(x) for x in self.leaks],
                "disowned": [f(x) for x in self.disowned],
                "guest_broke": [{"obligation": v.obligation, "gpa": v.gfn * PAGE,
                                 "pages": v.pages, "step": v.step, "detail": v.detail}
                                for v in self.violations],
                "guest_failures": self.guest_failures, "notes": self.notes,
                "stats": self.stats.as_json()}


def model_vmm(sev: bool, variant: Variant) -> Vmm:
    """The source VM of a scenario: SEV on `coco`, or a pKVM-style VM converting in
    place with dirty logging of guest_memfd allowed (the model extension for R10)."""
    from guestmem.model.kvm import Kvm
    from guestmem.model.profile import PROFILES
    if sev:
        vmm = Vmm(Kvm("coco"), uapi.KVM_X86_SEV_VM, backing="anon",
                  map_gpa_list="request", launch_sev=True)
        vmm.add_memory(DATA, DATA_SIZE, "anon")
        return vmm
    profile = replace(PROFILES["inplace"], name="inplace+gmem-dirty-log", gmem_dirty_logging=True)
    lists = "request" if variant.design is Design.SHARED_LIST else "outcome"
    vmm = Vmm(Kvm(profile), uapi.GUESTMEM_PKVM_VM, backing="anon", map_gpa_list=lists)
    vmm.add_memory(DATA, DATA_SIZE, "gmem")
    return vmm


def vm_attributes_vmm(sev: bool, variant: Variant) -> Vmm:
    """The guest_memfd design with the VM's own attributes (no in-place conversion):
    a SW_PROTECTED VM on `coco`, private pages in a guest_memfd and shared ones in
    anonymous memory (the selftests' layout), dirty logging of the memslot allowed
    by the same model extension. SEV scenarios stay on their SEV VM."""
    from guestmem.model.kvm import Kvm
    from guestmem.model.profile import PROFILES
    if sev:
        return model_vmm(sev, variant)
    profile = replace(PROFILES["coco"], name="coco+gmem-dirty-log", gmem_dirty_logging=True)
    lists = "request" if variant.design is Design.SHARED_LIST else "outcome"
    vmm = Vmm(Kvm(profile), uapi.KVM_X86_SW_PROTECTED_VM, backing="anon", map_gpa_list=lists)
    vmm.add_private_memory(DATA, DATA_SIZE)
    return vmm


def run_scenario(scenario: Scenario, variant: Variant,
                 make_vmm: Callable[[bool, Variant], Vmm] = model_vmm) -> Verdict:
    """Run the program on a fresh source, migrate as scheduled, continue on the
    destination, and judge."""
    vmm = make_vmm(scenario.sev, variant)
    if scenario.setup is not None:
        scenario.setup(vmm)
    vmm.load(GuestImage(b"", 0, scenario.program, "port"))
    key, out = TransportKey(), io.BytesIO()
    watch = LeakWatch(vmm)
    source = Source(vmm, variant, key, out, on_send=watch)
    refused: list[int] = []

    def act(label: int, result: object) -> bool:
        for action in scenario.schedule.get(label, ()):
            if action == "begin":
                if source.begun:
                    continue
                try:
                    source.begin()
                except MigrationRefused:
                    refused.append(label)
            elif not source.begun:
                continue  # refused so far: nothing to harvest
            elif action == "first":
                source.harvest_first()
            elif action == "second":
                source.harvest_second()
            elif action == "round":
                source.round()
            elif action == "pause":
                return True
        return False

    vmm.on_checkpoint = act
    result = vmm.run()
    if result.stop != "paused" or not source.begun:
        # never migrated: the guest ran on at the source, which must have lost nothing
        return Verdict(scenario.name, variant.name, False, refused, [], [], [], [],
                       _guest_failures(result), source.stats)
    before = guest_memory(vmm)
    account = GuestAccount(vmm.sev,
                           preserves=vmm.vm.vm_type == uapi.GUESTMEM_PKVM_VM)
    next_step = _paused_at(vmm)
    account.replay(scenario.program.steps[:next_step], iter(result.reports))
    announced_private = _ranges(account.announced)
    source.stop_and_copy()
    source.finish()
    out.seek(0)
    receiver = Destination(vmm.kvm, key)
    dest = receiver.receive(out)
    notes = [f"placed private {_gfn_ranges(placed)}, final {_gfn_ranges(final)}"
             for placed, final in receiver.disagreements]
    after = guest_memory(dest)
    findings = compare(before, after, lambda lo, hi: [(lo, hi)])
    owned = [f for f in findings if f.kind == "state" or account.owns(f.gfn, f.gfn + f.pages)]
    disowned = [f for f in findings if f not in owned]
    damage = owned + _list_findings(dest, announced_private, scenario.sev)
    rest = dest.run()
    account.replay(scenario.program.steps[next_step:], iter(rest.reports), next_step)
    return Verdict(scenario.name, variant.name, True, refused, _merge_findings(damage),
                   disowned, watch.leaks, account.violations, _guest_failures(rest),
                   source.stats, notes)


def _gfn_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{a * PAGE:#x}, {b * PAGE:#x})" for a, b in ranges) or "none"


def _paused_at(vmm: Vmm) -> int:
    vcpu = vmm.vcpu
    if isinstance(vcpu, api.ProgramVcpu):
        return vcpu.program_state().next_step
    raise TypeError("scenarios run on the model: its vCPU knows the program's position")


def _ranges(emap: ExtentMap[bool]) -> list[tuple[int, int]]:
    return [(a, b) for a, b, v in emap.items() if v]


def _list_findings(dest: Vmm, announced: list[tuple[int, int]], sev: bool) -> list[Finding]:
    """The destination's list against what the guest had announced at pause,
    within guest memory: a stale list misleads every later migration."""
    lo, hi = DATA // PAGE, (DATA + DATA_SIZE) // PAGE
    want, got = _clipped(announced, lo, hi), _clipped(dest.tracker.private_gfns(), lo, hi)
    findings = []
    for a, b, w in _spans(want, lo, hi):
        for x, y, g in _spans(got, a, b):
            if g != w:
                findings.append(Finding("list", x, y - x, f"the list says "
                                        f"{'private' if g else 'shared'}"))
    return findings if sev else []


def _clipped(ranges: list[tuple[int, int]], lo: int, hi: int) -> ExtentMap[bool]:
    out: ExtentMap[bool] = ExtentMap()
    for a, b in ranges:
        if max(a, lo) < min(b, hi):
            out.set(max(a, lo), min(b, hi), True)
    return out


def _guest_failures(result: object) -> list[int]:
    reports = list(getattr(result, "reports", []))
    return [reports[i + 1] for i, r in enumerate(reports[:-1]) if r == p.MISMATCH_TAG]


def verdict_table(variants: list[str] | None = None,
                  scenarios: list[str] | None = None) -> list[Verdict]:
    """Every scenario under every variant (or the ones named)."""
    return [run_scenario(SCENARIOS[s], VARIANTS[v])
            for s in (scenarios or list(SCENARIOS)) for v in (variants or list(VARIANTS))]


def safe_variant(scenario: Scenario) -> str:
    """The protocol this project calls safe for the scenario's kind of VM."""
    return SAFE_SEV if scenario.sev else SAFE_GMEM
