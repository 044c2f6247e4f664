"""Live migration: what it costs (issue 11 part 6).

Two measurements, side by side in one run:

1. The model, across guest sizes (1 GiB, 16 GiB, 256 GiB, 1 TiB): the running
   guest of guestmem.lab.migration (it writes up to 32 GiB, halving what it
   rewrites per pre-copy round; the host fills the rest) migrated in one
   process with the safe protocol. Per size: seconds (min and median of
   --repeats, interleaved across sizes), stream bytes, downtime pages, peak
   RSS. The model moves alike pages as runs and harvests the dirty log as
   ranges, so the cost stays flat from 1 GiB to 1 TiB.
2. The kernel (skipped without /dev/kvm): the same guest over --kvm-size of
   anonymous memory (the low memory is guest_memfd, which KVM cannot dirty-log:
   it goes in stop-and-copy), migrated while running; the first pre-copy round
   (all memory) as bytes per second, against this host's memcpy over the same
   size measured in the same run (ctypes.memmove, warm; min and median of
   --repeats). The ratio is the share of the limit that pre-copy reaches.
   Timings are noisy on this machine (it gives memory back to its own host):
   the runs interleave and the table shows min and median.

The convergence plot of the last kernel run (or model run without /dev/kvm)
goes to --plot (bench/out/, which git ignores).

    .venv/bin/python bench/migration.py [--quick] [--json] [--repeats N]
                                        [--kvm-size BYTES] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from guestmem.lab import migration as lab
from guestmem.model.kvm import Kvm as ModelKvm
from guestmem.vmm.migration import SAFE_SEV, VARIANTS

SIZES = (1 << 30, 16 << 30, 256 << 30, 1 << 40)
ROUNDS = 6


def model_point(size: int) -> dict[str, object]:
    started = time.perf_counter()
    run = lab.run(ModelKvm("mainline"), lab.Plan(size, ROUNDS), VARIANTS[SAFE_SEV])
    seconds = time.perf_counter() - started
    if not run.verified:
        raise SystemExit(f"the model's {size}-byte guest did not verify its memory")
    return {"seconds": seconds, "stream_bytes": run.stats.stream_bytes,
            "downtime_pages": run.stats.downtime_pages}


def kvm_point(size: int, plot: str | None) -> dict[str, object]:
    from guestmem.host.kvm import Kvm as HostKvm

    with HostKvm() as kvm:
        run = lab.run(kvm, lab.Plan(size, ROUNDS), VARIANTS[SAFE_SEV])
    if not run.verified:
        raise SystemExit("the kernel's guest did not verify its memory after migration")
    if plot:
        lab.plot_convergence(run, plot)
    return {"precopy_bytes_per_s": run.precopy_bytes_per_s,
            "downtime_ms": run.stats.downtime_seconds * 1000,
            "downtime_pages": run.stats.downtime_pages,
            "rounds": [r.dirty_pages for r in run.stats.rounds]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, small kvm guest")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kvm-size", type=int, default=256 << 20)
    parser.add_argument("--plot", default="bench/out/migration-convergence.png")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    kvm_size = 32 << 20 if args.quick else args.kvm_size
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)

    model: dict[int, list[dict[str, object]]] = {s: [] for s in SIZES}
    kernel: list[dict[str, object]] = []
    memcpy: list[float] = []
    have_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    for _ in range(repeats):  # interleaved: noise hits every case alike
        for size in SIZES:
            model[size].append(model_point(size))
        if have_kvm:
            kernel.append(kvm_point(kvm_size, args.plot))
            memcpy.append(lab.memcpy_bandwidth(kvm_size, repeats=3))
    if not have_kvm:
        lab.plot_convergence(lab.run(ModelKvm("mainline"), lab.Plan(1 << 30, ROUNDS),
                                     VARIANTS[SAFE_SEV]), args.plot)

    def spread(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values)}

    record: dict[str, object] = {
        "model": [{"size": size, "seconds": spread([float(str(r["seconds"])) for r in rs]),
                   "stream_bytes": rs[0]["stream_bytes"],
                   "downtime_pages": rs[0]["downtime_pages"]} for size, rs in model.items()],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "plot": args.plot,
    }
    if kernel:
        rates = [float(str(k["precopy_bytes_per_s"])) for k in kernel]
        record["kernel"] = {
            "size": kvm_size, "precopy_bytes_per_s": spread(rates),
            "memcpy_bytes_per_s": spread(memcpy),
            "ratio_median": statistics.median(rates) / statistics.median(memcpy),
            "ratio_best": max(rates) / max(memcpy),
            "downtime_ms": spread([float(str(k["downtime_ms"])) for k in kernel]),
            "downtime_pages": kernel[0]["downtime_pages"], "rounds": kernel[0]["rounds"]}
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print("model: a running guest migrated with the safe protocol (seconds: min / median)")
    print(f"{'size':>8} {'min s':>8} {'median s':>9} {'stream':>10} {'downtime pages':>15}")
    for row in record["model"]:  # type: ignore[attr-defined]
        print(f"{row['size'] >> 30:>6}Gi {row['seconds']['min']:>8.3f} "
              f"{row['seconds']['median']:>9.3f} {row['stream_bytes']:>10} "
              f"{row['downtime_pages']:>15}")
    print(f"peak RSS {record['peak_rss_bytes'] >> 20} MiB")
    if "kernel" in record:
        k = record["kernel"]
        print(f"\nkernel: {k['size'] >> 20} MiB of anonymous guest memory, pre-copy's first "  # type: ignore[index]
              f"round vs memcpy (MB/s, min / median)")
        print(f"pre-copy {k['precopy_bytes_per_s']['min'] / 1e6:8.0f} "  # type: ignore[index]
              f"{k['precopy_bytes_per_s']['median'] / 1e6:8.0f}")  # type: ignore[index]
        print(f"memcpy   {k['memcpy_bytes_per_s']['min'] / 1e6:8.0f} "  # type: ignore[index]
              f"{k['memcpy_bytes_per_s']['median'] / 1e6:8.0f}")  # type: ignore[index]
        print(f"ratio (medians) {k['ratio_median']:.3f}; downtime "  # type: ignore[index]
              f"{k['downtime_ms']['median']:.1f} ms, {k['downtime_pages']} pages")  # type: ignore[index]
    else:
        print("\nkernel: skipped (no read-write /dev/kvm)")
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
