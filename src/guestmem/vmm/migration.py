"""Live migration over the declared backend API (issue 11; seed 001).

A `Source` sends a running VM's memory in pre-copy rounds and a final
stop-and-copy; a `Destination` builds the VM from the stream and continues it.
Both use only `api` calls (memslot flags, KVM_GET_DIRTY_LOG, host mappings, vCPU
registers) plus, on the model, its declared extras (`api.ContentRuns` to move
alike pages as one run, `api.Firmware` for what SEV's PSP does, `api.ProgramVcpu`
for the interpreted program's position).

Two ways to know which pages are private (seed 001, ecosystem.md §3):
- the SEV design ("shared-list"): the VMM's shared-regions list, fed by the
  guest's KVM_HC_MAP_GPA_RANGE exits, harvested beside the dirty log;
- the guest_memfd design ("attributes"): the attributes the VMM itself set,
  where a conversion without a write still marks the page to send
  ("classification dirty").
A private page leaves through the modelled firmware export (AES-256-GCM under the
transport key, guestmem.vmm.transport); a shared one as plaintext.

What KVM cannot dirty-log (guest_memfd memslots: check_memory_region_flags
refuses KVM_MEM_LOG_DIRTY_PAGES with KVM_MEM_GUEST_MEMFD, upstream-2026-11.md §4)
moves in stop-and-copy only; `Source.stop_and_copy_only` names those memslots.
"""

from __future__ import annotations

import errno
import io
import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import BinaryIO

from guestmem import api, machine, uapi
from guestmem import program as p
from guestmem.extents import ExtentMap
from guestmem.hypercall import GFN_LIMIT
from guestmem.vmm import stream
from guestmem.vmm.transport import Exporter, Importer, TransportError, TransportKey
from guestmem.vmm.vmm import IN_PLACE, MemoryRegion, Vmm

PAGE = uapi.PAGE_SIZE
SHARED, PRIVATE = 0, 1  # the state byte a private blob is authenticated with
_GFNS = struct.Struct("<QQ")
_RUN = struct.Struct("<QQB")
_FORMULA = struct.Struct("<QQ")
_RAW, _FORMULA_RUN = 0, 1
# Reads of host memory are cut into chunks of this size (the kvm backend copies
# bytes; the model answers in runs whatever the size).
CHUNK = 2 << 20


class Design(Enum):
    SHARED_LIST = "shared-list"
    ATTRIBUTES = "attributes"


@dataclass(frozen=True)
class Variant:
    """A migration protocol. For the SEV design: the order of the two harvests in a
    round (seed 001 #2 is the list harvested before the dirty log), whether
    stop-and-copy re-reads the list and resends what it reclassifies (the
    "resync" of seed 001's reply), whether migration waits for the guest's
    KVM_MIGRATION_READY (R2). For the guest_memfd design: whether conversions
    count as dirty."""

    name: str
    design: Design
    list_before_dirty: bool = False
    resync: bool = True
    ready_gating: bool = True
    classification_dirty: bool = True

    def describe(self) -> str:
        if self.design is Design.ATTRIBUTES:
            return ("attributes, conversions " + ("dirty" if self.classification_dirty
                                                  else "not dirty"))
        return (f"list {'before' if self.list_before_dirty else 'after'} dirty log, "
                f"{'resync' if self.resync else 'no resync'}, "
                f"{'READY-gated' if self.ready_gating else 'ungated'}")


def _sev_variants() -> list[Variant]:
    out = []
    for first in (False, True):
        for resync in (True, False):
            for gated in (True, False):
                name = (f"{'list' if first else 'dirty'}-first"
                        f"{'' if resync else '-noresync'}{'' if gated else '-ungated'}")
                out.append(Variant(name, Design.SHARED_LIST, first, resync, gated))
    return out


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    *_sev_variants(),
    Variant("attributes", Design.ATTRIBUTES),
    Variant("attributes-no-classification", Design.ATTRIBUTES, classification_dirty=False),
)}
# The protocols that survive every scenario (README "Live migration"): for a VM whose
# memory only the C-bit protects, the dirty log before the list, the list resynced in
# stop-and-copy, READY-gated; for a VM with guest_memfd, the attributes with
# conversions as dirty (one meaning of MAP_GPA_RANGE per VM, R9).
SAFE_SEV = "dirty-first"
SAFE_GMEM = "attributes"


class MigrationRefused(Exception):
    """The source will not start: the guest has not reported READY (R2)."""


