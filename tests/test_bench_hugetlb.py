"""bench/hugetlb.py: the HugeTLB split and merge policies on a CoCo boot and on
conversions. The quick run, once, and what must hold in it: counters, memory by
folio size, stage-2 leaf sizes and the plots; never times."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from tests import bench_module

PAGE, MIB, GIB = 4096, 1 << 20, 1 << 30
GIB_PAGES = GIB // PAGE
POLICIES = ("dynamic", "eager-4k", "stepwise", "lazy")
# HVO keeps one vmemmap page per huge folio; a 2 MiB folio split to 4 KiB needs 8
# pages of struct page (512 x 64 bytes), a 1 GiB one 4096.
RESTORE_1G_TO_4K = 4095
RESTORE_1G_TO_2M = 512 - 1
RESTORE_2M_TO_4K = 8 - 1


@pytest.fixture(scope="module")
def bench():
    yield from bench_module.load("hugetlb")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """The quick run through main(), as a script would: (exit status, its JSON)."""
    plots = tmp_path_factory.mktemp("plots")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = bench.main(["--quick", "--json", "--plot-dir", str(plots)])
    return status, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def runs(bench, quick):
    """{(policy, workload): Result}."""
    return {(r["policy"], r["workload"]): bench.Result.from_json(r) for r in quick[1]["runs"]}


def test_the_quick_run_runs_every_policy_on_both_workloads_and_keeps_the_invariants(quick,
                                                                                     runs):
    status, out = quick
    assert status == 0
    assert out["parameters"]["quick"] and out["policies"] == list(POLICIES)
    assert set(runs) == {(p, w) for p in POLICIES for w in "AB"}
    assert {key: r.violations for key, r in runs.items() if r.violations} == {}
    for (_, workload), r in runs.items():
        assert r.ops == (out["parameters"]["ops"] if workload == "B" else r.samples[-1].at)
        assert r.peak_rss_mib > 0 and r.in_process


def test_memory_by_page_size_always_sums_to_the_allocated_bytes(runs):
    for key, r in runs.items():
        for s in r.samples:
            assert sum(s.memory.values()) == s.allocated == r.guest, (key, s.label, s.at)
        assert r.final == r.samples[-1]


def test_eager_4k_splits_every_folio_at_allocation_and_never_maps_huge(runs):
    for workload in "AB":
        r = runs["eager-4k", workload]
        folios = r.guest // GIB
        boot = r.samples[0]
        assert boot.label == "boot"
        assert (boot.splits, boot.vmemmap_restored) == (folios, folios * RESTORE_1G_TO_4K * PAGE)
        for s in r.samples:
            assert (s.splits, s.merges, s.vmemmap_freed) == (folios, 0, 0), "never again"
            assert s.memory == {"4 KiB": r.guest, "2 MiB": 0, "1 GiB": 0}
            assert s.huge_mapped() == 0, (workload, s.label, s.at)
        assert r.huge_mappable == 0
    assert runs["eager-4k", "A"].samples[0].stage2["4 KiB"] == runs["eager-4k", "A"].guest


def test_the_other_policies_boot_onto_1g_leaves(runs):
    for policy in ("dynamic", "stepwise", "lazy"):
        boot = runs[policy, "A"].samples[0]
        assert boot.splits == 0
        assert boot.stage2 == {"4 KiB": 0, "2 MiB": 0, "1 GiB": runs[policy, "A"].guest}


def folios_of(offset, length):
    return set(range(offset // GIB, (offset + length - 1) // GIB + 1))


def test_dynamic_splits_only_the_1g_folios_its_shared_buffers_cut(runs):
    r = runs["dynamic", "A"]
    cut: set[int] = set()
    for step in r.steps:
        if step.action == "convert":
            new = folios_of(step.offset, step.length) - cut
            assert step.splits == len(new), step
            assert step.vmemmap_restored == len(new) * RESTORE_1G_TO_4K * PAGE
            assert step.whole_before == (not folios_of(step.offset, step.length) & cut)
            cut |= new
        else:
            assert (step.splits, step.merges) == (0, 0), "host and guest faults split nothing"
    assert cut == set().union(*(folios_of(b.offset, b.length) for b in r.buffers))
    assert 1 < len(cut) < r.guest // GIB
    assert (r.final.splits, r.final.merges) == (len(cut), 0)
    assert r.final.memory == {"4 KiB": len(cut) * GIB, "2 MiB": 0,
                              "1 GiB": r.guest - len(cut) * GIB}
    # the folios no buffer cut stay mapped with 1 GiB leaves
    assert r.final.stage2["1 GiB"] == r.guest - len(cut) * GIB


def test_stepwise_restores_518_vmemmap_pages_for_a_first_4k_cut_of_a_1g_folio(runs):
    r = runs["stepwise", "A"]
    first_4k_cuts = [s for s in r.steps if s.action == "convert" and s.length == 4096
                     and s.whole_before]
    assert first_4k_cuts, "the quick run has a 4 KiB ring alone in its 1 GiB folio"
    for step in first_4k_cuts:
        assert step.vmemmap_restored == (RESTORE_1G_TO_2M + RESTORE_2M_TO_4K) * PAGE == \
            518 * PAGE
        assert step.splits == 2, "1 GiB -> 2 MiB, then the one 2 MiB piece -> 4 KiB"
    (swiotlb,) = [s for s in r.steps if s.kind == "swiotlb" and s.action == "convert"]
    pieces = 64 * MIB // (2 * MIB)
    assert swiotlb.whole_before and swiotlb.splits == 1 + pieces
    assert swiotlb.vmemmap_restored == (RESTORE_1G_TO_2M + pieces * RESTORE_2M_TO_4K) * PAGE
    # only the 2 MiB pieces the buffers cut are 4 KiB; the rest of a cut folio is 2 MiB
    assert r.final.memory["4 KiB"] < 64 * 2 * MIB < r.final.memory["2 MiB"]
    assert r.huge_mappable == r.guest - r.final.memory["4 KiB"]


def test_lazy_splits_nothing_until_a_host_fault(runs):
    r = runs["lazy", "A"]
    assert all(s.splits == 0 for s in r.steps if s.action != "host")
    by_label = {s.label: s for s in r.samples}
    assert by_label["swiotlb convert"].splits == 0
    assert by_label["swiotlb convert"].memory["1 GiB"] == r.guest, "shared, still 1 GiB"
    first_host = next(s for s in r.steps if s.action == "host")
    assert (first_host.kind, first_host.splits) == ("swiotlb", 1)
    assert first_host.vmemmap_restored == RESTORE_1G_TO_4K * PAGE
    # in the end the same folios are split as under dynamic: those the host wrote to
    assert r.final.memory == runs["dynamic", "A"].final.memory


def test_workload_b_converts_both_ways_and_restructures_per_policy(runs, quick):
    every = quick[1]["parameters"]["ops"] // quick[1]["parameters"]["samples"]
    for policy in POLICIES:
        r = runs[policy, "B"]
        assert [s.at for s in r.samples][:2] == [0, every]
        assert r.samples[-1].at == r.ops
    assert runs["dynamic", "B"].final.merges > 0
    assert runs["stepwise", "B"].final.memory["2 MiB"] > 0
    assert all(s.memory["2 MiB"] == 0 for p in ("dynamic", "eager-4k", "lazy")
               for s in runs[p, "B"].samples)


def test_the_plots_are_written(quick):
    paths = [Path(p) for p in quick[1]["plots"]]
    assert [p.name for p in paths] == ["hugetlb-coco-boot.png", "hugetlb-conversions.png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 10_000 and data.startswith(b"\x89PNG\r\n\x1a\n"), path


def test_the_sweep_does_the_same_work_at_every_size(bench, quick):
    rows = [bench.SweepRow(**r) for r in quick[1]["sweep"]]
    sizes = list(bench.QUICK.sweep_sizes)
    assert sizes == [GIB, 16 * GIB, 256 * GIB, 1 << 40]
    assert [(r.policy, r.guest) for r in rows] == [(p, s) for p in POLICIES for s in sizes]
    for policy in POLICIES:
        work = {(r.splits, r.merges, r.ops) for r in rows if r.policy == policy}
        assert len(work) == 1, (policy, work)
    by_policy = {r.policy: (r.splits, r.merges) for r in rows}
    assert by_policy["eager-4k"] == by_policy["lazy"] == (0, 0)
    # 2 pairs' worth of each of 4 KiB, 2 MiB, 1 GiB (quick: 3 pairs x 2 batches):
    # dynamic splits the 1 GiB folio each time; stepwise 1G->2M and the cut 2M
    # pieces (1 for 4 KiB and 2 MiB, all 512 for 1 GiB), and merges as many back
    assert by_policy["dynamic"] == (6, 6)
    assert by_policy["stepwise"] == (2 * (2 + 2 + 513),) * 2
    assert set(quick[1]["sweep_spread"]) == set(POLICIES)


def test_the_tables_fit_80_columns_and_the_markdown_has_every_row(bench, runs, quick):
    results = list(runs.values())
    rows = [bench.SweepRow(**r) for r in quick[1]["sweep"]]
    buffer = io.StringIO()
    bench.print_tables(Console(file=buffer, width=80), results, rows)
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    md = bench.markdown(results, rows)
    assert md.count("| dynamic |") == 3 and "| policy | ops/s | peak RSS MiB |" in md


def test_a_run_in_a_child_process_comes_back_whole(bench):
    cfg = replace(bench.QUICK, guest=2 * GIB, virtio=2, dma=1)
    seen = []
    result = bench.run_in_child("stepwise", "A", cfg, lambda done, total: seen.append(done))
    assert not result.in_process and result.violations == []
    assert seen and seen[-1] == result.ops
    assert [s.label for s in result.samples][:2] == ["boot", "swiotlb convert"]


def test_a_broken_invariant_is_a_failing_exit(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "violations", lambda kvm: ["made up"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = bench.main(["--quick", "-p", "lazy", "--ops", "50", "--sweep-batches", "1",
                             "--plot-dir", str(tmp_path)])
    assert status == 1 and "model invariant broken" in out.getvalue()


def test_a_saved_report_is_shown_and_plotted_again(bench, quick, tmp_path):
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(quick[1]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = bench.main(["--load", str(saved), "--markdown", "--plot-dir", str(tmp_path)])
    assert status == 0 and out.getvalue() == bench.markdown(
        [bench.Result.from_json(r) for r in quick[1]["runs"]],
        [bench.SweepRow(**r) for r in quick[1]["sweep"]])
    assert (tmp_path / "hugetlb-conversions.png").stat().st_size > 10_000
