"""What /proc shows about a process's mappings of a file (layer 3).

`GuestMemfd.memory_map()` uses it to find which pages of a guest_memfd some
process maps: /proc/PID/maps names the file by device and inode, and
/proc/PID/pagemap says which of those virtual pages are present
(Documentation/admin-guide/mm/pagemap.rst). Reading another process's pagemap
needs ptrace access to it.
"""

from __future__ import annotations

import os
from typing import Final

from guestmem import memmap

PAGE: Final = 4096
_TOP_BIT: Final = bytes(i >> 7 for i in range(256))  # pagemap bit 63: the top bit of byte 7


def file_mappings(pid: int | str, dev: int, ino: int) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of the file (dev, ino) in `pid`."""
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if int(fields[4]) == ino and os.makedev(major, minor) == dev:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end, int(fields[2], 16)))
    return out


def present(pid: int | str, addr: int, pages: int) -> bytes:
    """/proc/PID/pagemap: one byte per page of [addr, +pages), nonzero where the
    process's page table maps it."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        entries = os.pread(f.fileno(), 8 * pages, (addr // PAGE) * 8)
    return entries[7::8].translate(_TOP_BIT)


def mapped_file_pages(pid: int | str, dev: int, ino: int, first: int,
                      last: int) -> list[tuple[int, int]]:
    """File page intervals within [first, last) that `pid` has mapped now."""
    out: list[tuple[int, int]] = []
    for start, end, offset in file_mappings(pid, dev, ino):
        pgoff = offset // PAGE
        lo, hi = max(first, pgoff), min(last, pgoff + (end - start) // PAGE)
        if lo < hi:
            out += memmap.intervals_of(lo, present(pid, start + (lo - pgoff) * PAGE, hi - lo))
    return out
