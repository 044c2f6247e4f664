"""KVM_HC_MAP_GPA_RANGE argument checks (layer 1), shared by the model's vCPU
(KVM's checks) and the VMM's tracker (KVM's plus the VMM's)."""

from __future__ import annotations

from typing import Final

from guestmem import uapi

PAGE_SIZE_BITS: Final = {
    uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K: 4096,
    uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M: 2 << 20,
    uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G: 1 << 30,
}
PAGE_SIZE_MASK: Final = 0xF  # attrs bits 3:0 (Documentation/virt/kvm/x86/hypercalls.rst)
ENC_MASK: Final = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
GFN_LIMIT: Final = 1 << (52 - uapi.PAGE_SHIFT)  # x86-64: at most 52-bit physical addresses


def kvm_check(gpa: int, npages: int) -> int:
    """What KVM rejects before exiting (x86.c __kvm_emulate_hypercall): an unaligned
    gpa, npages == 0, gfn overflow: -KVM_EINVAL. We also refuse ranges beyond
    52-bit physical addresses (our choice: no x86 guest has memory there)."""
    gfn = gpa >> uapi.PAGE_SHIFT
    if gpa % uapi.PAGE_SIZE or npages == 0 or gfn + npages > GFN_LIMIT:
        return -uapi.KVM_EINVAL
    return 0


def vmm_check(attrs: int) -> int:
    """What a VMM rejects (QEMU kvm_handle_hc_map_gpa_range): unknown attribute bits
    or an undefined page-size encoding: -KVM_EINVAL."""
    if attrs & ~(PAGE_SIZE_MASK | ENC_MASK) or (attrs & PAGE_SIZE_MASK) not in PAGE_SIZE_BITS:
        return -uapi.KVM_EINVAL
    return 0
