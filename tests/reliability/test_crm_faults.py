"""3. CRM faults from FakeSalesforce, each alone and mixed: 5xx bursts, timeouts, dropped connections,
token expiry, UNABLE_TO_LOCK_ROW, malformed JSON, REQUEST_LIMIT_EXCEEDED half-way.

Each lands in the state the diagram gives; transient ones are retried within their budget (request
counts are asserted exactly); the daily limit stops the run cleanly (exit 4) and a later run finishes.
The machines run in-process here with a fast retry policy (3 attempts, no waits between retries, 0.3 s
read timeout), so that request counts are exact and timeouts cost a second, not the CLI's 20 s. A create
whose POST times out is never re-sent: the client looks the email up during its settle window
(``SETTLE`` here, longer than ``SLOW``) and really waits between those lookups.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager, SalesforceSchema
from crm_states.crm.salesforce import TokenCache
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import POSITIONS
from crm_states.testing import Fault, Faults, FakeSalesforce
from tests.faults import history_lengths, states_by_profile
from crm_states.testing.salesforce import SESSION_EXPIRED, UNABLE_TO_LOCK_ROW
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.reliability.checks import (
    APP_USER,
    app_users_by,
    check_histories,
    cli,
    cli_env,
    record,
    seed_nb_profiles,
    seed_signup_profiles,
    wait_until,
)

FAST = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0, connect_timeout=1.0, read_timeout=0.3)
SLOW = Fault.slow(1.0)  # longer than FAST's read timeout: a timeout for the client
SETTLE = 3.0  # the create's settle window: longer than SLOW, so a late commit is found in it


def client(fake: FakeSalesforce, *, settle: float = SETTLE, **schema: str) -> SalesforceConnectionManager:
    # Real sleep: FAST's retry delays are 0, so only the settle window's lookups really wait.
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST,
                                       sleep=time.sleep, token_cache=TokenCache(),
                                       schema=SalesforceSchema(**schema), create_settle_seconds=settle)


def warm(fake: FakeSalesforce, crm: SalesforceConnectionManager) -> None:
    """Fetch the token first, so injected faults meet the request under test; then reset the counts."""
    crm.find_crm_id("warm-up@example.org")
    fake.reset_counts()


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce(external_ids={APP_USER: ("NationBuilder_Id__c", "Sefaria_App_Email__c",
                                                 "Sefaria_User_Id__c")}) as server:
        yield server


# --- validation: the batched lookup --------------------------------------------------------------------

LOOKUP_CASES = {
    # name: (faults injected on the lookup, retried to success?, query requests, token requests, error text)
    "5xx burst within budget": ([(Fault.error(503), 1), (Fault.error(500), 1)], True, 3, 0, None),
    "5xx burst past budget": ([(Fault.error(503), 2), (Fault.error(502), 1)], False, 3, 0, "HTTP 502"),
    "timeout within budget": ([(SLOW, 2)], True, 3, 0, None),
    "timeout past budget": ([(SLOW, 3)], False, 3, 0, "timeout on GET"),
    "dropped connection within budget": ([(Fault.drop(), 2)], True, 3, 0, None),
    "dropped connection past budget": ([(Fault.drop(), 3)], False, 3, 0, "connection failed on GET"),
    "UNABLE_TO_LOCK_ROW within budget": ([(UNABLE_TO_LOCK_ROW, 2)], True, 3, 0, None),
    "UNABLE_TO_LOCK_ROW past budget": ([(UNABLE_TO_LOCK_ROW, 3)], False, 3, 0, "UNABLE_TO_LOCK_ROW"),
    "malformed JSON within budget": ([(Fault.malformed_json(), 2)], True, 3, 0, None),
    "malformed JSON past budget": ([(Fault.malformed_json(), 3)], False, 3, 0, "malformed JSON"),
    "token expiry": ("expire", True, 2, 1, None),
    "token refused again after refresh": ([(SESSION_EXPIRED, 2)], False, 2, 1, "refused a freshly issued token"),
    "400 not retried": ([(Fault.error(400), 1)], False, 1, 0, "HTTP 400 INVALID_REQUEST"),
}


@pytest.mark.parametrize("case", list(LOOKUP_CASES))
def test_a_lookup_fault_lands_where_the_diagram_says(db, fake: FakeSalesforce, case: str) -> None:
    faults, recovers, queries, tokens, error = LOOKUP_CASES[case]
    found = seed_nb_profiles(db, fake, 60)
    crm = client(fake)
    warm(fake, crm)
    if faults == "expire":
        fake.expire_tokens()
        faults = []
    for fault, times in faults:
        fake.inject(fault, times=times, kind="query")
    report = ValidationRunner(CrmStates.open(db, crm), RunnerConfig(chunk_size=1000)).run()

    assert report.lookups == 1 and report.processed == 60 and report.outcomes == {"finished": 60}
    assert fake.counts["query"] == queries and fake.counts["token"] == tokens  # the retry budget, exactly
    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    if recovers:
        assert check.states == {"WroteSalesforceAppUserUid": len(found), "WroteNotFound": 60 - len(found)}
    else:
        assert check.states == {"WroteUnexpectedResponse": 60}
        docs = list(db.profiles.find({}, {"CrmLog": 1}))
        assert all(len(p["CrmLog"]) == 1 and p["CrmLog"][0].startswith("NbProfileUnexpectedRes-") for p in docs)
        assert all(error in p["CrmLog"][0] for p in docs), docs[0]["CrmLog"]
        # Once Salesforce is healthy, resuming the state asks again and ends where Salesforce says.
        resumed = CrmStates.open(db, client(fake)).redrive(nb.NAME, list(db.profiles.find()))
        assert Counter(r.state for r in resumed) == {"WroteSalesforceAppUserUid": len(found),
                                                     "WroteNotFound": 60 - len(found)}
        check_histories(db, nb.SPEC).assert_clean()
    record(f"3 CRM fault, lookup: {case}", state="normal" if recovers else "WroteUnexpectedResponse",
           query_requests=queries, extra_token_requests=tokens)


# --- signup: the create -------------------------------------------------------------------------------

CREATE_CASES = {
    # name: (faults on the create, final state, create requests (email schema), upsert requests
    #        (external-id schema), app users made)
    "5xx burst within budget": ([(Fault.error(503), 2)], "WroteSalesforceAppUserUid", 3, 3, 1),
    "5xx burst past budget": ([(Fault.error(503), 3)], "WroteSalesforceErrorToDb", 3, 3, 0),
    "5xx after Salesforce made the user": ([(Fault.error(503, processed=True), 1)], "WroteSalesforceAppUserUid", 1, 2, 1),
    "dropped connection, user made": ([(Fault.drop(processed=True), 1)], "WroteSalesforceAppUserUid", 1, 2, 1),
    "dropped connection, nothing made": ([(Fault.drop(), 2)], "WroteSalesforceAppUserUid", 3, 3, 1),
    "UNABLE_TO_LOCK_ROW": ([(UNABLE_TO_LOCK_ROW, 1)], "WroteSalesforceAppUserUid", 2, 2, 1),
    "malformed JSON, user made": ([(Fault.malformed_json(processed=True), 1)], "WroteSalesforceAppUserUid", 1, 2, 1),
    # email: the timed-out POST is not re-sent; the record shows up during the settle window
    "timeout, Salesforce makes the user late": ([(SLOW, 1)], "WroteSalesforceAppUserUid", 1, 2, 1),
    "token expiry": ("expire", "WroteSalesforceAppUserUid", 1, 2, 1),
    "400 not retried": ([(Fault.error(400), 1)], "WroteSalesforceErrorToDb", 1, 1, 0),
}


@pytest.mark.parametrize("schema", ["email", "external-id"])
@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_a_create_fault_lands_where_the_diagram_says_and_never_doubles(db, fake: FakeSalesforce, case: str,
                                                                       schema: str) -> None:
    faults, state, creates, upserts, made = CREATE_CASES[case]
    seed_signup_profiles(db, 1, first_id=500)
    options = {"external_id_field": "Sefaria_User_Id__c"} if schema == "external-id" else {}
    crm = client(fake, **options)
    warm(fake, crm)
    kind = "upsert" if options else "create"
    if faults == "expire":
        fake.expire_tokens()
        faults = []
    for fault, times in faults:
        fake.inject(fault, times=times, kind=kind)
    result = CrmStates.open(db, crm).run_signup(500)
    fake.clear_faults()
    if any(fault.kind == "slow" for fault, _ in faults):
        time.sleep(SLOW.seconds)  # the late create completes in Salesforce after the client gave up

    assert (result.state, result.outcome) == (state, "finished"), result
    assert len(fake.records(APP_USER)) == made, fake.records(APP_USER)  # never a second app user
    assert fake.counts[kind] == (upserts if options else creates)  # the retry budget, exactly
    profile = db.profiles.find_one({"id": 500})
    if made:
        assert profile["sf_app_user_id"] == fake.records(APP_USER)[0]["Id"]
    else:
        [line] = profile["CrmLog"]
        assert line.startswith("NewUserSalesforceWriteError-") and "HTTP" in line
    check_histories(db, signup.SPEC).assert_clean()
    # Calling again (Sefaria's hook retried) changes nothing and makes no second user.
    CrmStates.open(db, client(fake, **options)).run_signup(500)
    assert len(fake.records(APP_USER)) == made
    record(f"3 CRM fault, create ({schema}): {case}", state=state, requests=fake.counts[kind], app_users=made)


def test_a_create_committed_after_the_settle_window_is_an_unknown_outcome_that_resume_finishes(
        db, fake: FakeSalesforce) -> None:
    """The email path's timed-out create commits only after the client stopped waiting: the signup lands
    in its failure state saying the outcome is unknown (1 create, never re-sent); once Salesforce has
    committed, resuming the failure state adopts that app user, with no second POST."""
    seed_signup_profiles(db, 1, first_id=600)
    crm = client(fake, settle=0.5)  # the window closes at ~0.8 s; Salesforce commits at 2 s
    warm(fake, crm)
    late = Fault.slow(2.0)
    fake.inject(late, times=1, kind="create")
    result = CrmStates.open(db, crm).run_signup(600)

    assert (result.state, result.outcome) == ("WroteSalesforceErrorToDb", "finished"), result
    assert fake.counts["create"] == 1  # the timed-out POST was not re-sent
    assert fake.counts["query"] >= 2  # the lookup before the create, then the settle window's
    [line] = db.profiles.find_one({"id": 600})["CrmLog"]
    assert line.startswith("NewUserSalesforceWriteError-") and "CrmOutcomeUnknown" in line, line
    assert "outcome unknown" in line and "not re-sent" in line, line
    # Salesforce finishes the request the client gave up on.
    assert wait_until(lambda: len(fake.records(APP_USER)) == 1, timeout=late.seconds + 5)

    [resumed] = CrmStates.open(db, client(fake)).redrive(
        signup.NAME, list(CrmStates.open(db, crm).profiles_in_state(signup.NAME, "WroteSalesforceErrorToDb")))
    assert (resumed.state, resumed.outcome) == ("WroteSalesforceAppUserUid", "finished"), resumed
    [user] = fake.records(APP_USER)
    assert db.profiles.find_one({"id": 600})["sf_app_user_id"] == user["Id"]
    assert fake.counts["create"] == 1  # resume found the late app user by email: no second POST
    assert app_users_by(fake, "Sefaria_App_Email__c")["new600@example.org"] == 1
    check = check_histories(db, signup.SPEC)
    check.assert_clean()
    assert check.states == {"WroteSalesforceAppUserUid": 1}
    record("3 CRM fault, create (email): timeout, Salesforce makes the user after the settle window",
           first_state=result.state, resumed_state=resumed.state, create_requests=fake.counts["create"],
           app_users=1)


# --- the daily limit -----------------------------------------------------------------------------------

def test_request_limit_exceeded_half_way_stops_cleanly_and_a_later_run_finishes(db, mongo_url: str,
                                                                                 fake: FakeSalesforce,
                                                                                 tmp_path: Path) -> None:
    found = seed_nb_profiles(db, fake, 2000)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    fake.daily_limit = fake.api_usage + 10  # ten lookups of the twenty, then REQUEST_LIMIT_EXCEEDED
    first = cli(env, "validate-nb", "--chunk-size", "100", "--lookup-size", "100", "--concurrency", "1")
    assert first.returncode == 4, first.stdout + first.stderr
    assert first.stdout.startswith("1000 of 2000 pending profiles validated"), first.stdout
    assert "stopped: CRM API limit reached" in first.stdout and "REQUEST_LIMIT_EXCEEDED" in first.stdout
    assert "run `crm-states validate-nb` again" in first.stdout and "Traceback" not in first.stderr
    assert fake.counts["query"] == 11  # ten answered, one refused and not retried
    # Clean: the refused lookup's profiles were not moved at all, and no lease is left behind.
    assert db[POSITIONS].count_documents({"machine": nb.NAME}) == 1000
    assert sum(history_lengths(db, nb.NAME).values()) == 4000
    assert db.crm_leases.count_documents({"owner": {"$exists": True}}) == 0

    fake.daily_limit = 100_000  # the next day
    second = cli(env, "validate-nb", "--chunk-size", "100", "--lookup-size", "100", "--concurrency", "1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.startswith("1000 of 1000 pending profiles validated"), second.stdout
    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    assert check.states == {"WroteSalesforceAppUserUid": len(found), "WroteNotFound": 2000 - len(found)}
    assert set(check.per_profile.values()) == {4}
    assert fake.counts["query"] == 21

    # The signup halts too: nothing is sent past the limit, and the call later finishes the same run.
    seed_signup_profiles(db, 1, first_id=90_000)
    fake.daily_limit = fake.api_usage
    crm = client(fake)
    halted = CrmStates.open(db, crm).run_signup(90_000)
    assert halted.outcome == "halted" and "API limit" in halted.error
    assert fake.counts["create"] == 0 and not fake.records(APP_USER)[len(found):]
    fake.daily_limit = 100_000
    done = CrmStates.open(db, crm).run_signup(90_000)
    assert done.state == "WroteSalesforceAppUserUid" and app_users_by(fake, "Sefaria_App_Email__c")["new90000@example.org"] == 1
    check_histories(db, signup.SPEC).assert_clean()
    record("3 CRM fault: REQUEST_LIMIT_EXCEEDED half-way", profiles=2000, first_run_exit=first.returncode,
           validated_before_the_limit=1000, second_run_exit=second.returncode, query_requests=fake.counts["query"],
           signup="halted, then WroteSalesforceAppUserUid with 1 app user")


# --- mixed ---------------------------------------------------------------------------------------------

MIX = Faults(seed=20261124, error_rates={500: 0.03, 502: 0.02, 503: 0.05}, drop_rate=0.03,
             malformed_json_rate=0.03, slow_rate=0.02, slow_seconds=1.0)


def test_a_seeded_mix_of_faults(db, fake: FakeSalesforce) -> None:
    """The mix over every request (token requests included) with tokens expiring every 25 calls."""
    found = seed_nb_profiles(db, fake, 3000)
    new_users = seed_signup_profiles(db, 150, first_id=100_001)
    crm = client(fake)
    warm(fake, crm)
    fake.token_call_limit = 25
    fake.expire_tokens()
    fake.faults = MIX
    for _ in range(3):  # and some UNABLE_TO_LOCK_ROW among the lookups
        fake.inject(UNABLE_TO_LOCK_ROW, times=1, kind="query")
    app = CrmStates.open(db, crm)
    report = ValidationRunner(app, RunnerConfig(chunk_size=100, concurrency=2)).run()
    assert report.lookups == 30 and report.outcomes == {"finished": 3000}
    lookup_requests = fake.counts["query"]
    # Each lookup: at most 3 attempts per token and at most one refresh.
    assert 30 <= lookup_requests <= 30 * FAST.attempts * 2
    # Signups meet the same mix except late answers (timeouts on the create are the case apart above).
    fake.faults = attrs.evolve(MIX, slow_rate=0.0)
    results = [app.run_signup(uid) for uid in new_users]
    injected = dict(fake.fault_counts)
    fake.clear_faults()
    fake.token_call_limit = None

    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    unexpected = check.states.pop("WroteUnexpectedResponse", 0)
    assert unexpected % 100 == 0  # a failed lookup sends its whole range, never part of it
    expected = Counter({"WroteSalesforceAppUserUid": len(found), "WroteNotFound": 3000 - len(found)})
    for pid, state in states_by_profile(db, nb.NAME).items():
        want = "WroteSalesforceAppUserUid" if pid in found else "WroteNotFound"
        assert state in (want, "WroteUnexpectedResponse"), (pid, state)
    signup_states = Counter(r.state for r in results)
    assert set(signup_states) <= {"WroteSalesforceAppUserUid", "WroteSalesforceErrorToDb"}
    check_histories(db, signup.SPEC).assert_clean()
    by_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert all(by_email[f"new{uid}@example.org"] <= 1 for uid in new_users)

    # Once Salesforce is healthy, resuming the failure states ends everyone where Salesforce says.
    app.redrive(nb.NAME, list(app.profiles_in_state(nb.NAME, "WroteUnexpectedResponse")))
    app.redrive(signup.NAME, list(app.profiles_in_state(signup.NAME, "WroteSalesforceErrorToDb")))
    final = check_histories(db, nb.SPEC)
    final.assert_clean()
    assert final.states == expected
    assert Counter(check_histories(db, signup.SPEC).states) == {"WroteSalesforceAppUserUid": 150}
    by_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert all(by_email[f"new{uid}@example.org"] == 1 for uid in new_users)
    record("3 CRM faults: seeded mix", profiles=3000, signups=150, faults_injected=injected,
           lookups=report.lookups, lookup_requests=lookup_requests, ranges_in_unexpected_response=unexpected // 100,
           signups_in_error_state=signup_states.get("WroteSalesforceErrorToDb", 0),
           token_requests=fake.counts["token"], duplicate_app_users=0)

