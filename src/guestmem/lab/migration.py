"""A running guest migrated live, with its numbers and a convergence plot
(issue 11 part 6), on either backend.

The guest writes its memory, then in each of `rounds` steps rewrites half of
what it wrote the step before (so pre-copy converges: pages dirtied per round
halve) and flips one page's state with MAP_GPA_RANGE, stopping at a
checkpoint after each step, where the VMM runs a pre-copy round. After the
last one the vCPU pauses; stop-and-copy sends what is still dirty, every
memslot KVM cannot dirty-log (guest_memfd), the list and the vCPU. The
destination continues the same program: it verifies every byte it wrote,
writes once more and verifies that too, then halts.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from guestmem import api, uapi
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm.migration import Destination, RoundStats, Source, Stats, Variant
from guestmem.vmm.transport import TransportKey
from guestmem.vmm.vmm import RunResult, Vmm

PAGE = uapi.PAGE_SIZE
DATA = 0x1_0000_0000
SEED = 0x6D69_6772_0000_0000  # "migr": the first word the guest writes
# The kvm backend populates what the guest writes: keep it a small share of memory.
KVM_LIMIT = 1 << 30


# The guest's identity page tables map 64 GiB (machine.IDENTITY_MAP_GIB): beyond what
# it can reach the host fills the memory, which migrates all the same.
GUEST_REACH = 32 << 30
HOST_FILL = 0x5A


@dataclass(frozen=True)
class Plan:
    size: int
    rounds: int

    def __post_init__(self) -> None:
        if self.touched < PAGE << self.rounds or self.touched % (PAGE << self.rounds) or \
                self.size % PAGE:
            raise ValueError(f"{self.size} bytes do not halve {self.rounds} times into pages")

    @property
    def touched(self) -> int:
        """What the guest writes; the host fills the rest."""
        return min(self.size, GUEST_REACH)


def program(plan: Plan) -> p.Program:
    """The guest: write, then halve and rewrite per round; verify on the destination."""
    size = plan.touched
    steps: list[p.Step] = [p.WritePattern(DATA, size, SEED, 1), p.MigrationReady(),
                           p.Checkpoint(0)]
    for i in range(1, plan.rounds + 1):
        steps += [p.WritePattern(DATA, size >> i, SEED + i, 1),
                  p.MapGpaRange(DATA + size - i * PAGE, 1, encrypted=i % 2 == 1),
                  p.Checkpoint(i)]
    steps += _verify(plan, 0)
    steps += [p.WritePattern(DATA, size, SEED + 100, 1),
              p.VerifyPattern(DATA, size, SEED + 100, 1)]
    return p.Program.of(*steps)


def _verify(plan: Plan, extra: int) -> list[p.Step]:
    """Each piece as last written: [size>>(i+1), size>>i) in round i, the rest last."""
    steps: list[p.Step] = []
    for i in range(plan.rounds):
        lo, hi = plan.touched >> (i + 1), plan.touched >> i
        steps.append(p.VerifyPattern(DATA + lo, hi - lo, SEED + i + extra + lo // 8, 1))
    steps.append(p.VerifyPattern(DATA, plan.touched >> plan.rounds, SEED + plan.rounds + extra,
                                 1))
    return steps


@dataclass
class LiveRun:
    backend: str
    variant: str
    size: int
    stats: Stats
    source: RunResult
    destination: RunResult
    verified: bool
    memcpy_bytes_per_s: float | None = None
    stop_and_copy_only: list[str] = field(default_factory=list)
    processes: int = 1
    refused: str | None = None  # why the destination refused the stream (two processes)

    @property
    def precopy_bytes_per_s(self) -> float:
        """The first round's rate: it sends all memory (the later ones are small)."""
        first = self.stats.rounds[0]
        return first.bytes_sent / first.seconds if first.seconds else 0.0

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "backend": self.backend, "variant": self.variant, "size": self.size,
            "processes": self.processes, "refused": self.refused,
            "verified": self.verified, **self.stats.as_json(),
            "destination_reports": self.destination.reports,
            "stop_and_copy_only": self.stop_and_copy_only,
            "precopy_bytes_per_s": round(self.precopy_bytes_per_s)}
        if self.memcpy_bytes_per_s:
            out["memcpy_bytes_per_s"] = round(self.memcpy_bytes_per_s)
            out["precopy_to_memcpy"] = round(self.precopy_bytes_per_s / self.memcpy_bytes_per_s, 4)
        return out


def _source(kvm: api.Kvm, plan: Plan) -> Vmm:
    """The source VM: guest memory at DATA (host-filled beyond the guest's reach)
    and the program loaded; closed again if any step fails."""
    vmm = Vmm(kvm)
    try:
        region = vmm.add_memory(DATA, plan.size, "anon")
        if plan.size > plan.touched:
            region.mapping.fill(plan.touched, HOST_FILL, plan.size - plan.touched)
        vmm.load(compile_program(program(plan), default_hypercall_abi(kvm.capabilities)))
    except BaseException:
        vmm.close()
        raise
    return vmm


