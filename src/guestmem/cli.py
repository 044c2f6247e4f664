"""`guestmem ...`: thin, parses arguments, calls one layer, prints.

Every string that comes from data is escaped before rich sees it: instance
names such as `gmem.flags[default,0]` read as markup otherwise. Tables are laid
out for the terminal's width (COLUMNS when set) so that names never wrap or get
truncated; at 80 columns every command stays readable. `--json` prints the same
facts for scripts, and every failure exits non-zero.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

import guestmem
from guestmem import api, uapi
from guestmem.caps import Capabilities
from guestmem.hugetlb_pools import (
    COUNTERS,
    SYSFS_FILES,
    Pool,
    Pools,
    gmem_hugetlb,
    read_pools,
    size_name,
    sysfs_name,
)
from guestmem.memmap import MemoryMap
from guestmem.model import Kvm as ModelKvm

if TYPE_CHECKING:  # for annotations; the commands import these modules when they run
    from guestmem.check import Instance, Result

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}  # inherited by every command
EXIT_FAILED = 1  # a case or a demo step did not behave as expected
STATUS_WIDTH = 4  # "pass", "fail", "skip"
DETAIL_MIN_WIDTH = 24  # narrower expected/observed columns read badly: use the list layout
INDENT = STATUS_WIDTH + 2  # where the list layout's detail lines start
UNBOUNDED = 10_000  # a width no table reaches: measuring at it gives a table's true minimum
STATUS_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def _console() -> Console:
    """Made per command, so COLUMNS and the terminal are read when it runs."""
    return Console()


# --- backends --------------------------------------------------------------------------------
def _open(backend: str, profile: str | None) -> api.Kvm:
    if profile is not None and backend != "model":
        raise click.UsageError(
            f"--profile chooses the kernel the model behaves like; the {backend} backend is "
            "this host's own kernel (drop --profile, or use --backend model)")
    if profile == "host" and not os.path.exists("/dev/kvm"):
        raise click.ClickException("the host profile is built from a probe of this machine's "
                                   "/dev/kvm, which does not exist here")
    if backend == "kvm" and not os.path.exists("/dev/kvm"):
        raise click.ClickException(
            "/dev/kvm does not exist on this machine: the kvm backend needs a host with KVM "
            "(the model backend, the default, runs anywhere)"
        )
    options = {} if profile is None else {"profile": profile}
    try:
        return guestmem.Kvm(backend=backend, **options)
    except OSError as e:
        raise click.ClickException(f"cannot open the {backend} backend: {e}") from e


def profile_name(kvm: api.Kvm) -> str | None:
    """The model's profile; None for a backend that is a real kernel."""
    return kvm.profile.name if isinstance(kvm, ModelKvm) else None


def describe(kvm: api.Kvm) -> str:
    """Which backend runs, and which kernel: the model's profile or the host's KVM."""
    if profile_name(kvm) is not None:
        return f"{kvm.backend} backend, {profile_name(kvm)} profile"
    return f"{kvm.backend} backend, this host's kernel ({kvm.capabilities.implementation})"


def _backend_options(fn: Any) -> Any:
    from guestmem.model import PROFILES

    fn = click.option("--profile", default=None, type=click.Choice([*sorted(PROFILES), "host"]),
                      help="Kernel profile the model behaves like (model backend only; "
                           "the model's default is mainline; host: this machine's "
                           "/dev/kvm as probed).")(fn)
    return click.option("--backend", default="model", show_default=True,
                        type=click.Choice(guestmem.BACKENDS),
                        help="model: guest_memfd in Python; kvm: the host kernel.")(fn)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(guestmem.__version__)
def main() -> None:
    """guestmem: Linux KVM guest_memfd, a VMM and a conformance suite."""


# --- info ------------------------------------------------------------------------------------
def profile_of(caps: Capabilities) -> str:
    """Which spec profile (DESIGN.md "Kernel profiles") the host matches; where it
    differs beyond that is upstream_differences()."""
    mainline = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    if caps.gmem_in_place_conversion:
        return "inplace"
    if caps.memory_attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE and len(caps.vm_types) > 1:
        return "coco"
    if caps.guest_memfd and caps.guest_memfd_flags & mainline == mainline:
        return "mainline"
    if caps.guest_memfd:
        return "pre-6.18 (guest_memfd without MMAP/INIT_SHARED)"
    return "none (no guest_memfd)"


def upstream_differences(caps: Capabilities) -> list[str]:
    """What this KVM does that upstream 6.18 on a TDP host (the mainline profile)
    does not."""
    upstream = ModelKvm("mainline").capabilities
    found = []
    if caps.shadow_paging != upstream.shadow_paging:
        found.append("shadow paging" if caps.shadow_paging else "TDP")
    if caps.pre_fault_memory != upstream.pre_fault_memory:
        found.append("no pre-fault" if not caps.pre_fault_memory else "pre-fault")
    if caps.gmem_shared_policy != upstream.gmem_shared_policy:
        found.append("NUMA policy per VMA" if not caps.gmem_shared_policy
                     else "NUMA policy per inode")
    if caps.execution.emulated_cpls:
        cpls = "/".join(f"CPL{c}" for c in sorted(caps.execution.emulated_cpls))
        found.append(f"{cpls} code emulated")
    if not caps.execution.hypercall_exits_at(0):
        found.append("no KVM_EXIT_HYPERCALL")
    return found


