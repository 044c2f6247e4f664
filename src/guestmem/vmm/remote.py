"""Live migration between two processes over a socket (issue 11 part 5).

The source process runs the guest and streams it (`send`); the destination
process builds the VM from the stream, answers whether it took it, and runs the
guest on (`receive`, `serve`, and `python -m guestmem.vmm.remote receive`).

On the socket, destination to source first: one line, `{"ready": true}`, once its
backend is open (the source starts its guest and pre-copy only then, so that
round 0's time is the transfer's, not the destination's start-up). Source to
destination: the migration stream (guestmem.vmm.stream), then the source shuts its
sending side down (the reader checks that nothing follows END, so it needs the end
of file). Destination to source: one line of JSON, the verdict, sent once the
whole stream is read and applied:
``{"accepted": true, "digests": [...]}`` (the SHA-256 of each memslot's memory as
placed, before the guest resumes) or ``{"accepted": false, "error": "..."}``. A
destination that refuses keeps reading until the source's end of file, so the
source can finish writing and read the verdict (no reset); it never runs the
guest. A source whose destination refused, or whose socket broke, turns dirty
logging off again and keeps its guest, paused where it was, for the caller to run
on (`Vmm.run()`); one whose destination accepted keeps it paused too: destroying
it (SEND_FINISH) is the caller's decision.

The transport key (the launch's shared secret, which both firmwares hold) never
travels on the socket: the destination entry point takes it from a file
descriptor (`--key-fd`, 32 bytes or 64 hex digits, read to its end) or, failing
that, from the environment variable GUESTMEM_MIGRATION_KEY (64 hex digits;
visible to the same user in /proc/PID/environ, so the descriptor is the better
way).

Pre-copy here runs at the guest's checkpoints: at each one before `stop_at` the
VMM turns dirty logging on and sends everything (the first, once migration may
start: READY, if the variant waits for it) or runs a round; the guest keeps
writing between them. At `stop_at` the vCPU pauses and stop-and-copy sends what
is still dirty plus every memslot KVM cannot dirty-log (guest_memfd), the list
and the vCPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from guestmem import api
from guestmem.vmm import stream
from guestmem.vmm.migration import (
    Destination,
    MigrationRefused,
    RoundStats,
    Source,
    Stats,
    Variant,
    canonical_runs,
)
from guestmem.vmm.transport import TransportError, TransportKey
from guestmem.vmm.vmm import RunResult, Vmm

KEY_ENV: Final = "GUESTMEM_MIGRATION_KEY"
DIGEST_CHUNK: Final = 8 << 20
# Exit statuses of the destination entry point.
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_GUEST = 0, 1, 2, 3
_VERDICT_LIMIT: Final = 1 << 20  # the longest verdict line a source reads
READY: Final = b'{"ready": true}'  # the destination's first line


class MigrationFailed(Exception):
    """The source could not complete a migration (not a refusal: those are results)."""


@dataclass(frozen=True)
class RegionDigest:
    """One memslot's memory, as a SHA-256 of its bytes through the host mapping."""

    gpa: int
    size: int
    backing: str
    sha256: str

    def as_json(self) -> dict[str, object]:
        return {"gpa": self.gpa, "size": self.size, "backing": self.backing,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object) -> RegionDigest:
        if not isinstance(obj, dict):
            raise ValueError(f"a region digest is an object, not {obj!r}")
        return cls(int(obj["gpa"]), int(obj["size"]), str(obj["backing"]), str(obj["sha256"]))


def memory_digests(vmm: Vmm) -> list[RegionDigest]:
    """Every memslot's bytes, hashed: equal digests on both sides mean the
    destination placed the memory byte for byte as the source had it."""
    out = []
    for region in vmm.regions:
        h = hashlib.sha256()
        if isinstance(region.mapping, api.ContentRuns):  # the model: its runs, canonical
            for run in canonical_runs(region.mapping.content_runs(0, region.size)):
                h.update(struct.pack("<QQQQ", run.start, run.end, run.word, run.step))
                h.update(run.data or b"")
        else:
            for offset in range(0, region.size, DIGEST_CHUNK):
                h.update(region.mapping.read(offset, min(DIGEST_CHUNK, region.size - offset)))
        out.append(RegionDigest(region.gpa, region.size, region.backing, h.hexdigest()))
    return out


