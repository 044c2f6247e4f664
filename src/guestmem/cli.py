"""`guestmem ...`: thin, parses arguments, calls one layer, prints."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import guestmem
from guestmem import api, uapi
from guestmem.caps import Capabilities
from guestmem.model import Kvm as ModelKvm


def _console() -> Console:
    """Made per command, so COLUMNS and the terminal are read when it runs."""
    return Console()


def _open(backend: str, profile: str) -> api.Kvm:
    if backend == "kvm" and not os.path.exists("/dev/kvm"):
        raise click.ClickException(
            "/dev/kvm does not exist on this machine: the kvm backend needs a host with KVM "
            "(the model backend, the default, runs anywhere)"
        )
    try:
        if backend == "model":
            return guestmem.Kvm(backend="model", profile=profile)
        return guestmem.Kvm(backend=backend)
    except OSError as e:
        raise click.ClickException(f"cannot open the {backend} backend: {e}") from e


def _backend_options(fn: Any) -> Any:
    from guestmem.model import PROFILES

    fn = click.option("--profile", default="mainline", show_default=True,
                      type=click.Choice(sorted(PROFILES)),
                      help="Kernel profile the model behaves like (model backend only).")(fn)
    return click.option("--backend", default="model", show_default=True,
                        type=click.Choice(guestmem.BACKENDS),
                        help="model: guest_memfd in Python; kvm: the host kernel.")(fn)


@click.group()
@click.version_option(guestmem.__version__)
def main() -> None:
    """guestmem: Linux KVM guest_memfd, a VMM and a conformance suite."""


def profile_of(caps: Capabilities) -> str:
    """Which spec profile (DESIGN.md "Kernel profiles") the host matches."""
    mainline = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    if caps.memory_attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE and len(caps.vm_types) > 1:
        return "coco"
    if caps.guest_memfd and caps.guest_memfd_flags & mainline == mainline:
        return "mainline"
    if caps.guest_memfd:
        return "pre-6.18 (guest_memfd without MMAP/INIT_SHARED)"
    return "none (no guest_memfd)"


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
    if model_profile:
        record["profile_description"] = model_profile.description
    return record


@main.command()
@_backend_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
def info(backend: str, profile: str, as_json: bool) -> None:
    """What the backend's KVM supports, and which spec profile it matches."""
    with _open(backend, profile) as kvm:
        record = info_record(kvm)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    table = Table(title=f"guestmem info ({record['backend']} backend)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("KVM implementation", record["implementation"])
    table.add_row("API version", str(record["api_version"]))
    table.add_row("spec profile", record["profile"])
    if "profile_description" in record:
        table.add_row("", record["profile_description"])
    table.add_row("VM types", ", ".join(f"{n} ({v})" for n, v in record["vm_types"].items()))
    table.add_row(
        "guest_memfd flags",
        f"{record['guest_memfd_flags']:#x} " + "|".join(record["guest_memfd_flag_names"]),
    )
    for name, flags in record["gmem_flags_by_vm_type"].items():
        table.add_row(f"  on a {name} VM", f"{flags:#x}")
    execution = record["execution"]
    table.add_row("CPU vendor", execution["cpu_vendor"])
    for insn, outcome in execution["cpl3_hypercall"].items():
        table.add_row(f"CPL3 {insn.upper()}", outcome)
    table.add_row(f"CPL0 {execution['native_hypercall'].upper()}", execution["cpl0_hypercall"])
    table.add_row("emulated CPLs", ", ".join(map(str, execution["emulated_cpls"])) or "none")
    table.add_row("MMU", "shadow paging" if record["shadow_paging"] else "TDP")
    table.add_row("NUMA nodes", str(record["numa_nodes"]))
    table.add_row("guest_memfd mempolicy",
                  "per inode (shared)" if record["gmem_shared_policy"] else "per VMA only")
    _console().print(table)
    caps = Table(title="KVM_CHECK_EXTENSION: system scope and on a VM of each type")
    caps.add_column("capability", style="bold")
    caps.add_column("system", justify="right")
    for vm_name in record["vm"]:
        caps.add_column(f"{vm_name} VM", justify="right")

    def fmt(value: int) -> str:
        return str(value) if value < 256 else f"{value:#x}"

    for name, value in record["system"].items():
        caps.add_row(name, fmt(value), *(fmt(v[name]) for v in record["vm"].values()))
    _console().print(caps)


@main.command()
@_backend_options
@click.option("--all-vm-types", is_flag=True, help="Also list cases for VM types the host lacks.")
@click.option("-k", "pattern", default="", help="Only cases whose name contains this.")
def check(backend: str, profile: str, all_vm_types: bool, pattern: str) -> None:
    """Run the conformance suite and print a table."""
    from guestmem.check import Status, instances, run_instance

    with _open(backend, profile) as kvm:
        types = tuple(uapi.VM_TYPE_NAMES) if all_vm_types else tuple(
            sorted(kvm.capabilities.vm_types))
        selected = [i for i in instances(types) if pattern in i.name]
        results = [run_instance(kvm, inst) for inst in selected]
    where = f"model backend, {profile} profile" if backend == "model" else f"{backend} backend"
    table = Table(title=f"guestmem conformance ({where})")
    for col in ("case", "expected", "observed", "result"):
        table.add_column(col, overflow="fold")
    style = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "yellow"}
    for r in results:
        table.add_row(r.name, r.expected, r.observed,
                      f"[{style[r.status]}]{r.status.value}[/]")
    console = _console()
    console.print(table)
    counts = {s: sum(r.status is s for r in results) for s in Status}
    console.print(f"{counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, "
                  f"{counts[Status.SKIP]} skipped")
    if counts[Status.FAIL]:
        sys.exit(1)


@main.command()
@_backend_options
def demo(backend: str, profile: str) -> None:
    """Run a guest on guest_memfd memory and show each step (--backend kvm: a real one)."""
    from guestmem import demo as scenario

    failed = 0
    console = _console()
    with _open(backend, profile) as kvm:
        for step in scenario.run(kvm):
            mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
            console.print(f"{mark} [bold]{step.title}[/]: {step.detail}")
            failed += not step.ok
    if failed:
        raise click.ClickException(f"{failed} demo step(s) did not behave as expected")


if __name__ == "__main__":
    main()
