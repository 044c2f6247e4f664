"""An owned file descriptor, closed once (the base of the kvm backend's objects
and of HugeTLB files)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from guestmem import uapi
from guestmem.exits import oserror
from guestmem.host import libc

T = TypeVar("T")


class OwnedFd:
    """An owned file descriptor, closed once."""

    # Set before __init__ runs: an object whose open failed (or whose call had a
    # wrong keyword) is still deleted, and __del__ must find "no fd" then.
    _fd: int | None = None

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        """The file descriptor; EBADF once closed."""
        if self._fd is None:
            raise oserror(errno.EBADF, "closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """close() was called."""
        return self._fd is None

    def close(self) -> None:
        """close(2), once."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()

    def _ioctl(self, request: int, arg: int | ctypes.Structure = 0) -> int:
        name = uapi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        if self._fd is None:
            raise oserror(errno.EBADF, name)
        if isinstance(arg, int):  # KVM_RUN's EINTR is a kick: the caller's to see
            return libc.ioctl(self._fd, request, arg, name, request != uapi.KVM_RUN)
        try:
            return int(fcntl.ioctl(self._fd, request, arg, True))
        except OSError as e:
            raise oserror(e.errno, name) from None

    def _call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(fd, *args), an os-module syscall; its OSError names the syscall."""
        if self._fd is None:
            raise oserror(errno.EBADF, name)
        try:
            return fn(self._fd, *args)
        except OSError as e:
            raise oserror(e.errno, name) from None