@dataclass
class RoundStats:
    """One round: pages found dirty (or reclassified), pages and bytes sent, by kind."""

    index: int
    phase: str  # "pre-copy" or "stop-and-copy"
    dirty_pages: int = 0
    sent_pages: int = 0
    private_pages: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


@dataclass
class Stats:
    rounds: list[RoundStats] = field(default_factory=list)
    downtime_seconds: float = 0.0
    stream_bytes: int = 0

    @property
    def downtime_pages(self) -> int:
        return sum(r.sent_pages for r in self.rounds if r.phase == "stop-and-copy")

    def as_json(self) -> dict[str, object]:
        return {"rounds": [vars(r) for r in self.rounds],
                "downtime_pages": self.downtime_pages,
                "downtime_ms": round(self.downtime_seconds * 1000, 3),
                "stream_bytes": self.stream_bytes}


@dataclass(frozen=True)
class Sent:
    """What one record carried: for the migration checker (leaks) and the numbers."""

    gfn: int
    pages: int
    private: bool
    runs: list[api.Run]
    round: int


# --- runs: the payload of a memory record ------------------------------------------------------
def encode_runs(gfn: int, pages: int, runs: list[api.Run]) -> bytes:
    """gfn and page count, then each run: start, length, kind, and the bytes (raw)
    or the formula's first word and step."""
    return b"".join(encode_run_parts(gfn, pages, runs))


def encode_run_parts(gfn: int, pages: int, runs: list[api.Run]) -> list[bytes]:
    """encode_runs as the parts it joins (a record writes them without a copy)."""
    out = [_GFNS.pack(gfn, pages)]
    for run in runs:
        if run.data is not None:
            out += [_RUN.pack(run.start, run.end - run.start, _RAW), run.data]
        else:
            out += [_RUN.pack(run.start, run.end - run.start, _FORMULA_RUN),
                    _FORMULA.pack(run.word & (2**64 - 1), run.step & (2**64 - 1))]
    return out


def decode_runs(payload: bytes) -> tuple[int, int, list[api.Run]]:
    """encode_runs' inverse; stream.StreamError if the runs do not tile the pages."""
    if len(payload) < _GFNS.size:
        raise stream.StreamError("a memory record shorter than its gfn and page count")
    gfn, pages = _GFNS.unpack_from(payload)
    pos, runs, covered = _GFNS.size, [], 0
    while pos < len(payload):
        if pos + _RUN.size > len(payload):
            raise stream.StreamError(f"gfn {gfn:#x}: a run header is cut short")
        start, length, kind = _RUN.unpack_from(payload, pos)
        pos += _RUN.size
        if start != covered or length == 0 or kind not in (_RAW, _FORMULA_RUN):
            raise stream.StreamError(f"gfn {gfn:#x}: runs do not tile the pages")
        if kind == _FORMULA_RUN and (start % 8 or length % 8):
            raise stream.StreamError(f"gfn {gfn:#x}: a formula run not of whole 64-bit words")
        if kind == _RAW:
            data = payload[pos:pos + length]
            if len(data) != length:
                raise stream.StreamError(f"gfn {gfn:#x}: a run's bytes are cut short")
            runs.append(api.Run(start, start + length, data))
            pos += length
        else:
            if pos + _FORMULA.size > len(payload):
                raise stream.StreamError(f"gfn {gfn:#x}: a formula is cut short")
            word, step = _FORMULA.unpack_from(payload, pos)
            runs.append(api.Run(start, start + length, None, word, step))
            pos += _FORMULA.size
        covered += length
    if covered != pages * PAGE:
        raise stream.StreamError(f"gfn {gfn:#x}: runs cover {covered} bytes of {pages} pages")
    return gfn, pages, runs


