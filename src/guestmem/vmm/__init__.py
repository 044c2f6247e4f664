"""Layer 4: a VMM over the backend-neutral API."""

from guestmem.machine import GuestImage
from guestmem.vmm.tracker import SharedRegionTracker, Sharing
from guestmem.vmm.vmm import GuestTimeout, MemoryRegion, RunResult, UnhandledExit, Vmm

__all__ = ["GuestImage", "GuestTimeout", "MemoryRegion", "RunResult", "SharedRegionTracker",
           "Sharing", "UnhandledExit", "Vmm"]
