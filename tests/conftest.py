import os

import pytest


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session")
def host_kvm():
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from guestmem.host import Kvm

    with Kvm() as kvm:
        yield kvm


@pytest.fixture(scope="session")
def host_profile():
    """The model profile of this machine's kernel, from a probe of /dev/kvm."""
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import guestmem

    return guestmem.host_profile()
