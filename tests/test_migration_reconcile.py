"""Reconciling migrated users without a nationbuilder_id by email (machines/reconcile_by_email.py,
crm_states/reconcile.py), against SecantusDB and FakeSalesforce over HTTP: exactly one App User is written
(its App User id), none and several are listed in their states, nothing is ever created or overwritten, and
one App User is never given to two profiles."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.api import CrmStates
from crm_states.crm import CrmLimitExceeded
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import replay_file
from crm_states.store import POSITIONS, Store
from crm_states.testing import FakeSalesforce
from crm_states.user_emails import User
from machines import new_user_signup as signup
from machines import reconcile_by_email as reconcile
from tests.faults import (
    FlakyDatabase,
    WritePlan,
    assert_history_is_path,
    states_by_profile,
)
from tests.migration_seed import APP_USER, app_for

UTC = dt.timezone.utc


@pytest.fixture(autouse=True)
def users_in_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests keep the users' emails in the profiles; Django may be configured by an earlier test."""
    monkeypatch.setenv("CRM_STATES_USER_SOURCE", "profiles")


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


def lines(db, pid: int) -> list[str]:
    return (db.profiles.find_one({"id": pid}) or {}).get("CrmLog") or []


def test_one_app_user_is_written_none_and_several_are_listed_nothing_created(db, fake: FakeSalesforce) -> None:
    one = fake.insert(APP_USER, {"Sefaria_App_Email__c": "rivka@example.org"})
    quoted = fake.insert(APP_USER, {"Sefaria_App_Email__c": "o'hara\\x@example.org"})
    twins = [fake.insert(APP_USER, {"Sefaria_App_Email__c": "twins@example.org"}) for _ in range(2)]
    placeholder = fake.insert(APP_USER, {"Sefaria_App_Email__c": "interim@example.org"})
    fake.insert("Contact", {"Email": "nobody@example.org"})  # a Contact is never taken for an App User
    db.profiles.insert_many([
        {"id": 1, "email": "  Rivka@Example.ORG "}, {"id": 2, "email": "O'Hara\\x@example.org"},
        {"id": 3, "email": "twins@example.org"}, {"id": 4, "email": "nobody@example.org"},
        {"id": 5, "email": "interim@example.org", "sf_app_user_id": "pending:0123abcd"},
        {"id": 6, "email": "rivka@example.org", "sf_app_user_id": "a0Aalreadyheld0001"},  # holds one: not asked
        {"id": 7, "email": "nb@example.org", "nationbuilder_id": 4242},  # validate-nb's, not this
    ])
    report = app_for(db, fake).reconcile_by_email()
    assert report.states == {"WroteSalesforceAppUserUid": 3, "WroteAmbiguousResponse": 1, "WroteEmailNotFound": 1}
    assert report.lookups == 1 and fake.counts["query"] == 1  # five emails, one packed request
    held = {p["id"]: p.get("sf_app_user_id") for p in db.profiles.find()}
    assert held == {1: one, 2: quoted, 3: None, 4: None, 5: placeholder, 6: "a0Aalreadyheld0001", 7: None}
    assert all(v is None or v.startswith("a0A") for v in held.values())  # App User ids (a0A...), never a Contact's
    ambiguous = CrmStates.open(db, InMemoryCrm()).position(3, reconcile.NAME)
    assert sorted(ambiguous.detail["candidates"]) == sorted(twins)
    assert lines(db, 3)[0].startswith("EmailReconcileAmbiguous-") and all(t in lines(db, 3)[0] for t in twins)
    assert lines(db, 4) == [l for l in lines(db, 4) if l.startswith("EmailReconcileNotFoundInSalesforce-")] != []
    assert fake.counts["create"] == fake.counts["upsert"] == fake.counts["collection_create"] == 0
    assert states_by_profile(db, reconcile.NAME).keys() == {1, 2, 3, 4, 5}
    for pid in (1, 2, 3, 4, 5):
        assert_history_is_path(reconcile.SPEC, Store(db).history(pid, reconcile.NAME))
    again = app_for(db, fake).reconcile_by_email()
    assert again.pending_at_start == 0 and fake.counts["query"] == 1  # judged with the same emails: not asked again


