"""`guestmem hugetlb` (the pools), `guestmem hugetlb walk` (issue 10's Done-when on
the model) and `info`'s HugeTLB lines: tables at 80 columns, JSON, exit codes."""

import json
import os

import pytest
from click.testing import CliRunner
from rich.console import Console

from guestmem import hugetlb_walk, uapi
from guestmem.api import HugetlbCounters
from guestmem.cli import _print_pools, info_record, main
from guestmem.host.hugetlb import SYSFS
from guestmem.host.hugetlb import Hugetlb as HostHugetlb
from guestmem.hugetlb_pools import Pool, Pools, host_hvo, host_meminfo, read_pools
from guestmem.model import Kvm as ModelKvm

from .conftest import kvm_unavailable_reason

S, G, PAGE = 2 << 20, 1 << 30, 4096
WIDTHS = (80, 200)
ELLIPSIS = "…"
TITLES = ["pool", "create", "fallocate", "4 KiB to shared", "back to private",
          "pin a shared piece", "to private while pinned", "unpin, to private", "close"]


def invoke(args, columns=80, exit_code=0):
    result = CliRunner(env={"COLUMNS": str(columns), "FORCE_COLOR": None}).invoke(main, args)
    assert result.exit_code == exit_code, result.output
    return result


def assert_fits(output, columns):
    assert ELLIPSIS not in output
    assert [line for line in output.splitlines() if len(line) > columns] == []


def host_pools_reason():
    """Why the host's pools cannot be read here, or None."""
    reason = kvm_unavailable_reason()
    if reason is None and not any(n.startswith("hugepages-") for n in _listdir(SYSFS)):
        reason = f"no HugeTLB pool in {SYSFS} (a kernel without CONFIG_HUGETLBFS)"
    return reason


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


needs_host_pools = pytest.mark.skipif(host_pools_reason() is not None,
                                      reason=str(host_pools_reason()))


# --- guestmem hugetlb: the pools -------------------------------------------------------------
@pytest.mark.parametrize("columns", WIDTHS)
def test_model_pools_table_fits_and_names_every_counter(columns):
    output = invoke(["hugetlb"], columns).stdout
    assert_fits(output, columns)
    header = next(line for line in output.splitlines() if "overcommit" in line)
    assert header.split("┃")[1:-1] == [f" {n} " for n in ("size", "nr", "free", "resv",
                                                         "surplus", "overcommit", "vmemmap")]
    assert any(line.split("│")[1].strip() == "1G" for line in output.splitlines()
               if line.startswith("│"))
    assert "vm.hugetlb_optimize_vmemmap off" in output
    assert "HugePages_Rsvd" in output and "underflow" not in output


def test_model_pools_json():
    record = json.loads(invoke(["hugetlb", "--json"]).stdout)
    assert record["backend"] == "model" and record["hvo"] is False
    assert [(p["name"], p["sysfs"]) for p in record["pools"]] == [
        ("2M", "hugepages-2048kB"), ("1G", "hugepages-1048576kB")]
    for pool in record["pools"]:
        assert [pool[k] for k in ("nr", "free", "resv", "surplus", "overcommit")] == [0] * 5
        assert (pool["vmemmap_bytes"], pool["underflowed"]) == (0, [])
    assert record["meminfo"]["Hugepagesize"] == 2048


