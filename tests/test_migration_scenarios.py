"""Seed 001's races and R1/R2/R9 as scenarios (guestmem.vmm.scenarios): the safe
protocols pass every one; each unsafe variant fails where the seed says, and the
guest's own obligations take the blame where the guest broke them."""

from __future__ import annotations

import pytest

from guestmem.vmm import migration
from guestmem.vmm.migration import SAFE_GMEM, SAFE_SEV, VARIANTS, Sent, Source
from guestmem.vmm.scenarios import (
    PAGE,
    SCENARIOS,
    Finding,
    P,
    Q,
    run_scenario,
    safe_variant,
    verdict_table,
    vm_attributes_vmm,
)

PFN, QFN = P // PAGE, Q // PAGE


def verdict(scenario: str, variant: str):
    return run_scenario(SCENARIOS[scenario], VARIANTS[variant])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_safe_protocol_passes_every_scenario(name):
    v = verdict(name, safe_variant(SCENARIOS[name]))
    assert v.passed, v.as_json()
    assert v.stats.rounds[-1].phase == "stop-and-copy" if v.migrated else v.refused


def test_every_scenario_has_a_verdict_under_every_variant():
    table = verdict_table()
    assert len(table) == len(SCENARIOS) * len(VARIANTS)
    assert {v.outcome for v in table} >= {"ok", "corrupted+list", "list", "state", "corrupted",
                                          "refused"}
    assert SAFE_SEV in VARIANTS and SAFE_GMEM in VARIANTS


def test_seed_2_a_list_harvested_before_the_dirty_log_corrupts_without_resync():
    bad = verdict("seed2-list-then-dirty", "list-first-noresync")
    assert Finding("corrupted", PFN, 1) in bad.damage
    assert any(f.kind == "list" and f.gfn == PFN for f in bad.damage)
    assert bad.guest_failures == [P], "the guest reads garbage where it wrote"
    assert not bad.violations, "the guest did everything right"
    assert verdict("seed2-list-then-dirty", "list-first").passed, "the resync repairs it"
    assert verdict("seed2-list-then-dirty", "dirty-first-noresync").passed


def test_seed_1_writing_before_the_hypercall_is_the_guests_fault():
    v = verdict("seed1-write-then-announce", SAFE_SEV)
    assert v.passed and v.guest_failures == [P]
    assert [(x.obligation, x.gfn) for x in v.violations if x.obligation == "O1"] == [
        ("O1", PFN), ("O1", PFN)]
    assert any(f.gfn == PFN for f in v.disowned), "the damage is on a page the guest gave up"
    fixed = verdict("seed1-announce-then-write", SAFE_SEV)
    assert fixed.passed and not fixed.guest_failures and not fixed.violations


def test_seed_3_the_guest_must_treat_announced_data_as_lost():
    v = verdict("seed3-convert-between-harvests", SAFE_SEV)
    assert v.passed and v.guest_failures == [P]
    assert {x.obligation for x in v.violations} == {"O2"}
    stale = verdict("seed3-convert-between-harvests", "list-first-noresync")
    assert [f.kind for f in stale.damage] == ["list"] and stale.damage[0].gfn == PFN


def test_converting_twice_is_not_a_no_op():
    v = verdict("convert-twice", "dirty-first-noresync")
    assert v.guest_failures == [P] and {x.obligation for x in v.violations} == {"O2"}
    assert [f.kind for f in v.damage] == ["list"]


def test_r1_a_rounded_range_corrupts_the_neighbour_by_the_guests_own_report():
    v = verdict("r1-rounded-range", SAFE_SEV)
    assert v.passed and v.guest_failures == [Q]
    assert [(x.obligation, x.gfn, x.pages) for x in v.violations
            if x.obligation == "O4"] == [("O4", QFN, 1)]


def test_r2_migrating_before_ready():
    assert verdict("r2-before-ready", "dirty-first").refused == [1], "gated: refused at first"
    bad = verdict("r2-before-ready", "dirty-first-noresync-ungated")
    assert bad.damage == [Finding("corrupted", PFN, 1)] and bad.guest_failures == [P]
    assert not bad.violations


def test_r2_only_gating_saves_a_guest_paused_before_it_reported():
    gated = verdict("r2-paused-before-ready", "dirty-first")
    assert gated.refused == [1] and not gated.migrated and gated.passed
    assert not gated.guest_failures, "the guest ran on at the source, intact"
    for name in ("dirty-first-ungated", "list-first-ungated"):
        bad = verdict("r2-paused-before-ready", name)
        assert bad.damage == [Finding("corrupted", PFN, 1)] and bad.guest_failures == [P]


def test_r9_a_list_of_requests_disagrees_with_a_failed_conversion():
    for name in VARIANTS:
        v = verdict("r9-two-meanings", name)
        if VARIANTS[name].design is migration.Design.SHARED_LIST:
            assert [(f.kind, f.gfn) for f in v.damage] == [("state", PFN)], name
        else:
            assert v.passed, name


def test_a_conversion_without_a_write_is_sent_only_as_classification_dirty():
    bad = verdict("convert-without-write", "attributes-no-classification")
    assert bad.damage == [Finding("state", PFN, 1, "shared at pause, private after")]
    assert verdict("convert-without-write", "attributes").passed


def test_the_leak_watch_catches_private_plaintext(monkeypatch):
    """A source that sends the firmware's plaintext in a PAGE record leaks."""
    def leaky(self, region, gfn, pages, private, stats):
        runs = self._export(region, gfn * PAGE, pages * PAGE)
        self.writer.record(migration.stream.PAGES, migration.encode_runs(gfn, pages, runs))
        if self.on_send is not None:
            self.on_send(Sent(gfn, pages, False, runs, self._round))

    monkeypatch.setattr(Source, "_send_pages", leaky)
    v = verdict("seed1-announce-then-write", SAFE_SEV)
    assert v.leaks and not v.passed and v.outcome.endswith("leaked")


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s.sev])
def test_the_attributes_design_holds_with_vm_level_attributes_too(name):
    """The same scenarios on a SW_PROTECTED VM with KVM_SET_MEMORY_ATTRIBUTES and
    two backings (no in-place conversion): the attributes design still passes, and
    without classification dirty a converted, unwritten page arrives in the wrong
    state. A conversion there loses the data (the private page is punched), and
    the guest that expects it breaks O2."""
    v = run_scenario(SCENARIOS[name], VARIANTS[SAFE_GMEM], vm_attributes_vmm)
    assert v.passed, v.as_json()
    if name == "convert-without-write":
        assert {x.obligation for x in v.violations} == {"O2"} and v.guest_failures == [P]
        bad = run_scenario(SCENARIOS[name], VARIANTS["attributes-no-classification"],
                           vm_attributes_vmm)
        assert [(f.kind, f.gfn) for f in bad.damage] == [("state", PFN)]
