"""Live migration on the model (guestmem.vmm.migration): a paused guest continues
on the destination with its memory, its C-bit view and its list; a damaged
stream is refused while the source runs on and loses nothing."""

from __future__ import annotations

import io

import pytest

from guestmem import api, uapi
from guestmem import program as p
from guestmem.machine import GuestImage
from guestmem.model.kvm import Kvm
from guestmem.vmm import Vmm, stream
from guestmem.vmm.migration import (
    VARIANTS,
    Destination,
    MigrationRefused,
    Source,
    bitmap_ranges,
    decode_runs,
    encode_runs,
    migrate,
    zero_runs,
)
from guestmem.vmm.transport import TransportKey

DATA = 0x1_0000_0000
PAGE = 4096


def sev_source(steps: tuple[p.Step, ...], size: int = 1 << 20) -> Vmm:
    vmm = Vmm(Kvm("coco"), uapi.KVM_X86_SEV_VM, backing="anon", launch_sev=True)
    vmm.add_memory(DATA, size, "anon")
    vmm.load(GuestImage(b"", 0, p.Program.of(*steps), "port"))
    vmm.on_checkpoint = lambda label, result: True  # pause at the first checkpoint
    return vmm


PRIVATE_AND_SHARED = (
    p.WritePattern(DATA, 2 * PAGE, 0xAA, 1),  # private: SEV pages start encrypted
    p.MapGpaRange(DATA + 16 * PAGE, 1, encrypted=False),
    p.WritePattern(DATA + 16 * PAGE, PAGE, 0xBB, 0),
    p.MigrationReady(),
    p.Checkpoint(1),
    p.VerifyPattern(DATA, 2 * PAGE, 0xAA, 1),
    p.VerifyPattern(DATA + 16 * PAGE, PAGE, 0xBB, 0),
)


def test_a_paused_sev_guest_continues_on_the_destination():
    vmm = sev_source(PRIVATE_AND_SHARED)
    assert vmm.run().stop == "paused"
    dest, stats = migrate(vmm, vmm.kvm, VARIANTS["dirty-first"])
    assert dest.run().reports == [p.VERIFY_OK, p.VERIFY_OK]
    assert dest.tracker.shared_ranges() == [(DATA + 16 * PAGE, PAGE)]
    assert stats.rounds[0].private_pages and stats.rounds[-1].phase == "stop-and-copy"


def test_the_host_reads_ciphertext_and_the_stream_carries_no_private_plaintext():
    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    secret = vmm.vm.guest_view(DATA, 2 * PAGE)[0][0]
    assert (secret.word, secret.step) == (0xAA, 1)
    host = vmm.read(DATA, 16)
    assert int.from_bytes(host[:8], "little") != 0xAA, "the host must see ciphertext"
    out = io.BytesIO()
    sent = []
    source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), out, on_send=sent.append)
    source.begin()
    source.stop_and_copy()
    source.finish()
    assert (0xAA).to_bytes(8, "little") + (0xAB).to_bytes(8, "little") not in out.getvalue()
    plain = [s for s in sent if not s.private and s.gfn <= DATA // PAGE < s.gfn + s.pages]
    assert not plain, "a private page went as plaintext"


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop", "swap"])
def test_a_damaged_stream_is_refused_and_the_source_runs_on(damage):
    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    key = TransportKey()
    out = io.BytesIO()
    source = Source(vmm, VARIANTS["dirty-first"], key, out)
    source.begin()
    source.stop_and_copy()
    source.finish()
    data = bytearray(out.getvalue())
    records = _record_offsets(bytes(data))
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[records[2][0] + 30] ^= 0x10
    elif damage == "drop":
        start, end = records[1]
        del data[start:end]
    else:
        (a, b), (c, d) = records[1], records[2]
        data = data[:a] + data[c:d] + data[a:b] + data[d:]
    with pytest.raises(stream.StreamError):
        Destination(vmm.kvm, key).receive(io.BytesIO(bytes(data)))
    source.resume()
    vmm.on_checkpoint = None
    assert vmm.run().reports == [p.VERIFY_OK, p.VERIFY_OK], "the source lost nothing"


def test_another_transport_key_is_refused_naming_the_record():
    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    out = io.BytesIO()
    source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), out)
    source.begin()
    source.stop_and_copy()
    source.finish()
    with pytest.raises(stream.StreamError, match="PRIV.*another transport key"):
        Destination(vmm.kvm, TransportKey()).receive(io.BytesIO(out.getvalue()))