def test_an_app_user_is_never_given_to_two_profiles(db, fake: FakeSalesforce) -> None:
    taken = fake.insert(APP_USER, {"Sefaria_App_Email__c": "shared@example.org"})
    pair = fake.insert(APP_USER, {"Sefaria_App_Email__c": "pair@example.org"})
    db.profiles.insert_many([{"id": 1, "email": "first@example.org", "sf_app_user_id": taken},
                             {"id": 2, "email": "shared@example.org"},
                             {"id": 3, "email": "pair@example.org"}, {"id": 4, "email": "PAIR@example.org"}])
    report = app_for(db, fake).reconcile_by_email()
    assert report.states == {"WroteAmbiguousResponse": 3}
    app = CrmStates.open(db, InMemoryCrm())
    assert app.position(2, reconcile.NAME).detail["held_by"] == [1]
    assert "another profile of this batch" in app.position(3, reconcile.NAME).detail["error"]
    assert {p.get("sf_app_user_id") for p in db.profiles.find({"id": {"$gt": 1}})} == {None}
    assert pair in lines(db, 4)[0]


def test_users_come_from_a_source_and_joined_before_selects_them(db, fake: FakeSalesforce) -> None:
    ids = [fake.insert(APP_USER, {"Sefaria_App_Email__c": f"u{i}@example.org"}) for i in range(1, 4)]
    db.profiles.insert_many([{"id": i} for i in range(1, 5)])  # no email in Mongo: Sefaria keeps it in SQL
    joined = {1: dt.datetime(2019, 5, 1, tzinfo=UTC), 2: dt.datetime(2024, 1, 2, tzinfo=UTC), 3: None,
              4: dt.datetime(2020, 1, 1)}
    table = {i: User(f"u{i}@example.org" if i < 4 else None, joined[i]) for i in range(1, 5)}
    asked: list[list[int]] = []

    def users(batch):
        asked.append(list(batch))
        return {i: table[i] for i in batch if i in table}

    app = app_for(db, fake)
    early = app.reconcile_by_email(joined_before=dt.date(2021, 1, 1), users=users)
    assert early.states == {"WroteSalesforceAppUserUid": 1, "ScriptFailureLogged": 1}  # 1 found; 4 has no email
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == ids[0] and asked
    rest = app.reconcile_by_email(users=users)
    assert rest.states == {"WroteSalesforceAppUserUid": 2}  # 2 and 3 (no join date: only without the filter)
    assert app.position(4, reconcile.NAME).state == "ScriptFailureLogged"


def test_a_signup_in_flight_is_left_to_the_signup(db, fake: FakeSalesforce) -> None:
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "late@example.org"})
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "failed@example.org"})
    db.profiles.insert_many([{"id": 1, "email": "late@example.org"}, {"id": 2, "email": "failed@example.org"}])
    crm = InMemoryCrm()
    crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED"))  # the signup stops at its write-ahead state
    signups = CrmStates.open(db, crm)
    assert signups.run_signup(1).outcome == "halted"
    crm.fail_next(ValueError("400 REQUIRED_FIELD_MISSING"))
    assert signups.run_signup(2).state == "WroteSalesforceErrorToDb"  # finished, with no App User
    report = app_for(db, fake).reconcile_by_email()
    assert report.states == {"WroteSalesforceAppUserUid": 1} and states_by_profile(db, reconcile.NAME).keys() == {2}
    assert signups.position(1, signup.NAME).state == "RequestAddToSalesforce"


