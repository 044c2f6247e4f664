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

        if options.get("profile") == "host":
            options["profile"] = host_profile()
        return ModelKvm(**options)
    if backend == "kvm":
        from guestmem.host import Kvm as HostKvm

        return HostKvm(**options)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def host_profile(path: str = "/dev/kvm") -> Any:
    """The model profile of this machine's kernel, from a probe of its /dev/kvm
    (DESIGN.md "Kernel profiles": `host`). OSError if /dev/kvm cannot be opened."""
    from guestmem.host import Kvm as HostKvm
    from guestmem.model import Profile

    with HostKvm(path) as kvm:
        return Profile.from_capabilities(kvm.capabilities)
