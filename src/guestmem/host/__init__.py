"""Layer 3: the real backend, guest_memfd on the host kernel through /dev/kvm."""

from guestmem.host.kvm import Capabilities, GuestMemfd, Kvm, Mapping, Vcpu, Vm

__all__ = ["Capabilities", "GuestMemfd", "Kvm", "Mapping", "Vcpu", "Vm"]