def test_a_sized_model_pool_reports_hvo_vmemmap_and_meminfo():
    kvm = ModelKvm()
    kvm.hugetlb.hvo = True
    kvm.hugetlb.set_nr_hugepages(G, 3)
    kvm.hugetlb.set_nr_hugepages(S, 5)
    record = read_pools(kvm).as_json()
    one_gig = record["pools"][1]
    assert (one_gig["nr"], one_gig["free"], one_gig["vmemmap_bytes"]) == (3, 3, 3 * PAGE)
    assert record["hvo"] is True
    assert record["meminfo"]["HugePages_Total"] == 5
    assert record["meminfo"]["Hugetlb"] == (3 * G + 5 * S) // 1024
    kvm.hugetlb.hvo = False
    assert read_pools(kvm).pools[1].vmemmap_bytes == 3 * (G // PAGE) * 64


def render(pools, columns=80):
    console = Console(width=columns, record=True, color_system=None)
    _print_pools(console, "HugeTLB pools: test", pools)
    return console.export_text()


def test_an_underflowed_counter_is_shown_as_underflowed_not_as_a_number():
    pools = Pools("kvm", (Pool(S, HugetlbCounters(4, 4, -1, 0, 0), None),), False,
                  {"HugePages_Total": 4, "HugePages_Rsvd": -1, "Hugepagesize": 2048})
    output = render(pools)
    assert_fits(output, 80)
    row = next(line for line in output.splitlines() if line.startswith("│ 2M"))
    assert [c.strip() for c in row.split("│")[1:-1]] == ["2M", "4", "4", "-1 underflow", "0",
                                                         "0", "unknown"]
    text = " ".join(output.split())
    assert ("hugepages-2048kB/resv_hugepages reads 18446744073709551615 = 2**64 - 1" in text)
    assert "/proc/meminfo HugePages_Rsvd reads 18446744073709551615; shown as -1" in text
    assert pools.as_json()["pools"][0]["underflowed"] == ["resv"]
    assert pools.as_json()["meminfo_underflowed"] == ["HugePages_Rsvd"]


def test_a_host_without_pools_or_hvo_says_so():
    output = " ".join(render(Pools("kvm", (), None, {})).split())
    assert "no HugeTLB pools (no hugepages-<size>kB directory in /sys/kernel/mm/hugepages)" \
        in output
    assert "vm.hugetlb_optimize_vmemmap not built" in output


def test_the_host_driver_reads_an_underflowed_sysfs_counter_as_negative(tmp_path):
    pool = tmp_path / "hugepages-2048kB"
    pool.mkdir()
    values = {"nr_hugepages": 4, "free_hugepages": 4, "resv_hugepages": (1 << 64) - 1,
              "surplus_hugepages": 0, "nr_overcommit_hugepages": 0}
    for name, value in values.items():
        (pool / name).write_text(f"{value}\n")

    class HostLike:
        backend = "kvm"
        hugetlb = HostHugetlb(str(tmp_path))

    (only,) = read_pools(HostLike()).pools
    assert (only.counters, only.underflowed, only.vmemmap_bytes) == (
        HugetlbCounters(4, 4, -1, 0, 0), ("resv",), None)


def test_host_meminfo_and_hvo_parse_the_kernels_files(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nHugePages_Total:       4\nHugePages_Free:        4\n"
                       "HugePages_Rsvd:    18446744073709551615\nHugePages_Surp:        0\n"
                       "Hugepagesize:       2048 kB\nHugetlb:            8192 kB\n")
    assert host_meminfo(str(meminfo)) == {"HugePages_Total": 4, "HugePages_Free": 4,
                                          "HugePages_Rsvd": -1, "HugePages_Surp": 0,
                                          "Hugepagesize": 2048, "Hugetlb": 8192}
    sysctl = tmp_path / "hugetlb_optimize_vmemmap"
    sysctl.write_text("1\n")
    assert host_hvo(str(sysctl)) is True
    sysctl.write_text("0\n")
    assert host_hvo(str(sysctl)) is False
    assert host_hvo(str(tmp_path / "absent")) is None, "no sysctl: HVO not built"


@needs_host_pools
@pytest.mark.parametrize("columns", WIDTHS)
def test_host_pools_table_and_json(host_kvm, columns):
    record = json.loads(invoke(["hugetlb", "--backend", "kvm", "--json"], columns).stdout)
    output = invoke(["hugetlb", "--backend", "kvm"], columns).stdout
    assert_fits(output, columns)
    sizes = host_kvm.hugetlb.page_sizes
    assert [p["page_size"] for p in record["pools"]] == list(sizes)
    for pool in record["pools"]:
        counters = host_kvm.hugetlb.counters(pool["page_size"])
        assert {k: pool[k] for k in vars(counters)} == vars(counters)
        assert pool["underflowed"] == [k for k, v in vars(counters).items() if v < 0]
        assert pool["vmemmap_bytes"] is None, "the kernel reports no vmemmap per pool"
    underflowed = any(p["underflowed"] for p in record["pools"])
    assert ("underflow" in output) == (underflowed or bool(record["meminfo_underflowed"]))
    assert record["hvo"] == host_hvo()
    assert set(record["meminfo"]) >= {"HugePages_Total", "HugePages_Rsvd", "Hugetlb"}


# --- guestmem hugetlb walk -------------------------------------------------------------------
def walk_json(page_size="1G", exit_code=0):
    return json.loads(invoke(["hugetlb", "walk", "--page-size", page_size, "--json"],
                             exit_code=exit_code).stdout)


def by_title(record):
    return {step["title"]: step for step in record["steps"]}


def test_the_walk_splits_a_1g_folio_restores_16_mib_of_vmemmap_and_merges_it_back():
    record = walk_json()
    assert record["page_size"] == G and record["failed"] == 0
    assert [s["title"] for s in record["steps"]] == TITLES
    assert all(s["ok"] for s in record["steps"])
    steps = by_title(record)
    shared = steps["4 KiB to shared"]
    assert shared["restructure"] == {"splits": 1, "merges": 0, "vmemmap_restored": 16_773_120,
                                     "vmemmap_freed": 0, "zeroed": 0}
    assert shared["split_folios"] == [G]
    assert steps["fallocate"]["memory_free"] - shared["memory_free"] == 16_773_120
    back = steps["back to private"]
    assert back["restructure"]["merges"] == 1 and back["restructure"]["vmemmap_freed"] == \
        16_773_120
    assert back["split_folios"] == [] and back["memory_free"] == steps["fallocate"]["memory_free"]


def test_the_walk_shows_eagain_at_the_pinned_page_then_success_after_the_unpin():
    steps = by_title(walk_json())
    pinned = steps["to private while pinned"]
    assert pinned["error"] == {"errno": "EAGAIN", "error_offset": G + 5 * PAGE}
    assert pinned["restructure"] == steps["pin a shared piece"]["restructure"], "nothing changed"
    assert pinned["split_folios"] == [G]
    after = steps["unpin, to private"]
    assert after["error"] is None and after["restructure"]["merges"] == 2
    assert after["split_folios"] == []


def test_the_walk_reads_the_pool_counters_after_each_step():
    counters = [tuple(s["counters"].values()) for s in walk_json()["steps"]]
    assert counters == [(2, 2, 0, 0, 0), (2, 2, 2, 0, 0)] + [(2, 0, 0, 0, 0)] * 6 + [
        (2, 2, 0, 0, 0)]


def test_the_walk_on_2m_pages_restores_7_vmemmap_pages_per_split():
    steps = by_title(walk_json("2M"))
    assert steps["4 KiB to shared"]["restructure"]["vmemmap_restored"] == 7 * PAGE
    assert steps["to private while pinned"]["error"]["error_offset"] == S + 5 * PAGE
    assert steps["close"]["restructure"]["vmemmap_freed"] == 14 * PAGE


@pytest.mark.parametrize("columns", WIDTHS)
def test_the_walk_prints_a_line_per_step_within_the_width(columns):
    output = invoke(["hugetlb", "walk"], columns).stdout
    assert_fits(output, columns)
    marks = [line.split(maxsplit=1) for line in output.splitlines()
             if line.startswith(("ok ", "FAILED "))]
    assert [rest.split(":")[0] for _, rest in marks] == TITLES
    assert {mark for mark, _ in marks} == {"ok"}
    text = " ".join(output.split())
    assert "16,773,120 bytes of vmemmap restored" in text
    assert "EAGAIN at error_offset 0x40005000" in text


def test_the_walks_expectations_can_fail(monkeypatch):
    """Without HVO a split restores nothing: the walk must say so and exit 1."""
    made = hugetlb_walk.hugetlb_kvm

    def without_hvo(page_size):
        kvm = made(page_size)
        kvm.hugetlb.hvo = False
        return kvm

    monkeypatch.setattr(hugetlb_walk, "hugetlb_kvm", without_hvo)
    record = walk_json(exit_code=1)
    failed = [s["title"] for s in record["steps"] if not s["ok"]]
    assert failed == ["4 KiB to shared", "back to private", "close"]
    assert record["failed"] == 3
    output = invoke(["hugetlb", "walk"], exit_code=1).output
    assert "FAILED 4 KiB to shared" in output
    assert "3 walk step(s) did not behave as expected" in output


def test_a_walk_the_model_refuses_stops_with_exit_1(monkeypatch):
    def refusing(page_size):
        raise OSError(12, "Cannot allocate memory (KVM_CREATE_GUEST_MEMFD)")
        yield

    monkeypatch.setattr(hugetlb_walk, "run", refusing)
    assert "the walk stopped" in invoke(["hugetlb", "walk"], exit_code=1).output


def test_pool_options_before_walk_are_a_usage_error():
    result = invoke(["hugetlb", "--json", "walk"], exit_code=2)
    assert "--json belongs to the pools table" in result.output


# --- info: which sizes guest_memfd is offered ----------------------------------------------------
def test_info_says_the_mainline_model_offers_guest_memfd_no_hugetlb_and_why():
    record = json.loads(invoke(["info", "--json"]).stdout)
    offer = record["gmem_hugetlb"]
    assert (offer["page_sizes"], offer["pool_sizes"]) == ([], [S, G])
    assert "lacks GUEST_MEMFD_FLAG_HUGETLB (0x4)" in offer["reason"]
    assert "KVM_CAP_GUEST_MEMFD_FLAGS (0x3)" in offer["reason"]


def test_info_record_of_a_model_with_gmem_hugetlb_offers_every_hstate():
    with ModelKvm("hugetlb") as kvm:
        record = info_record(kvm)
    offer = record["gmem_hugetlb"]
    assert (offer["page_sizes"], offer["page_orders"]) == ([S, G], [uapi.HUGETLB_PAGE_ORDER_2M,
                                                                    uapi.HUGETLB_PAGE_ORDER_1G])
    assert offer["reason"].startswith("2M (page_order 9), 1G (page_order 18)")
    assert "HUGETLB" in record["guest_memfd_flag_names"]


@pytest.mark.parametrize("columns", WIDTHS)
def test_info_table_shows_the_hugetlb_rows_whole(columns):
    output = invoke(["info"], columns).stdout
    assert_fits(output, columns)
    words = output.split()
    assert "GUEST_MEMFD_FLAG_HUGETLB" in words
    row = next(line for line in output.splitlines() if "HugeTLB pools" in line)
    assert row.split("│")[2].strip() == "2M, 1G"


@pytest.mark.skipif(kvm_unavailable_reason() is not None, reason=str(kvm_unavailable_reason()))
def test_info_on_the_kernel_names_the_missing_flag_and_the_host_pools(host_kvm):
    record = json.loads(invoke(["info", "--backend", "kvm", "--json"]).stdout)
    offer = record["gmem_hugetlb"]
    assert offer["pool_sizes"] == list(host_kvm.hugetlb.page_sizes)
    if host_kvm.capabilities.guest_memfd_flags & uapi.GUEST_MEMFD_FLAG_HUGETLB:
        assert offer["page_sizes"] == offer["pool_sizes"]
        assert "NO_DIRECT_MAP" in offer["reason"], "bit 2 is ambiguous on a kernel"
    else:
        assert offer["page_sizes"] == []
        assert "this kernel's KVM_CAP_GUEST_MEMFD_FLAGS" in offer["reason"]
        assert "lacks GUEST_MEMFD_FLAG_HUGETLB" in offer["reason"]
