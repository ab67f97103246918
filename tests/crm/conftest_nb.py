"""Fixtures for tests of the NationBuilder client and of loading a log into it.

Not a conftest.py (another suite owns that name here): test modules import what they use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crm_states.crm.http import RetryPolicy
from crm_states.crm.nationbuilder import NationbuilderConnectionManager
from crm_states.testing.nationbuilder import FakeNationbuilder

#: A token distinctive enough that finding it anywhere in logs or errors means it leaked.
TOKEN = "SENTINEL-nb-token-7c1e5a93d2"

#: Short timeouts so a "slow" fault costs a fraction of a second; waits go to FakeClock, not time.
FAST = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0, connect_timeout=2.0, read_timeout=0.5)


class FakeClock:
    """Time for the fake's rate-limit windows, advanced only by the client's ``sleep``, which it records."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def nb(clock: FakeClock) -> Iterator[FakeNationbuilder]:
    with FakeNationbuilder(token=TOKEN, clock=clock) as server:
        yield server


def make_nb_client(server: FakeNationbuilder, clock: FakeClock, **kwargs: object) -> NationbuilderConnectionManager:
    """A client of ``server`` whose retries wait on ``clock``."""
    options: dict[str, object] = {"token": TOKEN, "base_url": server.api_url,
                                  "session": server.client_session(), "policy": FAST, "sleep": clock.sleep}
    options.update(kwargs)
    return NationbuilderConnectionManager(**options)  # type: ignore[arg-type]


@pytest.fixture
def nb_client(nb: FakeNationbuilder, clock: FakeClock) -> NationbuilderConnectionManager:
    return make_nb_client(nb, clock)
