"""How much memory one call of the kvm backend may populate.

DESIGN.md: the real backend protects the host it runs on. `allocate(0, 1 << 40)`
on a 24 GiB host woke the OOM killer; now a call that would populate more than
the limit fails with ENOMEM before the kernel is asked, and the message names
the override.

The limit, in order of precedence:
1. `Kvm(populate_limit=bytes)`;
2. the environment variable GUESTMEM_POPULATE_LIMIT (bytes, or with a binary
   suffix: "512M", "16G", "1T"), read at call time;
3. the default: half of MemAvailable in /proc/meminfo, read at call time, so
   that memory already populated by earlier calls lowers it.

It bounds each call (guest_memfd fallocate, MADV_POPULATE_READ/WRITE,
KVM_PRE_FAULT_MEMORY, and the Mapping helpers that touch every page: fill,
touch_in_child), not the sum of calls; reading MemAvailable each time is what
keeps the sum in check. What a running guest touches is not bounded: it is the
guest's to touch.
"""

from __future__ import annotations

import errno
import os

from guestmem.exits import oserror

ENV = "GUESTMEM_POPULATE_LIMIT"
MEMINFO = "/proc/meminfo"
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'17179869184', '16G', '1.5G', '512M' -> bytes (whole bytes, rounded down)."""
    given = text
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = _SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        value = -1
    if value < 0 or not number[:1].isdigit():
        raise ValueError(f"{ENV}={given!r}: expected bytes, e.g. 17179869184, 16G or 1.5G")
    return int(value * scale)


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open(MEMINFO) as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, f"no MemAvailable in {MEMINFO}")


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class PopulateLimit:
    """One Kvm's limit; its mappings and guest_memfds ask it before populating."""

    def __init__(self, override: int | None = None) -> None:
        if override is not None and (isinstance(override, bool) or not isinstance(override, int)):
            raise TypeError(f"populate_limit must be an int (bytes) or None, not "
                            f"{type(override).__name__}")
        if override is not None and override < 0:
            raise ValueError(f"populate_limit={override} is negative")
        self.override = override
        if override is None and os.environ.get(ENV):
            parse_size(os.environ[ENV])  # a bad value fails at Kvm(), not at the first call

    def current(self) -> tuple[int, str]:
        """(the limit in bytes, where it comes from), as of now."""
        if self.override is not None:
            return self.override, "Kvm(populate_limit=...)"
        env = os.environ.get(ENV)
        if env:
            return parse_size(env), f"{ENV}={env}"
        return mem_available() // 2, "half of MemAvailable"

    def check(self, nbytes: int, what: str) -> None:
        """ENOMEM if populating nbytes would exceed the limit."""
        if nbytes <= 0:
            return
        limit, source = self.current()
        if nbytes > limit:
            raise oserror(errno.ENOMEM, f"{what}: populating {_size(nbytes)} exceeds the "
                          f"populate limit of {_size(limit)} ({source}); raise it with "
                          f"Kvm(populate_limit=bytes) or {ENV}")
