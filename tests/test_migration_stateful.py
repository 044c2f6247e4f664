"""Random guests under the safe protocols (issue 11 part 4): writes and
conversions interleaved with migration steps at random, then the checker. A
guest that keeps seed 001's obligations must find every page it owns, with the
state and contents it had at pause, and nothing private may cross in plaintext.

GUESTMEM_MIGRATION_EXAMPLES sets the number of random guests per VM kind
(default 100; the README records a long run)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestmem import program as p
from guestmem.vmm.migration import SAFE_GMEM, SAFE_SEV, VARIANTS
from guestmem.vmm.scenarios import DATA, DATA_SIZE, PAGE, Scenario, run_scenario

EXAMPLES = int(os.environ.get("GUESTMEM_MIGRATION_EXAMPLES", "100"))
PAGES = 8  # the pages the guest plays with, from BASE
BASE = DATA + 64 * PAGE
ACTIONS = ("first", "second", "round", "none")

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, PAGES - 1), st.integers(1, 2**32)),
    st.tuples(st.just("convert"), st.integers(0, PAGES - 1), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("checkpoint"), st.sampled_from(ACTIONS)),
)


class Guest:
    """Builds a program that keeps the obligations and verifies what it owns."""

    def __init__(self, sev: bool) -> None:
        self.sev = sev
        self.private = dict.fromkeys(range(PAGES), sev)  # SEV starts private
        self.owned: dict[int, int] = {}  # page -> first word it holds
        self.steps: list[p.Step] = [p.WritePattern(DATA, DATA_SIZE, 0x3000, 1),
                                    p.MigrationReady(), p.Checkpoint(0)]
        self.schedule: dict[int, tuple[str, ...]] = {0: ("begin",)}

    def apply(self, operation: tuple[object, ...]) -> None:
        match operation:
            case ("write", int(page), int(value)):
                self.steps.append(p.WritePattern(BASE + page * PAGE, PAGE, value, 1))
                self.owned[page] = value
            case ("convert", int(page), int(n), bool(private)):
                n = min(n, PAGES - page)
                self.steps.append(p.MapGpaRange(BASE + page * PAGE, n, encrypted=private))
                for i in range(page, page + n):
                    if self.private[i] != private and self.sev:
                        self.owned.pop(i, None)  # O2: a C-bit flip loses the data
                    self.private[i] = private
            case ("checkpoint", str(action)):
                label = len(self.schedule)
                self.steps.append(p.Checkpoint(label))
                if action != "none":
                    self.schedule[label] = (action,)

    def pause(self) -> None:
        label = len(self.schedule)
        self.steps.append(p.Checkpoint(label))
        self.schedule[label] = ("pause",)

    def verify(self) -> None:
        self.steps += [p.VerifyPattern(BASE + page * PAGE, PAGE, value, 1)
                       for page, value in sorted(self.owned.items())]


def check(sev: bool, before: list[tuple[object, ...]], after: list[tuple[object, ...]],
          variant: str | None = None) -> None:
    guest = Guest(sev)
    for operation in before:
        guest.apply(operation)
    guest.pause()
    for operation in after:
        if operation[0] != "checkpoint":
            guest.apply(operation)
    guest.verify()
    scenario = Scenario("random", "random guest", "test", sev, tuple(guest.steps),
                        guest.schedule)
    verdict = run_scenario(scenario, VARIANTS[variant or (SAFE_SEV if sev else SAFE_GMEM)])
    assert verdict.passed, verdict.as_json()
    assert not verdict.guest_failures and not verdict.violations, verdict.as_json()


SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(op, max_size=24), st.lists(op, max_size=6))
def test_random_sev_guests_migrate_intact(before, after):
    check(True, before, after)


@SETTINGS
@given(st.lists(op, max_size=24), st.lists(op, max_size=6))
def test_random_guest_memfd_guests_migrate_intact(before, after):
    check(False, before, after)


def test_the_same_check_fails_an_unsafe_protocol():
    """A conversion after the last round, without a write: without the resync the
    list that travels is stale; without classification dirty the page's state is."""
    for sev, bad in ((True, "dirty-first-noresync"), (False, "attributes-no-classification")):
        convert = [("convert", 0, 1, not sev), ("checkpoint", "none")]  # away from the start
        check(sev, convert, [])
        try:
            check(sev, convert, [], bad)
        except AssertionError:
            continue
        raise AssertionError(f"{bad} passed a conversion after its last round")
