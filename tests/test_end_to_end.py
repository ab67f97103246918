"""The machines end to end on the real clients: FakeSalesforce over HTTP, MongoDB on SecantusDB."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager, SalesforceSchema
from crm_states.crm.salesforce import TokenCache
from crm_states.store import POSITIONS
from crm_states.testing import Fault, FakeSalesforce
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import assert_history_is_path
from tests.test_cli import PYTHONPATH

APP_USER = "Sefaria_App_User__c"
FAST = RetryPolicy(attempts=3, base_delay=0.0, read_timeout=1.0)


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce(external_ids={APP_USER: ("NationBuilder_Id__c", "Sefaria_App_Email__c",
                                                 "Sefaria_User_Id__c")}) as server:
        yield server


def _client(fake: FakeSalesforce, **schema: str) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST,
                                       sleep=lambda s: None, token_cache=TokenCache(),
                                       schema=SalesforceSchema(**schema))


def test_validation_over_http_in_one_batch(db, fake: FakeSalesforce, tmp_path: Path) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 9000 + i} for i in range(1, 201)])
    found = {i: fake.insert(APP_USER, {"NationBuilder_Id__c": str(9000 + i)}) for i in range(1, 201, 3)}
    app = CrmStates.open(db, _client(fake), journal_path=str(tmp_path / "j.jsonl"))

    results = app.validate_profiles(list(db.profiles.find()))

    assert fake.counts["query"] == 1 and fake.counts["token"] == 1  # 200 profiles, one lookup
    for result in results:
        expected = "WroteSalesforceAppUserUid" if result.profile_id in found else "WroteNotFound"
        assert result.state == expected
    for pid, app_user in found.items():
        assert db.profiles.find_one({"id": pid})["sf_app_user_id"] == app_user
    assert_history_is_path(nb.SPEC, app.history(1, nb.NAME))


def test_a_failed_lookup_lands_the_batch_in_unexpected_response(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 100 + i} for i in range(1, 6)])
    fake.inject(Fault.error(503), times=3, kind="query")
    app = CrmStates.open(db, _client(fake))
    assert {r.state for r in app.validate_profiles(list(db.profiles.find()))} == {"WroteUnexpectedResponse"}
    log = db.profiles.find_one({"id": 1})["CrmLog"]
    assert len(log) == 1 and log[0].startswith("NbProfileUnexpectedRes-") and "503" in log[0]


def test_the_api_limit_halts_the_batch_and_a_later_run_finishes(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 300 + i} for i in range(1, 4)])
    app = CrmStates.open(db, _client(fake))
    fake.daily_limit = fake.api_usage  # the allocation is spent
    results = app.validate_profiles(list(db.profiles.find()))
    assert {r.outcome for r in results} == {"halted"}
    assert "API limit" in results[0].error
    # A lookup is a read: its transitions are committed with its outcome, so nothing half-done remains.
    assert app.store.count_by_state(nb.NAME) == {} and db[POSITIONS].count_documents({}) == 0
    fake.daily_limit = 100_000
    assert {r.state for r in app.validate_profiles(list(db.profiles.find()))} == {"WroteNotFound"}
    for pid in (1, 2, 3):
        assert_history_is_path(nb.SPEC, app.history(pid, nb.NAME))


def test_signup_over_http_with_sefaria_names(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_one({"id": 77})
    app = CrmStates.open(db, _client(fake))
    result = app.run_signup(77, email="dvora@example.org", first_name="דבורה", last_name="O'Sullivan-Abramowitz",
                            lang="he", educator=True)
    assert result.state == "WroteSalesforceAppUserUid"
    [record] = fake.records(APP_USER)
    assert record["First_Name__c"] == "דבורה" and record["Last_Name__c"] == "O'Sullivan-Abramowitz"
    assert record["Hebrew_English__c"] == "Hebrew" and record["Educator__c"] is True
    assert db.profiles.find_one({"id": 77})["sf_app_user_id"] == record["Id"]


@pytest.mark.parametrize("schema", [{}, {"external_id_field": "Sefaria_User_Id__c"}], ids=["email", "external-id"])
def test_signup_whose_answer_is_lost_never_creates_twice(db, fake: FakeSalesforce, schema: dict) -> None:
    """Salesforce creates the app user but the answer never arrives; the retry and a later resume
    both find it instead of creating a second one."""
    db.profiles.insert_one({"id": 78})
    app = CrmStates.open(db, _client(fake, **schema))
    kind = "upsert" if schema else "create"
    fake.inject(Fault.drop(processed=True), times=1, kind=kind)
    result = app.run_signup(78, email="lost@example.org")
    assert result.state == "WroteSalesforceAppUserUid"
    assert len(fake.records(APP_USER)) == 1
    assert app.run_signup(78, email="lost@example.org", restart=True).state == "WroteSalesforceAppUserUid"
    assert len(fake.records(APP_USER)) == 1
    assert_history_is_path(signup.SPEC, app.history(78, signup.NAME))


def test_a_rejected_signup_records_the_error(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_one({"id": 79})
    app = CrmStates.open(db, _client(fake))
    fake.inject(Fault.error(400), times=1, kind="create")
    result = app.run_signup(79, email="rejected@example.org")
    assert result.state == "WroteSalesforceErrorToDb"
    [line] = db.profiles.find_one({"id": 79})["CrmLog"]
    assert line.startswith("NewUserSalesforceWriteError-") and "CrmRejected" in line
    assert fake.counts["create"] == 1  # a 400 is not retried


def test_demo_command_runs_and_report_shows_the_same_counts(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in ("MONGO_URL", "MONGO_DB")}, "PYTHONPATH": PYTHONPATH}
    demo = subprocess.run([sys.executable, "-m", "crm_states.cli", "demo", "--profiles", "300"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "nb_profile_validation (210 profiles)" in demo.stdout
    assert "new_user_signup (90 profiles)" in demo.stdout
    assert "[*] → NotChecked → RequestedContact → NotFound → WroteNotFound" in demo.stdout
    assert "[*] → NotChecked → RequestedContact → UnexpectedResponse → WroteUnexpectedResponse" in demo.stdout
    assert "9 signups met the database outage" in demo.stdout and "restored 9" in demo.stdout
    assert "LoggedDbFailure                       9" in demo.stdout
    assert "They stay in LoggedDbFailure until `crm-states resume --machine new_user_signup" in demo.stdout
    # The signup phase shows its progress as the validation phase does (plain lines when not on a terminal).
    progress = [line for line in demo.stderr.splitlines() if line.startswith("signed up ")]
    assert progress[-1].startswith("signed up 90/90 new users; ") and "WroteSalesforceAppUserUid" in progress[-1]
    assert 2 <= len(progress) <= 11
    report = subprocess.run([sys.executable, "-m", "crm_states.cli", "report"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() in demo.stdout


def test_bad_flags_and_unreachable_database_give_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    bad = subprocess.run([sys.executable, "-m", "crm_states.cli", "demo", "--profiles", "zero"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected a whole number" in bad.stderr and "Traceback" not in bad.stderr
    down = subprocess.run([sys.executable, "-m", "crm_states.cli", "report", "--mongo-url",
                           "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 3, down.stderr
    assert down.stderr.startswith("crm-states: cannot reach MongoDB") and "Traceback" not in down.stderr
