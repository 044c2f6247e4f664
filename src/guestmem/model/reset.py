"""The register state of a new vCPU: the x86 reset state KVM gives it
(kernel: arch/x86/kvm/x86.c kvm_vcpu_reset, and the vendor's vcpu_reset:
vmx.c vmx_vcpu_reset / svm.c init_vmcb). Read back with KVM_GET_REGS and
KVM_GET_SREGS on 6.18.44 (kvm_pvm) for vCPUs 0, 1 and 7; matches the SDM's
power-up state.
"""

from __future__ import annotations

from guestmem import uapi

RESET_RIP = 0xFFF0
RFLAGS_FIXED = 0x2  # bit 1 always reads 1
RESET_RDX = 0x600  # CPUID(1).EAX when no CPUID was set (kvm_vcpu_reset)
CR0_RESET = 0x6000_0010  # X86_CR0_NW | X86_CR0_CD | X86_CR0_ET
APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000
MSR_IA32_APICBASE_ENABLE = 1 << 11
MSR_IA32_APICBASE_BSP = 1 << 8
BSP_VCPU_ID = 0  # kvm->arch.bsp_vcpu_id until KVM_SET_BOOT_CPU_ID
SEG_TYPE_CODE, SEG_TYPE_DATA, SEG_TYPE_TSS_BUSY, SEG_TYPE_LDT = 0xB, 0x3, 0xB, 0x2


def reset_regs() -> uapi.kvm_regs:
    return uapi.kvm_regs(rip=RESET_RIP, rflags=RFLAGS_FIXED, rdx=RESET_RDX)


def _segment(selector: int, base: int, seg_type: int, s: int) -> uapi.kvm_segment:
    return uapi.kvm_segment(base=base, limit=0xFFFF, selector=selector, type=seg_type,
                            present=1, s=s)


def reset_sregs(vcpu_id: int) -> uapi.kvm_sregs:
    """Real mode at F000:FFF0 (seg_setup), caches with limit 0xffff, TR a busy TSS and
    LDTR an LDT, caching disabled, the local APIC enabled (BSP for vCPU 0)."""
    data = _segment(0, 0, SEG_TYPE_DATA, 1)
    apic = APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
    if vcpu_id == BSP_VCPU_ID:
        apic |= MSR_IA32_APICBASE_BSP
    return uapi.kvm_sregs(
        cs=_segment(0xF000, 0xFFFF_0000, SEG_TYPE_CODE, 1), ds=data, es=data, fs=data, gs=data,
        ss=data, tr=_segment(0, 0, SEG_TYPE_TSS_BUSY, 0), ldt=_segment(0, 0, SEG_TYPE_LDT, 0),
        gdt=uapi.kvm_dtable(limit=0xFFFF), idt=uapi.kvm_dtable(limit=0xFFFF), cr0=CR0_RESET,
        apic_base=apic)
