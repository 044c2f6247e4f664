"""Object lifetimes at the API boundary: failed opens, dropped objects, use after close."""

from __future__ import annotations

import errno
import gc
import sys

import pytest

from guestmem.host import Kvm as HostKvm
from guestmem.model import Kvm as ModelKvm


@pytest.fixture
def unraisable(monkeypatch):
    """What Python reports as "Exception ignored in ..." (e.g. from __del__)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    yield seen
    gc.collect()


def test_failed_host_open_reports_nothing_from_del(unraisable):
    with pytest.raises(OSError) as e:
        HostKvm(path="/nonexistent")
    assert e.value.errno == errno.ENOENT, "open of a missing path is ENOENT"
    with pytest.raises(TypeError):
        HostKvm(pth="/dev/kvm")  # a wrong keyword: the object exists, __init__ never ran
    del e
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


def test_failed_model_open_reports_nothing_from_del(unraisable):
    with pytest.raises(ValueError):
        ModelKvm(profile="no-such-profile")
    with pytest.raises(TypeError):
        ModelKvm(profil="mainline")
    gc.collect()
    assert [u.exc_value for u in unraisable] == []
