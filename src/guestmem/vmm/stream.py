"""The migration stream's format (issue 11 part 1): versioned, every record checksummed.

A stream is a header, then records, the last of them END. The header is the magic
b"GMMIGRAT", the format version (u16) and reserved flags (u16, zero). A record is
its tag (4 ASCII bytes), its sequence number (u32, counting from 0), the payload's
length (u64), the payload, and a CRC-32 (zlib) of everything before it in the
record. A reader refuses, with an error that names the record and what is wrong:
another magic or version, an unknown tag, a record out of sequence (a reordered
or dropped one), a checksum that does not match (a corrupted one), a stream that
ends before its END record or inside a record (a truncated one), and anything
after END. The checksum guards against transport damage, not against an
attacker: what must stay secret or unforged travels encrypted and authenticated
inside its payload.

Our design: no upstream format migrates guest_memfd memory (upstream-2026-11.md §4).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"GMMIGRAT"
VERSION = 1
_HEADER = struct.Struct("<8sHH")
_RECORD = struct.Struct("<4sIQ")
_CRC = struct.Struct("<I")
MAX_PAYLOAD = 1 << 32  # a bound on what a reader allocates for one record

# Record tags: the VM's configuration, memory pages in plaintext, private pages as
# the firmware exported them, the shared-regions list (SEV design) or the private
# attributes (guest_memfd design), vCPU state, the firmware's sealed count of
# private blobs (SEND_FINISH), the end of the stream.
CONFIG, PAGES, PRIVATE, SHARED_LIST, ATTRIBUTES, VCPU, FINISH, END = (
    b"CONF", b"PAGE", b"PRIV", b"LIST", b"ATTR", b"VCPU", b"FINI", b"END.")
TAGS = frozenset({CONFIG, PAGES, PRIVATE, SHARED_LIST, ATTRIBUTES, VCPU, FINISH, END})


class StreamError(ValueError):
    """A stream the reader refuses: the message says which record and why."""


@dataclass(frozen=True)
class Record:
    tag: bytes
    sequence: int
    payload: bytes


class StreamWriter:
    """Writes the header at once, then records in sequence; end() writes END."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sequence = 0
        self.ended = False
        out.write(_HEADER.pack(MAGIC, VERSION, 0))
        self.written = _HEADER.size  # bytes so far

    def record(self, tag: bytes, payload: bytes | Sequence[bytes]) -> None:
        """One record; a payload given in parts is written part by part (no copy
        of a large one to join it)."""
        if tag not in TAGS or tag == END:
            raise ValueError(f"not a record tag: {tag!r}")
        self._write(tag, [payload] if isinstance(payload, bytes) else payload)

    def end(self) -> None:
        self._write(END, [])
        self.ended = True

    def _write(self, tag: bytes, parts: Sequence[bytes]) -> None:
        if self.ended:
            raise ValueError("the stream has ended")
        length = sum(len(part) for part in parts)
        head = _RECORD.pack(tag, self.sequence, length)
        crc = zlib.crc32(head)
        self.out.write(head)
        for part in parts:
            crc = zlib.crc32(part, crc)
            self.out.write(part)
        self.out.write(_CRC.pack(crc))
        self.sequence += 1
        self.written += len(head) + length + _CRC.size


def read_records(source: BinaryIO) -> Iterator[Record]:
    """The records of a stream up to and excluding END, each checked before it is
    yielded; StreamError at the first thing wrong (nothing after it is read)."""
    magic, version, flags = _HEADER.unpack(_exactly(source, _HEADER.size, "the header"))
    if magic != MAGIC:
        raise StreamError(f"not a guestmem migration stream (magic {magic!r})")
    if version != VERSION or flags:
        raise StreamError(f"stream format version {version} flags {flags:#x}: this reader "
                          f"takes version {VERSION} without flags")
    expected = 0
    while True:
        record = _read_record(source, expected)
        if record.tag == END:
            if source.read(1):
                raise StreamError(f"data after the END record (record {expected})")
            return
        yield record
        expected += 1


def _read_record(source: BinaryIO, expected: int) -> Record:
    head = source.read(_RECORD.size)
    if not head:
        raise StreamError(f"the stream ends before its END record (after record {expected - 1})")
    if len(head) < _RECORD.size:
        raise StreamError(f"the stream ends inside record {expected}'s header")
    tag, sequence, length = _RECORD.unpack(head)
    if tag not in TAGS:
        raise StreamError(f"record {expected}: unknown tag {tag!r}")
    if sequence != expected:
        raise StreamError(f"record {sequence} ({tag.decode()}) arrived where record "
                          f"{expected} was expected: reordered or lost")
    if length > MAX_PAYLOAD:
        raise StreamError(f"record {expected} ({tag.decode()}): {length} bytes is too long")
    payload = _exactly(source, length, f"record {expected}'s payload")
    (crc,) = _CRC.unpack(_exactly(source, _CRC.size, f"record {expected}'s checksum"))
    if crc != zlib.crc32(payload, zlib.crc32(head)):
        raise StreamError(f"record {expected} ({tag.decode()}): checksum mismatch, "
                          "the record was damaged")
    return Record(tag, sequence, payload)


_READ_CHUNK = 1 << 20


def _exactly(source: BinaryIO, n: int, what: str) -> bytes:
    """n bytes, read a chunk at a time: a length the record only claims allocates
    nothing until the bytes are there."""
    if n <= _READ_CHUNK:
        data = source.read(n)
    else:
        parts, got = [], 0
        while got < n:
            part = source.read(min(_READ_CHUNK, n - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
    if len(data) < n:
        raise StreamError(f"the stream ends inside {what}")
    return data
