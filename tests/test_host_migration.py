"""Live migration of a running guest on this host's /dev/kvm (issue 11 part 5).

The guest is compiled x86 code. It writes memory, and at each checkpoint the VMM
runs a pre-copy round (KVM's dirty log on the anonymous memslot); between
checkpoints it keeps writing and changes the shared-regions list with
MAP_GPA_RANGE (port doorbell). At the last checkpoint it pauses; stop-and-copy
sends what is still dirty, the guest_memfd low memory (which KVM cannot
dirty-log), the list and the vCPU. The destination, in this process or another
one at the far end of a socket, continues the same program from the checkpoint,
verifies the memory and writes on. Memory is compared byte for byte with the
source at pause and with what the program wrote (a Python replay of its
WritePattern steps)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from guestmem import machine, uapi
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.vmm import Vmm
from guestmem.vmm.migration import VARIANTS, Source
from guestmem.vmm.remote import Refused, RegionDigest, memory_digests, receive, send
from guestmem.vmm.transport import TransportKey

PAGE = 4096
DATA = 0x4000_0000  # the anonymous memslot, at 1 GiB
DATA_SIZE = 32 << 20
GFN = DATA // PAGE
LOW = 0x300000  # guest data in the guest_memfd low memory, above the code (machine.CODE_LIMIT)
STOP = 9

BEFORE = (  # before migration begins
    p.WritePattern(DATA, 256 * PAGE, 0xA000, 1),
    p.WritePattern(LOW, 16 * PAGE, 0xB000, 3),
    p.MigrationReady(),
    p.Checkpoint(1),  # begin: dirty logging on, round 0 sends every logged page
)
PRECOPY = (  # the guest keeps writing, and changes the list, between rounds
    p.WritePattern(DATA + 512 * PAGE, 64 * PAGE, 0xC000, 1),
    p.MapGpaRange(DATA + 1024 * PAGE, 32, encrypted=True),
    p.WritePattern(DATA + 1024 * PAGE, 32 * PAGE, 0xD000, 7),
    p.Checkpoint(2),  # round 1
    p.WritePattern(DATA + 16 * PAGE, 4 * PAGE, 0xE000, 1),
    p.MapGpaRange(DATA + 1040 * PAGE, 8, encrypted=False),
    p.WritePattern(LOW + 4 * PAGE, PAGE, 0xF000, 1),
    p.Checkpoint(3),  # round 2
    p.WritePattern(DATA + 2048 * PAGE, 8 * PAGE, 0x1234, 1),
    p.Checkpoint(STOP),  # pause: stop-and-copy
)
AFTER = (  # on the destination: the same program goes on
    p.VerifyPattern(DATA, 16 * PAGE, 0xA000, 1),
    p.VerifyPattern(DATA + 16 * PAGE, 4 * PAGE, 0xE000, 1),
    p.VerifyPattern(DATA + 20 * PAGE, 236 * PAGE, 0xA000 + 20 * 512, 1),
    p.VerifyPattern(DATA + 512 * PAGE, 64 * PAGE, 0xC000, 1),
    p.VerifyPattern(DATA + 1024 * PAGE, 32 * PAGE, 0xD000, 7),
    p.VerifyPattern(DATA + 2048 * PAGE, 8 * PAGE, 0x1234, 1),
    p.VerifyPattern(LOW, 4 * PAGE, 0xB000, 3),
    p.VerifyPattern(LOW + 4 * PAGE, PAGE, 0xF000, 1),
    p.VerifyPattern(LOW + 5 * PAGE, 11 * PAGE, 0xB000 + 5 * 512 * 3, 3),
    p.WritePattern(DATA + 4096 * PAGE, 64 * PAGE, 0x5555, 9),
    p.VerifyPattern(DATA + 4096 * PAGE, 64 * PAGE, 0x5555, 9),
    p.VerifyPattern(DATA + 1024 * PAGE, 32 * PAGE, 0xD000, 7),
)
PROGRAM = p.Program.of(*BEFORE, *PRECOPY, *AFTER)
VERIFIES = sum(isinstance(s, p.VerifyPattern) for s in AFTER)
# The list at pause: [1024, 1056) made private, [1040, 1048) shared again.
PRIVATE = [(GFN + 1024, GFN + 1040), (GFN + 1048, GFN + 1056)]


def pattern(value: int, step: int, length: int) -> bytes:
    words = np.arange(length // 8, dtype=np.uint64) * np.uint64(step) + np.uint64(value)
    return words.astype("<u8").tobytes()


def replay(steps: tuple[p.Step, ...]) -> tuple[bytearray, bytearray]:
    """What the program's writes leave in the anonymous memslot and in low memory
    from LOW on (everything else there is the VMM's: page tables, GDT, code)."""
    data, low = bytearray(DATA_SIZE), bytearray(16 * PAGE)
    for step in steps:
        if isinstance(step, p.WritePattern):
            buf, base = (data, DATA) if step.gpa >= DATA else (low, LOW)
            off = step.gpa - base
            buf[off:off + step.length] = pattern(step.value, step.step, step.length)
    return data, low


def start_guest(kvm) -> Vmm:
    vmm = Vmm(kvm)
    vmm.add_memory(DATA, DATA_SIZE, "anon")
    vmm.load(compile_program(PROGRAM, default_hypercall_abi(kvm.capabilities)))
    return vmm


def memory(vmm: Vmm) -> list[bytes]:
    return [r.mapping.read(0, r.size) for r in vmm.regions]


def check_memory_is_the_programs(mem: list[bytes], steps: tuple[p.Step, ...]) -> None:
    data, low = replay(steps)
    assert mem[1] == data
    assert mem[0][LOW:LOW + len(low)] == low


class Relay:
    """Carries a socket's bytes both ways between two others, keeping what went
    source to destination and flipping one bit of it at `flip` (if given)."""

    def __init__(self, flip: int | None = None) -> None:
        self.source, a = socket.socketpair()
        b, self.destination = socket.socketpair()
        self.forwarded = bytearray()
        self.flip = flip
        self.threads = [threading.Thread(target=self._pump, args=(a, b, True)),
                        threading.Thread(target=self._pump, args=(b, a, False))]
        for t in self.threads:
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        while chunk := src.recv(1 << 16):
            if forward:
                start = len(self.forwarded)
                chunk = bytearray(chunk)
                if self.flip is not None and start <= self.flip < start + len(chunk):
                    chunk[self.flip - start] ^= 0x04
                self.forwarded += chunk
            try:
                dst.sendall(chunk)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=20)
            assert not t.is_alive(), "the relay is stuck"
        self.source.close()


