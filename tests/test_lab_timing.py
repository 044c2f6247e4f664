"""guestmem.lab.timing.no_gc: the collector stays out of a timed loop and comes back
as it was, also when the loop raises."""

import gc

import pytest

from guestmem.lab.timing import no_gc


def test_no_gc_disables_and_restores():
    assert gc.isenabled()
    with no_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_gc():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with no_gc():
            pass
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()
