"""The migration stream's format (guestmem.vmm.stream): a damaged stream is refused,
never half-read as valid."""

from __future__ import annotations

import io
import struct

import pytest

from guestmem.vmm import stream
from guestmem.vmm.stream import PAGES, PRIVATE, SHARED_LIST, StreamError, StreamWriter

RECORDS = [(PAGES, b"\x11" * 40), (SHARED_LIST, b""), (PRIVATE, bytes(range(33)))]


def encoded(records=RECORDS, end=True) -> bytes:
    out = io.BytesIO()
    writer = StreamWriter(out)
    for tag, payload in records:
        writer.record(tag, payload)
    if end:
        writer.end()
    return out.getvalue()


def read(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(r.tag, r.payload) for r in stream.read_records(io.BytesIO(data))]


def refusal(data: bytes) -> str:
    try:
        read(data)
    except StreamError as e:
        return str(e)
    pytest.fail("a damaged stream was read as valid")


def test_records_come_back_in_order_with_their_payloads():
    assert read(encoded()) == RECORDS
    assert read(encoded([])) == []


def test_every_truncation_is_refused():
    data = encoded()
    for cut in range(len(data)):
        assert "ends" in refusal(data[:cut]), cut


def test_every_flipped_bit_is_refused():
    data = encoded()
    for at in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[at] ^= bit
            refusal(bytes(damaged))


def test_a_reordered_or_dropped_record_is_refused_naming_it():
    data = encoded()
    header = struct.calcsize("<8sHH")
    sizes = [struct.calcsize("<4sIQ") + len(p) + 4 for _, p in RECORDS]
    offsets = [header + sum(sizes[:i]) for i in range(len(sizes) + 1)]
    first, second = (data[offsets[i]:offsets[i + 1]] for i in range(2))
    swapped = data[:header] + second + first + data[offsets[2]:]
    assert refusal(swapped) == ("record 1 (LIST) arrived where record 0 was expected: "
                                "reordered or lost")
    dropped = data[:header] + second + data[offsets[2]:]
    assert "record 1 (LIST) arrived where record 0" in refusal(dropped)


def test_a_stream_without_its_end_record_or_with_data_after_it_is_refused():
    assert "before its END record" in refusal(encoded(end=False))
    assert "after the END record" in refusal(encoded() + b"x")


def test_another_format_or_version_is_refused():
    data = encoded()
    assert "not a guestmem migration stream" in refusal(b"NOTGUEST" + data[8:])
    newer = data[:8] + struct.pack("<HH", stream.VERSION + 1, 0) + data[12:]
    assert f"version {stream.VERSION + 1}" in refusal(newer)


def test_a_damaged_record_is_refused_before_it_is_yielded():
    """The checksum is checked before a record is handed on, so a reader never acts
    on damaged data: the good records before it come out, then the error."""
    data = bytearray(encoded())
    data[-30] ^= 0x01  # inside the last data record's payload
    records = stream.read_records(io.BytesIO(bytes(data)))
    assert next(records).tag == PAGES and next(records).tag == SHARED_LIST
    with pytest.raises(StreamError, match="record 2 \\(PRIV\\): checksum mismatch"):
        next(records)


def test_the_writer_refuses_unknown_tags_and_writing_after_the_end():
    writer = StreamWriter(io.BytesIO())
    for tag in (b"XXXX", stream.END):
        with pytest.raises(ValueError, match="not a record tag"):
            writer.record(tag, b"")
    writer.end()
    with pytest.raises(ValueError, match="has ended"):
        writer.record(PAGES, b"")
