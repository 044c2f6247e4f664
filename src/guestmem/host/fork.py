"""A forked child of this process that stays alive and touches memory on request
(api.ChildProcess on the kvm backend).

The child is a real fork(2): its page tables are its own, so a conversion that
must zap every process's mappings is seen to reach it, and a MADV_DONTFORK
mapping is really missing there. It serves requests over a socketpair and never
returns into the interpreter's normal flow: it ends in os._exit. Accesses go
through the child's own /proc/self/mem (opened after the fork: the parent's fd
names the parent's mm), so an access that would SIGBUS fails with EIO instead
of killing the child; whether a VMA is there and what it allows comes from the
child's /proc/self/maps, since /proc/self/mem forces past protections.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import pickle
import signal
import socket
import struct
from typing import Any, Self

from guestmem import _args, api
from guestmem.exits import HostSigbus, HostSigsegv, oserror

_LENGTH = struct.Struct("<Q")
_TOUCH_BYTE = 0x5A  # what touch(write=True) stores, as Mapping.touch_in_child


def _send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    header = _recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _LENGTH.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _vma_fault(addr: int, length: int, write: bool) -> tuple[str, int] | None:
    """SIGSEGV where [addr, addr+length) has no VMA or one that forbids the access,
    read from this process's /proc/self/maps."""
    want = "w" if write else "r"
    pos, end = addr, addr + max(length, 1)
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi <= pos or lo > pos:
                continue
            if want not in perms:
                return "sigsegv", pos
            pos = hi
            if pos >= end:
                return None
    return "sigsegv", pos


def _access(mem: int, op: str, addr: int, arg: Any) -> tuple[str, Any]:
    """One load or store in this (the child's) address space."""
    write = op == "write"
    length = len(arg) if write else arg
    fault = _vma_fault(addr, length, write)
    if fault is not None:
        return fault
    try:
        if write:
            done = os.pwrite(mem, arg, addr)
            return ("ok", None) if done == length else ("sigbus", addr + done)
        data = os.pread(mem, length, addr)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EFAULT):
            return "sigbus", addr
        return "errno", e.errno
    return ("ok", data) if len(data) == length else ("sigbus", addr + len(data))


def _serve(sock: socket.socket) -> None:
    """The child's loop: answer requests until told to exit or the parent goes."""
    faulthandler.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we end
    mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    while True:
        request = _recv(sock)
        if request is None or request[0] == "exit":
            return
        op, addr, arg = request
        _send(sock, _access(mem, op, addr, arg))


@_args.checked
class ChildProcess:
    """fork(2) of this process; requests are served by the child (module docstring)."""

    def __init__(self) -> None:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: serve, then leave without running the parent's code
            status = 0
            try:
                parent_end.close()
                _serve(child_end)
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        child_end.close()
        self._sock: socket.socket | None = parent_end
        self._pid = pid

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    def _ask(self, op: str, addr: int, arg: Any) -> Any:
        if self._sock is None:
            raise oserror(errno.ESRCH, f"child {self._pid} has exited")
        _send(self._sock, (op, addr, arg))
        reply = _recv(self._sock)
        if reply is None:
            raise oserror(errno.ESRCH, f"child {self._pid} died")
        kind, value = reply
        if kind == "sigbus":
            raise HostSigbus(value, f"in child {self._pid}")
        if kind == "sigsegv":
            raise HostSigsegv(value, f"in child {self._pid}")
        if kind == "errno":
            raise oserror(value, "/proc/self/mem in the child")
        return value

    @staticmethod
    def _range(mapping: api.Mapping, offset: int, length: int) -> int:
        if offset < 0 or length < 0 or offset + length > mapping.length:
            raise ValueError(f"[{offset:#x}, +{length:#x}) outside a {mapping.length:#x} "
                             "mapping")
        return mapping.addr + offset

    def read(self, mapping: api.Mapping, offset: int, length: int) -> bytes:
        """A load in the child at the parent mapping's address (pread of its /proc/self/mem)."""
        data: bytes = self._ask("read", self._range(mapping, offset, length), length)
        return data

    def write(self, mapping: api.Mapping, offset: int, data: bytes) -> None:
        """A store in the child (pwrite of its /proc/self/mem)."""
        self._ask("write", self._range(mapping, offset, len(data)), data)

    def touch(self, mapping: api.Mapping, offset: int, write: bool = False,
              length: int = 1) -> int | None:
        """The signal a load (store) in the child gets, or None."""
        try:
            if write:
                self.write(mapping, offset, bytes([_TOUCH_BYTE]) * length)
            else:
                self.read(mapping, offset, length)
        except HostSigbus:
            return signal.SIGBUS
        except HostSigsegv:
            return signal.SIGSEGV
        return None

    def exit(self) -> None:
        """exit(2) of the child, then waitpid(2): its mappings and fds go."""
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        with contextlib.suppress(OSError):  # already gone: reap it below
            _send(sock, ("exit", 0, None))
        sock.close()
        os.waitpid(self._pid, 0)

    close = exit

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def __del__(self) -> None:
        self.exit()
