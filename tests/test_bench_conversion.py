"""bench/conversion.py in quick mode: the counters it reports are the model's
costs of each conversion (never its times)."""

from __future__ import annotations

import json

import pytest

from tests import bench_module

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40


@pytest.fixture(scope="module")
def bench():
    yield from bench_module.load("conversion")


def counters(row):
    return (row.invalidations, row.tlb_flushes, row.s2_zapped, row.ptes_zapped)


def test_a_2mib_conversion_zaps_what_was_mapped_with_one_invalidation_and_flush(bench):
    rows = bench.table1(batches=2, pairs=3, ranges={"2 MiB": 2 * MIB})
    assert [(r.to, r.mode) for r in rows] == [("private", "mapped"), ("shared", "mapped"),
                                              ("private", "unmapped"), ("shared", "unmapped")]
    to_private, to_shared, private_only, shared_only = rows
    # host-mapped and stage-2 mapped: 512 host PTEs and 512 stage-2 pages, 1 + 1
    assert (to_private.host_mapped, to_private.s2_mapped) == (512, 512)
    assert to_private.mapped_label() == "host+S2"
    assert counters(to_private) == (1, 1, 512, 512)
    # private: the host cannot map it; the guest's private mappings are zapped
    assert (to_shared.host_mapped, to_shared.s2_mapped) == (0, 512)
    assert to_shared.mapped_label() == "S2"
    assert counters(to_shared) == (1, 1, 512, 0)
    # nothing mapped: still an invalidation, but nothing to zap and no flush
    for row in (private_only, shared_only):
        assert (row.host_mapped, row.s2_mapped, row.mapped_label()) == (0, 0, "none")
        assert counters(row) == (1, 0, 0, 0)
    assert all(r.ops == 6 and len(r.us_batches) == 2 for r in rows)


def test_every_range_zaps_its_pages_and_nothing_else(bench):
    rows = bench.table1(batches=1, pairs=2)
    for name, length in bench.RANGES.items():
        pages = length // bench.PS
        to_private, to_shared = (r for r in rows if r.case == name and r.mode == "mapped")
        assert counters(to_private) == (1, 1, pages, pages), name
        assert counters(to_shared) == (1, 1, pages, 0), name


def test_the_same_conversion_costs_the_same_counters_on_1gib_and_1tib(bench):
    rows = bench.table2(batches=1, pairs=2, frag_pairs=1,
                        guests={"1 GiB": GIB, "1 TiB": TIB})
    small, large = rows[: len(rows) // 2], rows[len(rows) // 2:]
    assert [(r.case, r.to) for r in small] == [(r.case, r.to) for r in large]
    for a, b in zip(small, large, strict=True):
        assert (a.guest, b.guest) == (GIB, TIB)
        assert counters(a) == counters(b), a.case
        assert (a.host_mapped, a.s2_mapped) == (b.host_mapped, b.s2_mapped), a.case
    by_case = {(r.case, r.to): r for r in large}
    gib_pages = GIB // bench.PS
    assert counters(by_case["2 MiB", "private"]) == (1, 1, 512, 512)
    assert counters(by_case["1 GiB", "private"]) == (1, 1, gib_pages, gib_pages)
    assert counters(by_case["2 MiB, frag.", "private"]) == (1, 1, 512, 512)
    # the fragmented GiB: the host maps its shared half only; one invalidation for
    # all 256 runs, and stage 2 loses the whole GiB
    frag_private, frag_shared = by_case["1 GiB, frag.", "private"], by_case["1 GiB, frag.",
                                                                          "shared"]
    assert (frag_private.host_mapped, frag_private.s2_mapped) == (gib_pages // 2, gib_pages)
    assert frag_private.mapped_label() == "host 50%+S2"
    assert counters(frag_private) == (1, 1, gib_pages, gib_pages // 2)
    assert counters(frag_shared) == (1, 1, gib_pages, 0)


def test_the_whole_1tib_guest_converts_in_one_invalidation(bench):
    whole = bench.whole_guest(TIB)
    pages = TIB // bench.PS
    assert (whole.invalidations, whole.tlb_flushes) == (1, 1)
    assert whole.s2_zapped == whole.ptes_zapped == pages


def test_quick_json_run(bench, capsys):
    assert bench.main(["--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["quick"]
    assert len(out["table1"]) == 4 * len(bench.RANGES)
    assert len(out["table2"]) == 2 * len(bench.CASES) * len(bench.GUESTS)
    assert [w["guest"] for w in out["whole_guest"]] == list(bench.GUESTS.values())
    assert all(w["s2_zapped"] == w["guest"] // bench.PS for w in out["whole_guest"])
    assert out["peak_rss_mb"] > 0
