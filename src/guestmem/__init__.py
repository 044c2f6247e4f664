"""guestmem: Linux KVM guest_memfd, its real backend, a VMM and a conformance suite.

`guestmem.Kvm(backend=...)` opens a backend; everything above the API (VMM,
conformance, CLI) is written against what it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from guestmem import api

if TYPE_CHECKING:
    from guestmem.host import Kvm as HostKvm
    from guestmem.host.hugetlb import Hugetlb as HostHugetlb
    from guestmem.host.hugetlb import HugetlbFile as HostHugetlbFile
    from guestmem.host.hugetlb import HugetlbMapping as HostHugetlbMapping
    from guestmem.host.hugetlb import HugetlbMount as HostHugetlbMount
    from guestmem.model import Kvm as ModelKvm
    from guestmem.model import Profile
    from guestmem.model import hugetlb as model_hugetlb

__version__ = "0.1.0"

BACKENDS = ("model", "kvm")
OPTIONS = {"model": {"profile", "numa_nodes"}, "kvm": {"path", "populate_limit"}}


@overload
def Kvm(backend: Literal["model"] = "model", **options: Any) -> ModelKvm: ...  # noqa: N802
@overload
def Kvm(backend: Literal["kvm"], **options: Any) -> HostKvm: ...  # noqa: N802
@overload
def Kvm(backend: str, **options: Any) -> api.Kvm: ...  # noqa: N802


def Kvm(backend: str = "model", **options: Any) -> api.Kvm:  # noqa: N802 - reads like a class
    """Open a backend: "model" (the embedded default; options: profile= "mainline",
    "coco" or "host" (this machine's kernel, probed), numa_nodes=) or "kvm" (the host
    kernel through /dev/kvm; options: path=, populate_limit=)."""
    if backend in OPTIONS and options.keys() - OPTIONS[backend]:
        name = sorted(options.keys() - OPTIONS[backend])[0]
        others = [b for b, names in OPTIONS.items() if name in names]
        where = f" (an option of the {others[0]} backend)" if others else ""
        raise TypeError(f"the {backend} backend takes no option {name!r}{where}; its "
                        f"options: {', '.join(sorted(OPTIONS[backend]))}")
    if backend == "model":
        from guestmem.model import Kvm as ModelKvm

        if options.get("profile") == "host":
            options["profile"] = host_profile()
        return ModelKvm(**options)
    if backend == "kvm":
        from guestmem.host import Kvm as HostKvm

        return HostKvm(**options)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def host_profile(path: str = "/dev/kvm") -> Profile:
    """The model profile of this machine's kernel, from a probe of its /dev/kvm
    (DESIGN.md "Kernel profiles": `host`). OSError if /dev/kvm cannot be opened."""
    from guestmem.host import Kvm as HostKvm
    from guestmem.model import Profile

    with HostKvm(path) as kvm:
        return Profile.from_capabilities(kvm.capabilities)


if TYPE_CHECKING:  # mypy holds both backends to the declared API
    def _model_is_an_api_kvm(kvm: ModelKvm) -> api.Kvm:
        return kvm

    def _host_is_an_api_kvm(kvm: HostKvm) -> api.Kvm:
        return kvm

    def _host_hugetlb_is_an_api_hugetlb(hugetlb: HostHugetlb, file: HostHugetlbFile,
                                        mount: HostHugetlbMount,
                                        mapping: HostHugetlbMapping,
                                        ) -> tuple[api.Hugetlb, api.HugetlbFile,
                                                   api.HugetlbMount, api.HugetlbMapping]:
        return hugetlb, file, mount, mapping

    def _model_hugetlb_is_an_api_hugetlb(hugetlb: model_hugetlb.Hugetlb,
                                         file: model_hugetlb.HugetlbFile,
                                         mount: model_hugetlb.HugetlbMount,
                                         mapping: model_hugetlb.HugetlbMapping,
                                         ) -> tuple[api.Hugetlb, api.HugetlbFile,
                                                    api.HugetlbMount, api.HugetlbMapping]:
        return hugetlb, file, mount, mapping