def test_migration_waits_for_ready_when_gated():
    vmm = sev_source((p.Checkpoint(1), p.MigrationReady(), p.Checkpoint(2)))
    vmm.run()
    source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), io.BytesIO())
    with pytest.raises(MigrationRefused, match="KVM_MIGRATION_READY"):
        source.begin()
    assert not source.begun and not source.logged, "a refused start changes nothing"
    ungated = Source(vmm, VARIANTS["dirty-first-ungated"], TransportKey(), io.BytesIO())
    ungated.begin()
    assert ungated.begun


def test_guest_memfd_memslots_go_in_stop_and_copy():
    """KVM refuses KVM_MEM_LOG_DIRTY_PAGES on guest_memfd memslots (EINVAL), so
    their pages move only while the guest is paused."""
    kvm = Kvm("mainline")
    vmm = Vmm(kvm)
    vmm.add_memory(DATA, 1 << 20, "anon")
    vmm.load(GuestImage(b"", 0, p.Program.of(p.WritePattern(DATA, PAGE, 7, 1),
                                             p.Checkpoint(1), p.VerifyPattern(DATA, PAGE, 7, 1)),
                        "port"))
    vmm.on_checkpoint = lambda label, result: True
    vmm.run()
    source = Source(vmm, VARIANTS["dirty-first-ungated"], TransportKey(), io.BytesIO())
    source.begin()
    assert [r.backing for r in source.stop_and_copy_only] == ["gmem"]
    assert [r.backing for r in source.logged] == ["anon"]


