"""Layer 2: guest_memfd and the KVM around it, implemented in Python."""

from guestmem.model.kvm import Kvm
from guestmem.model.profile import PROFILES, VM_TYPES, Profile, VmType

__all__ = ["PROFILES", "VM_TYPES", "Kvm", "Profile", "VmType"]
