"""bench/policies.py: what seed 004's designs (the model's conversion policies)
let each workload do. Outcomes and the model's counters, never times."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from guestmem import program as p
from tests import bench_module

POLICIES = ("per-page", "whole-file", "no-get-pfn-while-mapped", "rmap-switch")


@pytest.fixture(scope="module")
def bench():
    yield from bench_module.load("policies")


@pytest.fixture(scope="module")
def table(bench):
    """{(row label, policy): Outcome} for every workload under every policy."""
    labels = {w.name: w.label for w in bench.WORKLOADS}
    return {(labels[o.workload], o.policy): o for o in bench.run_all()}


def test_the_policies_are_the_models_in_the_seeds_order(bench):
    assert bench.POLICIES == POLICIES


def test_every_run_keeps_the_models_invariants(table):
    assert len(table) == 6 * 4
    assert {key: o.violations for key, o in table.items() if o.violations} == {}
    assert not [o.notes for o in table.values() if any("teardown" in n for n in o.notes)]


def test_per_page_runs_every_workload(table):
    for label in ("selftest", "QEMU pieces", "QEMU 1 mmap", "Firecracker", "pKVM munmap",
                  "pKVM mapped"):
        outcome = table[label, "per-page"]
        assert (outcome.works, outcome.cell) == (True, "works"), (label, outcome.detail)
    selftest = table["selftest", "per-page"].steps
    assert "to private, pinned (EAGAIN, as expected)" in selftest, "elevated_refcount"
    assert "error_offset" in selftest
    assert selftest.count("child access") == 2, "forked_accesses: SIGBUS on read and write"


def test_per_page_qemu_reclaims_its_dma_buffer_after_an_eagain(table):
    """The buffer the VMM pinned for DMA: to private meets EAGAIN, the VMM drops
    its own pin and retries (Vmm._convert_in_place)."""
    for label in ("QEMU pieces", "QEMU 1 mmap"):
        notes = table[label, "per-page"].notes
        assert len(notes) == 1 and "EAGAIN" in notes[0] and "dropped its pin" in notes[0], notes


def test_whole_file_refuses_qemus_pieces_and_any_conversion_while_mapped(table):
    pieces = table["QEMU pieces", "whole-file"]
    assert (pieces.cell, pieces.kind) == ("EINVAL: mmap pieces", "errno")
    assert "whole-file" in pieces.detail
    # one mmap of the whole file is allowed; the guest's to-private is then EBUSY
    for label in ("QEMU 1 mmap", "Firecracker"):
        outcome = table[label, "whole-file"]
        assert (outcome.cell, outcome.kind) == ("EBUSY: MAP_GPA_RANGE", "conversion"), label
    assert table["selftest", "whole-file"].cell == "EBUSY: to private"
    assert table["pKVM mapped", "whole-file"].cell == "EBUSY: convert 256M"


def test_rmap_switch_refuses_every_pin_with_efault(table):
    assert table["QEMU pieces", "rmap-switch"].cell == "EFAULT: DMA pin"
    assert table["QEMU 1 mmap", "rmap-switch"].cell == "EFAULT: DMA pin"
    assert table["Firecracker", "rmap-switch"].cell == "EFAULT: O_DIRECT pin"
    selftest = table["selftest", "rmap-switch"]
    assert selftest.cell == "EFAULT: pin"
    assert selftest.steps.count("child access") == 2, "the fork's SIGBUS came before the pin"


def test_no_get_pfn_while_mapped_fails_the_guests_fault_with_ebusy(table):
    firecracker = table["Firecracker", "no-get-pfn-while-mapped"]
    assert (firecracker.cell, firecracker.kind) == ("EBUSY: guest boot", "memory_fault")
    assert table["QEMU pieces", "no-get-pfn-while-mapped"].cell == "EBUSY: guest boot"
    assert table["selftest", "no-get-pfn-while-mapped"].cell == "EBUSY: guest rmw"
    mapped = table["pKVM mapped", "no-get-pfn-while-mapped"]
    assert mapped.cell == "EBUSY: guest verify"
    assert "convert 256M" in mapped.steps, "the conversion itself is allowed"


def test_the_pkvm_hand_off_works_where_it_should_with_the_buffer_kept(table):
    """After a munmap every policy hands the 256 MiB over; kept mapped, only the
    policies that unmap for the conversion do (per-page, rmap-switch). "guest
    verify" is the guest's VerifyPattern over all 256 MiB: the host's bytes."""
    for policy in POLICIES:
        outcome = table["pKVM munmap", policy]
        assert outcome.works, (policy, outcome.cell)
        assert outcome.steps[-2:] == ["convert 256M", "guest verify"]
    for policy in ("per-page", "rmap-switch"):
        outcome = table["pKVM mapped", policy]
        assert outcome.works, (policy, outcome.cell)
        assert outcome.steps[-2:] == ["guest verify", "host read private (SIGBUS, as expected)"]


