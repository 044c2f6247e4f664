from hypothesis import given
from hypothesis import strategies as st

from guestmem.extents import ExtentMap

N = 64
ops = st.lists(
    st.tuples(st.integers(0, N), st.integers(0, N), st.sampled_from([None, "a", "b"])),
    max_size=30,
)


@given(ops, st.booleans())
def test_matches_a_per_point_reference(operations, use_take):
    emap: ExtentMap[str] = ExtentMap()
    ref: list[str | None] = [None] * N
    for start, end, value in operations:
        if value is None and use_take:
            had = sum(v is not None for v in ref[start:end])
            assert emap.take(start, end) == had
        else:
            emap.set(start, end, value)
        for i in range(start, min(end, N)):
            ref[i] = value
    assert [emap.get(i) for i in range(N)] == ref
    # Invariants: sorted, non-overlapping, non-empty, adjacent equal extents merged.
    items = list(emap.items())
    for (s1, e1, v1), (s2, _, v2) in zip(items, items[1:], strict=False):
        assert s1 < e1 <= s2
        assert not (e1 == s2 and v1 == v2)
    assert emap.covered(0, N) == sum(v is not None for v in ref)
    gaps = [i for a, b in emap.gaps(0, N) for i in range(a, b)]
    assert gaps == [i for i, v in enumerate(ref) if v is None]


def test_all_equal_and_overlapping():
    emap: ExtentMap[int] = ExtentMap()
    emap.set(10, 20, 1)
    emap.set(20, 30, 1)
    assert list(emap.items()) == [(10, 30, 1)]
    assert emap.all_equal(12, 28, 1)
    assert not emap.all_equal(5, 28, 1)
    assert emap.all_equal(0, 10, None)
    assert list(emap.overlapping(15, 40)) == [(15, 30, 1)]


def test_a_terabyte_of_pages_is_one_extent():
    emap: ExtentMap[str] = ExtentMap()
    pages = (1 << 40) >> 12
    emap.set(0, pages, "shared")
    emap.set(pages // 2, pages // 2 + 1, "private")
    assert len(emap) == 3
    assert emap.get(pages - 1) == "shared"


def test_many_sublists_against_a_per_point_reference():
    """Enough boundaries that sortedcontainers splits its list into many sublists
    (about 1,000 keys each), and ranges wide enough to remove more than a few
    boundaries at once: the paths the small property test above cannot reach."""
    import random

    rng = random.Random(3)
    n = 200_000
    emap: ExtentMap[int] = ExtentMap()
    ref: list[int | None] = [None] * n
    for step in range(8_000):
        start = rng.randrange(n)
        end = min(n, start + (rng.randrange(1, 800) if step % 100 == 0 else rng.randrange(1, 8)))
        value = rng.choice([None, 1, 2, 3])
        if value is None and step % 2:
            assert emap.take(start, end) == sum(v is not None for v in ref[start:end])
        else:
            emap.set(start, end, value)
        ref[start:end] = [value] * (end - start)
        if step % 500 == 0:
            for point in rng.sample(range(n), 200):
                assert emap.get(point) == ref[point]
    assert emap.boundaries() > 5_000  # several sublists
    edges = {p + d for s, e, _ in emap.items() for p in (s, e) for d in (-1, 0) if 0 <= p + d < n}
    assert all(emap.get(point) == ref[point] for point in edges)  # sublist ends among them
    rebuilt: list[int | None] = [None] * n
    for s, e, v in emap.items():
        rebuilt[s:e] = [v] * (e - s)
    assert rebuilt == ref


def test_repr_lists_the_extents_in_hex():
    """What a failing assertion on model state prints: each extent, half-open, in hex."""
    m: ExtentMap[object] = ExtentMap()
    assert repr(m) == "ExtentMap()"
    m.set(0, 2, "a")
    m.set(0x10, 0x19, 1)
    assert repr(m) == "ExtentMap([0x0,0x2)='a', [0x10,0x19)=1)"