def test_a_1_tib_guest_migrates_in_ranges():
    """The guest's page tables map 64 GiB: it writes 48 GiB of them and shares
    256 GiB more, which the host fills; all of the 1 TiB moves as a few runs."""
    shared = DATA + (512 << 30)
    vmm = sev_source((p.WritePattern(DATA, 48 << 30, 5, 1),
                      p.MapGpaRange(shared, (256 << 30) // PAGE, encrypted=False),
                      p.MigrationReady(),
                      p.Checkpoint(1), p.VerifyPattern(DATA, 48 << 30, 5, 1)), size=1 << 40)
    vmm.run()
    vmm.regions[-1].mapping.fill(512 << 30, 0x5A, 256 << 30)
    vmm.write(shared + (100 << 30), b"host data")
    dest, stats = migrate(vmm, vmm.kvm, VARIANTS["dirty-first"])
    assert stats.stream_bytes < 1 << 20, "1 TiB of alike pages is a few runs"
    assert dest.run().reports == [p.VERIFY_OK]
    assert dest.read(shared + (100 << 30), 12) == b"host dataZZZ"
    assert dest.read(shared + (200 << 30), 4) == b"ZZZZ"


def test_runs_round_trip_and_refuse_what_does_not_tile():
    runs = [api.Run(0, PAGE, b"x" * PAGE), api.Run(PAGE, 3 * PAGE, None, 5, 1)]
    assert decode_runs(encode_runs(9, 3, runs)) == (9, 3, runs)
    with pytest.raises(stream.StreamError, match="tile"):
        decode_runs(encode_runs(9, 3, runs[1:]))
    with pytest.raises(stream.StreamError, match="cover"):
        decode_runs(encode_runs(9, 4, runs))
    assert zero_runs(bytes(2 * PAGE) + b"y" * PAGE) == [
        api.Run(0, 2 * PAGE, None), api.Run(2 * PAGE, 3 * PAGE, b"y" * PAGE)]


def test_dirty_bitmaps_become_ranges():
    assert bitmap_ranges(bytes([0b0000_0110, 0xFF, 0xFF, 0x01, 0, 0x80]), 48) == [
        (1, 3), (8, 25), (47, 48)]
    assert bitmap_ranges(bytes([0xFF]), 5) == [(0, 5)]
    assert bitmap_ranges(bytes(8), 64) == []


def _record_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record after the 12-byte header."""
    out, pos = [], 12
    while pos < len(data):
        length = int.from_bytes(data[pos + 8:pos + 16], "little")
        end = pos + 16 + length + 4
        out.append((pos, end))
        pos = end
    return out


def test_dirty_log_ranges_say_what_the_bitmap_says():
    """The model's range form of KVM_GET_DIRTY_LOG (api.DirtyLogRanges) against the
    bitmap, on the same writes; both clear, both refuse a slot without logging."""
    import errno

    results = []
    for ranges in (False, True):
        vmm = Vmm(Kvm("mainline"))
        region = vmm.add_memory(DATA, 1 << 20, "anon")
        vmm.vm.set_user_memory_region2(region.slot, uapi.KVM_MEM_LOG_DIRTY_PAGES, DATA,
                                       1 << 20, region.mapping.addr)
        vmm.load(GuestImage(b"", 0, p.Program.of(p.WritePattern(DATA + PAGE, 3 * PAGE, 1, 1),
                                                 p.WritePattern(DATA + 9 * PAGE, 8, 2, 0)),
                            "port"))
        vmm.run()
        def get(vm=vmm.vm, slot=region.slot, ranges=ranges):
            if ranges:
                return vm.get_dirty_log_ranges(slot)
            return bitmap_ranges(vm.get_dirty_log(slot, 256), 256)

        results.append((get(), get()))
        for slot in (vmm.low.slot, 7):
            try:
                vmm.vm.get_dirty_log_ranges(slot) if ranges else vmm.vm.get_dirty_log(slot, 1)
            except OSError as e:
                assert e.errno == errno.ENOENT
            else:
                raise AssertionError("a slot without a dirty bitmap")
    assert results[0] == results[1] == ([(1, 4), (9, 10)], [])


def test_sev_encryption_starts_with_the_launch():
    """Nothing encrypts an SEV VM's memory until KVM_SEV_LAUNCH_START (the model's
    launch_start): the conformance cases' SEV VMs share plaintext with the host."""
    import errno

    kvm = Kvm("coco")
    plain = Vmm(kvm, uapi.KVM_X86_SEV_VM)
    for call in (lambda: plain.vm.launch_update_data(0, PAGE),):
        try:
            call()
        except OSError as e:
            assert e.errno == errno.EINVAL
        else:
            raise AssertionError("LAUNCH_UPDATE_DATA before LAUNCH_START")
    plain.vm.launch_start()
    try:
        plain.vm.launch_start()
    except OSError as e:
        assert e.errno == errno.EINVAL
    else:
        raise AssertionError("a second LAUNCH_START")
    with pytest.raises(ValueError, match="SEV VM type"):
        Vmm(kvm, uapi.KVM_X86_DEFAULT_VM, launch_sev=True)
    default = Vmm(kvm)
    try:
        default.vm.launch_start()
    except OSError as e:
        assert e.errno == errno.ENOTTY
    else:
        raise AssertionError("LAUNCH_START on a default VM")


def test_a_start_that_fails_leaves_dirty_logging_off(monkeypatch):
    """The second memslot's flags change fails (ENOMEM, say): the first one's dirty
    logging is turned off again, and nothing counts as begun."""
    import errno

    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    real = vmm.vm.set_user_memory_region2
    calls = []

    def flaky(slot, flags, *args):
        calls.append((slot, flags))
        if slot == vmm.regions[1].slot and flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            raise OSError(errno.ENOMEM, "no memory for the dirty bitmap")
        return real(slot, flags, *args)

    monkeypatch.setattr(vmm.vm, "set_user_memory_region2", flaky)
    source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), io.BytesIO())
    with pytest.raises(OSError):
        source.begin()
    assert calls[-1] == (vmm.regions[0].slot, 0), "the first memslot's logging off again"
    assert not source.begun and not source.logged and not source.stop_and_copy_only
    monkeypatch.undo()
    with pytest.raises(OSError) as e:
        vmm.vm.get_dirty_log(vmm.regions[0].slot, 1)
    assert e.value.errno == errno.ENOENT


def _stream_of(vmm, key):
    out = io.BytesIO()
    source = Source(vmm, VARIANTS["dirty-first"], key, out)
    source.begin()
    source.stop_and_copy()
    source.finish()
    return out.getvalue()


