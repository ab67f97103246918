"""Read timeouts against connect failures, and what a timed-out create does (RELIABILITY.md, bug 1).

All over real HTTP to loopback servers: ``FakeSalesforce`` for slow answers and refused connections, a
listening socket that never accepts for a connect timeout. Nothing patches ``requests``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import attrs
import pytest
import requests

from crm_states.crm.errors import CrmConfigError, CrmOutcomeUnknown, CrmReadTimeout, CrmTransientError
from crm_states.crm.http import RetryPolicy, send
from crm_states.crm.salesforce import SalesforceConnectionManager
from crm_states.testing.salesforce import FakeSalesforce
from crm_states.testing.server import Fault

USER = "Sefaria_App_User__c"
MakeClient = Callable[..., SalesforceConnectionManager]
ONCE = RetryPolicy(attempts=1, connect_timeout=0.5, read_timeout=0.3)


def ok(response: requests.Response) -> None:
    return None


# -- send: how a failure is classified -----------------------------------------------------------------

def test_a_read_timeout_is_a_crm_read_timeout(fake: FakeSalesforce) -> None:
    fake.inject(Fault.slow(1.0))
    url = f"{fake.url}/services/data/v60.0/limits?access_token=secret-value"
    with pytest.raises(CrmReadTimeout) as caught:
        send(fake.client_session(), "GET", url, classify=ok, policy=ONCE)
    error = caught.value
    assert isinstance(error, CrmTransientError)  # still retried by send, as before
    assert str(error).startswith("timeout on GET ") and "ReadTimeout" in str(error)
    assert error.method == "GET" and error.url.startswith(fake.url) and "secret-value" not in error.url


def test_a_refused_connection_is_transient_but_not_a_read_timeout(fake: FakeSalesforce) -> None:
    url = f"{fake.url}/services/data/v60.0/limits"
    session = fake.client_session()
    fake.stop()  # nothing listens on the port any more: the request never reaches a server
    with pytest.raises(CrmTransientError) as caught:
        send(session, "GET", url, classify=ok, policy=ONCE)
    assert not isinstance(caught.value, CrmReadTimeout)
    assert str(caught.value).startswith("connection failed on GET ")


@contextlib.contextmanager
def never_accepting() -> Iterator[int]:
    """A loopback port whose accept queue is full: a further connect gets no answer (connect timeout)."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except OSError:
                probe.close()
                break
            fillers.append(probe)
        else:
            pytest.skip("this system's TCP stack accepts every connect: no connect timeout to provoke")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        server.close()


def test_a_connect_timeout_is_transient_but_not_a_read_timeout() -> None:
    with never_accepting() as port:
        session = requests.Session()
        session.trust_env = False
        with pytest.raises(CrmTransientError) as caught:
            send(session, "POST", f"http://127.0.0.1:{port}/services/data/v60.0/sobjects/{USER}/",
                 classify=ok, policy=ONCE, json={})
    assert not isinstance(caught.value, CrmReadTimeout)
    assert "ConnectTimeout" in str(caught.value)


def test_read_timeouts_are_still_retried_within_the_budget(fake: FakeSalesforce) -> None:
    policy = attrs.evolve(ONCE, attempts=3, base_delay=0.0, max_delay=0.0)
    fake.inject(Fault.slow(1.0), times=2)
    response = send(fake.client_session(), "GET", f"{fake.url}/services/oauth2/userinfo", classify=ok,
                    policy=policy, sleep=lambda s: None)
    assert response is not None
    assert fake.total_requests == 3


# -- the create by email -------------------------------------------------------------------------------

def test_a_timed_out_create_is_not_resent_and_its_late_record_is_found(fake: FakeSalesforce,
                                                                        make_client: MakeClient) -> None:
    client = make_client(sleep=time.sleep, create_settle_seconds=3.0)  # conftest: 0.5 s read timeout
    client.find_crm_id("warm@x")
    fake.reset_counts()
    fake.inject(Fault.slow(1.0), kind="create")  # Salesforce commits 0.5 s after the client gave up
    crm_id = client.add_user_to_crm("late@example.org", "L", "A")
    [user] = fake.records(USER)
    assert crm_id == user["Id"]
    assert fake.counts["create"] == 1
    assert fake.counts["query"] >= 2  # before the create, then in the settle window until it showed up


def test_a_create_that_does_not_settle_in_the_window_is_an_unknown_outcome(fake: FakeSalesforce,
                                                                           make_client: MakeClient,
                                                                           sleeps: list[float]) -> None:
    client = make_client(create_settle_seconds=1.0)  # sleeps are only recorded: the window is counted
    client.find_crm_id("warm@x")
    fake.reset_counts()
    fake.inject(Fault.slow(2.0), kind="create")
    with pytest.raises(CrmOutcomeUnknown) as caught:
        client.add_user_to_crm("never@example.org", "N", "S")
    message = str(caught.value)
    assert "outcome unknown" in message and "not re-sent" in message and "1s settle window" in message
    assert isinstance(caught.value, CrmTransientError) and isinstance(caught.value.__cause__, CrmReadTimeout)
    assert fake.counts["create"] == 1  # never a second POST
    # Backoff 0.25 s, 0.5 s, then what is left of the window: four lookups, not a busy loop.
    assert sleeps == [0.25, 0.5, 0.25]
    assert fake.counts["query"] == 1 + 4


def test_the_settle_window_defaults_to_twice_the_read_timeout_plus_5_seconds(make_client: MakeClient,
                                                                             policy: RetryPolicy) -> None:
    assert make_client().create_settle_seconds == 2 * policy.read_timeout + 5
    assert make_client(create_settle_seconds=0).create_settle_seconds == 0
    with pytest.raises(CrmConfigError, match="create_settle_seconds"):
        make_client(create_settle_seconds=-1)


def test_a_create_whose_connection_failed_is_checked_and_resent_as_before(fake: FakeSalesforce,
                                                                         make_client: MakeClient) -> None:
    client = make_client(create_settle_seconds=60.0)
    client.find_crm_id("warm@x")
    fake.reset_counts()
    fake.inject(Fault.drop(), kind="create")  # no answer, nothing made: looked up, then posted again
    crm_id = client.add_user_to_crm("dropped@example.org", "D", "C")
    assert [u["Id"] for u in fake.records(USER)] == [crm_id]
    assert fake.counts["create"] == 2 and fake.counts["query"] == 2
