import os

import pytest
from hypothesis import settings

# `make mutation` runs tests slowed by mutmut's trampolines, one mutant after another:
# no deadline (slowness is not a kill) and no example database (a failing example
# saved under one mutant must not kill the next).
settings.register_profile("mutation", deadline=None, database=None)
if os.environ.get("GUESTMEM_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["GUESTMEM_HYPOTHESIS_PROFILE"])


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


def backends():
    """Parameters for a test that runs on both backends (kvm skips, saying why)."""
    reason = kvm_unavailable_reason()
    return [pytest.param("model", id="model"),
            pytest.param("kvm", id="kvm",
                         marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


def open_kvm(backend):
    """A fresh Kvm of the backend (the model's default profile)."""
    from guestmem.host import Kvm as HostKvm
    from guestmem.model import Kvm as ModelKvm

    return ModelKvm() if backend == "model" else HostKvm()


@pytest.fixture(params=["model", "kvm"])
def any_kvm(request):
    """The model (mainline), then this host's kernel (skipped without /dev/kvm)."""
    if request.param == "kvm":
        yield request.getfixturevalue("host_kvm")
        return
    from guestmem.model import Kvm as ModelKvm

    with ModelKvm("mainline") as kvm:
        yield kvm