def test_costs_are_the_whole_workloads_or_up_to_the_failure(bench, table):
    pages = bench.HANDOFF // bench.PS
    # one conversion of nothing the guest had mapped: one invalidation, no flush;
    # kept mapped, the host's 65536 PTEs are zapped, after a munmap there are none
    assert table["pKVM munmap", "per-page"].cost == "1/0/0/0"
    assert table["pKVM mapped", "per-page"].cost == f"1/0/0/{pages}"
    assert table["pKVM mapped", "rmap-switch"].cost == f"1/0/0/{pages}"
    # failed before any conversion: nothing was invalidated
    for key in (("QEMU pieces", "whole-file"), ("Firecracker", "no-get-pfn-while-mapped")):
        assert table[key].cost == "0/0/0/0", key
    # the selftest: 4 single-page round trips (8), page 4, page 6, pages 0-7 (the
    # EAGAIN changes nothing)
    assert table["selftest", "per-page"].invalidations == 11
    firecracker = table["Firecracker", "per-page"]
    assert (firecracker.invalidations, firecracker.s2_zapped) == (3, 48 + 4)


def test_a_guest_that_reads_other_data_fails_as_wrong_data(bench):
    def workload(run):
        vmm = run.vmm(bench.SW)
        run.step("mmap", vmm.add_memory, bench.GPA, bench.PS)
        run.step("write", vmm.write, bench.GPA, bench.words(1, bench.PS))
        run.guest("guest verify", vmm, p.VerifyPattern(bench.GPA, bench.PS, 2))

    outcome = bench.run_one(bench.Workload("wrong", "wrong", workload), "per-page")
    assert (outcome.works, outcome.cell, outcome.kind) == (False, "wrong data: guest verify",
                                                           "check")
    assert outcome.steps == ["mmap", "write"]


def test_json_lists_every_cell(bench, capsys):
    assert bench.main(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policies"] == list(POLICIES)
    assert [w["label"] for w in out["workloads"]] == [w.label for w in bench.WORKLOADS]
    assert all(w["steps"] for w in out["workloads"]), "each workload documents its steps"
    assert len(out["results"]) == 24
    cells = {(r["workload"], r["policy"]): r["cell"] for r in out["results"]}
    assert cells["QEMU in-place backend", "whole-file"] == "EINVAL: mmap pieces"


def test_one_workload_and_policy_can_be_chosen(bench, capsys):
    assert bench.main(["--json", "-w", "pKVM munmap", "-p", "whole-file"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["workload"], r["policy"], r["cell"]) for r in results] == [
        ("pKVM 256 MiB hand-off", "whole-file", "works")]


def test_the_tables_fit_80_columns_and_the_markdown_has_both(bench):
    outcomes = bench.run_all()
    buffer = io.StringIO()
    bench.print_tables(Console(file=buffer, width=80), outcomes)
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    md = bench.markdown(outcomes).splitlines()
    assert md[0] == "| workload | " + " | ".join(POLICIES) + " |"
    assert sum(line.startswith("| selftest |") for line in md) == 2