def _rewritten(records):
    """Records re-sequenced and re-checksummed, as a host that forges a stream would."""
    out = io.BytesIO()
    writer = stream.StreamWriter(out)
    for record in records:
        writer.record(record.tag, record.payload)
    writer.end()
    return out.getvalue()


def test_a_forged_stream_cannot_roll_back_drop_or_cut_private_pages():
    """Valid checksums do not make a stream genuine: a private blob swapped for an
    earlier one, a dropped one, or a stream cut before the firmware's finish
    record is refused naming the record."""
    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    key = TransportKey()
    records = list(stream.read_records(io.BytesIO(_stream_of(vmm, key))))
    private = [i for i, r in enumerate(records) if r.tag == stream.PRIVATE]
    assert len(private) >= 2
    swapped = list(records)
    swapped[private[1]] = records[private[0]]
    dropped = [r for i, r in enumerate(records) if i != private[1]]
    cut = [r for r in records if r.tag != stream.FINISH]
    after = [*records, records[private[0]]]
    for forged, why in ((swapped, "replayed, reordered or dropped"),
                        (dropped, "replayed, reordered or dropped"),
                        (cut, "no finish record"), (after, "after the finish record")):
        with pytest.raises(stream.StreamError, match=why):
            Destination(vmm.kvm, key).receive(io.BytesIO(_rewritten(forged)))


def _with_payload(records, tag, payload):
    return [stream.Record(r.tag, r.sequence, payload if r.tag == tag else r.payload)
            for r in records]


@pytest.mark.parametrize("change, why", [
    (lambda c: c["regions"][0].pop("gpa"), "gpa and size must be integers"),
    (lambda c: c.update(regions="xyz"), "list of 1 to 512"),
    (lambda c: c.update(regions=[1, 2]), "not an object"),
    (lambda c: c["regions"][1].update(gpa=-4096), "page-aligned"),
    (lambda c: c["regions"][1].update(size=-4096), "page-aligned"),
    (lambda c: c["regions"][0].update(size=4097), "page-aligned"),
    (lambda c: c["regions"][1].update(gpa=1 << 70), "below 2\\^52"),
    (lambda c: c["regions"][1].update(backing="tmpfs"), "backing"),
    (lambda c: c.update(vm_type=99), "cannot build the VM"),
    (lambda c: c.update(sev="yes"), "sev"),
    (lambda c: c.update(design="telepathy"), "unknown design"),
])
def test_a_hostile_configuration_is_refused_before_anything_is_built(change, why):
    import json

    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    key = TransportKey()
    records = list(stream.read_records(io.BytesIO(_stream_of(vmm, key))))
    conf = json.loads(records[0].payload)
    change(conf)
    forged = _with_payload(records, stream.CONFIG, json.dumps(conf).encode())
    with pytest.raises(stream.StreamError, match=why):
        Destination(vmm.kvm, key).receive(io.BytesIO(_rewritten(forged)))


@pytest.mark.parametrize("change, why", [
    (lambda s: s.update(next_step=10**6), "step 1000000"),
    (lambda s: s.update(next_step=-5), "step -5"),
    (lambda s: s.update(abi="bogus"), "hypercall ABI 'bogus'"),
    (lambda s: s.update(encrypted=[[-5, 2**70]]), "outside guest memory"),
    (lambda s: s.update(program=[["WritePattern", {"bogus": 1}]]), "malformed"),
])
def test_a_hostile_vcpu_record_is_refused(change, why):
    import json
    import struct as st

    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    key = TransportKey()
    records = list(stream.read_records(io.BytesIO(_stream_of(vmm, key))))
    payload = next(r.payload for r in records if r.tag == stream.VCPU)
    nregs, nsregs = st.unpack_from("<II", payload)
    head, state = payload[:8 + nregs + nsregs], json.loads(payload[8 + nregs + nsregs:])
    change(state)
    forged = _with_payload(records, stream.VCPU, head + json.dumps(state).encode())
    with pytest.raises(stream.StreamError, match=why):
        Destination(vmm.kvm, key).receive(io.BytesIO(_rewritten(forged)))


