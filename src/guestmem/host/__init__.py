"""Layer 3: the real backend, guest_memfd on the host kernel through /dev/kvm."""

from guestmem.caps import Capabilities
from guestmem.host.kvm import GuestMemfd, Kvm, Mapping, Vcpu, Vm

__all__ = ["Capabilities", "GuestMemfd", "Kvm", "Mapping", "Vcpu", "Vm"]
