import ctypes

import pytest

from guestmem import uapi


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_GET_API_VERSION", 0xAE00),
        ("KVM_CREATE_VM", 0xAE01),
        ("KVM_CHECK_EXTENSION", 0xAE03),
        ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04),
        ("KVM_CREATE_VCPU", 0xAE41),
        ("KVM_GET_DIRTY_LOG", 0x4010AE42),
        ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
        ("KVM_SET_USER_MEMORY_REGION2", 0x40A0AE49),
        ("KVM_RUN", 0xAE80),
        ("KVM_GET_REGS", 0x8090AE81),
        ("KVM_SET_REGS", 0x4090AE82),
        ("KVM_GET_SREGS", 0x8138AE83),
        ("KVM_SET_SREGS", 0x4138AE84),
        ("KVM_ENABLE_CAP", 0x4068AEA3),
        ("KVM_SET_MEMORY_ATTRIBUTES", 0x4020AED2),
        ("KVM_CREATE_GUEST_MEMFD", 0xC040AED4),
        ("KVM_PRE_FAULT_MEMORY", 0xC040AED5),
        ("KVM_SET_MEMORY_ATTRIBUTES2", 0xC080AED2),
        ("KVM_GMEM_CONVERT_SHARED", 0xC040AF41),
        ("KVM_GMEM_CONVERT_PRIVATE", 0xC040AF42),
    ],
)
def test_ioctl_numbers_match_the_kernels_literal_values(name, value):
    assert getattr(uapi, name) == value


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (uapi.kvm_userspace_memory_region, 32),
        (uapi.kvm_userspace_memory_region2, 160),
        (uapi.kvm_create_guest_memfd, 64),
        (uapi.kvm_memory_attributes, 32),
        (uapi.kvm_memory_attributes2, 128),
        (uapi.kvm_pre_fault_memory, 64),
        (uapi.kvm_enable_cap, 104),
        (uapi.kvm_regs, 144),
        (uapi.kvm_sregs, 312),
        (uapi.kvm_segment, 24),
    ],
)
def test_struct_sizes(struct, size):
    assert ctypes.sizeof(struct) == size


def test_kvm_run_offsets():
    assert uapi.kvm_run.exit.offset == 32
    assert uapi.kvm_run.kvm_valid_regs.offset == 288
    # memory_fault {flags@32, gpa@40, size@48}; hypercall ret @88, flags @96
    assert uapi.kvm_run_memory_fault.gpa.offset == 8
    assert uapi.kvm_run_hypercall.ret.offset == 56
    assert uapi.kvm_run_hypercall.flags.offset == 64


def test_region2_field_offsets():
    r = uapi.kvm_userspace_memory_region2
    assert (r.guest_memfd_offset.offset, r.guest_memfd.offset, r.pad2.offset) == (32, 40, 48)


def test_constants():
    assert uapi.KVM_EXIT_MEMORY_FAULT == 39
    assert uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE == 8
    assert uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE == 8
    assert uapi.KVM_MAP_GPA_RANGE_ENCRYPTED == 0x10
    assert uapi.GUESTMEM_HUGETLB_FLAG_2MB == 0x5400000000000000
    assert uapi.GUESTMEM_HUGETLB_FLAG_1GB == 0x7800000000000000
    assert uapi.CAPABILITY_NAMES[244] == "KVM_CAP_GUEST_MEMFD_FLAGS"


def test_ioc_rejects_oversized_argument():
    with pytest.raises(ValueError):
        uapi._IOC(uapi.IOC_WRITE, uapi.KVMIO, 1, 1 << 14)
