"""Layer 6: the conformance suite (cases run on any backend)."""

from guestmem.check import (  # noqa: F401 - registers the cases
    cases_coco,
    cases_conversions,
    cases_gmem,
    cases_gmem_conversions,
    cases_guest,
    cases_hugetlb,
    cases_inplace_vmm,
    cases_memslot,
    cases_prefault,
)
from guestmem.check.suite import REGISTRY, Instance, Result, Status, instances, run_instance

__all__ = ["REGISTRY", "Instance", "Result", "Status", "instances", "run_instance"]
