"""Fixtures: a ``FakeSalesforce`` per test and a client pointed at it that never really sleeps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from crm_states.crm.http import RetryPolicy
from crm_states.crm.salesforce import SalesforceConnectionManager, TokenCache
from crm_states.testing.salesforce import FakeSalesforce

#: Three tries, no real waiting, and a read timeout short enough for the slow-answer tests.
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, connect_timeout=1.0, read_timeout=0.5)


@pytest.fixture
def policy() -> RetryPolicy:
    return FAST


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(fake: FakeSalesforce, sleeps: list[float],
                policy: RetryPolicy) -> Callable[..., SalesforceConnectionManager]:
    """Build clients for ``fake`` sharing one fresh token cache (never the process-wide one)."""
    cache = TokenCache()

    def build(**kwargs: Any) -> SalesforceConnectionManager:
        options: dict[str, Any] = {"client_secret": fake.client_secret, "session": fake.client_session(),
                                   "policy": policy, "sleep": sleeps.append, "token_cache": cache}
        options.update(kwargs)
        return SalesforceConnectionManager(fake.url, fake.client_id, **options)

    return build


@pytest.fixture
def client(make_client: Callable[..., SalesforceConnectionManager]) -> SalesforceConnectionManager:
    return make_client()
