"""`guestmem migrate`: the verdict matrix, one scenario in detail, and a running
guest migrated on either backend, at 80 columns, as JSON, with exit codes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from guestmem.vmm import scenarios
from guestmem.vmm.migration import VARIANTS

from .conftest import kvm_unavailable_reason

ELLIPSIS = "…"


def invoke(args, exit_code=0, columns=80):
    result = CliRunner(env={"COLUMNS": str(columns), "FORCE_COLOR": None}).invoke(
        __import__("guestmem.cli", fromlist=["main"]).main, args)
    assert result.exit_code == exit_code, result.output
    return result


def fits(output, columns=80):
    return ELLIPSIS not in output and all(len(line) <= columns for line in output.splitlines())


def test_the_matrix_fits_80_columns_and_marks_the_safe_protocols():
    out = invoke(["migrate", "scenarios"]).output
    assert fits(out), out
    rows = {line.split("│")[1].split()[0]: line for line in out.splitlines()
            if line.startswith("│ S")}
    assert len(rows) == len(scenarios.SCENARIOS)
    assert "ok*" in rows["S3"] and " CL " in rows["S3"], "seed #2: list-first-noresync corrupts"
    assert "P10 attributes-no-classification" in out


def test_the_matrix_as_json_has_every_verdict():
    verdicts = json.loads(invoke(["migrate", "scenarios", "--json"]).output)
    assert len(verdicts) == len(scenarios.SCENARIOS) * len(VARIANTS)
    bad = [v for v in verdicts if v["scenario"] == "seed2-list-then-dirty"
           and v["variant"] == "list-first-noresync"]
    assert bad[0]["outcome"] == "corrupted+list" and bad[0]["damage"][0]["gpa"] == scenarios.P


def test_a_safe_protocol_that_fails_exits_1(monkeypatch):
    monkeypatch.setattr(scenarios, "safe_variant", lambda s: "list-first-noresync")
    out = invoke(["migrate", "scenarios", "--variant", "list-first-noresync"], exit_code=1).output
    assert "fail their safe protocol" in out
    invoke(["migrate", "scenario", "seed2-list-then-dirty", "--variant", "list-first-noresync"],
           exit_code=1)


def test_one_scenario_says_where_and_whose_fault():
    out = invoke(["migrate", "scenario", "seed1-write-then-announce", "--variant",
                  "dirty-first"]).output
    assert fits(out), out
    assert f"guest broke O1 at gpa {scenarios.P:#x}" in out
    assert f"read wrong data at {scenarios.P:#x}" in out
    detail = json.loads(invoke(["migrate", "scenario", "seed2-list-then-dirty", "--variant",
                                "list-first-noresync", "--json"]).output)
    assert [d["kind"] for d in detail[0]["damage"]] == ["corrupted", "list"]


def test_bad_input_exits_2_before_anything_runs_and_fits_80_columns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, says in ((["migrate", "scenario", "nope"], "no such scenario"),
                       (["migrate", "scenarios", "--variant", "nope"], "no such protocol"),
                       (["migrate", "run", "--variant", "nope"], "no such protocol"),
                       (["migrate", "run", "--size", "12K", "--rounds", "3"], "halve"),
                       (["migrate", "run", "--backend", "kvm", "--size", "2G"], "at most 1.0 GiB"),
                       (["migrate", "run", "--plot", "no/x.png"],
                        "not a writable directory")):
        out = invoke(args, exit_code=2).output
        assert says in out and fits(out), out
    assert not list(tmp_path.iterdir()), "nothing was written"


def test_a_plot_path_without_png_gets_it_and_says_so(tmp_path):
    out = invoke(["migrate", "run", "--size", "64M", "--rounds", "2", "--plot",
                  str(tmp_path / "c"), "--json"]).output
    record = json.loads(out)
    assert record["plot"] == str(tmp_path / "c.png") and (tmp_path / "c.png").exists()


def test_run_on_the_model_prints_rounds_downtime_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "migration-convergence.png"
    out = invoke(["migrate", "run", "--size", "1G", "--rounds", "4"]).output
    assert fits(out), out
    assert "memory intact" in out and "stop&copy" in out and "plot  " in out
    assert "migration-convergence.png" in out
    assert "KVM cannot dirty-log guest_memfd" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(invoke(["migrate", "run", "--size", "64M", "--rounds", "3", "--plot",
                                "", "--json"]).output)
    assert record["verified"] and record["plot"] is None
    assert [r["dirty_pages"] for r in record["rounds"][:3]] == [16384, 8192, 4096]
    assert [r["phase"] for r in record["rounds"]] == ["pre-copy"] * 3 + ["stop-and-copy"]


def test_run_on_the_kernel_reports_the_memcpy_ratio(tmp_path):
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    record = json.loads(invoke(["migrate", "run", "--backend", "kvm", "--size", "16M",
                                "--rounds", "3", "--plot", str(tmp_path / "k.png"),
                                "--json"]).output)
    assert record["verified"] and record["destination_reports"] == [0] * 5
    assert 0 < record["precopy_to_memcpy"] < 1
    assert record["stop_and_copy_only"] == ["memslot 0 (gmem)"]


def test_run_across_two_processes_on_the_model():
    record = json.loads(invoke(["migrate", "run", "--size", "256M", "--rounds", "3",
                                "--processes", "2", "--plot", "", "--json"]).output)
    assert record["verified"] and record["processes"] == 2
    assert record["destination_reports"] == [0] * 5


def test_a_refusal_across_processes_says_so(monkeypatch):
    """The destination refuses (here a vCPU record it cannot read): the command
    says the destination refused and why, not that memory was lost, and exits 1."""
    from guestmem.vmm.migration import Source

    monkeypatch.setattr(Source, "_vcpu_state", lambda self: b"\x01\x02")
    out = invoke(["migrate", "run", "--size", "64M", "--rounds", "2", "--processes", "2",
                  "--plot", ""], exit_code=1).output
    assert "the destination refused the stream" in out and "vCPU state" in out
    assert "NOT intact" not in out and "kept its guest" in out
