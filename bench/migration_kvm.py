"""Benchmark: pre-copy throughput of live migration on this host's /dev/kvm,
as a ratio to this host's memcpy bandwidth measured in the same run (issue 11).

A real guest (compiled x86, CPL3 under kvm_pvm) owns SIZE bytes of anonymous
memory in one memslot. It writes all of it, then reaches a checkpoint where the
VMM starts migrating (`Source.begin()`: KVM_MEM_LOG_DIRTY_PAGES on, round 0 sends
every page); then, ROUNDS times, it rewrites all of it and checkpoints, and the
VMM runs one pre-copy round (`Source.round()`: KVM_GET_DIRTY_LOG, the list, and
every dirty page read through the memslot's mapping, encoded and checksummed into
the stream). The stream goes to a sink that discards it: what is measured is the
source's side, not a network. At each checkpoint the same thread also times one
memcpy (ctypes.memmove) of SIZE bytes between two warm buffers, so the two
measurements interleave (host-notes: timings here are noisy and bimodal).
Throughput is the guest memory a round moved over the round's wall time.

    .venv/bin/python bench/migration_kvm.py [--size MIB] [--rounds N] [--json]

It populates about three times SIZE (the guest's memory and the two memcpy
buffers); SIZE is at most 320 MiB, so under 1 GiB in all.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.host import Kvm
from guestmem.vmm import RunResult, Vmm
from guestmem.vmm.migration import VARIANTS, Source
from guestmem.vmm.transport import TransportKey

MIB = 1 << 20
DATA = 0x4000_0000
MAX_SIZE_MIB = 320


class Sink(io.RawIOBase):
    """A stream destination that counts and drops what it is given."""

    def __init__(self) -> None:
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        n = memoryview(data).nbytes  # type: ignore[arg-type]
        self.bytes += n
        return n


@dataclass
class Sample:
    label: int
    pages: int
    stream_bytes: int
    round_s: float
    memcpy_s: float


@dataclass
class Bench:
    size: int
    samples: list[Sample] = field(default_factory=list)
    first_round_s: float = 0.0


def run(size_mib: int, rounds: int) -> Bench:
    size = size_mib * MIB
    bench = Bench(size)
    src_buf = (ctypes.c_char * size)()
    dst_buf = (ctypes.c_char * size)()
    ctypes.memset(src_buf, 0x5A, size)  # warm both: every page populated
    ctypes.memset(dst_buf, 0xA5, size)

    def memcpy() -> float:
        t0 = time.perf_counter()
        ctypes.memmove(dst_buf, src_buf, size)
        return time.perf_counter() - t0

    memcpy()
    steps: list[p.Step] = [p.WritePattern(DATA, size, 1, 1), p.MigrationReady(), p.Checkpoint(1)]
    for i in range(rounds):
        steps += [p.WritePattern(DATA, size, 100 + i, 3), p.Checkpoint(2 + i)]
    with Kvm() as kvm, Vmm(kvm) as vmm:
        vmm.add_memory(DATA, size, "anon")
        vmm.load(compile_program(p.Program.of(*steps), default_hypercall_abi(kvm.capabilities)))
        sink = Sink()
        source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), sink)

        def checkpoint(label: int, result: RunResult) -> bool:
            before = sink.bytes
            t0 = time.perf_counter()
            if label == 1:
                source.begin()
                bench.first_round_s = time.perf_counter() - t0
                return False
            stats = source.round()
            elapsed = time.perf_counter() - t0
            bench.samples.append(Sample(label, stats.sent_pages, sink.bytes - before, elapsed,
                                        memcpy()))
            return False

        vmm.on_checkpoint = checkpoint
        result = vmm.run(timeout=600)
        if result.stop != "done":
            raise SystemExit(f"the guest stopped: {result.stop} {result.log}")
    for sample in bench.samples:
        if sample.pages * 4096 != size:
            raise SystemExit(f"round at checkpoint {sample.label} sent {sample.pages} pages, "
                             f"the guest dirtied {size // 4096}")
    return bench


def summary(bench: Bench) -> dict[str, object]:
    size = bench.size
    rates = [size / s.round_s for s in bench.samples]
    copies = [size / s.memcpy_s for s in bench.samples]
    return {
        "size_bytes": size,
        "rounds": len(bench.samples),
        "first_round_mb_s": round(size / bench.first_round_s / 1e6, 1),
        "precopy_mb_s": {"best": round(max(rates) / 1e6, 1),
                         "median": round(statistics.median(rates) / 1e6, 1)},
        "memcpy_mb_s": {"best": round(max(copies) / 1e6, 1),
                        "median": round(statistics.median(copies) / 1e6, 1)},
        "ratio": {"best": round(max(rates) / max(copies), 4),
                  "median": round(statistics.median(rates) / statistics.median(copies), 4)},
        "stream_bytes_per_round": bench.samples[0].stream_bytes if bench.samples else 0,
        "samples": [vars(s) for s in bench.samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="guest memory in MiB (128)")
    parser.add_argument("--rounds", type=int, default=7, help="pre-copy rounds timed (7)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    if not 1 <= args.size <= MAX_SIZE_MIB or args.rounds < 1:
        parser.error(f"--size is 1..{MAX_SIZE_MIB} MiB and --rounds at least 1")
    out = summary(run(args.size, args.rounds))
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pre-copy of {args.size} MiB of anonymous guest memory, "
                        f"{out['rounds']} rounds (every page dirty), vs memcpy")
    for column in ("", "best MB/s", "median MB/s"):
        table.add_column(column, justify="right")
    pre, cpy, ratio = out["precopy_mb_s"], out["memcpy_mb_s"], out["ratio"]
    assert isinstance(pre, dict) and isinstance(cpy, dict) and isinstance(ratio, dict)
    table.add_row("pre-copy round", str(pre["best"]), str(pre["median"]))
    table.add_row("memcpy (ctypes.memmove)", str(cpy["best"]), str(cpy["median"]))
    table.add_row("ratio", str(ratio["best"]), str(ratio["median"]))
    Console().print(table)
    print(f"round 0 (begin, everything): {out['first_round_mb_s']} MB/s; "
          f"stream bytes per round: {out['stream_bytes_per_round']}")


if __name__ == "__main__":
    main()