def test_the_api_limit_stops_the_run_and_a_later_run_finishes_it(db, fake: FakeSalesforce) -> None:
    for i in range(1, 7):
        fake.insert(APP_USER, {"Sefaria_App_Email__c": f"u{i}@example.org"})
    db.profiles.insert_many([{"id": i, "email": f"u{i}@example.org"} for i in range(1, 7)])
    fake.daily_limit = fake.api_usage + 1  # one lookup, then REQUEST_LIMIT_EXCEEDED
    first = app_for(db, fake).reconcile_by_email(chunk_size=3)
    assert first.stopped and first.states == {"WroteSalesforceAppUserUid": 3}
    stuck = CrmStates.open(db, InMemoryCrm()).profiles_in_state(reconcile.NAME, "RequestedAppUser")
    assert all(row["detail"].get("email") for row in stuck)
    assert db[POSITIONS].count_documents({"machine": reconcile.NAME, "claim": {"$exists": True}}) == 0  # released
    fake.daily_limit = 100_000
    second = app_for(db, fake).reconcile_by_email(chunk_size=3)
    assert second.states == {"WroteSalesforceAppUserUid": 3} and not second.stopped
    assert db.profiles.count_documents({"sf_app_user_id": {"$exists": True}}) == 6


def test_dry_run_limit_and_max_api_calls(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_many([{"id": i, "email": f"u{i}@example.org"} for i in range(1, 11)])
    dry = app_for(db, fake).reconcile_by_email(dry_run=True)
    assert dry.pending_at_start == 10 and fake.total_requests == 0 and db[POSITIONS].count_documents({}) == 0
    limited = app_for(db, fake).reconcile_by_email(limit=4, chunk_size=2)
    assert limited.processed == 4
    budget = app_for(db, fake).reconcile_by_email(max_api_calls=1, chunk_size=2)
    assert budget.processed == 2 and "--max-api-calls 1" in budget.stopped


def test_a_refused_write_is_journaled_replayed_and_resumed_and_heal_keeps_it(db, fake: FakeSalesforce,
                                                                               tmp_path: Path) -> None:
    found = fake.insert(APP_USER, {"Sefaria_App_Email__c": "u1@example.org"})
    db.profiles.insert_many([{"id": 1, "email": "u1@example.org"}, {"id": 2, "email": "u2@example.org"}])
    journal = tmp_path / "journal.jsonl"
    flaky = FlakyDatabase(db, WritePlan({("profiles", "update", 1)}))
    app = app_for(flaky, fake, journal_path=str(journal))
    report = app.reconcile_by_email(chunk_size=1)  # one profile write per chunk: the first is refused
    assert report.states == {"DbWriteOkErrorLogged": 1, "WroteEmailNotFound": 1}
    replayed = replay_file(Store(db), journal)
    assert replayed.failed == [] and db.profiles.find_one({"id": 1})["sf_app_user_id"] == found
    plain = app_for(db, fake)
    assert {r.state for r in plain.resume(reconcile.NAME, "DbWriteOkErrorLogged").results} == {"WroteSalesforceAppUserUid"}
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "u2@example.org"})  # MarComs created it meanwhile
    assert {r.state for r in plain.resume(reconcile.NAME, "WroteEmailNotFound").results} == {"WroteSalesforceAppUserUid"}
    stale = {"id": 1, "email": "u1@example.org"}
    db.profiles.replace_one({"id": 1}, stale)  # Sefaria's stale save
    assert plain.heal().healed[reconcile.NAME] == 1 and db.profiles.find_one({"id": 1})["sf_app_user_id"] == found


def test_the_user_source_setting_is_followed_and_a_function_there_refused(db, fake, monkeypatch) -> None:
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "one@example.org"})
    db.profiles.insert_one({"id": 1, "email": "one@example.org"})
    monkeypatch.setenv("CRM_STATES_USER_SOURCE", "tests.somewhere:users")
    with pytest.raises(ValueError, match="reads users by id from django or profiles"):
        app_for(db, fake).reconcile_by_email()
    assert fake.total_requests == 0 and db[POSITIONS].count_documents({}) == 0
    monkeypatch.setenv("CRM_STATES_USER_SOURCE", "profiles")
    assert app_for(db, fake).reconcile_by_email().states == {"WroteSalesforceAppUserUid": 1}