def info_record(kvm: api.Kvm) -> dict[str, Any]:
    """Everything `info` shows; for the model, its profile is what it matches."""
    caps = kvm.capabilities
    record = asdict(caps)
    record["vm_types"] = {uapi.VM_TYPE_NAMES.get(t, str(t)): t for t in sorted(caps.vm_types)}
    record["gmem_flags_by_vm_type"] = {
        uapi.VM_TYPE_NAMES.get(t, str(t)): f for t, f in caps.gmem_flags_by_vm_type.items()
    }
    record["vm"] = {uapi.VM_TYPE_NAMES.get(t, str(t)): v for t, v in caps.vm.items()}
    record["guest_memfd_flag_names"] = [
        name
        for name, bit in (
            ("MMAP", uapi.GUEST_MEMFD_FLAG_MMAP),
            ("INIT_SHARED", uapi.GUEST_MEMFD_FLAG_INIT_SHARED),
            ("HUGETLB", uapi.GUEST_MEMFD_FLAG_HUGETLB),
        )
        if caps.guest_memfd_flags & bit
    ]
    execution = caps.execution
    record["execution"] = {
        "cpu_vendor": execution.cpu_vendor,
        "native_hypercall": execution.native_hypercall,
        "cpl3_hypercall": {insn: o.value for insn, o in execution.cpl3_hypercall.items()},
        "cpl0_hypercall": execution.cpl0_hypercall.value,
        "emulated_cpls": sorted(execution.emulated_cpls),
        "default_cpl": execution.default_cpl,
    }
    record["backend"] = kvm.backend
    model_profile = kvm.profile if isinstance(kvm, ModelKvm) else None
    record["profile"] = model_profile.name if model_profile else profile_of(caps)
    record["differences_from_mainline"] = upstream_differences(caps)
    record["gmem_hugetlb"] = gmem_hugetlb(kvm).as_json()
    if model_profile:
        record["profile_description"] = model_profile.description
    return record


