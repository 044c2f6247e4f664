"""Sparse page contents, kept as extents over page indexes (DESIGN.md "Scale").

A page's bytes are one of:
- Fill(b): every byte is b (a zeroed page is Fill(0));
- Pattern(value, step, origin): the guest program pattern, 64-bit word at byte
  offset o is value + ((o - origin) // 8) * step — what WritePattern writes, so a
  1 TiB pattern is one extent and verifying it is one comparison;
- Bytes(page): real bytes, for pages written with arbitrary data (host writes);
- Stale(owner): what a freshly allocated page holds before anyone zeroes it,
  the data its previous owner left (mm/page_alloc.c hands pages out as they were
  freed; only __GFP_ZERO or the caller's clear_highpage zeroes them). It reads as
  a pattern naming the owner, never as zeros: a path that skips zeroing shows
  another owner's data, as seed 000's shmem SGP_WRITE bug did;
- Ciphertext(key): what the other side of an SNP conversion reads: the bytes
  seen through the other key, noise that is neither owner's data.

SEV memory encryption (the C-bit) is kept beside the contents: `sealed` maps a
page to the memory key its bytes are under (an SEV VM's key when the guest wrote
it with C=1), so a reader under another key, or the host (no key), sees
Ciphertext noise, and the firmware, reading under the VM's key, the data. Our
simplification: a page is under one key; a partial write under another key
turns the rest of the page to noise for the new key (hardware encrypts per
16-byte block).

Offsets are byte offsets in the backing object (a guest_memfd inode or an
anonymous mapping), so contents stay put when the object is mapped elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from guestmem.extents import ExtentMap

PAGE = 4096
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Fill:
    byte: int


@dataclass(frozen=True)
class Pattern:
    value: int
    step: int
    origin: int  # byte offset of word 0

    def word_at(self, offset: int) -> int:
        return (self.value + ((offset - self.origin) // 8) * self.step) & _MASK


@dataclass(frozen=True)
class Bytes:
    page: int  # the page index the bytes belong to (never merges with a neighbour)


@dataclass(frozen=True)
class Stale:
    owner: int  # which earlier allocation's data this is (HostProcess.new_pages)

    def as_pattern(self) -> Pattern:
        """Word i of the page range reads STALE_TAG | owner << 24 | i."""
        return Pattern((STALE_TAG | (self.owner & 0xFFFFFF) << 24) & _MASK, 1, 0)


STALE_TAG = 0x5354414C << 32  # "STAL" in the top half of each stale word


@dataclass(frozen=True)
class Ciphertext:
    key: int  # which conversion produced it (a new key stream each time)

    def as_pattern(self) -> Pattern:
        """Word i of the page range reads CIPHER_TAG | key << 24 | i."""
        return Pattern((CIPHER_TAG | (self.key & 0xFFFFFF) << 24) & _MASK, 1, 0)


CIPHER_TAG = 0x43495048 << 32  # "CIPH"


@dataclass(frozen=True)
class Snapshot:
    """The bytes a Bytes page held when it was handed over (PageStore.convert)."""

    data: bytes


Content = Fill | Pattern | Bytes | Stale | Ciphertext
ZERO = Fill(0)


class PageStore:
    """Contents of one backing object: which pages hold what."""

    def __init__(self) -> None:
        self.extents: ExtentMap[Content] = ExtentMap()
        self.pages: dict[int, bytearray] = {}
        # Pages converted in place and not written since: what their previous owner
        # had there (invariants._conversions_keep_data_only_where_preserved).
        self.handed_over: ExtentMap[Content | Snapshot] = ExtentMap()
        self.sealed: ExtentMap[int] = ExtentMap()  # page -> SEV memory key (C=1 data)

    def clear(self, first: int, last: int) -> None:
        """Forget [first, last) (the pages were freed, or are being rewritten)."""
        if self.sealed.boundaries():
            self.sealed.clear(first, last)
        if self.handed_over.boundaries():
            self.handed_over.clear(first, last)
        if not self.extents.boundaries():
            return  # never written: nothing to forget
        for start, end, c in list(self.extents.overlapping(first, last)):
            if isinstance(c, Bytes):
                for i in range(start, end):
                    self.pages.pop(i, None)
        self.extents.clear(first, last)

    # --- conversions in place -----------------------------------------------------------------
    def contents(self, runs: list[tuple[int, int]]) -> list[tuple[int, int, Content | Snapshot]]:
        """What the pages of `runs` hold now, real bytes copied (for remember())."""
        held: list[tuple[int, int, Content | Snapshot]] = []
        for first, last in runs:
            for lo, hi, c in self.extents.overlapping(first, last):
                if isinstance(c, Bytes):
                    held += [(i, i + 1, Snapshot(bytes(self.pages[i]))) for i in range(lo, hi)]
                else:
                    held.append((lo, hi, c))
        return held

    def remember(self, held: list[tuple[int, int, Content | Snapshot]]) -> None:
        """Those pages changed owner: keep what they held until they are written."""
        for lo, hi, c in held:
            self.handed_over.set(lo, hi, c)

    def kept_across_conversion(self, first: int, last: int) -> list[tuple[int, int]]:
        """Pages of [first, last) that still hold, unwritten since, what their previous
        owner had before a conversion (zeros excepted: nobody's data)."""
        kept = []
        for lo, hi, before in self.handed_over.overlapping(first, last):
            if before == ZERO:
                continue
            if isinstance(before, Snapshot):
                c = self.extents.get(lo)
                if isinstance(c, Bytes) and bytes(self.pages[lo]) == before.data:
                    kept.append((lo, hi))
            else:
                kept += [(a, b) for a, b, c in self.extents.overlapping(lo, hi) if c == before]
        return kept

    def content(self, index: int) -> Content | None:
        return self.extents.get(index)

    # --- writing ----------------------------------------------------------------------------
    def set(self, first: int, last: int, content: Content) -> None:
        self.clear(first, last)
        self.extents.set(first, last, content)

    def write_pattern(self, offset: int, length: int, value: int, step: int,
                      key: int | None = None) -> None:
        """Write a pattern over [offset, offset+length); partial pages become Bytes.
        `key`: the SEV memory key the write is under (C=1), None for plaintext."""
        self._rekey(offset, length, key)
        self._write_uniform(offset, length, Pattern(value & _MASK, step & _MASK, offset))
        self._seal(offset, length, key)

    def write_bytes(self, offset: int, data: bytes, key: int | None = None) -> None:
        self._rekey(offset, len(data), key)
        self._write_bytes(offset, data)
        self._seal(offset, len(data), key)

    def _rekey(self, offset: int, length: int, key: int | None) -> None:
        """The pages of [offset, +length) go under `key`; a page only partly
        written that was under another key reads as noise under the new one."""
        if length <= 0 or key is None and not self.sealed.boundaries():
            return  # nothing written, or plaintext over plaintext: nothing to do
        first, last = offset // PAGE, -(-(offset + length) // PAGE)
        for index in {first, last - 1}:
            whole = offset <= index * PAGE and (index + 1) * PAGE <= offset + length
            if not whole and self.sealed.get(index) != key:
                self.set(index, index + 1, Ciphertext(_noise(self.sealed.get(index), key)))

    def _seal(self, offset: int, length: int, key: int | None) -> None:
        if length > 0 and (key is not None or self.sealed.boundaries()):
            self.sealed.set(offset // PAGE, -(-(offset + length) // PAGE), key)

    def _write_bytes(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, PAGE)
            n = min(PAGE - within, len(data) - pos)
            page = self._materialize(index)
            if self.handed_over.boundaries():  # written by its new owner
                self.handed_over.clear(index, index + 1)
            page[within:within + n] = data[pos:pos + n]
            pos += n

    def fill(self, offset: int, length: int, byte: int, key: int | None = None) -> None:
        self._rekey(offset, length, key)
        self._write_uniform(offset, length, Fill(byte))
        self._seal(offset, length, key)

    def _write_uniform(self, offset: int, length: int, content: Fill | Pattern) -> None:
        end = offset + length
        first_full, last_full = -(-offset // PAGE), end // PAGE
        if first_full >= last_full:  # no whole page: real bytes
            self._write_bytes(offset, render(content, offset, length))
            return
        self.set(first_full, last_full, content)
        for lo, hi in ((offset, first_full * PAGE), (last_full * PAGE, end)):  # partial edges
            if lo < hi:
                self._write_bytes(lo, render(content, lo, hi - lo))

    def _materialize(self, index: int) -> bytearray:
        """Turn page `index` into real bytes (keeping what it held) and return them."""
        c = self.extents.get(index)
        if isinstance(c, Bytes):
            return self.pages[index]
        data = bytearray(render(c if c is not None else ZERO, index * PAGE, PAGE))
        self.extents.set(index, index + 1, Bytes(index))
        self.pages[index] = data
        return data

    # --- reading ----------------------------------------------------------------------------
    def read(self, offset: int, length: int, key: int | None = None) -> bytes:
        """Bytes of [offset, offset+length) as a reader under `key` sees them
        (None: the host, or C=0); pages with no content read as zeros."""
        out = bytearray()
        for lo, hi, c in self._pieces(offset, offset + length, key):
            out += self._render_piece(lo, hi, c)
        return bytes(out)

    def runs(self, offset: int, length: int,
             key: int | None = None) -> Iterator[tuple[int, int, Content]]:
        """(start, end, content) byte pieces of [offset, +length) as a reader under
        `key` sees them: Bytes pieces need read(), the others are formulas."""
        return self._pieces(offset, offset + length, key)

    def _pieces(self, lo: int, hi: int,
                key: int | None = None) -> Iterator[tuple[int, int, Content]]:
        """(start, end, content) byte pieces covering [lo, hi), gaps as ZERO; pages
        under a key other than `key` as noise."""
        if not self.sealed.boundaries() and key is None:
            yield from self._plain_pieces(lo, hi)
            return
        pos = lo
        for s, e, sealed_by in self.sealed.overlapping(lo // PAGE, -(-hi // PAGE)):
            s_b, e_b = max(s * PAGE, lo), min(e * PAGE, hi)
            if s_b > pos:
                yield from self._under(pos, s_b, None, key)
            yield from self._under(s_b, e_b, sealed_by, key)
            pos = e_b
        if pos < hi:
            yield from self._under(pos, hi, None, key)

    def _under(self, lo: int, hi: int, sealed_by: int | None,
               key: int | None) -> Iterator[tuple[int, int, Content]]:
        if sealed_by == key:
            yield from self._plain_pieces(lo, hi)
        else:
            yield lo, hi, Ciphertext(_noise(sealed_by, key))

    def _plain_pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, Content]]:
        pos = lo
        for s, e, c in self.extents.overlapping(lo // PAGE, -(-hi // PAGE)):
            s_b, e_b = max(s * PAGE, lo), min(e * PAGE, hi)
            if s_b > pos:
                yield pos, s_b, ZERO
            yield s_b, e_b, c
            pos = e_b
        if pos < hi:
            yield pos, hi, ZERO

    def stale(self, first: int, last: int) -> list[tuple[int, int]]:
        """Page ranges of [first, last) that still hold a previous owner's data."""
        return [(s, e) for s, e, c in self.extents.overlapping(first, last)
                if isinstance(c, Stale)]

    def _render_piece(self, lo: int, hi: int, c: Content) -> bytes:
        if isinstance(c, Bytes):
            index = lo // PAGE
            page = self.pages[index]
            return bytes(page[lo - index * PAGE: hi - index * PAGE])
        return render(c, lo, hi - lo)

    def first_mismatch(self, offset: int, length: int, want: Pattern | Fill,
                       key: int | None = None) -> tuple[int, int] | None:
        """First 8-byte word in [offset, +length) that differs from `want`, as
        (byte offset, word found), or None. Costs per extent, not per page. The
        range is 8-byte aligned, as every pattern range is (program.pattern_words)."""
        for lo, hi, c in self._pieces(offset, offset + length, key):
            if isinstance(c, Stale | Ciphertext):
                c = c.as_pattern()
            if c == want or (isinstance(c, Fill) and isinstance(want, Pattern)
                             and want.step == 0 and _fill_word(c.byte) == want.value) or (
                    isinstance(c, Pattern) and isinstance(want, Pattern) and c.step == want.step
                    and (lo - c.origin) % 8 == 0 and c.word_at(lo) == want.word_at(lo)):
                continue
            found = self._scan(lo, hi, c, want)
            if found is not None:
                return found
        return None

    def _scan(self, lo: int, hi: int, c: Content, want: Pattern | Fill) -> tuple[int, int] | None:
        """Word-by-word comparison of one piece that is not equal symbolically.
        Formula contents are compared on their first page only (enough: both are
        linear in the word index); real bytes are compared page by page."""
        pos = lo
        while pos < hi:
            n = min(hi - pos, PAGE - pos % PAGE)
            data = self._render_piece(pos, pos + n, c)
            expect = render(want, pos, n)
            if data != expect:
                for w in range(0, n, 8):
                    if data[w:w + 8] != expect[w:w + 8]:
                        return pos + w, int.from_bytes(data[w:w + 8], "little")
            if not isinstance(c, Bytes):
                break  # two formulas linear in the word index that agree on a page agree

            pos += n
        return None


def _noise(under: int | None, reader: int | None) -> int:
    """The Ciphertext key of what a reader under `reader` sees of bytes under
    `under`: distinct per pair, never anyone's data."""
    return 0x5E0000 | ((under or 0) & 0xFF) << 8 | ((reader or 0) & 0xFF)


def _fill_word(byte: int) -> int:
    return int.from_bytes(bytes([byte]) * 8, "little")


def render(c: Content, offset: int, length: int) -> bytes:
    """The bytes of content c at [offset, offset+length) (for small ranges)."""
    if isinstance(c, Stale | Ciphertext):
        c = c.as_pattern()
    if isinstance(c, Fill):
        return bytes([c.byte]) * length
    if isinstance(c, Pattern):
        start = offset - (offset - c.origin) % 8  # word-aligned start, relative to origin
        nwords = -(-(offset + length - start) // 8)
        if c.step == 0:  # one word repeated: no loop over the words
            blob = (c.value & _MASK).to_bytes(8, "little") * nwords
        else:
            blob = struct.pack(f"<{nwords}Q", *(c.word_at(start + 8 * i) for i in range(nwords)))
        return blob[offset - start: offset - start + length]
    raise TypeError(f"render of {c!r} needs the page store")


def to_runs(store: PageStore, offset: int, length: int, key: int | None = None,
            base: int = 0) -> list[tuple[int, int, bytes | None, int, int]]:
    """[offset, +length) of `store` as a reader under `key` sees it: (start, end,
    data, word, step) with start/end shifted by base - offset; data None means the
    formula "word i is word + i*step". Costs per extent (DESIGN.md "Scale")."""
    out: list[tuple[int, int, bytes | None, int, int]] = []
    shift = base - offset
    for lo, hi, c in store.runs(offset, length, key):
        if isinstance(c, Stale | Ciphertext):
            c = c.as_pattern()
        if isinstance(c, Fill):
            out.append((lo + shift, hi + shift, None, _fill_word(c.byte), 0))
        elif isinstance(c, Pattern) and (lo - c.origin) % 8 == 0 and lo % 8 == 0 and hi % 8 == 0:
            out.append((lo + shift, hi + shift, None, c.word_at(lo), c.step))
        else:
            out.append((lo + shift, hi + shift, store.read(lo, hi - lo, key), 0, 0))
    return out


def write_runs(store: PageStore, offset: int, runs: list[tuple[int, int, bytes | None, int, int]],
               key: int | None = None) -> None:
    """Write (start, end, data, word, step) runs, start/end relative to `offset`."""
    for start, end, data, word, step in runs:
        if data is not None:
            store.write_bytes(offset + start, data, key)
        elif (offset + start) % 8 == 0 and (end - start) % 8 == 0:
            store.write_pattern(offset + start, end - start, word, step, key)
        else:
            pattern = Pattern(word & _MASK, step & _MASK, offset + start)
            store.write_bytes(offset + start, render(pattern, offset + start, end - start), key)