def receive_in_thread(kvm, sock: socket.socket, key: TransportKey) -> tuple[threading.Thread, dict]:
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["vmm"] = receive(kvm, sock, key)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e
        finally:
            sock.close()

    t = threading.Thread(target=work)
    t.start()
    return t, out


# --- what KVM dirty-logs on this kernel -----------------------------------------------------------
def test_this_kernel_dirty_logs_anonymous_memslots_and_refuses_guest_memfd_ones(host_kvm):
    with start_guest(host_kvm) as vmm:
        low, anon = vmm.regions
        with pytest.raises(OSError) as refused:
            vmm.vm.set_user_memory_region2(
                low.slot, uapi.KVM_MEM_GUEST_MEMFD | uapi.KVM_MEM_LOG_DIRTY_PAGES, low.gpa,
                low.size, low.mapping.addr, low.guest_memfd, 0)
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(OSError) as no_log:  # the memslot has no dirty bitmap
            vmm.vm.get_dirty_log(low.slot, low.size // PAGE)
        assert no_log.value.errno == errno.ENOENT

        source = Source(vmm, VARIANTS["dirty-first"], TransportKey(), io.BytesIO())
        sent: list[tuple[int, int, int, bool]] = []
        source.on_send = lambda s: sent.append((s.round, s.gfn, s.pages, s.private))

        def precopy(label: int, result) -> bool:
            if label == 1:
                source.begin()
            elif label != STOP:
                source.round()
            return label == STOP

        vmm.on_checkpoint = precopy
        assert vmm.run(timeout=10).stop == "paused"
        assert source.logged == [anon] and source.stop_and_copy_only == [low]
        # Exactly the pages the guest wrote between rounds, as the list classified them.
        assert [s for s in sent if s[0] == 1] == [
            (1, GFN + 512, 64, False), (1, GFN + 1024, 32, True)]
        assert [s for s in sent if s[0] == 2] == [(2, GFN + 16, 4, False)]
        source.stop_and_copy()
        stop = [s[1:] for s in sent if s[0] == 3]
        # low memory in full (2 MiB chunks), the page written at pause, and the
        # pages the resync found sent private but now shared
        assert stop == [(0, 512, False), (512, 512, False), (GFN + 1040, 8, False),
                        (GFN + 2048, 8, False)]
        assert [(r.dirty_pages, r.sent_pages, r.private_pages) for r in source.stats.rounds] == [
            (DATA_SIZE // PAGE, DATA_SIZE // PAGE, 0), (96, 96, 32), (4, 4, 0), (1040, 1040, 0)]


# --- one process ----------------------------------------------------------------------------------
def test_a_running_guest_migrates_byte_exact_in_one_process(host_kvm):
    key = TransportKey()
    relay = Relay()
    with start_guest(host_kvm) as vmm:
        thread, got = receive_in_thread(host_kvm, relay.destination, key)
        result = send(vmm, VARIANTS["dirty-first"], relay.source, key, STOP, timeout=10)
        thread.join(timeout=20)
        relay.join()
        assert result.accepted, result.error
        assert "error" not in got
        dest: Vmm = got["vmm"]  # type: ignore[assignment]
        with dest:
            assert result.run.checkpoints == [1, 2, 3, STOP]
            assert result.run.reports == [0, 0], "both MAP_GPA_RANGE calls answered 0"
            source_mem, dest_mem = memory(vmm), memory(dest)
            assert [len(m) for m in dest_mem] == [4 << 20, DATA_SIZE]
            assert dest_mem == source_mem, "the destination's memory is the source's at pause"
            check_memory_is_the_programs(dest_mem, BEFORE + PRECOPY)
            assert dest.tracker.private_gfns() == PRIVATE == vmm.tracker.private_gfns()
            assert result.destination_digests == memory_digests(vmm) == result.digests_at_pause
            stream_bytes = bytes(relay.forwarded)
            assert len(stream_bytes) == result.stats.stream_bytes
            # private pages crossed only encrypted; shared ones in plaintext
            assert pattern(0xD000, 7, 64) not in stream_bytes
            assert pattern(0xC000, 1, 64) in stream_bytes

            run = dest.run(timeout=10)
            assert (run.stop, run.reports) == ("done", [p.VERIFY_OK] * VERIFIES)
            check_memory_is_the_programs(memory(dest), BEFORE + PRECOPY + AFTER)


def test_another_transport_key_is_refused_and_the_source_runs_on(host_kvm):
    relay = Relay()
    with start_guest(host_kvm) as vmm:
        thread, got = receive_in_thread(host_kvm, relay.destination, TransportKey())
        result = send(vmm, VARIANTS["dirty-first"], relay.source, TransportKey(), STOP,
                      timeout=10)
        thread.join(timeout=20)
        relay.join()
        assert not result.accepted
        assert isinstance(got["error"], Refused)
        assert "PRIV" in result.error and "another transport key" in result.error
        assert memory_digests(vmm) == result.digests_at_pause, "the source lost nothing"
        run = vmm.run(timeout=10)
        assert (run.stop, run.reports) == ("done", [p.VERIFY_OK] * VERIFIES)


# --- two processes --------------------------------------------------------------------------------
def destination_process(sock: socket.socket | None, key: TransportKey,
                        connect: str | None = None) -> subprocess.Popen[str]:
    """`python -m guestmem.vmm.remote receive`, with the socket inherited (or told
    where to connect) and the key through an inherited pipe."""
    r, w = os.pipe()
    os.write(w, key.key.hex().encode())
    os.close(w)
    where = ["--fd", str(sock.fileno())] if sock is not None else ["--connect", str(connect)]
    fds = (r,) if sock is None else (sock.fileno(), r)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "guestmem.vmm.remote", "receive", *where,
             "--key-fd", str(r), "--timeout", "10"],
            pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(r)
        if sock is not None:
            sock.close()


def connected(how: str, key: TransportKey) -> tuple[socket.socket, subprocess.Popen[str]]:
    """A destination process and the source's end of its socket: a socketpair
    (the process inherits its end) or TCP on the loopback (it connects)."""
    if how == "fd":
        mine, theirs = socket.socketpair()
        return mine, destination_process(theirs, key)
    with socket.create_server(("127.0.0.1", 0)) as server:
        child = destination_process(None, key, f"127.0.0.1:{server.getsockname()[1]}")
        server.settimeout(20)
        return server.accept()[0], child


@pytest.mark.parametrize("how", ["fd", "connect"])
def test_a_running_guest_migrates_to_another_process_and_runs_on(host_kvm, how):
    key = TransportKey()
    mine, child = connected(how, key)
    with start_guest(host_kvm) as vmm, mine:
        result = send(vmm, VARIANTS["dirty-first"], mine, key, STOP, timeout=10)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert result.accepted, result.error
        report = json.loads(out)
        source_mem = memory(vmm)
        check_memory_is_the_programs(source_mem, BEFORE + PRECOPY)
        at_pause = [RegionDigest.from_json(d) for d in report["digests_before"]]
        assert at_pause == result.digests_at_pause == [
            RegionDigest(0, 4 << 20, "gmem", hashlib.sha256(source_mem[0]).hexdigest()),
            RegionDigest(DATA, DATA_SIZE, "anon", hashlib.sha256(source_mem[1]).hexdigest())]
        assert report["private_gfns"] == [list(r) for r in PRIVATE]
        assert report["run"]["stop"] == "done"
        assert report["run"]["checkpoints"] == []
        assert report["run"]["reports"] == [p.VERIFY_OK] * VERIFIES
        # After the run: the anonymous memslot as the whole program leaves it; low
        # memory as it was but for the Accessed and Dirty bits the shadow MMU's walk
        # set in the PDE of the 2 MiB page the destination wrote first
        # (DATA + 16 MiB: the page directory of GiB 1 at PD_BASE + 0x1000, entry 8).
        data, _ = replay(BEFORE + PRECOPY + AFTER)
        low = bytearray(source_mem[0])
        pde = machine.PD_BASE + 0x1000 + 8 * 8
        assert low[pde] & 0x60 == 0
        low[pde] |= 0x60
        after = [RegionDigest.from_json(d) for d in report["digests_after"]]
        assert after == [RegionDigest(0, 4 << 20, "gmem", hashlib.sha256(low).hexdigest()),
                         RegionDigest(DATA, DATA_SIZE, "anon", hashlib.sha256(data).hexdigest())]


def test_a_flipped_byte_is_refused_by_the_other_process_and_the_source_runs_on(host_kvm):
    key = TransportKey()
    relay = Relay(flip=100_000)  # inside round 0's pages
    child = destination_process(relay.destination, key)
    with start_guest(host_kvm) as vmm:
        result = send(vmm, VARIANTS["dirty-first"], relay.source, key, STOP, timeout=10)
        out, err = child.communicate(timeout=30)
        relay.join()
        assert child.returncode == 1, (out, err)
        assert len(relay.forwarded) == result.stats.stream_bytes > 100_000
        assert json.loads(out) == {"accepted": False, "error": result.error}
        assert "checksum mismatch, the record was damaged" in result.error
        assert "migration refused: record " in err
        assert not result.accepted and not result.destination_digests
        source_mem = memory(vmm)
        check_memory_is_the_programs(source_mem, BEFORE + PRECOPY)
        run = vmm.run(timeout=10)
        assert (run.stop, run.reports) == ("done", [p.VERIFY_OK] * VERIFIES)
        check_memory_is_the_programs(memory(vmm), BEFORE + PRECOPY + AFTER)


def test_the_destination_refuses_to_start_without_a_key():
    env = {k: v for k, v in os.environ.items() if k != "GUESTMEM_MIGRATION_KEY"}
    done = subprocess.run([sys.executable, "-m", "guestmem.vmm.remote", "receive", "--fd", "0"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no transport key" in json.loads(done.stdout)["error"]
