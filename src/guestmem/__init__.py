"""guestmem: Linux KVM guest_memfd, its real backend, a VMM and a conformance suite.

`guestmem.Kvm(backend=...)` opens a backend; everything above the API (VMM,
conformance, CLI) is written against what it returns.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

BACKENDS = ("kvm",)


def Kvm(backend: str = "kvm", **options: Any) -> Any:  # noqa: N802 - reads like the class it returns
    """Open a backend's /dev/kvm equivalent."""
    if backend == "kvm":
        from guestmem.host import Kvm as HostKvm

        return HostKvm(**options)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
