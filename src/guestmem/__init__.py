"""guestmem: Linux KVM guest_memfd, its real backend, a VMM and a conformance suite.

`guestmem.Kvm(backend=...)` opens a backend; everything above the API (VMM,
conformance, CLI) is written against what it returns.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

BACKENDS = ("model", "kvm")


def Kvm(backend: str = "model", **options: Any) -> Any:  # noqa: N802 - reads like a class
    """Open a backend: "model" (the embedded default, options: profile=...) or
    "kvm" (the host kernel through /dev/kvm)."""
    if backend == "model":
        from guestmem.model import Kvm as ModelKvm

        return ModelKvm(**options)
    if backend == "kvm":
        from guestmem.host import Kvm as HostKvm

        return HostKvm(**options)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