def run(kvm: api.Kvm, plan: Plan, variant: Variant,
        on_round: Callable[[RoundStats], None] | None = None) -> LiveRun:
    """Migrate the running guest in this process; the destination on the same Kvm."""
    if kvm.backend == "kvm" and plan.size > KVM_LIMIT:
        raise ValueError(f"{plan.size} bytes: the kvm backend migrates at most {KVM_LIMIT} "
                         "(it populates every page the guest writes)")
    vmm = _source(kvm, plan)
    try:
        key, out = TransportKey(), io.BytesIO()
        source = Source(vmm, variant, key, out)

        def at(label: int, result: RunResult) -> bool:
            """Round 0 (everything) at the first checkpoint, a round at each one
            after, the pause at the last: `rounds` pre-copy rounds in all, as
            guestmem.vmm.remote.send runs them."""
            if label == plan.rounds:
                return True
            if label == 0:
                source.begin()
                stats = source.stats.rounds[-1]
            else:
                stats = source.round()
            if on_round is not None:
                on_round(stats)
            return False

        vmm.on_checkpoint = at
        result = vmm.run(timeout=600)
        if result.stop != "paused":
            raise RuntimeError(f"the guest stopped before its last checkpoint: {result.stop} "
                               f"{result.log[-3:]}")
        final = source.stop_and_copy()
        if on_round is not None:
            on_round(final)
        source.finish()
        out.seek(0)
        dest = Destination(kvm, key).receive(out)
        try:
            host_kept = all(dest.read(DATA + at, 8) == bytes([HOST_FILL]) * 8
                            for at in range(plan.touched, plan.size, max(PAGE, plan.size // 7)))
            rest = dest.run(timeout=600)
        finally:
            dest.close()
        verified = host_kept and rest.stop == "done" and \
            rest.reports == [p.VERIFY_OK] * (plan.rounds + 2)
        return LiveRun(kvm.backend, variant.name, plan.size, source.stats, result, rest,
                       verified,
                       stop_and_copy_only=[f"memslot {r.slot} ({r.backing})"
                                           for r in source.stop_and_copy_only])
    finally:
        vmm.close()


def run_across(kvm: api.Kvm, plan: Plan, variant: Variant,
               on_round: Callable[[RoundStats], None] | None = None,
               timeout: float = 600) -> LiveRun:
    """The same, with the destination in a second process (`python -m
    guestmem.vmm.remote receive`, on the same backend) over a socket pair; the
    transport key goes to it through a pipe, never on the socket. Verified: the
    destination placed every memslot byte for byte as the source had it at pause
    (SHA-256 per memslot) and its guest verified its memory and ran to the end."""
    from guestmem.vmm import remote

    if kvm.backend == "kvm" and plan.size > KVM_LIMIT:
        raise ValueError(f"{plan.size} bytes: the kvm backend migrates at most {KVM_LIMIT}")
    ours, theirs = socket.socketpair()
    key = TransportKey()
    key_read, key_write = os.pipe()
    os.write(key_write, key.key.hex().encode())
    os.close(key_write)
    command = [sys.executable, "-m", "guestmem.vmm.remote", "receive", "--fd",
               str(theirs.fileno()), "--key-fd", str(key_read), "--backend", kvm.backend,
               "--timeout", str(timeout)]
    profile = getattr(kvm, "profile", None)  # the model's: the destination takes the same
    if profile is not None:
        command += ["--profile", str(profile.name)]
    child = subprocess.Popen(command, pass_fds=(theirs.fileno(), key_read),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    theirs.close()
    os.close(key_read)
    try:
        vmm = _source(kvm, plan)
    except BaseException:
        ours.close()
        child.kill()
        child.wait()
        raise
    try:
        sent = remote.send(vmm, variant, ours, key, plan.rounds, timeout, on_round)
        out, err = child.communicate(timeout=timeout)
        stop_and_copy_only = [f"memslot {r.slot} ({r.backing})" for r in vmm.regions
                              if r.gmem is not None]
    finally:
        ours.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        vmm.close()
    report = json.loads(out.decode() or "{}")
    run = report.get("run") or {}
    rest = RunResult(stop=str(run.get("stop", "refused")), reports=list(run.get("reports", [])))
    digests = [d.as_json() for d in sent.digests_at_pause]
    verified = sent.accepted and report.get("digests_before") == digests and \
        rest.stop == "done" and rest.reports == [p.VERIFY_OK] * (plan.rounds + 2)
    refused = None if sent.accepted else f"{sent.error} (the source kept its guest)"
    return LiveRun(kvm.backend, variant.name, plan.size, sent.stats, sent.run, rest, verified,
                   stop_and_copy_only=stop_and_copy_only, processes=2, refused=refused)


def memcpy_bandwidth(size: int, repeats: int = 5) -> float:
    """This host's memcpy rate over `size` bytes, warm: the best of `repeats`
    (ctypes.memmove, which is libc's memcpy), bytes per second."""
    import ctypes
    src = ctypes.create_string_buffer(size)
    dst = ctypes.create_string_buffer(size)
    ctypes.memmove(dst, src, size)  # warm: fault every page in
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        ctypes.memmove(dst, src, size)
        best = min(best, time.perf_counter() - started)
    return size / best


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def plot_convergence(run: LiveRun, path: str) -> str:
    """A PNG: pages dirtied and pages sent per round (log scale), stop-and-copy
    marked. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = run.stats.rounds
    xs = [r.index for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x - 0.2 for x in xs], [max(r.dirty_pages, 0.5) for r in rounds], width=0.4,
           label="pages found dirty")
    ax.bar([x + 0.2 for x in xs], [max(r.sent_pages, 0.5) for r in rounds], width=0.4,
           label="pages sent")
    ax.set_yscale("log")
    ax.set_xlabel("round (last: stop-and-copy)")
    ax.set_ylabel("pages")
    ax.set_xticks(xs, [str(x) if r.phase == "pre-copy" else f"{x}\nstop" for x, r in
                       zip(xs, rounds, strict=True)])
    ax.set_title(f"pre-copy convergence: {run.backend}, {_size(run.size)}, {run.variant}, "
                 f"downtime {run.stats.downtime_seconds * 1000:.1f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