def zero_runs(data: bytes, base: int = 0) -> list[api.Run]:
    """Bytes read from a host mapping as runs: whole zero pages as one formula
    (QEMU's zero-page flag), the rest as bytes. One pass, each run cut once:
    growing a run page by page would copy its bytes again for every page
    (quadratic: 40 MB/s on the kvm backend with 2 MiB chunks)."""
    zero = bytes(PAGE)
    kinds = [data.startswith(zero[:min(PAGE, len(data) - off)], off)
             for off in range(0, len(data), PAGE)]
    cuts = [0, *(i * PAGE for i in range(1, len(kinds)) if kinds[i] != kinds[i - 1]),
            len(data)]
    return [api.Run(base + a, base + b, None if kinds[a // PAGE] else data[a:b])
            for a, b in zip(cuts, cuts[1:], strict=False) if a < b]


def canonical_runs(runs: list[api.Run]) -> list[api.Run]:
    """The same contents, cut the same way whoever wrote them: adjacent formulas
    that continue each other, and adjacent bytes, merged (for digests of memory
    that the model keeps as runs)."""
    out: list[api.Run] = []
    for run in runs:
        last = out[-1] if out else None
        if last is not None and last.end == run.start:
            if last.data is None and run.data is None and last.step == run.step and \
                    (last.word + (last.end - last.start) // 8 * last.step - run.word) % 2**64 == 0:
                out[-1] = api.Run(last.start, run.end, None, last.word, last.step)
                continue
            if last.data is not None and run.data is not None:
                out[-1] = api.Run(last.start, run.end, last.data + run.data)
                continue
        out.append(run)
    return out


def bitmap_ranges(bitmap: bytes, npages: int) -> list[tuple[int, int]]:
    """KVM_GET_DIRTY_LOG's bitmap as [first, last) page ranges: whole 0xff bytes at
    C speed, bits only in the bytes at the edges of runs."""
    out: list[tuple[int, int]] = []

    def add(lo: int, hi: int) -> None:
        hi = min(hi, npages)
        if lo >= hi:
            return
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))

    for m in re.finditer(rb"[^\x00]+", bitmap):
        for piece in re.finditer(rb"\xff+|[^\xff]", m.group()):
            base = (m.start() + piece.start()) * 8
            if piece.group()[0] == 0xFF:
                add(base, base + 8 * len(piece.group()))
                continue
            byte = piece.group()[0]
            for bit in range(8):
                if byte >> bit & 1:
                    add(base + bit, base + bit + 1)
    return out


# --- the source --------------------------------------------------------------------------------
class Source:
    """The sending side. Drive it with begin(), then round() (or its two halves,
    harvest_first() and harvest_second(), between which a scenario lets the guest
    run), then stop_and_copy() once the vCPU is paused, then finish()."""

    def __init__(self, vmm: Vmm, variant: Variant, key: TransportKey, out: BinaryIO,
                 on_send: Callable[[Sent], None] | None = None) -> None:
        self.vmm = vmm
        self.variant = variant
        self.writer = stream.StreamWriter(out)
        self.exporter = Exporter(key)
        self.on_send = on_send
        self.stats = Stats()
        self.logged: list[MemoryRegion] = []  # memslots KVM dirty-logs for us
        self.stop_and_copy_only: list[MemoryRegion] = []  # those it will not (guest_memfd)
        self._list: list[tuple[int, int]] = []  # the harvested private list (SEV design)
        self._dirty: list[tuple[int, int]] = []  # harvested, not yet sent
        self._sent_private: ExtentMap[bool] = ExtentMap()  # how each gfn was last sent
        self._first_half = False
        self._round = 0
        self.begun = False

    @property
    def design(self) -> Design:
        return self.variant.design

    # -- start --
    def begin(self) -> None:
        """Refuse until READY if gated (R2); turn on dirty logging where KVM allows it;
        send the configuration and, as the first round, everything."""
        if self.variant.ready_gating and self.design is Design.SHARED_LIST and \
                not self.vmm.migration_ready:
            raise MigrationRefused("the guest has not reported KVM_MIGRATION_READY through "
                                   "MSR_KVM_MIGRATION_CONTROL: its shared regions may not "
                                   "all be in the list yet (R2)")
        try:
            for region in self.vmm.regions:
                (self.logged if self._log_dirty(region) else self.stop_and_copy_only).append(
                    region)
            self._config()
        except BaseException:  # a failed start leaves the memslots as they were
            self.resume()
            self.stop_and_copy_only = []
            raise
        self.begun = True
        self._dirty = [(r.gpa // PAGE, (r.gpa + r.size) // PAGE) for r in self.logged]
        self._harvest_list()
        self._send_dirty("pre-copy")

    def _log_dirty(self, region: MemoryRegion) -> bool:
        """KVM_MEM_LOG_DIRTY_PAGES on the memslot (a flags-only change), if KVM takes it."""
        flags = uapi.KVM_MEM_GUEST_MEMFD if region.gmem is not None else 0
        try:
            self.vmm.vm.set_user_memory_region2(
                region.slot, flags | uapi.KVM_MEM_LOG_DIRTY_PAGES, region.gpa, region.size,
                region.mapping.addr, region.gmem if region.gmem is not None else 0,
                region.gmem_offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False  # check_memory_region_flags: no dirty logging of guest_memfd
        return True

    def _config(self) -> None:
        """CONF: the VM type, the memslots (gpa, size, backing) and the design."""
        regions = [{"gpa": r.gpa, "size": r.size, "backing": r.backing, "slot": r.slot}
                   for r in self.vmm.regions]
        payload = {"vm_type": self.vmm.vm.vm_type, "design": self.design.value,
                   "regions": regions, "in_place": self.vmm.in_place, "sev": self.vmm.sev}
        self.writer.record(stream.CONFIG, _json(payload))

    # -- pre-copy --
    def round(self) -> RoundStats:
        """One pre-copy round: both harvests in the variant's order, then the sends."""
        self.harvest_first()
        return self.harvest_second()

    def harvest_first(self) -> None:
        if self.design is Design.SHARED_LIST and self.variant.list_before_dirty:
            self._harvest_list()
        else:
            self._harvest_dirty()
        self._first_half = True

    def harvest_second(self) -> RoundStats:
        if not self._first_half:
            self.harvest_first()
        if self.design is Design.SHARED_LIST and self.variant.list_before_dirty:
            self._harvest_dirty()
        else:
            self._harvest_list()
        self._first_half = False
        return self._send_dirty("pre-copy")

    def _harvest_dirty(self) -> None:
        """KVM_GET_DIRTY_LOG of every logged memslot (cleared as read); with the
        attributes design and classification-dirty, the conversions since too."""
        vm = self.vmm.vm
        for region in self.logged:
            base, npages = region.gpa // PAGE, region.size // PAGE
            if isinstance(vm, api.DirtyLogRanges):
                ranges = vm.get_dirty_log_ranges(region.slot)
            else:
                ranges = bitmap_ranges(vm.get_dirty_log(region.slot, npages), npages)
            self._dirty += [(base + lo, base + hi) for lo, hi in ranges]
        if self.design is Design.ATTRIBUTES and self.variant.classification_dirty:
            self._dirty += self.vmm.attributes.harvest_changed()

    def _harvest_list(self) -> None:
        """The private ranges as the VMM knows them now: its shared-regions list (SEV)
        or the attributes it set (guest_memfd)."""
        record = self.vmm.tracker if self.design is Design.SHARED_LIST else self.vmm.attributes
        self._list = record.private_gfns()

    def _send_dirty(self, phase: str) -> RoundStats:
        started = time.perf_counter()
        stats = RoundStats(self._round, phase)
        dirty = _merge(self._dirty)
        self._dirty = []
        stats.dirty_pages = sum(hi - lo for lo, hi in dirty)
        for lo, hi in dirty:
            self._send_range(lo, hi, stats)
        stats.seconds = time.perf_counter() - started
        self.stats.rounds.append(stats)
        self._round += 1
        return stats

    def _send_range(self, lo: int, hi: int, stats: RoundStats) -> None:
        """Send gfns [lo, hi) classified by the harvested list, memslot by memslot,
        in chunks."""
        for start, end, private in _classify(self._list, lo, hi):
            for region in self.vmm.regions:
                a = max(start, region.gpa // PAGE)
                b = min(end, (region.gpa + region.size) // PAGE)
                while a < b:
                    n = min(b - a, CHUNK // PAGE) if not isinstance(
                        region.mapping, api.ContentRuns) else b - a
                    self._send_pages(region, a, n, private, stats)
                    a += n

    def _send_pages(self, region: MemoryRegion, gfn: int, pages: int, private: bool,
                    stats: RoundStats) -> None:
        gpa, length = gfn * PAGE, pages * PAGE
        if private:
            runs = self._export(region, gpa, length)
            payload = encode_runs(gfn, pages, runs)
            blob = self.exporter.export(gfn, pages, PRIVATE, payload)
            self.writer.record(stream.PRIVATE, blob)
            stats.private_pages += pages
            stats.bytes_sent += len(blob)
        else:
            runs = self._read_shared(region, gpa, length)
            parts = encode_run_parts(gfn, pages, runs)
            self.writer.record(stream.PAGES, parts)
            stats.bytes_sent += sum(len(part) for part in parts)
        stats.sent_pages += pages
        self._sent_private.set(gfn, gfn + pages, True if private else None)
        if self.on_send is not None:
            self.on_send(Sent(gfn, pages, private, runs, self._round))

    def _read_shared(self, region: MemoryRegion, gpa: int, length: int) -> list[api.Run]:
        """A host read through the memslot's mapping (of ciphertext, if the page
        is in fact private: the host sees nothing else)."""
        offset = gpa - region.gpa
        if isinstance(region.mapping, api.ContentRuns):
            return region.mapping.content_runs(offset, length)
        return zero_runs(region.mapping.read(offset, length))

    def _export(self, region: MemoryRegion, gpa: int, length: int) -> list[api.Run]:
        """SEND_UPDATE_DATA's plaintext: the firmware's read where the backend has
        one (api.Firmware), else the host mapping: a VM whose memory nothing
        encrypts (this host's default VM) reads the same either way."""
        if isinstance(self.vmm.vm, api.Firmware):
            return self.vmm.vm.firmware_export(gpa, length, True)
        return self._read_shared(region, gpa, length)

    # -- stop-and-copy --
    def stop_and_copy(self) -> RoundStats:
        """The vCPU is paused: the last harvests, the resync of what changed
        classification (if the variant does it), every page KVM could not log,
        the list or attributes, and the vCPU."""
        started = time.perf_counter()
        self.vmm.settle_vcpu()
        if self._first_half:
            self.harvest_second()
        self._harvest_dirty()
        previous = self._list
        self._harvest_list()
        if not self.variant.resync and self.design is Design.SHARED_LIST:
            self._list = previous  # the stale list is what goes, and what it is sent with
        elif self.design is Design.SHARED_LIST:
            self._dirty += self._reclassified(previous)
        self._dirty += [(r.gpa // PAGE, (r.gpa + r.size) // PAGE)
                        for r in self.stop_and_copy_only]
        stats = self._send_dirty("stop-and-copy")
        self._send_state()
        self.stats.downtime_seconds = time.perf_counter() - started
        return stats

    def _reclassified(self, previous: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """gfns already sent under a classification the final list contradicts."""
        out = []
        for lo, hi, private in _classify(self._list, 0, GFN_LIMIT):
            for a, b, was in _sent_runs(self._sent_private, lo, hi):
                if was != private:
                    out.append((a, b))
        return out

    def _send_state(self) -> None:
        kind = stream.SHARED_LIST if self.design is Design.SHARED_LIST else stream.ATTRIBUTES
        self.writer.record(kind, b"".join(_GFNS.pack(lo, hi - lo) for lo, hi in self._list))
        self.writer.record(stream.VCPU, self._vcpu_state())

    def _vcpu_state(self) -> bytes:
        """Registers and special registers; on the model, the program's position."""
        vcpu = self.vmm.vcpu
        regs, sregs = bytes(vcpu.get_regs()), bytes(vcpu.get_sregs())
        model = b""
        if isinstance(vcpu, api.ProgramVcpu):
            state = vcpu.program_state()
            model = _json({"next_step": state.next_step, "abi": state.hypercall_abi,
                           "migration_control": state.migration_control,
                           "encrypted": [list(r) for r in state.encrypted],
                           "program": p.encode_program(state.program)})
        return struct.pack("<II", len(regs), len(sregs)) + regs + sregs + model

    def finish(self) -> None:
        """FINI (the firmware's sealed count of private blobs), then END: the
        destination may run. The source stays as it is: it is the caller's to
        resume (the destination refused) or destroy (SEND_FINISH)."""
        self.writer.record(stream.FINISH, self.exporter.finish())
        self.writer.end()
        self.stats.stream_bytes = self.writer.written

    def resume(self) -> None:
        """Give up: dirty logging off again; the source VM runs on, unchanged."""
        for region in self.logged:
            flags = uapi.KVM_MEM_GUEST_MEMFD if region.gmem is not None else 0
            self.vmm.vm.set_user_memory_region2(
                region.slot, flags, region.gpa, region.size, region.mapping.addr,
                region.gmem if region.gmem is not None else 0, region.gmem_offset)
        self.logged = []


def _classify(private: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    """[lo, hi) cut by the private ranges (sorted, disjoint): (start, end, private)."""
    pos = lo
    for a, b in private:
        if b <= pos or a >= hi:
            continue
        a, b = max(a, pos), min(b, hi)
        if a > pos:
            yield pos, a, False
        yield a, b, True
        pos = b
    if pos < hi:
        yield pos, hi, False


def _sent_runs(sent: ExtentMap[bool], lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    """[lo, hi) by how each gfn last went: (start, end, private). A gfn never sent
    counts as shared: guest_memfd memslots go whole at stop-and-copy anyway, and
    every logged gfn went in the first round."""
    return _classify([(a, b) for a, b, _ in sent.overlapping(lo, hi)], lo, hi)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _unjson(payload: bytes, what: str) -> dict[str, object]:
    try:
        obj = json.loads(payload)
    except ValueError as e:
        raise stream.StreamError(f"{what}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise stream.StreamError(f"{what}: not an object")
    return obj


# --- the destination ---------------------------------------------------------------------------
BACKINGS = ("gmem", "gmem+shared", IN_PLACE, "anon")
MAX_GUEST = 1 << 52  # x86-64 physical addresses


@dataclass(frozen=True)
class ConfRegion:
    gpa: int
    size: int
    backing: str


def _kind(backing: str) -> str:
    return "anon" if backing == "anon" else "gmem"


def _check_config(conf: dict[str, object]) -> tuple[Design, int, bool, list[ConfRegion]]:
    """The CONF record, checked before anything is built: a design, a VM type, the
    SEV flag, and memslots of page-aligned, non-empty, disjoint guest-physical
    ranges below 2^52, the first at GPA 0; StreamError naming what is wrong."""
    def bad(what: str) -> stream.StreamError:
        return stream.StreamError(f"the configuration: {what}")

    try:
        design = Design(conf.get("design"))
    except ValueError:
        raise bad(f"unknown design {conf.get('design')!r}") from None
    vm_type, sev, raw = conf.get("vm_type"), conf.get("sev", False), conf.get("regions")
    if not isinstance(vm_type, int) or isinstance(vm_type, bool) or not 0 <= vm_type < 2**32:
        raise bad(f"vm_type {vm_type!r}")
    if not isinstance(sev, bool):
        raise bad(f"sev {sev!r}")
    if not isinstance(raw, list) or not raw or len(raw) > 512:
        raise bad("regions must be a list of 1 to 512 memslots")
    regions, end = [], 0
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad(f"region {i} is not an object")
        gpa, size, backing = item.get("gpa"), item.get("size"), item.get("backing")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (gpa, size)):
            raise bad(f"region {i}: gpa and size must be integers")
        assert isinstance(gpa, int) and isinstance(size, int)
        if gpa % PAGE or size % PAGE or size <= 0 or gpa < end or gpa + size > MAX_GUEST:
            raise bad(f"region {i}: [{gpa:#x}, +{size:#x}) is not page-aligned, non-empty, "
                      "in order and below 2^52")
        if backing not in BACKINGS:
            raise bad(f"region {i}: backing {backing!r}")
        assert isinstance(backing, str)
        regions.append(ConfRegion(gpa, size, backing))
        end = gpa + size
    if regions[0].gpa != 0:
        raise bad("no low memory at GPA 0")
    return design, vm_type, sev, regions


class Destination:
    """The receiving side: builds the VM the CONF record describes, places each
    record's pages in the state they were sent with, takes the list or attributes
    and the vCPU, and refuses anything wrong with a StreamError or TransportError
    (the VM it built is then closed: nothing of it runs)."""

    def __init__(self, kvm: api.Kvm, key: TransportKey, make_vmm: Callable[..., Vmm] | None = None
                 ) -> None:
        self.kvm = kvm
        self.key = key
        self.importer = Importer(key)
        self.finished = False
        self.make_vmm = make_vmm or Vmm
        self.vmm: Vmm | None = None
        self.design: Design | None = None
        self.received: list[Sent] = []
        # (as placed, as the source's final attributes had them) where they differ
        self.disagreements: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []

    def receive(self, source: BinaryIO) -> Vmm:
        """Read the whole stream; the VMM, ready to run(), or an exception."""
        try:
            for record in stream.read_records(source):
                self._apply(record)
            if self.vmm is None or self.vmm.image is None:
                raise stream.StreamError("the stream has no configuration or no vCPU state")
            if not self.finished:
                raise stream.StreamError("the stream has no finish record: its private "
                                         "pages cannot be known complete")
            return self.vmm
        except BaseException:
            if self.vmm is not None:
                self.vmm.close()
                self.vmm = None
            raise

    def _apply(self, record: stream.Record) -> None:
        if self.finished:
            raise stream.StreamError(f"record {record.sequence} ({record.tag.decode()}) "
                                     "after the finish record")
        if record.tag == stream.CONFIG:
            self._configure(record)
            return
        if self.vmm is None:
            raise stream.StreamError(f"record {record.sequence} ({record.tag.decode()}) "
                                     "before the configuration")
        if record.tag == stream.PAGES:
            self._place(*decode_runs(record.payload), private=False)
        elif record.tag == stream.PRIVATE:
            try:
                imported = self.importer.import_pages(record.payload)
            except TransportError as e:
                raise stream.StreamError(f"record {record.sequence} (PRIV): {e}") from None
            gfn, pages, runs = decode_runs(imported.data)
            if (gfn, pages) != (imported.gfn, imported.pages) or imported.state != PRIVATE:
                raise stream.StreamError(f"record {record.sequence} (PRIV): the blob's "
                                         "gfn, size or state differs from its contents")
            self._place(gfn, pages, runs, private=True)
        elif record.tag in (stream.SHARED_LIST, stream.ATTRIBUTES):
            self._take_state(record)
        elif record.tag == stream.VCPU:
            self._take_vcpu(record.payload)
        elif record.tag == stream.FINISH:
            try:
                self.importer.finish(record.payload)
            except TransportError as e:
                raise stream.StreamError(f"record {record.sequence} (FINI): {e}") from None
            self.finished = True

    def _configure(self, record: stream.Record) -> None:
        if self.vmm is not None:
            raise stream.StreamError(f"record {record.sequence}: a second configuration")
        conf = _unjson(record.payload, "the configuration")
        design, vm_type, sev, regions = _check_config(conf)
        self.design = design
        low = regions[0]
        try:
            # an SEV source's context is received (RECEIVE_START: encryption on here too)
            vmm = self.make_vmm(self.kvm, vm_type, backing=_kind(low.backing),
                                low_memory_size=low.size, launch_sev=sev)
            self.vmm = vmm
            for region in regions[1:]:
                if region.backing == "gmem+shared" or (region.backing == IN_PLACE
                                                       and not vmm.in_place):
                    vmm.add_private_memory(region.gpa, region.size)
                else:
                    vmm.add_memory(region.gpa, region.size, _kind(region.backing))
        except (OSError, ValueError) as e:
            raise stream.StreamError(f"cannot build the VM the configuration describes: "
                                     f"{e}") from None
        got = [(r.gpa, r.size, r.backing) for r in vmm.regions]
        want = [(r.gpa, r.size, r.backing) for r in regions]
        if got != want:
            raise stream.StreamError(f"this host builds the memslots as {got}, the source "
                                     f"had {want}")

    def _place(self, gfn: int, pages: int, runs: list[api.Run], private: bool) -> None:
        """Put the pages in their state (converting where this VMM converts) and
        their contents: private ones through the firmware import, shared ones
        through the host mapping."""
        assert self.vmm is not None
        vmm = self.vmm
        gpa, length = gfn * PAGE, pages * PAGE
        if vmm.converts:
            if vmm.convert(gpa, length, private) != 0:
                raise stream.StreamError(f"gfn {gfn:#x}+{pages}: cannot make the pages "
                                         f"{'private' if private else 'shared'} here")
            enc = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else 0
            vmm.tracker.apply(gpa, pages, enc, 0)
        try:
            if private and isinstance(vmm.vm, api.Firmware):
                vmm.vm.firmware_import(gpa, runs, True)
            else:
                region = vmm.region_of(gpa)
                if gpa + length > region.gpa + region.size:
                    raise stream.StreamError(f"gfn {gfn:#x}+{pages} crosses a memslot")
                self._write(region, gpa - region.gpa, runs)
        except ValueError as e:
            raise stream.StreamError(f"gfn {gfn:#x}+{pages}: {e}") from None
        except OSError as e:
            raise stream.StreamError(f"gfn {gfn:#x}+{pages}: {e}") from None
        self.received.append(Sent(gfn, pages, private, runs, -1))

    @staticmethod
    def _write(region: MemoryRegion, offset: int, runs: list[api.Run]) -> None:
        if isinstance(region.mapping, api.ContentRuns):
            region.mapping.write_runs(offset, runs)
            return
        for run in runs:
            if run.data is not None:
                region.mapping.write(offset + run.start, run.data)
            elif run.word == 0 and run.step == 0:
                region.mapping.fill(offset + run.start, 0, run.end - run.start)
            else:  # rendered a chunk at a time: a tiny record may describe a huge run
                for at in range(run.start, run.end, CHUNK):
                    words = (min(run.end, at + CHUNK) - at) // 8
                    first = run.word + (at - run.start) // 8 * run.step
                    region.mapping.write(offset + at, struct.pack(
                        f"<{words}Q", *((first + i * run.step) & (2**64 - 1)
                                       for i in range(words))))

    def _take_state(self, record: stream.Record) -> None:
        """The list (SEV) or attributes (guest_memfd) as the source had them."""
        assert self.vmm is not None
        if len(record.payload) % _GFNS.size:
            raise stream.StreamError(f"record {record.sequence}: a list of ranges is cut short")
        ranges = [_GFNS.unpack_from(record.payload, i)
                  for i in range(0, len(record.payload), _GFNS.size)]
        private = [(gfn, gfn + n) for gfn, n in ranges]
        if record.tag == stream.ATTRIBUTES:
            # The pages are in the states their records gave them; where the source's
            # final attributes say otherwise, a page's change never reached us.
            placed = self.vmm.attributes.private_gfns()
            if placed != private:
                self.disagreements.append((placed, private))
        self.vmm.tracker.replace(private)

    def _take_vcpu(self, payload: bytes) -> None:
        assert self.vmm is not None
        vcpu = self.vmm.vcpu
        try:
            nregs, nsregs = struct.unpack_from("<II", payload)
            regs = payload[8:8 + nregs]
            sregs = payload[8 + nregs:8 + nregs + nsregs]
            rest = payload[8 + nregs + nsregs:]
            vcpu.set_sregs(uapi.kvm_sregs.from_buffer_copy(sregs))
            vcpu.set_regs(uapi.kvm_regs.from_buffer_copy(regs))
        except (struct.error, ValueError) as e:
            raise stream.StreamError(f"the vCPU state is malformed: {e}") from None
        program: p.Program | None = None
        abi, control = "port", "port"
        if rest:
            if not isinstance(vcpu, api.ProgramVcpu):
                raise stream.StreamError("the source ran an interpreted program (the model); "
                                         "this backend runs machine code")
            resume = _program_state(_unjson(rest, "the program state"))
            program, abi, control = resume.program, resume.hypercall_abi, \
                resume.migration_control
            vcpu.restore_program_state(resume)
        self.vmm.adopt(machine.GuestImage(b"", 0, program, abi, control))


def _program_state(state: dict[str, object]) -> api.ProgramState:
    """The model's vCPU record, checked: a program, a step within it, a known ABI
    and way of writing the migration MSR, C-bit ranges within guest memory."""
    try:
        program = p.decode_program(state["program"])
        next_step, abi = state["next_step"], state["abi"]
        control = state.get("migration_control", "port")
        encrypted = state["encrypted"]
        if not isinstance(next_step, int) or not 0 <= next_step <= len(program.steps):
            raise ValueError(f"step {next_step!r} of a {len(program.steps)}-step program")
        if abi not in p.HYPERCALL_ABIS or control not in p.MIGRATION_CONTROLS:
            raise ValueError(f"hypercall ABI {abi!r}, migration control {control!r}")
        if not isinstance(encrypted, list):
            raise ValueError("encrypted must be a list of ranges")
        ranges = tuple((int(a), int(b)) for a, b in encrypted)
        if any(not 0 <= a < b <= GFN_LIMIT for a, b in ranges):
            raise ValueError("an encrypted range outside guest memory")
    except (KeyError, TypeError, ValueError) as e:
        raise stream.StreamError(f"the program state is malformed: {e}") from None
    assert isinstance(abi, str) and isinstance(control, str)
    return api.ProgramState(program, next_step, abi, ranges, control)


def migrate(vmm: Vmm, kvm: api.Kvm, variant: Variant, key: TransportKey | None = None,
            rounds: int = 2) -> tuple[Vmm, Stats]:
    """In one process: `rounds` pre-copy rounds with the vCPU stopped between
    them (the caller runs it for concurrency), stop-and-copy, and the destination."""
    key = key or TransportKey()
    buf = io.BytesIO()
    source = Source(vmm, variant, key, buf)
    source.begin()
    for _ in range(rounds):
        source.round()
    source.stop_and_copy()
    source.finish()
    buf.seek(0)
    return Destination(kvm, key).receive(buf), source.stats
