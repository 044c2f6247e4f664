import errno
import json

import pytest
from click.testing import CliRunner

from guestmem import demo
from guestmem.cli import main


def test_demo_steps_all_hold_on_the_kernel(host_kvm):
    steps = list(demo.run(host_kvm))
    assert [s.title for s in steps if not s.ok] == []
    assert steps[-1].title == "guest_memfd closed for good"
    assert "EFAULT" in steps[-1].detail


def test_cli_demo_exits_zero(host_kvm):
    result = CliRunner().invoke(main, ["demo", "--backend", "kvm"])
    assert result.exit_code == 0, result.output
    assert "FAILED" not in result.output


def test_info_json_reports_implementation_and_profile(host_kvm):
    result = CliRunner().invoke(main, ["info", "--json", "--backend", "kvm"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    caps = host_kvm.capabilities
    assert record["implementation"] == caps.implementation
    assert record["guest_memfd_flags"] == caps.guest_memfd_flags
    assert record["system"]["KVM_CAP_GUEST_MEMFD"] == 1
    assert record["profile"] == "mainline"
    # ... where the probe found this host departs from upstream on a TDP host
    assert ("shadow paging" in record["differences_from_mainline"]) == caps.shadow_paging
    assert ("no KVM_EXIT_HYPERCALL" in record["differences_from_mainline"]) == \
        (not caps.execution.hypercall_exits_at(0))
    # VM scope, probed on a VM of each type the host has
    assert record["vm"]["default"]["KVM_CAP_GUEST_MEMFD_FLAGS"] == caps.guest_memfd_flags


def test_check_prints_the_table_and_counts(host_kvm):
    result = CliRunner().invoke(main, ["check", "--backend", "kvm", "-k", "gmem.fallocate"])
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed, 0 skipped" in result.output  # flag sets 0, MMAP, MMAP|SHARED


def test_check_lists_missing_vm_types_with_reasons(host_kvm):
    result = CliRunner(env={"COLUMNS": "300"}).invoke(
        main, ["check", "--backend", "kvm", "-k", "memslot.overlap", "--all-vm-types"])
    assert result.exit_code == 0, result.output
    assert "not in KVM_CAP_VM_TYPES" in result.output


def test_unknown_backend_is_refused():
    result = CliRunner().invoke(main, ["info", "--backend", "nope"])
    assert result.exit_code != 0


def test_model_is_the_default_backend_and_runs_the_demo():
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert "model backend" in result.output and "FAILED" not in result.output
    assert "KVM_EXIT_HYPERCALL" in result.output  # the model delivers the real exit


def test_model_info_names_its_profile():
    result = CliRunner().invoke(main, ["info", "--json", "--profile", "coco"])
    record = json.loads(result.output)
    assert record["backend"] == "model" and record["profile"] == "coco"
    assert record["memory_attributes"] == 8
    assert sorted(record["vm_types"].values()) == [0, 1, 2, 3, 4, 5]
    # VM scope: attributes and INIT_SHARED only where upstream.md §1.4 says
    assert record["vm"]["default"]["KVM_CAP_MEMORY_ATTRIBUTES"] == 0
    assert record["vm"]["sw-protected"]["KVM_CAP_MEMORY_ATTRIBUTES"] == 8
    assert record["vm"]["snp"]["KVM_CAP_GUEST_MEMFD_FLAGS"] == 1
    assert record["vm"]["default"]["KVM_CAP_GUEST_MEMFD_FLAGS"] == 3


def test_model_check_passes_on_both_profiles():
    for profile in ("mainline", "coco"):
        result = CliRunner().invoke(main, ["check", "--profile", profile])
        assert result.exit_code == 0, result.output
        assert " 0 failed" in result.output


# --- check --json ------------------------------------------------------------------------------
RESULT_KEYS = {"case", "instance", "vm_type", "gmem_flags", "source", "expected", "observed",
               "status", "checks"}


def test_check_json_records_each_result_with_its_checks():
    result = CliRunner().invoke(main, ["check", "--json", "--profile", "coco",
                                       "-k", "gmem.fallocate"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["backend"], record["profile"]) == ("model", "coco")
    results = record["results"]
    assert {r["instance"] for r in results} == {
        "gmem.fallocate[default,0]", "gmem.fallocate[default,MMAP]",
        "gmem.fallocate[default,MMAP|INIT_SHARED]", "gmem.fallocate[sev,0]",
        "gmem.fallocate[sev,MMAP]", "gmem.fallocate[sev,MMAP|INIT_SHARED]",
        "gmem.fallocate[sev-es,0]", "gmem.fallocate[sev-es,MMAP]",
        "gmem.fallocate[sev-es,MMAP|INIT_SHARED]", "gmem.fallocate[sw-protected,0]",
        "gmem.fallocate[sw-protected,MMAP]", "gmem.fallocate[sw-protected,MMAP|INIT_SHARED]",
        "gmem.fallocate[snp,0]", "gmem.fallocate[snp,MMAP]",
        "gmem.fallocate[snp,MMAP|INIT_SHARED]", "gmem.fallocate[tdx,0]",
        "gmem.fallocate[tdx,MMAP]", "gmem.fallocate[tdx,MMAP|INIT_SHARED]"}
    assert all(set(r) == RESULT_KEYS and r["case"] == "gmem.fallocate" for r in results)
    passed = [r for r in results if r["status"] == "pass"]
    skipped = [r for r in results if r["status"] == "skip"]
    assert record["counts"] == {"pass": len(passed), "fail": 0, "skip": len(skipped)}
    assert len(passed) + len(skipped) == len(results)
    assert all(r["checks"] and all(c["ok"] for c in r["checks"]) for r in passed)
    assert {tuple(sorted(c)) for r in passed for c in r["checks"]} == \
        {("expected", "observed", "ok", "what")}
    assert all(r["checks"] == [] and "INIT_SHARED" in r["observed"] for r in skipped)


@pytest.fixture
def failing_case(monkeypatch):
    """A case that fails, registered for one test only."""
    from guestmem.check import suite

    monkeypatch.setattr(suite, "REGISTRY", list(suite.REGISTRY))

    @suite.case("test.always_fails", "this test", "one equals two")
    def always_fails(ctx):
        ctx.equal("one", 1, 2)

    return "test.always_fails[default]"


def test_check_json_reports_a_failure_and_exits_one(failing_case):
    result = CliRunner().invoke(main, ["check", "--json", "-k", "test.always_fails"])
    assert result.exit_code == 1
    record = json.loads(result.stdout)
    assert record["counts"] == {"pass": 0, "fail": 1, "skip": 0}
    [failed] = record["results"]
    assert (failed["instance"], failed["status"]) == (failing_case, "fail")
    assert failed["checks"] == [{"what": "one", "expected": "1", "observed": "2", "ok": False}]


def test_check_table_shows_a_failure_and_exits_one(failing_case):
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["check", "-k", "test.always_fails"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    at = lines.index(f"fail  {failing_case}")
    assert lines[at + 1].split() == ["expected", "one", "equals", "two"]
    assert lines[at + 2].split() == ["observed", "one:", "expected", "1,", "observed", "2"]
    assert "0 passed, 1 failed, 0 skipped" in lines


# --- every command ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], *([name] for name in main.commands)])
def test_every_command_takes_dash_h(command):
    short, long = (CliRunner().invoke(main, [*command, flag]) for flag in ("-h", "--help"))
    assert short.exit_code == 0, short.output
    assert short.stdout == long.stdout
    assert short.stdout.startswith(f"Usage: main {' '.join(command)}".rstrip() + " [OPTIONS]")


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    import guestmem

    run = subprocess.run([sys.executable, "-m", "guestmem", "--version"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(guestmem.__version__)
    run = subprocess.run([sys.executable, "-m", "guestmem", "check", "-k", "no_such_case"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert "Usage: python -m guestmem check" in run.stderr


@pytest.mark.parametrize("command", ["info", "check", "demo"])
def test_profile_with_the_kvm_backend_is_a_usage_error(command):
    result = CliRunner().invoke(main, [command, "--backend", "kvm", "--profile", "coco"])
    assert result.exit_code == 2
    assert "--profile chooses the kernel the model behaves like; the kvm backend is this " \
           "host's own kernel" in result.stderr


def test_model_profile_still_defaults_to_mainline():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["profile"] == "mainline"


# --- demo ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, header", [
    ([], "guestmem demo: model backend, mainline profile"),
    (["--profile", "coco"], "guestmem demo: model backend, coco profile"),
])
def test_demo_first_line_names_backend_and_profile(args, header):
    result = CliRunner().invoke(main, ["demo", *args])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == header


def test_demo_on_the_kernel_names_it_first(host_kvm):
    result = CliRunner().invoke(main, ["demo", "--backend", "kvm"])
    assert result.exit_code == 0, result.output
    implementation = host_kvm.capabilities.implementation
    assert result.stdout.splitlines()[0] == \
        f"guestmem demo: kvm backend, this host's kernel ({implementation})"


def test_demo_step_that_fails_exits_one(monkeypatch):
    def one_bad_step(kvm):
        yield demo.Step("first", "fine")
        yield demo.Step("second", "[not markup] went wrong", ok=False)

    monkeypatch.setattr(demo, "run", one_bad_step)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1
    assert "FAILED second: [not markup] went wrong" in result.stdout
    assert "Error: 1 demo step(s) did not behave as expected" in result.stderr


def test_demo_that_raises_oserror_exits_one(monkeypatch):
    def raising(kvm):
        yield demo.Step("first", "fine")
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(demo, "run", raising)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1
    assert "Error: the demo stopped: [Errno 9] Bad file descriptor" in result.stderr


@pytest.mark.parametrize("profile", ["mainline", "coco", "inplace"])
def test_info_names_the_profile_a_kernel_matches(profile):
    """profile_of, on the capabilities each model profile reports."""
    from guestmem.cli import profile_of
    from guestmem.model import Kvm as ModelKvm

    with ModelKvm(profile) as kvm:
        assert profile_of(kvm.capabilities) == profile