def test_a_formula_run_must_be_whole_words_and_a_huge_claim_allocates_nothing():
    with pytest.raises(stream.StreamError, match="whole 64-bit words"):
        decode_runs(encode_runs(0, 1, [api.Run(0, 12, None, 1, 0),
                                       api.Run(12, PAGE, b"x" * (PAGE - 12))]))
    head = b"GMMIGRAT" + (1).to_bytes(2, "little") + bytes(2)
    claim = b"PAGE" + bytes(4) + (1 << 32).to_bytes(8, "little")  # 4 GiB, never sent
    with pytest.raises(stream.StreamError, match="ends inside record 0's payload"):
        list(stream.read_records(io.BytesIO(head + claim + b"x" * 100)))


def test_an_empty_host_write_changes_no_sealed_page():
    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    vmm.write(DATA + PAGE, b"")
    vmm.on_checkpoint = None
    assert vmm.run().reports == [p.VERIFY_OK, p.VERIFY_OK]


def test_a_malformed_verdict_is_a_failure_and_the_source_stops_logging():
    """remote.send: the destination answers 'accepted' with digests that are not
    digests; the source treats it as a failed migration and turns dirty logging off."""
    import json
    import socket
    import threading

    from guestmem.vmm import remote

    vmm = sev_source((p.MigrationReady(), p.Checkpoint(1), p.Checkpoint(2)))
    vmm.on_checkpoint = None
    ours, theirs = socket.socketpair()

    def destination():
        theirs.sendall(remote.READY + b"\n")
        with theirs, theirs.makefile("rb") as reader:
            while reader.read(1 << 16):
                pass
            theirs.sendall(json.dumps({"accepted": True, "digests": [{"gpa": 0}]}).encode()
                           + b"\n")

    thread = threading.Thread(target=destination)
    thread.start()
    with ours:
        sent = remote.send(vmm, VARIANTS["dirty-first"], ours, TransportKey(), stop_at=2)
    thread.join(10)
    assert not sent.accepted and "verdict is malformed" in (sent.error or "")
    for region in vmm.regions:
        with pytest.raises(OSError):
            vmm.vm.get_dirty_log(region.slot, 1)


def test_the_firmware_refuses_memory_no_memslot_backs_and_writes_nothing():
    """firmware_export / firmware_import on a range that runs past guest memory:
    EFAULT (our choice: SEND/RECEIVE_UPDATE_DATA fail on a bad address), and an
    import writes none of its runs, not even those that had memory."""
    import errno

    vmm = sev_source(PRIVATE_AND_SHARED)
    vmm.run()
    end = DATA + (1 << 20)
    before = vmm.vm.guest_view(end - PAGE, PAGE)
    for call in (lambda: vmm.vm.firmware_export(end - PAGE, 2 * PAGE, True),
                 lambda: vmm.vm.firmware_import(end - PAGE, [
                     api.Run(0, PAGE, None, 7, 1), api.Run(PAGE, 2 * PAGE, None, 9, 1)], True)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EFAULT
    assert vmm.vm.guest_view(end - PAGE, PAGE) == before


@pytest.mark.parametrize("conversion", ["attributes+fallocate", "guest-flags"])
def test_the_vmm_records_every_conversion_it_makes(conversion):
    """Vmm.attributes (the attributes design's source) follows conversions made by a
    guest's MAP_GPA_RANGE, whichever conversion mode the VMM uses, and not a
    refused one."""
    from guestmem.vmm.vmm import MAP_GPA_SET_ATTRIBUTES

    vmm = Vmm(Kvm("coco"), uapi.KVM_X86_SW_PROTECTED_VM, backing="anon", conversion=conversion)
    vmm.add_private_memory(DATA, 1 << 20)
    flags = MAP_GPA_SET_ATTRIBUTES if conversion == "guest-flags" else None
    vmm.load(GuestImage(b"", 0, p.Program.of(
        p.MapGpaRange(DATA + PAGE, 2, encrypted=True, flags=flags),
        p.MapGpaRange(DATA + 8 * PAGE, 0, encrypted=True, flags=flags)), "port"))
    result = vmm.run()
    assert result.reports == [0, -uapi.KVM_EINVAL & (2**64 - 1)], "npages 0 is refused"
    gfn = DATA // PAGE
    assert vmm.attributes.private_gfns() == [(gfn + 1, gfn + 3)]
    assert vmm.attributes.harvest_changed() == [(gfn + 1, gfn + 3)]
    assert vmm.attributes.harvest_changed() == [], "harvested once"