def run_json(result: RunResult) -> dict[str, object]:
    """What a run did, as JSON: how it stopped, the guest's reports and checkpoints."""
    return {"stop": result.stop, "reports": result.reports, "checkpoints": result.checkpoints,
            "exits": result.exits, "errno": result.errno, "log": result.log}


# --- the source ---------------------------------------------------------------------------------
@dataclass
class SendResult:
    """What `send` did. `accepted`: the destination took the VM (the source is
    paused at `stop_at`, unchanged). Otherwise `error` says why (the
    destination's refusal, a broken socket) and the source's dirty logging is off
    again: `Vmm.run()` continues its guest."""

    accepted: bool
    run: RunResult  # the source's run up to the pause
    stats: Stats
    error: str | None = None
    digests_at_pause: list[RegionDigest] = field(default_factory=list)
    destination_digests: list[RegionDigest] = field(default_factory=list)
    private_gfns: list[tuple[int, int]] = field(default_factory=list)  # the list at pause

    def as_json(self) -> dict[str, object]:
        return {"accepted": self.accepted, "error": self.error, "run": run_json(self.run),
                "stats": self.stats.as_json(),
                "digests_at_pause": [d.as_json() for d in self.digests_at_pause],
                "destination_digests": [d.as_json() for d in self.destination_digests],
                "private_gfns": [list(r) for r in self.private_gfns]}


class _Precopy:
    """The checkpoint handler of a migration in progress: begin, then one round per
    checkpoint, and a pause at `stop_at`. A broken socket ends the migration (the
    guest runs on to `stop_at` all the same)."""

    def __init__(self, source: Source, stop_at: int,
                 on_round: Callable[[RoundStats], None] | None = None) -> None:
        self.source = source
        self.stop_at = stop_at
        self.on_round = on_round
        self.broken: OSError | None = None

    def __call__(self, label: int, result: RunResult) -> bool:
        if label == self.stop_at:
            return True
        if self.broken is not None:
            return False
        try:
            if not self.source.begun:
                try:
                    self.source.begin()
                except MigrationRefused as e:  # not READY yet: try at the next checkpoint
                    result.log.append(f"checkpoint {label}: migration waits ({e})")
                    return False
            else:
                self.source.round()
            if self.on_round is not None:
                self.on_round(self.source.stats.rounds[-1])
        except OSError as e:  # the destination went away (EPIPE, ECONNRESET)
            self.broken = e
            result.log.append(f"checkpoint {label}: the stream broke ({e}); migration "
                              "abandoned, the guest runs on here")
        return False


def send(vmm: Vmm, variant: Variant, sock: socket.socket, key: TransportKey, stop_at: int,
         timeout: float = 30.0,
         on_round: Callable[[RoundStats], None] | None = None) -> SendResult:
    """Run `vmm`'s loaded guest and migrate it over `sock` (connected to a
    `receive`): pre-copy at each checkpoint before `stop_at`, stop-and-copy there,
    then wait for the destination's verdict. MigrationFailed if the guest ends or
    fails before `stop_at`, or migration never could begin (READY gating).
    `vmm.on_checkpoint` is restored before returning."""
    _await_ready(sock, timeout)
    out = sock.makefile("wb")
    source = Source(vmm, variant, key, out)
    handler = _Precopy(source, stop_at, on_round)
    saved, vmm.on_checkpoint = vmm.on_checkpoint, handler
    try:
        run = vmm.run(timeout=timeout)
    finally:
        vmm.on_checkpoint = saved
    if run.stop != "paused":
        source.resume()
        raise MigrationFailed(f"the guest stopped ({run.stop}) before checkpoint {stop_at}: "
                              f"reports {run.reports}")
    if not source.begun:
        raise MigrationFailed(f"migration could not begin before checkpoint {stop_at}: "
                              + "; ".join(run.log))
    result = SendResult(False, run, source.stats)
    error: str | None = None
    if handler.broken is None:
        try:
            final = source.stop_and_copy()
            if on_round is not None:
                on_round(final)
            result.digests_at_pause = memory_digests(vmm)
            result.private_gfns = vmm.tracker.private_gfns()
            source.finish()
            out.flush()
        except OSError as e:
            error = f"the stream broke in stop-and-copy: {e}"
    else:
        error = f"the stream broke in pre-copy: {handler.broken}"
    try:
        out.close()
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        error = error or f"the stream broke at its end: {e}"
    verdict = _read_verdict(sock, timeout)
    digests = verdict.get("digests", [])
    if error is None and verdict.get("accepted") is True and isinstance(digests, list):
        try:
            result.destination_digests = [RegionDigest.from_json(d) for d in digests]
            result.accepted = True
            return result
        except (KeyError, TypeError, ValueError) as e:
            error = f"the destination's verdict is malformed: {e}"
    result.error = error or str(verdict.get("error", "the destination did not accept"))
    source.resume()
    return result