def _facts_table(record: dict[str, Any]) -> Table:
    table = Table(title=f"guestmem info ({escape(record['backend'])} backend)", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows = [
        ("KVM implementation", record["implementation"]),
        ("API version", str(record["api_version"])),
        ("spec profile", record["profile"]),
        ("", record.get("profile_description", "")),
        ("differs from mainline in", ", ".join(record["differences_from_mainline"]) or "nothing"),
        ("VM types", ", ".join(f"{n} ({v})" for n, v in record["vm_types"].items())),
        ("guest_memfd flags",
         f"{record['guest_memfd_flags']:#x} " + "|".join(record["guest_memfd_flag_names"])),
        *((f"  on a {name} VM", f"{flags:#x}")
          for name, flags in record["gmem_flags_by_vm_type"].items()),
        *_execution_rows(record["execution"]),
        ("MMU", "shadow paging" if record["shadow_paging"] else "TDP"),
        ("NUMA nodes", str(record["numa_nodes"])),
        ("guest_memfd mempolicy",
         "per inode (shared)" if record["gmem_shared_policy"] else "per VMA only"),
        *_hugetlb_rows(record["gmem_hugetlb"]),
    ]
    for label, value in rows:
        if label or value:
            table.add_row(escape(label), escape(value))
    return table


def _execution_rows(execution: dict[str, Any]) -> list[tuple[str, str]]:
    """How the host runs guest code, as probed."""
    cpl0 = f"CPL0 {execution['native_hypercall'].upper()}"
    return [("CPU vendor", execution["cpu_vendor"]),
            *((f"CPL3 {insn.upper()}", o) for insn, o in execution["cpl3_hypercall"].items()),
            (cpl0, execution["cpl0_hypercall"]),
            ("emulated CPLs", ", ".join(map(str, execution["emulated_cpls"])) or "none")]


def _hugetlb_rows(offer: dict[str, Any]) -> list[tuple[str, str]]:
    """Which HugeTLB sizes guest_memfd is offered (and why), and which have a pool."""
    pools = ", ".join(map(size_name, offer["pool_sizes"])) or "none"
    return [("guest_memfd on HugeTLB", offer["reason"]), ("HugeTLB pools", pools)]


def _cap_value(value: int) -> str:
    return str(value) if value < 256 else f"{value:#x}"


def vm_differences(record: dict[str, Any], cap: str) -> str:
    """The VM types whose value of `cap` differs from system scope, grouped by value:
    "0 on default, sev; 1 on snp". Empty where every VM agrees with system scope."""
    system = record["system"][cap]
    by_value: dict[int, list[str]] = {}
    for vm_name, values in record["vm"].items():
        if values[cap] != system:
            by_value.setdefault(values[cap], []).append(vm_name)
    return "; ".join(f"{_cap_value(v)} on {', '.join(names)}" for v, names in by_value.items())


def _capabilities_table(record: dict[str, Any]) -> Table:
    """One row per capability, VM values only where they differ: a column per VM type
    would not fit 80 columns once a host has six of them."""
    probed = ", ".join(record["vm"]) or "none"
    table = Table(title="KVM_CHECK_EXTENSION at system scope, and on a VM of each type",
                  caption=escape(f"VMs probed: {probed}; blank: every VM gives the system "
                                 "value"))
    table.add_column("capability", style="bold", no_wrap=True)
    table.add_column("system", justify="right", no_wrap=True)
    table.add_column("on a VM, where different")
    for cap, value in record["system"].items():
        table.add_row(escape(cap), _cap_value(value), escape(vm_differences(record, cap)))
    return table


@main.command()
@_backend_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
def info(backend: str, profile: str | None, as_json: bool) -> None:
    """What the backend's KVM supports, and which spec profile it matches."""
    with _open(backend, profile) as kvm:
        record = info_record(kvm)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    console = _console()
    console.print(_facts_table(record))
    console.print(_capabilities_table(record))


# --- check: selecting cases ------------------------------------------------------------------
Matcher = Callable[[str], bool]
Tokens = list[str]
KEYWORDS = frozenset({"and", "or", "not"})
_TOKEN = re.compile(r"[()]|[^\s()]+")


class SelectionError(ValueError):
    """A -k expression that does not parse."""


def parse_selection(expression: str) -> Matcher:
    """Parse a -k expression as pytest's -k reads one: names, each matching the instance
    names that contain it (case-sensitive), joined by `and`, `or`, `not` and
    parentheses. A small recursive descent, never eval()."""
    matcher, rest = _parse_or(_TOKEN.findall(expression))
    if rest:
        raise SelectionError(f"unexpected {rest[0]!r}")
    return matcher


def _any_of(matchers: list[Matcher]) -> Matcher:
    return matchers[0] if len(matchers) == 1 else lambda name: any(m(name) for m in matchers)


def _all_of(matchers: list[Matcher]) -> Matcher:
    return matchers[0] if len(matchers) == 1 else lambda name: all(m(name) for m in matchers)


def _parse_or(tokens: Tokens) -> tuple[Matcher, Tokens]:
    matcher, tokens = _parse_and(tokens)
    terms = [matcher]
    while tokens[:1] == ["or"]:
        matcher, tokens = _parse_and(tokens[1:])
        terms.append(matcher)
    return _any_of(terms), tokens


def _parse_and(tokens: Tokens) -> tuple[Matcher, Tokens]:
    matcher, tokens = _parse_not(tokens)
    factors = [matcher]
    while tokens[:1] == ["and"]:
        matcher, tokens = _parse_not(tokens[1:])
        factors.append(matcher)
    return _all_of(factors), tokens


def _parse_not(tokens: Tokens) -> tuple[Matcher, Tokens]:
    if tokens[:1] != ["not"]:
        return _parse_atom(tokens)
    inner, rest = _parse_not(tokens[1:])
    return (lambda name: not inner(name)), rest


def _parse_atom(tokens: Tokens) -> tuple[Matcher, Tokens]:
    if not tokens:
        raise SelectionError("a name or '(' is missing at the end")
    token, rest = tokens[0], tokens[1:]
    if token == "(":
        inner, rest = _parse_or(rest)
        if rest[:1] != [")"]:
            raise SelectionError("'(' without its ')'")
        return inner, rest[1:]
    if token == ")" or token in KEYWORDS:
        raise SelectionError(f"a name or '(' is missing before {token!r}")
    return (lambda name: token in name), rest


@dataclass(frozen=True)
class Selection:
    """The -k expressions as given; an instance is selected if any of them matches it."""

    expressions: tuple[str, ...]
    matches: Matcher


def _selection_option(ctx: click.Context, param: click.Parameter,
                      expressions: tuple[str, ...]) -> Selection | None:
    if not expressions:
        return None
    matchers = []
    for expression in expressions:
        try:
            matchers.append(parse_selection(expression))
        except SelectionError as e:
            raise click.BadParameter(f"{e} in {expression!r}") from e
    return Selection(expressions, _any_of(matchers))


def _nothing_selected(selection: Selection | None, vm_types: Iterable[int],
                      all_vm_types: bool) -> str:
    given = " ".join(f"-k {e!r}" for e in selection.expressions) if selection else "the suite"
    names = ", ".join(uapi.VM_TYPE_NAMES.get(t, str(t)) for t in vm_types)
    hint = "" if all_vm_types else "; --all-vm-types adds the VM types the backend lacks"
    return f"{given} selects no case instance (VM types: {names}{hint})"


# --- check: results --------------------------------------------------------------------------
def result_record(inst: Instance, result: Result) -> dict[str, Any]:
    """One result for `check --json`."""
    return {
        "case": inst.case.name,
        "instance": result.name,
        "vm_type": uapi.VM_TYPE_NAMES.get(inst.vm_type, str(inst.vm_type)),
        "gmem_flags": inst.case.gmem_flags,
        "source": result.source,
        "expected": result.expected,
        "observed": result.observed,
        "status": result.status.value,
        "checks": [asdict(c) for c in result.checks],
    }


def _counts(results: Iterable[Result]) -> dict[str, int]:
    counts = dict.fromkeys(STATUS_STYLE, 0)
    for r in results:
        counts[r.status.value] += 1
    return counts


def _results_table(title: str, results: list[Result]) -> Table:
    """The wide layout. The detail columns share one minimum (their longest word, at
    least DETAIL_MIN_WIDTH), so rich's shrinking never takes either below it."""
    words = [w for r in results for text in (r.expected, r.observed) for w in text.split()]
    detail_width = max([DETAIL_MIN_WIDTH, *map(len, words)])
    name_width = max((len(r.name) for r in results), default=0)
    table = Table(title=escape(title))
    table.add_column("case", no_wrap=True, min_width=name_width)
    table.add_column("expected", min_width=detail_width, overflow="fold")
    table.add_column("observed", min_width=detail_width, overflow="fold")
    table.add_column("result", no_wrap=True, min_width=STATUS_WIDTH)
    for r in results:
        table.add_row(escape(r.name), escape(r.expected), escape(r.observed), _status(r))
    return table


def _status(result: Result) -> str:
    value = result.status.value
    return f"[{STATUS_STYLE[value]}]{value}[/]"


def _print_result_lines(console: Console, result: Result) -> None:
    """The narrow layout: the status and the whole name on one line; below it, the
    reason for a skip, or what a failure expected and observed."""
    console.print(f"{_status(result)}  {escape(result.name)}", soft_wrap=True)
    details = {"skip": [("reason", result.observed)],
               "fail": [("expected", result.expected), ("observed", result.observed)]}
    rows = details.get(result.status.value, [])
    if not rows:
        return
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(label, escape(text))
    console.print(Padding(grid, (0, 0, 0, INDENT), expand=False))


def _print_results(console: Console, title: str, results: list[Result]) -> None:
    table = _results_table(title, results)
    unbounded = console.options.update_width(UNBOUNDED)
    if console.measure(table, options=unbounded).minimum <= console.width:
        console.print(table)
    else:
        console.print(escape(title), style="bold")
        for r in results:
            _print_result_lines(console, r)
    counts = _counts(results)
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")


@main.command()
@_backend_options
@click.option("--all-vm-types", is_flag=True, help="Also list cases for VM types the host lacks.")
@click.option("-k", "selection", multiple=True, metavar="EXPRESSION", callback=_selection_option,
              help="Only instances whose name contains this; pytest-like expressions with "
                   "and/or/not/parentheses work (-k 'gmem and not mmap'). Repeat -k to run "
                   "the instances that match any of them.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON record: each result with its checks, and the counts.")
def check(backend: str, profile: str | None, all_vm_types: bool, selection: Selection | None,
          as_json: bool) -> None:
    """Run the conformance suite and print a table; exit 1 if any case fails."""
    from guestmem.check import instances, run_instance

    with _open(backend, profile) as kvm:
        where = describe(kvm)
        types = tuple(uapi.VM_TYPE_NAMES) if all_vm_types else tuple(
            sorted(kvm.capabilities.vm_types))
        selected = [i for i in instances(types) if selection is None or selection.matches(i.name)]
        if not selected:
            raise click.UsageError(_nothing_selected(selection, types, all_vm_types))
        runs = [(inst, run_instance(kvm, inst)) for inst in selected]
        record: dict[str, Any] = {"backend": kvm.backend, "profile": profile_name(kvm),
                                  "implementation": kvm.capabilities.implementation}
    results = [r for _, r in runs]
    if as_json:
        record |= {"results": [result_record(i, r) for i, r in runs], "counts": _counts(results)}
        click.echo(json.dumps(record, indent=2))
    else:
        _print_results(_console(), f"guestmem conformance: {where}", results)
    if _counts(results)["fail"]:
        click.get_current_context().exit(EXIT_FAILED)


# --- demo ------------------------------------------------------------------------------------
class ShownStep(Protocol):
    """What a step printed as a line has: demo's Step, the HugeTLB walk's WalkStep."""

    @property
    def title(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def ok(self) -> bool: ...


def _step_line(step: ShownStep) -> Table:
    """A step as printed as it happens: its mark, and its text in a hanging indent."""
    line = Table.grid(padding=(0, 1))
    line.add_column(no_wrap=True)
    line.add_column(overflow="fold")
    mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
    line.add_row(mark, f"[bold]{escape(step.title)}[/]: {escape(step.detail)}")
    return line


@main.command()
@_backend_options
def demo(backend: str, profile: str | None) -> None:
    """Run a guest on guest_memfd memory and show each step (--backend kvm: a real one)."""
    from guestmem import demo as scenario

    failed = 0
    console = _console()
    with _open(backend, profile) as kvm:
        console.print(escape(f"guestmem demo: {describe(kvm)}"), style="bold")
        try:
            for step in scenario.run(kvm):
                console.print(_step_line(step))
                failed += not step.ok
        except OSError as e:
            raise click.ClickException(f"the demo stopped: {e}") from e
    if failed:
        raise click.ClickException(f"{failed} demo step(s) did not behave as expected")


# --- hugetlb ---------------------------------------------------------------------------------
UNDERFLOW = "[bold red]{value} underflow[/]"  # a counter the kernel took below zero
UNDERFLOWED = "underflowed"


def _bytes_text(n: int | None) -> str:
    """8 KiB, 16 MiB: exact binary units where n is a whole number of one; else bytes."""
    if n is None:
        return "unknown"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift:,} {unit}"
    return f"{n:,} B"


def _counter_cell(pool: Pool, name: str) -> str:
    value = getattr(pool.counters, name)
    return UNDERFLOW.format(value=value) if name in pool.underflowed else str(value)


def _pools_table(title: str, pools: Pools) -> Table:
    table = Table(title=escape(title))
    table.add_column("size", no_wrap=True)
    for name in (*COUNTERS, "vmemmap"):
        table.add_column(name, justify="right", no_wrap=True)
    for pool in pools.pools:
        table.add_row(size_name(pool.page_size), *(_counter_cell(pool, n) for n in COUNTERS),
                      _bytes_text(pool.vmemmap_bytes))
    return table


def _meminfo_table(pools: Pools) -> Table:
    whose = "the model's" if pools.backend == "model" else "this host's"
    table = Table(title=f"{whose} /proc/meminfo", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for key, value in pools.meminfo.items():
        text = f"{value} kB" if key in ("Hugepagesize", "Hugetlb") else str(value)
        if key in pools.meminfo_underflowed:
            text = UNDERFLOW.format(value=value)
        table.add_row(escape(key), text)
    return table


def _pool_notes(pools: Pools) -> list[tuple[str, str]]:
    """HVO's state, what vmemmap means here, and every underflowed counter spelled out."""
    hvo = {True: "on: all but one vmemmap page of each huge page freed",
           False: "off: every huge page keeps its vmemmap",
           None: "not built (no vm.hugetlb_optimize_vmemmap)"}[pools.hvo]
    notes = [("HVO", f"vm.hugetlb_optimize_vmemmap {hvo}")]
    if any(p.vmemmap_bytes is None for p in pools.pools):
        notes.append(("vmemmap", "unknown: the kernel reports none per pool (and HVO applies "
                                 "only to pages allocated while it is on)"))
    for pool in pools.pools:
        for name in pool.underflowed:
            value = getattr(pool.counters, name)
            notes.append((UNDERFLOWED, f"{sysfs_name(pool.page_size)}/{SYSFS_FILES[name]} "
                          f"reads {value + (1 << 64)} = 2**64 - {-value}: the kernel's "
                          f"unsigned counter went below zero; shown as {value}"))
    for key in pools.meminfo_underflowed:
        value = pools.meminfo[key]
        notes.append((UNDERFLOWED, f"/proc/meminfo {key} reads {value + (1 << 64)}; shown as "
                                   f"{value}"))
    return notes


def _notes_grid(notes: list[tuple[str, str]]) -> Table:
    """Label and text, the text in a hanging indent; underflows in red."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in notes:
        style = "bold red" if label == UNDERFLOWED else "bold"
        grid.add_row(f"[{style}]{escape(label)}[/]", escape(text))
    return grid


def _print_pools(console: Console, title: str, pools: Pools) -> None:
    if pools.pools:
        console.print(_pools_table(title, pools))
    else:
        console.print(escape(f"{title}: no HugeTLB pools (no hugepages-<size>kB directory in "
                             "/sys/kernel/mm/hugepages)"), style="bold")
    console.print(_notes_grid(_pool_notes(pools)))
    if pools.meminfo:
        console.print(_meminfo_table(pools))


@main.group(invoke_without_command=True, subcommand_metavar="[walk [OPTIONS]]")
@click.option("--backend", default="model", show_default=True,
              type=click.Choice(guestmem.BACKENDS),
              help="model: a fresh model's pools (empty, as a booted host's); kvm: this "
                   "host's sysfs and /proc/meminfo.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
@click.pass_context
def hugetlb(ctx: click.Context, backend: str, as_json: bool) -> None:
    """The HugeTLB pools per page size: nr, free, resv, surplus, overcommit, vmemmap,
    HVO and /proc/meminfo's lines; `hugetlb walk`: guest_memfd on 1G pages, step
    by step."""
    if ctx.invoked_subcommand is not None:
        given = [option for param, option in (("backend", "--backend"), ("as_json", "--json"))
                 if ctx.get_parameter_source(param) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} belongs to the pools table; the walk "
                                   f"takes its own options: guestmem hugetlb walk --help")
        return
    with _open(backend, None) as kvm:
        where = describe(kvm) if backend == "kvm" else "model backend"
        try:
            pools = read_pools(kvm)
        except OSError as e:
            raise click.ClickException(f"cannot read the HugeTLB pools: {e}") from e
    if as_json:
        click.echo(json.dumps(pools.as_json(), indent=2))
        return
    _print_pools(_console(), f"HugeTLB pools: {where}", pools)


@hugetlb.command()
@click.option("--page-size", type=click.Choice(["1G", "2M"]), default="1G", show_default=True,
              help="The huge page size of the guest_memfd and its pool.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON record: the page size and each step with the pool's "
                   "counters, the splits and merges, and any errno after it.")
def walk(page_size: str, as_json: bool) -> None:
    """On the model: a guest_memfd of two huge pages, one 4 KiB page to shared (its
    folio splits, HVO's vmemmap comes back) and back (it merges), a pinned piece's
    EAGAIN at its error_offset, the unpin, close; the pool's counters after each
    step. Exit 1 if any step does not behave as expected."""
    from guestmem import hugetlb_walk

    size = _parse_size(page_size, "--page-size")
    console = _console()
    steps = []
    if not as_json:
        console.print(f"guestmem hugetlb walk: model backend, hugetlb profile, "
                      f"{page_size} pages", style="bold")
    try:
        for step in hugetlb_walk.run(size):
            steps.append(step)
            if not as_json:
                console.print(_step_line(step))
    except OSError as e:
        raise click.ClickException(f"the walk stopped: {e}") from e
    failed = sum(not step.ok for step in steps)
    if as_json:
        click.echo(json.dumps({"page_size": size, "steps": [s.as_json() for s in steps],
                               "failed": failed}, indent=2))
    if failed:
        raise click.ClickException(f"{failed} walk step(s) did not behave as expected")


# --- memory ----------------------------------------------------------------------------------
def _parse_size(text: str, option: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a size such as 4096, 64K or 2G",
                                 param_hint=option)
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2) or " "))


def _runs_table(title: str, mm: MemoryMap) -> Table:
    table = Table(title=escape(title))
    table.add_column("pages", justify="right", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("state")
    for run in mm.runs:
        state = ", ".join(sorted(run.state)) or "-"
        table.add_row(f"{run.first}-{run.last - 1}", str(run.pages), escape(state))
    return table


@main.command()
@click.option("--pid", type=int, required=True, help="The process that holds the guest_memfd.")
@click.option("--fd", "target_fd", type=int, required=True, help="Its fd number in that process.")
@click.option("--offset", default="0", show_default=True, help="Start of the window (bytes).")
@click.option("--length", default=None, help="Window length (bytes; default: to the end, "
              "at most 4G).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
def memory(pid: int, target_fd: int, offset: str, length: str | None, as_json: bool) -> None:
    """What the kernel shows of another process's guest_memfd: uptodate pages
    (mincore) and the pages that process maps (/proc/PID/pagemap). Needs ptrace
    access to it (pidfd_getfd)."""
    from guestmem.host.kvm import MEMORY_MAP_LIMIT, attach_guest_memfd

    start = _parse_size(offset, "--offset")
    window = None if length is None else _parse_size(length, "--length")
    try:
        with attach_guest_memfd(pid, target_fd) as gmem:
            size = gmem.size
            if window is None:
                window = min(size - start, MEMORY_MAP_LIMIT)
            if start + window > size:
                raise click.BadParameter(f"[{start:#x}, +{window:#x}) ends past the end of the "
                                         f"{size:#x}-byte file", param_hint="--offset/--length")
            mm = gmem.memory_map(start, window)
    except OSError as e:
        raise click.ClickException(f"cannot look at fd {target_fd} of process {pid}: {e}") from e
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if as_json:
        click.echo(json.dumps({"pid": pid, "fd": target_fd, **mm.as_json()}, indent=2))
        return
    title = (f"guest_memfd fd {target_fd} of process {pid}: {size:#x} bytes; pages "
             f"{mm.first}-{mm.last - 1}; seen: {', '.join(sorted(mm.known))}")
    _console().print(_runs_table(title, mm))


if __name__ == "__main__":
    main()


# --- migrate ---------------------------------------------------------------------------------
OUTCOME_STYLE = {"ok": "green", "refused": "yellow"}  # anything else is damage: red


@main.group()
def migrate() -> None:
    """Live migration: a running guest moved to a new VM (`run`), or seed 001's
    races under each protocol (`scenarios`, `scenario NAME`). KVM cannot
    dirty-log guest_memfd memslots, so their memory moves in stop-and-copy."""


@migrate.command("run")
@click.option("--backend", default="model", show_default=True,
              type=click.Choice(guestmem.BACKENDS),
              help="model: the whole subsystem in Python; kvm: a real guest on this host.")
@click.option("--size", default="64M", show_default=True,
              help="Guest memory (bytes, K/M/G/T); the guest writes up to 32G of it "
                   "and the host fills the rest; kvm: at most 1G.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 20),
              help="Pre-copy rounds, the first sending everything; between them the "
                   "guest rewrites half of what it wrote before.")
@click.option("--variant", default="dirty-first", show_default=True,
              help="The protocol (guestmem migrate scenarios lists them).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 2),
              help="2: the destination is another process, over a socket "
                   "(python -m guestmem.vmm.remote receive).")
@click.option("--plot", "plot_path", default="migration-convergence.png", show_default=True,
              help="Where to write the convergence PNG, in an existing directory "
                   "('' for none).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
def migrate_run(backend: str, size: str, rounds: int, variant: str, processes: int,
                plot_path: str, as_json: bool) -> None:
    """Migrate a running guest: pre-copy rounds between its bursts of writes (at its
    checkpoints), stop-and-copy, and the destination verifies every byte it wrote
    and runs on. Exit 1 unless the destination's guest verified its memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from guestmem.lab import migration as lab
    from guestmem.vmm.migration import VARIANTS

    if variant not in VARIANTS:
        raise click.BadParameter(f"{variant!r}: no such protocol;\n"
                                 "guestmem migrate scenarios lists them", param_hint="--variant")
    try:
        plan = lab.Plan(_parse_size(size, "--size"), rounds)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from e
    if backend == "kvm" and plan.size > lab.KVM_LIMIT:
        raise click.BadParameter(f"at most {_short_size(lab.KVM_LIMIT)} on the kvm backend\n"
                                 "(it populates what the guest writes)", param_hint="--size")
    if plot_path:
        plot_path = plot_path if plot_path.endswith(".png") else plot_path + ".png"
        folder = os.path.dirname(plot_path) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise click.BadParameter(f"not a writable directory:\n{folder}",
                                     param_hint="--plot")
    console = _console()
    with _open(backend, None) as kvm:
        if not as_json:
            console.print(escape(f"guestmem migrate run: {describe(kvm)}, "
                                 f"{_bytes_text(plan.size)}, {variant}"
                                 + (", destination in another process" if processes == 2
                                    else "")), style="bold")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console, disable=as_json, transient=True) as progress:
            task = progress.add_task("pre-copy", total=rounds + 1)

            def advance(stats: Any) -> None:
                progress.update(task, advance=1, description=f"round {stats.index} "
                                f"({stats.phase}): {stats.sent_pages} pages")
            try:
                migrate_one = lab.run if processes == 1 else lab.run_across
                result = migrate_one(kvm, plan, VARIANTS[variant], on_round=advance)
            except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
                raise click.ClickException(f"the migration stopped: {e}") from e
        if backend == "kvm":
            result.memcpy_bytes_per_s = lab.memcpy_bandwidth(min(plan.size, 256 << 20))
    if result.refused:
        if as_json:
            click.echo(json.dumps({**result.as_json(), "plot": None}, indent=2))
        raise click.ClickException(f"the destination refused the stream: {result.refused}")
    plot = lab.plot_convergence(result, plot_path) if plot_path else None
    if as_json:
        click.echo(json.dumps({**result.as_json(), "plot": plot}, indent=2))
    else:
        _print_live_run(console, result, plot)
    if not result.verified:
        raise click.ClickException("the destination's guest did not find its memory intact: "
                                   f"reports {result.destination.reports}")


def _print_live_run(console: Console, result: Any, plot: str | None) -> None:
    table = Table(title="rounds (pages of 4 KiB)", title_justify="left")
    for name in ("round", "phase", "dirty", "sent", "private", "bytes", "ms"):
        table.add_column(name, justify="left" if name == "phase" else "right", no_wrap=True)
    for r in result.stats.rounds:
        table.add_row(str(r.index), "stop&copy" if r.phase == "stop-and-copy" else r.phase,
                      str(r.dirty_pages), str(r.sent_pages), str(r.private_pages),
                      _short_size(r.bytes_sent), f"{r.seconds * 1000:.1f}")
    console.print(table)
    rows = [("verdict", "memory intact; the guest runs on at the destination"
             if result.verified else "memory NOT intact at the destination"),
            ("downtime", f"{result.stats.downtime_pages} pages, "
                         f"{result.stats.downtime_seconds * 1000:.1f} ms"),
            ("stream", _short_size(result.stats.stream_bytes)),
            ("stop-and-copy only", escape(", ".join(result.stop_and_copy_only) or "none") +
             " (KVM cannot dirty-log guest_memfd)")]
    if result.memcpy_bytes_per_s:
        rows.append(("pre-copy rate", f"{result.precopy_bytes_per_s / 1e6:.0f} MB/s = "
                     f"{result.precopy_bytes_per_s / result.memcpy_bytes_per_s:.3f} of this "
                     f"host's memcpy ({result.memcpy_bytes_per_s / 1e6:.0f} MB/s)"))
    if plot:
        rows.append(("plot", escape(plot)))
    console.print(_notes_grid(rows))


@migrate.command("scenarios")
@click.option("--variant", "variants", multiple=True,
              help="Only these protocols (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print every verdict as JSON.")
def migrate_scenarios(variants: tuple[str, ...], as_json: bool) -> None:
    """Every scenario under every protocol, on the model (SEV's C-bit and the
    checker's oracle exist only there): what each loses, corrupts or leaks. Exit 1
    if a scenario's safe protocol fails it."""
    from guestmem.vmm.migration import VARIANTS
    from guestmem.vmm.scenarios import SCENARIOS, safe_variant, verdict_table

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: no such protocol;\n"
                                 "guestmem migrate scenarios lists them", param_hint="--variant")
    chosen = list(variants) or list(VARIANTS)
    verdicts = verdict_table(chosen)
    failed = [v for v in verdicts if v.variant == safe_variant(SCENARIOS[v.scenario])
              and not v.passed]
    if as_json:
        click.echo(json.dumps([v.as_json() for v in verdicts], indent=2))
    else:
        _print_matrix(_console(), verdicts, list(SCENARIOS), chosen)
    if failed:
        raise click.ClickException(f"{len(failed)} scenario(s) fail their safe protocol")


def _short_size(n: int) -> str:
    """1023 B, 4.0 KiB, 128.0 MiB: fits a narrow column."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


OUTCOME_CODE = {"ok": "ok", "refused": "--", "corrupted": "C", "lost": "D", "list": "L",
                "state": "S", "leaked": "X"}


def _outcome_code(outcome: str) -> str:
    return "".join(OUTCOME_CODE.get(part, "?") for part in outcome.split("+"))


def _print_matrix(console: Console, verdicts: list[Any], scenarios: list[str],
                  variants: list[str]) -> None:
    """Rows: scenarios; columns: protocols by number (legends below). A cell is
    the outcome on pages the guest still owns: ok, C corrupted, D lost, L stale
    list, S wrong state, X leaked, -- refused; * marks the safe protocol."""
    from guestmem.vmm.migration import VARIANTS
    from guestmem.vmm.scenarios import SCENARIOS, safe_variant

    by = {(v.scenario, v.variant): v for v in verdicts}
    table = Table(title="verdicts: ok, C corrupted, D lost, L stale list, S wrong state, "
                        "X leaked, -- refused; * safe", title_justify="left")
    table.add_column("scenario", no_wrap=True)
    for i, _ in enumerate(variants, 1):
        table.add_column(f"P{i}", no_wrap=True)
    for i, s in enumerate(scenarios, 1):
        cells = []
        for name in variants:
            v = by[(s, name)]
            style = OUTCOME_STYLE.get(v.outcome, "bold red")
            mark = "*" if name == safe_variant(SCENARIOS[s]) else ""
            cells.append(f"[{style}]{escape(_outcome_code(v.outcome) + mark)}[/]")
        table.add_row(escape(f"S{i} {s}"[:21]), *cells)
    console.print(table)
    blame = {s: sorted({o for v in verdicts if v.scenario == s for o in v.guest_blame().split(",")
                        if o}) for s in scenarios}
    console.print(_notes_grid([(f"S{i}", escape(f"{s}: {SCENARIOS[s].title}" + (
        f" (guest broke {', '.join(blame[s])})" if blame[s] else "")))
        for i, s in enumerate(scenarios, 1)]))
    console.print(_notes_grid([(f"P{i}", escape(f"{n}: {VARIANTS[n].describe()}"))
                               for i, n in enumerate(variants, 1)]))


@migrate.command("scenario")
@click.argument("name")
@click.option("--variant", "variants", multiple=True,
              help="Only these protocols (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def migrate_scenario(name: str, variants: tuple[str, ...], as_json: bool) -> None:
    """One scenario in detail: per protocol, the damage and where, the guest's
    broken obligations, the pages moved. Exit 1 if its safe protocol fails."""
    from guestmem.vmm.migration import VARIANTS
    from guestmem.vmm.scenarios import SCENARIOS, run_scenario, safe_variant

    if name not in SCENARIOS:
        raise click.BadParameter(f"{name!r}: no such scenario;\n"
                                 "guestmem migrate scenarios lists them", param_hint="NAME")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: no such protocol;\n"
                                 "guestmem migrate scenarios lists them", param_hint="--variant")
    scenario = SCENARIOS[name]
    verdicts = [run_scenario(scenario, VARIANTS[v]) for v in (variants or VARIANTS)]
    if as_json:
        click.echo(json.dumps([v.as_json() for v in verdicts], indent=2))
    else:
        console = _console()
        console.print(escape(f"{name}: {scenario.title} ({scenario.source})"), style="bold")
        console.print(escape(f"expected: {scenario.expects}"))
        for v in verdicts:
            safe = " (safe)" if v.variant == safe_variant(scenario) else ""
            style = OUTCOME_STYLE.get(v.outcome, "bold red")
            console.print(f"[bold]{escape(v.variant + safe)}[/]: [{style}]"
                          f"{escape(v.outcome)}[/]")
            lines = [f"{f.kind} at gpa {f.gfn * 4096:#x} ({f.pages} page"
                     f"{'s' if f.pages > 1 else ''}) {f.detail}".rstrip()
                     for f in v.damage + v.leaks]
            lines += list(dict.fromkeys(  # once per obligation and place
                f"guest broke {x.obligation} at gpa {x.gfn * 4096:#x}: {x.detail}"
                for x in v.violations))
            lines += [f"the destination's guest read wrong data at {gpa:#x}"
                      for gpa in v.guest_failures]
            lines += [f"refused at checkpoint {label} (not READY)" for label in v.refused]
            lines += [f"the destination saw pages whose state disagrees with the source's "
                      f"final attributes: {note}" for note in v.notes]
            moved = v.stats.rounds
            if moved:
                lines.append(f"moved {sum(r.sent_pages for r in moved)} pages "
                             f"({sum(r.private_pages for r in moved)} private) in "
                             f"{len(moved)} rounds, the last stop-and-copy")
            for line in lines:
                console.print(Padding(escape(line), (0, 0, 0, 2)))
    failed = [v for v in verdicts if v.variant == safe_variant(scenario) and not v.passed]
    if failed:
        raise click.ClickException(f"{name} fails its safe protocol {failed[0].variant}")
