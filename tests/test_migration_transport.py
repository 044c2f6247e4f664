"""Private pages through the modelled firmware (guestmem.vmm.transport): they come
back only where, as and under the key they were sent; nothing private crosses in
plaintext."""

from __future__ import annotations

import struct

import pytest

from guestmem.vmm.transport import Exporter, TransportError, TransportKey, import_pages

PAGE = 4096
PRIVATE = 1
SECRET = (b"private guest data, page " * 400)[:2 * PAGE]


def test_pages_come_back_with_their_gfn_and_state():
    key = TransportKey()
    blob = Exporter(key).export(0x1234, 2, PRIVATE, SECRET)
    got = import_pages(key, blob)
    assert (got.gfn, got.pages, got.state, got.data) == (0x1234, 2, PRIVATE, SECRET)


def test_nothing_private_crosses_in_plaintext():
    blob = Exporter(TransportKey()).export(7, 2, PRIVATE, SECRET)
    assert SECRET[:32] not in blob and b"private guest data" not in blob


def test_every_flipped_bit_is_refused():
    key = TransportKey()
    blob = Exporter(key).export(9, 1, PRIVATE, bytes(PAGE))
    for at in range(len(blob)):
        damaged = bytearray(blob)
        damaged[at] ^= 0x04
        with pytest.raises(TransportError):
            import_pages(key, bytes(damaged))


def test_a_blob_cannot_be_moved_to_another_gfn_or_state():
    key = TransportKey()
    blob = Exporter(key).export(0x10, 2, PRIVATE, SECRET)
    for gfn, state in ((0x11, PRIVATE), (0x10, 0)):
        moved = struct.pack("<QQB", gfn, 2, state) + blob[17:]
        with pytest.raises(TransportError, match="authentication failed"):
            import_pages(key, moved)


def test_another_key_or_a_short_blob_is_refused():
    blob = Exporter(TransportKey()).export(1, 1, PRIVATE, bytes(PAGE))
    with pytest.raises(TransportError, match="another transport key"):
        import_pages(TransportKey(), blob)
    with pytest.raises(TransportError, match="shorter"):
        import_pages(TransportKey(), blob[:20])


def test_nonces_never_repeat_under_one_exporter():
    exporter = Exporter(TransportKey())
    blobs = [exporter.export(0, 1, PRIVATE, bytes(PAGE)) for _ in range(100)]
    assert len({b[17:29] for b in blobs}) == 100
    assert len(set(blobs)) == 100, "the same page exported twice is two different blobs"


def test_pages_are_exported_whole_and_keys_are_aes_256():
    exporter = Exporter(TransportKey())
    for pages, data in ((1, b""), (0, bytes(PAGE)), (-1, bytes(PAGE))):
        with pytest.raises(ValueError, match="whole"):
            exporter.export(0, pages, PRIVATE, data)
    with pytest.raises(ValueError, match="32 bytes"):
        TransportKey(bytes(16))


def test_an_importer_takes_blobs_only_in_the_order_they_were_made():
    """A blob replayed from earlier, a dropped one, one from another stream, and a
    count that does not match are refused (the host carries the blobs and may try
    to roll a private page back)."""
    from guestmem.vmm.transport import Importer

    key = TransportKey()
    exporter = Exporter(key)
    blobs = [exporter.export(i, 1, PRIVATE, bytes([i]) * 8) for i in range(3)]
    sealed = exporter.finish()
    importer = Importer(key)
    assert importer.import_pages(blobs[0]).data == bytes(8)
    for bad in (blobs[0], blobs[2], Exporter(key).export(1, 1, PRIVATE, b"x" * 8)):
        with pytest.raises(TransportError, match="replayed, reordered or dropped"):
            importer.import_pages(bad)
    importer.import_pages(blobs[1])
    with pytest.raises(TransportError, match="due"):  # the finish is not the next blob
        importer.finish(sealed)
    importer.import_pages(blobs[2])
    assert importer.finish(sealed) == 3
    short = Importer(key)
    short.import_pages(blobs[0])
    with pytest.raises(TransportError):
        short.finish(sealed)
    damaged = bytearray(sealed)
    damaged[-1] ^= 1
    complete = Importer(key)
    for blob in blobs:
        complete.import_pages(blob)
    with pytest.raises(TransportError, match="authentication failed"):
        complete.finish(bytes(damaged))
