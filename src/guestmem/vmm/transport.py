"""Private pages leaving through the firmware, modelled (issue 11 part 2).

SEV's SEND_UPDATE_DATA hands the host a run of guest pages encrypted and
integrity-protected under a transport key that the source and destination
firmware agreed on; the host only carries the blob, and RECEIVE_UPDATE_DATA
imports it where it was sent from, or refuses it. Here AES-256-GCM (the
`cryptography` library) plays the firmware: the gfn, the page count and the
page's state (private or shared, and how it was when sent) are authenticated
data, so a blob cannot be replayed at another gfn or as another state, and a
damaged one, or one under another key, is refused whole. Nonces come from a
counter per exporter, never repeating under one key.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAGE = 4096
_HEADER = struct.Struct("<QQB")  # gfn, pages, state
_NONCE = 12


class TransportError(ValueError):
    """A blob the importing firmware refuses."""


@dataclass(frozen=True)
class ImportedPages:
    gfn: int
    pages: int
    state: int
    data: bytes


class TransportKey:
    """The transport key both firmwares hold (the launch's shared secret)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else AESGCM.generate_key(bit_length=256)
        if len(self.key) != 32:
            raise ValueError("a transport key is 32 bytes (AES-256)")


class Exporter:
    """SEND_UPDATE_DATA on the source: one exporter per stream. Its nonces count
    up from a random prefix, and `finish()` seals how many blobs it made, so an
    Importer refuses a blob replayed from earlier, reordered or dropped, and a
    stream cut before its last blob (SEND_FINISH's role here)."""

    def __init__(self, key: TransportKey) -> None:
        self._aead = AESGCM(key.key)
        self._prefix = os.urandom(4)
        self._counter = 0

    def export(self, gfn: int, pages: int, state: int, data: bytes) -> bytes:
        """gfn, page count and state in the clear (authenticated), then the nonce
        and `data` (the pages' contents as the migration encodes them: bytes, or
        runs of alike pages) encrypted with their tag."""
        if pages <= 0 or not data:
            raise ValueError("pages are exported whole: at least one, with their contents")
        header = _HEADER.pack(gfn, pages, state)
        nonce = self._prefix + self._counter.to_bytes(8, "little")
        self._counter += 1
        return header + nonce + self._aead.encrypt(nonce, data, header)


    def finish(self) -> bytes:
        """The count of blobs exported, sealed under the key with the next nonce."""
        nonce = self._prefix + self._counter.to_bytes(8, "little")
        count = self._counter.to_bytes(8, "little")
        return nonce + self._aead.encrypt(nonce, count, _FINISH)


_FINISH = b"guestmem SEND_FINISH"


class Importer:
    """RECEIVE_UPDATE_DATA for one stream: each blob must carry the next nonce of
    the exporter that began the stream (the first blob fixes its prefix), and
    `finish()` must find exactly the blobs imported. Anything else is refused."""

    def __init__(self, key: TransportKey) -> None:
        self.key = key
        self._prefix: bytes | None = None
        self._counter = 0

    def import_pages(self, blob: bytes) -> ImportedPages:
        if len(blob) >= _HEADER.size + _NONCE:
            self._check_nonce(blob[_HEADER.size:_HEADER.size + _NONCE], "pages")
        pages = import_pages(self.key, blob)
        self._counter += 1
        return pages

    def finish(self, sealed: bytes) -> int:
        """The exporter's count, if it equals what was imported; else TransportError."""
        if len(sealed) != _NONCE + 8 + 16:
            raise TransportError("a finish record of the wrong size")
        self._check_nonce(sealed[:_NONCE], "the finish record")
        try:
            count = AESGCM(self.key.key).decrypt(sealed[:_NONCE], sealed[_NONCE:], _FINISH)
        except InvalidTag:
            raise TransportError("the finish record: authentication failed") from None
        sent = int.from_bytes(count, "little")
        if sent != self._counter:
            raise TransportError(f"the source exported {sent} private blobs, "
                                 f"{self._counter} arrived")
        return sent

    def _check_nonce(self, nonce: bytes, what: str) -> None:
        prefix, counter = nonce[:4], int.from_bytes(nonce[4:], "little")
        if self._prefix is None:
            self._prefix = prefix
        if prefix != self._prefix or counter != self._counter:
            raise TransportError(f"{what}: blob {counter} of stream {prefix.hex()} where blob "
                                 f"{self._counter} of stream {self._prefix.hex()} was due "
                                 "(replayed, reordered or dropped)")


def import_pages(key: TransportKey, blob: bytes) -> ImportedPages:
    """RECEIVE_UPDATE_DATA on the destination: the pages and where and how they
    were sent, or TransportError if anything was changed or the key differs."""
    if len(blob) < _HEADER.size + _NONCE + 16:
        raise TransportError("a blob shorter than its header, nonce and tag")
    header, nonce = blob[:_HEADER.size], blob[_HEADER.size:_HEADER.size + _NONCE]
    gfn, pages, state = _HEADER.unpack(header)
    try:
        data = AESGCM(key.key).decrypt(nonce, blob[_HEADER.size + _NONCE:], header)
    except InvalidTag:
        raise TransportError(f"pages at gfn {gfn:#x}: authentication failed (damaged, "
                             "moved, or under another transport key)") from None
    return ImportedPages(gfn, pages, state, data)
