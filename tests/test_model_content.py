from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem.model.content import PAGE, PageStore

SIZE = 6 * PAGE

writes = st.lists(
    st.one_of(
        st.tuples(st.just("pattern"), st.integers(0, SIZE // 8 - 1), st.integers(1, 900),
                  st.integers(0, 2**64 - 1), st.integers(0, 3)),
        st.tuples(st.just("fill"), st.integers(0, SIZE - 1), st.integers(1, 3 * PAGE),
                  st.integers(0, 255), st.just(0)),
        st.tuples(st.just("bytes"), st.integers(0, SIZE - 1), st.integers(1, 300),
                  st.integers(0, 255), st.just(0)),
        st.tuples(st.just("clear"), st.integers(0, 5), st.integers(1, 3), st.just(0), st.just(0)),
    ),
    max_size=12,
)


def apply(store, ref, op):
    kind, a, b, c, d = op
    if kind == "pattern":
        off, n = a * 8, min(b, SIZE // 8 - a) * 8
        store.write_pattern(off, n, c, d)
        for i in range(n // 8):
            ref[off + 8 * i: off + 8 * i + 8] = ((c + i * d) % 2**64).to_bytes(8, "little")
    elif kind == "fill":
        n = min(b, SIZE - a)
        store.fill(a, n, c)
        ref[a:a + n] = bytes([c]) * n
    elif kind == "bytes":
        n = min(b, SIZE - a)
        data = bytes((c + i) % 256 for i in range(n))
        store.write_bytes(a, data)
        ref[a:a + n] = data
    else:
        last = min(a + b, SIZE // PAGE)
        store.clear(a, last)
        ref[a * PAGE:last * PAGE] = bytes((last - a) * PAGE)


@settings(max_examples=300)
@given(writes, st.integers(0, SIZE // 8 - 1), st.integers(1, SIZE // 8))
def test_store_matches_a_bytearray(ops, vstart, vlen):
    store, ref = PageStore(), bytearray(SIZE)
    for op in ops:
        apply(store, ref, op)
    assert store.read(0, SIZE) == bytes(ref)
    assert store.read(13, 5000) == bytes(ref[13:5013])
    # first_mismatch agrees with a word-by-word scan against a pattern
    off, n = vstart * 8, min(vlen, SIZE // 8 - vstart) * 8
    from guestmem.model.content import Pattern
    want = Pattern(7, 1, off)
    expected = None
    for w in range(off, off + n, 8):
        if ref[w:w + 8] != want.word_at(w).to_bytes(8, "little"):
            expected = (w, int.from_bytes(ref[w:w + 8], "little"))
            break
    assert store.first_mismatch(off, n, want) == expected


def test_a_terabyte_pattern_is_one_extent_and_verifies_fast():
    store = PageStore()
    tib = 1 << 40
    store.write_pattern(0, tib, 5, 1)
    assert len(store.extents) == 1
    from guestmem.model.content import Pattern
    assert store.first_mismatch(0, tib, Pattern(5, 1, 0)) is None
    store.write_bytes(tib // 2, b"\xff")
    bad = store.first_mismatch(0, tib, Pattern(5, 1, 0))
    assert bad is not None and bad[0] == tib // 2


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=16)),
                min_size=1, max_size=3),
       st.integers(0, SIZE // 8 - 1))
def test_first_mismatch_finds_the_first_corrupted_word(corruptions, vstart):
    """A verified pattern with a few bytes overwritten anywhere: the mismatch named is
    the first word that differs, with what it holds (what a guest's check reports)."""
    from guestmem.model.content import Pattern

    store, ref = PageStore(), bytearray(SIZE)
    store.write_pattern(0, SIZE, 7, 1)
    for i in range(SIZE // 8):
        ref[8 * i: 8 * i + 8] = (7 + i).to_bytes(8, "little")
    for offset, data in corruptions:
        data = data[: SIZE - offset]
        store.write_bytes(offset, data)
        ref[offset:offset + len(data)] = data
    off = vstart * 8
    want = Pattern(7, 1, 0)
    expected = next(((w, int.from_bytes(ref[w:w + 8], "little")) for w in range(off, SIZE, 8)
                     if ref[w:w + 8] != want.word_at(w).to_bytes(8, "little")), None)
    assert store.first_mismatch(off, SIZE - off, want) == expected


def test_kept_across_conversion_names_every_page_that_still_holds_the_old_owners_data():
    """PageStore.remember / kept_across_conversion (the invariant behind in-place
    conversion): every run and every byte page still as it was is reported, in
    order; zeros, and pages written since, are not."""
    from guestmem.model.content import Fill, PageStore

    store = PageStore()
    store.fill(0, 2 * PAGE, 0x11)  # pages 0-1
    store.fill(2 * PAGE, PAGE, 0)  # page 2: zeros, nobody's data
    store.write_bytes(3 * PAGE + 5, b"old bytes")  # page 3: real bytes
    store.fill(4 * PAGE, 2 * PAGE, 0x22)  # pages 4-5
    store.remember(store.contents([(0, 6)]))
    assert store.kept_across_conversion(0, 6) == [(0, 2), (3, 4), (4, 6)]
    store.write_bytes(3 * PAGE, b"\x01")  # the new owner writes page 3
    store.set(5, 6, Fill(0x33))  # and page 5
    assert store.kept_across_conversion(0, 6) == [(0, 2), (4, 5)]
