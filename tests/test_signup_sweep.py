"""The signup sweep (``crm-states signup --pending``): users a signup missed, signed up in sObject
Collections batches after one packed email lookup; per-record errors, lost answers, the API limit, upserts
by external id, the user sources, and the single signup left as it was."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import SalesforceSchema, TokenCache
from crm_states.records import Position
from crm_states.sweep import sweep_signups
from crm_states.testing import Fault, FakeSalesforce
from crm_states.users import User, Window, profile_users, source_from_env
from machines import new_user_signup as signup
from tests.faults import states_by_profile
from tests.reliability.checks import app_users_by, check_histories

APP_USER = "Sefaria_App_User__c"
ROOT = Path(__file__).resolve().parents[1]
JOINED = dt.datetime(2026, 3, 1)


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce(external_ids={APP_USER: ("Sefaria_User_Id__c", "NationBuilder_Id__c")}) as server:
        yield server


def app_for(db, fake: FakeSalesforce, **schema) -> CrmStates:
    crm = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                      policy=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda s: None,
                                      schema=SalesforceSchema(**schema))
    return CrmStates.open(db, crm)


def seed_users(db, ids: range, **extra) -> None:
    db.profiles.insert_many([{"id": i, "email": f"user{i}@example.org", "first_name": "רבקה", "last_name": "O'Hara",
                              "date_joined": JOINED, **extra} for i in ids])


def test_missed_users_are_signed_up_in_batches_and_migrated_ones_adopted(db, fake) -> None:
    seed_users(db, range(1, 451))
    migrated = {i: fake.insert(APP_USER, {"Sefaria_App_Email__c": f"USER{i}@Example.org"}) for i in range(1, 451, 9)}
    for n in (1, 2):  # two App Users already hold user 7's email: never adopted, never created
        fake.insert(APP_USER, {"Sefaria_App_Email__c": "user7@example.org", "First_Name__c": f"dup {n}"})
    app = app_for(db, fake)
    assert app.run_signup(5).state == "WroteSalesforceAppUserUid"  # its hook ran: the sweep leaves it alone
    db.profiles.insert_one({"id": 999, "first_name": "no email"})

    report = sweep_signups(app, source=profile_users)
    assert (report.users_read, report.signed_up, report.pending, report.batches) == (450, 1, 449, 3)
    assert fake.counts["collection_create"] == 2 and fake.counts["create"] == 1  # 398 created; the single signup
    assert fake.counts["query"] == 1 + 1  # one packed email lookup for all of them (+ the single signup's)
    assert report.api_requests == 3
    states = states_by_profile(db, signup.NAME)
    assert Counter(states.values()) == {"WroteSalesforceAppUserUid": 449, "WroteSalesforceErrorToDb": 1}
    assert report.counts.states == Counter(s for pid, s in states.items() if pid != 5)
    assert report.sources == {"adopted by email": len(migrated), "created": 449 - len(migrated) - 1}
    assert app.position(7, signup.NAME).detail["error"].startswith("2 App Users hold this email")
    for pid, app_user in migrated.items():
        assert db.profiles.find_one({"id": pid})["sf_app_user_id"] == app_user
    per_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert per_email["user7@example.org"] == 2
    assert {e for e, n in per_email.items() if n != 1} == {"user7@example.org"}
    assert len(fake.records(APP_USER)) == 450 - 1 + 2  # one per user, user 7's two, nothing else
    check_histories(db, signup.SPEC).assert_clean()

    again = sweep_signups(app, source=profile_users)
    assert (again.pending, again.signed_up, again.left_for_operator, again.api_requests) == (0, 449, 1, 0)


def test_each_record_error_is_its_own_profiles_state(db) -> None:
    with FakeSalesforce(unique_fields={APP_USER: ["Sefaria_App_Email__c"]}) as fake:
        seed_users(db, range(1, 11))
        db.profiles.update_one({"id": 4}, {"$set": {"email": "user3@example.org"}})  # two users, one email
        app = app_for(db, fake)
        report = sweep_signups(app, source=profile_users)
        assert report.counts.states == {"WroteSalesforceAppUserUid": 9, "WroteSalesforceErrorToDb": 1}
        failed = app.position(4, signup.NAME)
        assert failed.detail["error"].startswith("DUPLICATE_VALUE") and not failed.detail.get("outcome_unknown")
        assert db.profiles.find_one({"id": 4})["CrmLog"][0].startswith("NewUserSalesforceWriteError-")
        assert not signup.needs_signup(failed)  # a refusal waits for an operator, the sweep does not resend it
        assert fake.counts["collection_create"] == 1


def test_a_lost_answer_is_outcome_unknown_and_the_next_sweep_adopts_what_was_made(db, fake) -> None:
    seed_users(db, range(1, 31))
    app = app_for(db, fake)
    fake.inject(Fault.drop(processed=True), kind="collection_create")  # created, the answer lost
    first = sweep_signups(app, source=profile_users, batch_size=20)
    assert first.counts.states == {"WroteSalesforceErrorToDb": 20, "WroteSalesforceAppUserUid": 10}
    unknown = app.position(1, signup.NAME)
    assert unknown.detail["outcome_unknown"] and signup.needs_signup(unknown)
    assert fake.counts["collection_create"] == 2  # the lost one was not re-sent
    second = sweep_signups(app, source=profile_users)
    assert second.pending == 20 and second.sources == {"adopted by email": 20} and fake.counts["collection_create"] == 2
    assert set(app_users_by(fake, "Sefaria_App_Email__c").values()) == {1} and len(fake.records(APP_USER)) == 30
    check_histories(db, signup.SPEC).assert_clean()


def test_the_api_limit_halts_the_batch_and_a_later_sweep_finishes(db, fake) -> None:
    seed_users(db, range(1, 21))
    app = app_for(db, fake)
    fake.daily_limit = 1  # the email lookup, then the create is refused whole
    first = sweep_signups(app, source=profile_users)
    assert first.stopped and "API limit" in first.stopped and first.counts.outcomes == {"halted": 20}
    assert all(app.position(i, signup.NAME).claim is None for i in range(1, 21))  # released: nothing was sent
    assert len(fake.records(APP_USER)) == 0
    fake.daily_limit = 100_000
    assert sweep_signups(app, source=profile_users).counts.states == {"WroteSalesforceAppUserUid": 20}
    assert len(fake.records(APP_USER)) == 20


def test_with_an_external_id_field_the_batch_is_an_upsert_on_the_user_id(db, fake) -> None:
    seed_users(db, range(1, 6))
    app = app_for(db, fake, external_id_field="Sefaria_User_Id__c")
    report = sweep_signups(app, source=profile_users)
    assert report.counts.states == {"WroteSalesforceAppUserUid": 5}
    assert fake.counts["collection_upsert"] == 1 and fake.counts["collection_create"] == 0
    assert sorted(r["Sefaria_User_Id__c"] for r in fake.records(APP_USER)) == [str(i) for i in range(1, 6)]


def test_windows_older_than_dry_run_and_the_sources(db, fake, monkeypatch) -> None:
    seed_users(db, range(1, 6))
    seed_users(db, range(6, 9), date_joined=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
    app = app_for(db, fake)
    dry = sweep_signups(app, source=profile_users, older_than=600, dry_run=True)
    assert (dry.users_read, dry.pending) == (5, 5) and fake.total_requests == 0
    assert states_by_profile(db, signup.NAME) == {}
    window = Window(joined_after=dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc),
                    joined_before=dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc))
    assert sweep_signups(app, source=profile_users, window=window, limit=3).counts.states == \
        {"WroteSalesforceAppUserUid": 3}
    assert source_from_env({}) is profile_users
    monkeypatch.setattr(sys.modules[__name__], "only_two", lambda window, *, app: iter(
        [User(1, "user1@example.org"), User(4, "user4@example.org", lang="he")]), raising=False)
    custom = source_from_env({"CRM_STATES_USER_SOURCE": f"{__name__}:only_two"})
    assert sweep_signups(app, source=custom).counts.states == {"WroteSalesforceAppUserUid": 1}  # 1 was done
    assert fake.records(APP_USER)[-1]["Hebrew_English__c"] == "Hebrew"
    with pytest.raises(ValueError, match="CRM_STATES_USER_SOURCE"):
        source_from_env({"CRM_STATES_USER_SOURCE": "no.such:thing"})


def test_needs_signup_decides_from_the_position() -> None:
    def at(state: str | None, **detail) -> Position:
        return Position(state=state, detail=detail)

    assert signup.needs_signup(at(None)) and signup.needs_signup(at("RequestAddToSalesforce"))
    assert signup.needs_signup(at("LoggedDbFailure"))
    assert signup.needs_signup(at("WroteSalesforceErrorToDb", error="CrmTransientError: 503"))
    assert signup.needs_signup(at("WroteSalesforceErrorToDb", error="CrmReadTimeout: slow"))
    assert signup.needs_signup(at("WroteSalesforceErrorToDb", outcome_unknown=True, error="x"))
    assert not signup.needs_signup(at("WroteSalesforceErrorToDb", error="CrmRejected: REQUIRED_FIELD_MISSING"))
    assert not signup.needs_signup(at("WroteSalesforceAppUserUid"))


def test_the_django_user_source_reads_auth_user(tmp_path: Path) -> None:
    """In a process of its own: Django's settings are configured once per process."""
    script = textwrap.dedent("""
        import datetime as dt, django
        from django.conf import settings
        settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
                           INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes"], USE_TZ=True)
        django.setup()
        from django.core.management import call_command
        call_command("migrate", verbosity=0)
        from django.contrib.auth.models import User
        for i, day in ((3, 1), (1, 5), (2, 9)):
            u = User.objects.create(username=f"u{i}", email=f"u{i}@example.org", first_name="Ruth", id=i)
            User.objects.filter(id=i).update(date_joined=dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc))
        from crm_states.users import Window, django_users, source_from_env
        assert source_from_env({"CRM_STATES_USER_SOURCE": "django"}) is django_users
        users = list(django_users(Window(joined_after=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))))
        print([(u.id, u.email, u.first_name, u.joined.day) for u in users])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(1, 'u1@example.org', 'Ruth', 5), (2, 'u2@example.org', 'Ruth', 9)]"


def test_the_command_prints_what_the_database_holds(db, mongo_url, fake, tmp_path) -> None:
    seed_users(db, range(1, 251))
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "user9@example.org"})
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(tmp_path / "j.jsonl"),
           "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crm_states.cli", "signup", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    for wrong in (["--pending", "--email", "x@example.org"], ["--user-id", "3", "--older-than", "60"], []):
        refused = cli(*wrong)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    env["CRM_TYPE"] = ""  # a dry run needs no CRM
    dry = cli("--pending", "--dry-run")
    assert dry.returncode == 0 and "250 users would be signed up" in dry.stdout and fake.total_requests == 0
    env["CRM_TYPE"] = "SALESFORCE"
    stopped = cli("--pending", "--max-api-calls", "2")  # pays for one lookup and one create of 200
    assert stopped.returncode == 4 and "stopped: --max-api-calls 2 reached (2 API requests spent)" in stopped.stdout
    assert "200 of the 250 users found so far signed up" in stopped.stdout
    done = cli("--pending", "--older-than", "3600")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "250 users read from profiles: 200 have an app user" in done.stdout
    assert "50 of the 50 users found signed up" in done.stdout and "(2 API requests, 1 batch)" in done.stdout
    states = Counter(states_by_profile(db, signup.NAME).values())
    assert states == {"WroteSalesforceAppUserUid": 250}
    assert re.search(r"^  WroteSalesforceAppUserUid +50$", done.stdout, re.M)
    assert "app users: 1 adopted by email, 199 created" in stopped.stdout
    assert len(fake.records(APP_USER)) == 250