def _await_ready(sock: socket.socket, timeout: float) -> None:
    """The destination's first line, READY: it has its backend open and reads the
    stream from now on, so pre-copy's timings are the transfer's, not its start-up.
    Read a byte at a time: nothing of the verdict that follows is consumed."""
    sock.settimeout(timeout)
    line = b""
    try:
        while not line.endswith(b"\n") and len(line) < len(READY) + 1:
            byte = sock.recv(1)
            if not byte:
                break
            line += byte
    except OSError as e:
        raise MigrationFailed(f"the destination never became ready: {e}") from e
    if line != READY + b"\n":
        raise MigrationFailed(f"the destination did not say it was ready: {line!r}")


def _read_verdict(sock: socket.socket, timeout: float) -> dict[str, object]:
    """The destination's one JSON line; a refusal if it closed without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < _VERDICT_LIMIT:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return {"accepted": False, "error": f"no verdict from the destination: {e}"}
    if not data.endswith(b"\n"):
        return {"accepted": False, "error": "the destination closed without a verdict"}
    try:
        verdict = json.loads(data)
    except ValueError:
        return {"accepted": False, "error": f"the destination's verdict is not JSON: {data!r}"}
    if not isinstance(verdict, dict):
        return {"accepted": False, "error": f"the destination's verdict is not an object: {data!r}"}
    return verdict


# --- the destination ----------------------------------------------------------------------------
class Refused(Exception):
    """The destination refused the stream (and told the source so)."""


def receive(kvm: api.Kvm, sock: socket.socket, key: TransportKey) -> Vmm:
    """Read a whole stream from `sock` and build its VM on `kvm`, answer the verdict,
    and return the VMM ready to `run()`. On a damaged stream or another key: answer
    the refusal, read on to the source's end of file, and raise Refused (with the
    StreamError or TransportError as its cause); the VM built so far is closed."""
    sock.sendall(READY + b"\n")
    reader = sock.makefile("rb")
    try:
        try:
            vmm = Destination(kvm, key).receive(reader)
        except (stream.StreamError, TransportError) as e:
            _answer(sock, {"accepted": False, "error": str(e)})
            _drain(reader)
            raise Refused(str(e)) from e
        try:
            _answer(sock, {"accepted": True,
                           "digests": [d.as_json() for d in memory_digests(vmm)]})
        except BaseException:
            vmm.close()
            raise
        return vmm
    finally:
        reader.close()


def _answer(sock: socket.socket, verdict: dict[str, object]) -> None:
    """The verdict line, the last thing the destination sends."""
    sock.sendall(json.dumps(verdict, sort_keys=True).encode() + b"\n")
    sock.shutdown(socket.SHUT_WR)


def _drain(reader: BinaryIO) -> None:
    """Read to the end of file, so the source can write its stream out."""
    try:
        while reader.read(1 << 20):
            pass
    except OSError:
        pass


def serve(kvm: api.Kvm, sock: socket.socket, key: TransportKey, timeout: float = 30.0
          ) -> dict[str, object]:
    """The destination's whole job: receive, then run the guest to its end. The
    report: accepted or the error; the memory as placed (digests, before the
    guest resumes) and at the end; the run; the list that came with the VM."""
    try:
        vmm = receive(kvm, sock, key)
    except Refused as e:
        return {"accepted": False, "error": str(e)}
    with vmm:
        before = memory_digests(vmm)
        private = vmm.tracker.private_gfns()
        result = vmm.run(timeout=timeout)
        return {"accepted": True, "error": None,
                "digests_before": [d.as_json() for d in before],
                "private_gfns": [list(r) for r in private],
                "run": run_json(result),
                "digests_after": [d.as_json() for d in memory_digests(vmm)]}


# --- the entry point ----------------------------------------------------------------------------
def read_key(key_fd: int | None) -> TransportKey:
    """The transport key from a descriptor (32 bytes, or 64 hex digits, to EOF; the
    descriptor is closed) or from GUESTMEM_MIGRATION_KEY (hex). ValueError if neither
    holds a key."""
    if key_fd is not None:
        with os.fdopen(key_fd, "rb") as f:
            raw = f.read(129)
        data = raw if len(raw) == 32 else bytes.fromhex(raw.decode("ascii").strip())
        return TransportKey(data)
    env = os.environ.get(KEY_ENV)
    if not env:
        raise ValueError(f"no transport key: pass --key-fd or set {KEY_ENV} (hex)")
    return TransportKey(bytes.fromhex(env.strip()))


def _connect(fd: int | None, address: str | None) -> socket.socket:
    if fd is not None:
        return socket.socket(fileno=fd)
    assert address is not None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--connect takes HOST:PORT, not {address!r}")
    return socket.create_connection((host.strip("[]"), int(port)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guestmem.vmm.remote",
        description="The destination of a live migration: receive a VM over a socket, "
                    "run its guest to the end (on this host's /dev/kvm, or a model), and "
                    "print a JSON "
                    "report (accepted or the error, memory digests, the guest's reports). "
                    "Exit 0: received and ran to the end; 1: refused the stream; 2: bad "
                    "arguments or no key; 3: the guest did not end normally.")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("receive", help="receive one VM and run it")
    where = rec.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="an inherited, connected stream socket")
    where.add_argument("--connect", metavar="HOST:PORT", help="connect to the source")
    rec.add_argument("--key-fd", type=int, default=None,
                     help=f"read the transport key from this descriptor (else ${KEY_ENV})")
    rec.add_argument("--timeout", type=float, default=30.0,
                     help="seconds the guest may run (default 30)")
    rec.add_argument("--backend", choices=("kvm", "model"), default="kvm",
                     help="where the VM is built: this host's /dev/kvm (default) or a "
                          "model of its own in this process")
    rec.add_argument("--profile", default=None,
                     help="the model's kernel profile (--backend model; default mainline)")
    args = parser.parse_args(argv)
    try:
        key = read_key(args.key_fd)
        sock = _connect(args.fd, args.connect)
    except (ValueError, OSError) as e:
        print(json.dumps({"accepted": False, "error": f"usage: {e}"}))
        return EXIT_USAGE
    import guestmem

    options = {} if args.profile is None else {"profile": args.profile}
    try:
        kvm = guestmem.Kvm(backend=args.backend, **options)
    except (OSError, ValueError, KeyError) as e:
        print(json.dumps({"accepted": False, "error": f"cannot open the {args.backend} "
                                                      f"backend: {e}"}))
        return EXIT_USAGE
    with sock, kvm:
        report = serve(kvm, sock, key, args.timeout)
    print(json.dumps(report, sort_keys=True))
    if not report["accepted"]:
        print(f"migration refused: {report['error']}", file=sys.stderr)
        return EXIT_REFUSED
    run = report["run"]
    return EXIT_OK if isinstance(run, dict) and run.get("stop") == "done" else EXIT_GUEST


if __name__ == "__main__":
    sys.exit(main())
