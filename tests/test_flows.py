"""The change-email, mark-as-spam and mailing-list flows (issue 5).

Hypothesis, as in tests/test_machine_properties.py: for random CRM outcomes x DB failures at each write,
every persisted history is a path of the diagram from [*], the final state is the one the outcomes imply,
the CRM side effects match it, and there is a journal entry iff the run ended in the DB-failure state
(whose replay is idempotent and whose resume records the CRM's OK without a second request).

Then each flow end to end: FakeSalesforce over HTTP, MongoDB on the real wire-protocol server, and the
operator's ``replay``, ``resume`` and ``report`` commands for its DB-failure state.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.cli import main
from crm_states.crm import CrmLimitExceeded, RetryPolicy, SalesforceConnectionManager
from crm_states.crm.memory import InMemoryCrm
from crm_states.crm.salesforce import TokenCache
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.store import POSITIONS, Store
from crm_states.testing import Fault, FakeSalesforce
from machines import change_email, mailing_list_signup, mark_as_spam
from tests.faults import FlakyDatabase, WritePlan, assert_history_is_path, expect_commits
from tests.test_machine_properties import CRM_FAILURES, DB_FAULTS, _check_common

APP_USER, APP_DATA = "Sefaria_App_User__c", "Sefaria_App_Data__c"
OLD_EMAIL, NEW_EMAIL = "old@example.org", "new.address@example.org"
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OUTCOMES = [*CRM_FAILURES, "limit"]


class ReviewCrm(InMemoryCrm):
    """The in-memory CRM, with "mark for review" told apart from "mark as spam"."""

    def mark_for_review_in_crm(self, crm_id: str) -> None:
        self._call("mark_for_review_in_crm", crm_id)
        self.app_users[crm_id]["review"] = True


def _world(faults: set, journal_dir: str) -> tuple[CrmStates, ReviewCrm, Store, WritePlan]:
    raw = mongomock.MongoClient().db
    plan = WritePlan(faults)
    crm = ReviewCrm()
    app = CrmStates(store=Store(FlakyDatabase(raw, plan)), crm=crm, journal=Journal(Path(journal_dir) / "j.jsonl"),
                    claim_wait=0)
    return app, crm, Store(raw), plan


def _expected(faults: set, spec: Any, request: str, answered: str, success: str, error: str,
              writes_error: bool = True) -> tuple[Any, Any, Any]:
    """(the state the run ends in, the state persisted, the writes) for a write-ahead flow: commit 1 is the
    write-ahead (a failure interrupts the run before the CRM is called), commit 2 the result with its
    write (OK writes nothing to the profile; an error its CrmLog line, when there is a profile), and a
    failed commit 2 takes the DB-failure edge."""
    if answered == "halted":
        expected, persisted, commits = expect_commits(faults, [(False, False)], "LoggedDbFailure", [request])
        return (None if expected is None else request), persisted, commits
    final = success if answered == "OK" else error
    writes = answered != "OK" and writes_error
    return expect_commits(faults, [(False, False), (writes, True)], "LoggedDbFailure", [request, final])


def _check_run(spec: Any, result: Any, clean: Store, pid: int, journal: Path, expected: Any, persisted: Any,
               code: str, commits: Any) -> dict[str, Any]:
    if expected is None:
        assert result.outcome == "interrupted"
    elif persisted == expected and expected in spec.terminal:
        assert result.state == expected and result.finished
    _check_common(spec, clean, pid, journal, expected)
    profile = clean.get_profile(pid) or {}
    assert clean.position(pid, spec.name).state == persisted
    logs = profile.get("CrmLog", [])
    assert len(logs) == (1 if commits.profile_writes[:1] == [True] else 0)
    if logs:
        assert logs[0].startswith(f"{code}-") and ": " in logs[0]
    return profile


def _replay_and_resume(spec: Any, app: CrmStates, crm: InMemoryCrm, clean: Store, plan: WritePlan, pid: int,
                       journal: Path, answered: str, method: str, success: str, error: str) -> None:
    """The DB-failure state: replay restores what Mongo refused (twice = once); ``resume`` (the CLI's
    redrive) records an OK without asking the CRM again, and asks again after an unexpected response."""
    plan.failing.clear()
    replay_file(clean, journal)
    again = replay_file(clean, journal)
    assert (again.applied, again.unchanged) == (0, 1)
    assert clean.position(pid, spec.name).state == "LoggedDbFailure"
    assert_history_is_path(spec, clean.history(pid, spec.name))
    sent = [c for c in crm.calls if c[0] == method]
    [resumed] = app.redrive(spec.name, [clean.get_profile(pid) or {"id": pid}])
    resent = [c for c in crm.calls if c[0] == method][len(sent):]
    if answered == "OK":
        assert resumed.state == success and resent == []
    else:
        assert resumed.state in (success, error)
        assert (resumed.state == success) == bool(resent)
    assert_history_is_path(spec, clean.history(pid, spec.name))


# --- change_email ----------------------------------------------------------------------------------


@PROPERTY
@given(crm_outcome=st.sampled_from(["ok", "no_crm_id", "bad_email", *OUTCOMES]), faults=DB_FAULTS)
def test_change_email_histories_are_diagram_paths(crm_outcome: str, faults: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        app_user = crm.add_app_user(email=OLD_EMAIL)
        profile = {"id": 9} if crm_outcome == "no_crm_id" else {"id": 9, "sf_app_user_id": app_user}
        clean.profiles.insert_one(profile)
        if crm_outcome in CRM_FAILURES:
            crm.fail_next(CRM_FAILURES[crm_outcome]())
        elif crm_outcome == "limit":
            crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED", status=403))
        email = 12345 if crm_outcome == "bad_email" else NEW_EMAIL

        result = app.change_email(9, email)  # type: ignore[arg-type]

        sends = crm_outcome not in ("no_crm_id", "bad_email")
        answered = {"ok": "OK", "no_lists": "OK", "limit": "halted"}.get(crm_outcome, "UnexpectedResponse")
        expected, persisted, commits = _expected(faults, change_email.SPEC, "RequestEmailChangeInSalesforce",
                                                 answered, "WroteEmailChange", "WroteSalesforceErrorToDb")
        calls = [c for c in crm.calls if c[0] == "change_user_email"]
        assert calls == ([("change_user_email", (app_user, NEW_EMAIL))] if sends and expected else [])
        assert crm.app_users[app_user]["email"] == (NEW_EMAIL if crm_outcome == "ok" and expected else OLD_EMAIL)
        if answered == "halted" and expected:
            assert result.outcome == "halted" and "API limit" in (result.error or "")
        journal = Path(tmp) / "j.jsonl"
        doc = _check_run(change_email.SPEC, result, clean, 9, journal, expected, persisted,
                         "EmailChangeSalesforceWriteError", commits)
        # The CRM id does not change and nothing but the run's own fields is written.
        assert doc.get("sf_app_user_id") == profile.get("sf_app_user_id")
        assert set(doc) <= {"_id", "id", "sf_app_user_id", "CrmLog"}
        if persisted in ("WroteEmailChange", "WroteSalesforceErrorToDb"):
            assert clean.position(9, change_email.NAME).detail["new_email"] == email

        if expected == "LoggedDbFailure":
            _replay_and_resume(change_email.SPEC, app, crm, clean, plan, 9, journal, answered, "change_user_email",
                               "WroteEmailChange", "WroteSalesforceErrorToDb")
        if answered == "halted" and expected:
            # The run stopped at its write-ahead state and released its claim (nothing was sent): the next
            # call finishes it (one more request). If that release was refused too, the claim stands until it
            # expires: the next call sends nothing and says the run is claimed.
            released = (POSITIONS, "update", 2) not in faults
            plan.failing.clear()
            again = app.change_email(9, NEW_EMAIL)
            if released:
                assert again.state == "WroteEmailChange"
                assert crm.app_users[app_user]["email"] == NEW_EMAIL
            else:
                assert again.outcome == "claimed" and "holds this run" in again.error
                assert [c for c in crm.calls if c[0] == "change_user_email"] == calls
            assert_history_is_path(change_email.SPEC, clean.history(9, change_email.NAME))


# --- mark_as_spam ------------------------------------------------------------------------------------


@PROPERTY
@given(crm_outcome=st.sampled_from(["ok", "no_crm_id", *OUTCOMES]), review=st.booleans(), faults=DB_FAULTS)
def test_mark_as_spam_histories_are_diagram_paths(crm_outcome: str, review: bool, faults: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        app_user = crm.add_app_user(email=OLD_EMAIL)
        clean.profiles.insert_one({"id": 4} if crm_outcome == "no_crm_id" else {"id": 4, "sf_app_user_id": app_user})
        if crm_outcome in CRM_FAILURES:
            crm.fail_next(CRM_FAILURES[crm_outcome]())
        elif crm_outcome == "limit":
            crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED", status=403))

        result = app.mark_as_spam(4, review=review)

        method = "mark_for_review_in_crm" if review else "mark_as_spam_in_crm"
        answered = {"ok": "OK", "no_lists": "OK", "limit": "halted"}.get(crm_outcome, "UnexpectedResponse")
        expected, persisted, commits = _expected(faults, mark_as_spam.SPEC, "RequestMarkAsSpamInCrm", answered,
                                                 "WroteMarkedAsSpam", "WroteCrmErrorToDb")
        sent = crm_outcome != "no_crm_id" and expected is not None
        assert crm.calls == ([(method, (app_user,))] if sent else [])
        done = crm_outcome == "ok" and expected is not None
        assert crm.app_users[app_user].get("spam", False) == (done and not review)
        assert crm.app_users[app_user].get("review", False) == (done and review)
        journal = Path(tmp) / "j.jsonl"
        doc = _check_run(mark_as_spam.SPEC, result, clean, 4, journal, expected, persisted,
                         "SpamMarkCrmWriteError", commits)
        assert set(doc) <= {"_id", "id", "sf_app_user_id", "CrmLog"}
        if persisted in ("WroteMarkedAsSpam", "WroteCrmErrorToDb"):
            detail = clean.position(4, mark_as_spam.NAME).detail
            assert detail["action"] == ("mark_for_review" if review else "mark_as_spam")
        if doc.get("CrmLog"):
            assert doc["CrmLog"][0].split(": ", 1)[1].startswith("mark_for_review" if review else "mark_as_spam")

        if expected == "LoggedDbFailure":
            _replay_and_resume(mark_as_spam.SPEC, app, crm, clean, plan, 4, journal, answered, method,
                               "WroteMarkedAsSpam", "WroteCrmErrorToDb")


# --- mailing_list_signup -------------------------------------------------------------------------------


@PROPERTY
@given(crm_outcome=st.sampled_from(["ok", "no_lists", *OUTCOMES]), with_profile=st.booleans(), faults=DB_FAULTS)
def test_mailing_list_signup_histories_are_diagram_paths(crm_outcome: str, with_profile: bool, faults: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        email, lists = "Reader@Example.org", ([] if crm_outcome == "no_lists" else ["Weekly Parasha", "Daf Yomi"])
        if with_profile:
            clean.profiles.insert_one({"id": 21})
        if crm_outcome in CRM_FAILURES:
            crm.fail_next(CRM_FAILURES[crm_outcome]())
        elif crm_outcome == "limit":
            crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED", status=403))
        pid = 21 if with_profile else mailing_list_signup.signup_id(email)
        assert pid > 0 if with_profile else pid < 0

        result = app.subscribe(email, lists, profile_id=21 if with_profile else None, first_name="Noa")

        assert result.profile_id == pid
        answered = {"ok": "OK", "no_lists": "OK", "limit": "halted"}.get(crm_outcome, "UnexpectedResponse")
        expected, persisted, commits = _expected(faults, mailing_list_signup.SPEC, "RequestAddToMailingLists",
                                                 answered, "WroteMailingListSignup", "WroteSalesforceErrorToDb",
                                                 writes_error=with_profile)
        sent = expected is not None  # no lists is a signup to the default lists: sent too
        assert crm.calls == ([("add_email_to_mailing_lists", (email, tuple(lists)))] if sent else [])
        subscribed = crm_outcome in ("ok", "no_lists") and expected is not None
        assert all((email in crm.mailing_lists.get(name, set())) == subscribed for name in lists)
        journal = Path(tmp) / "j.jsonl"
        _check_run(mailing_list_signup.SPEC, result, clean, pid, journal, expected, persisted,
                   "MailingListSignupSalesforceWriteError", commits)
        if not with_profile:  # a signup without an account lives in our collection only
            assert clean.get_profile(pid) is None
        if persisted in ("WroteMailingListSignup", "WroteSalesforceErrorToDb"):
            detail = clean.position(pid, mailing_list_signup.NAME).detail
            assert (detail["email"], detail["lists"], detail["first_name"]) == (email, lists, "Noa")

        if expected == "LoggedDbFailure":
            _replay_and_resume(mailing_list_signup.SPEC, app, crm, clean, plan, pid, journal, answered,
                               "add_email_to_mailing_lists", "WroteMailingListSignup", "WroteSalesforceErrorToDb")


def test_signup_id_is_stable_negative_and_case_blind() -> None:
    one = mailing_list_signup.signup_id("Reader@Example.org ")
    assert one == mailing_list_signup.signup_id(" reader@example.ORG") < 0
    assert one != mailing_list_signup.signup_id("other@example.org")
    assert -(2**63) < one
    with pytest.raises(ValueError):
        mailing_list_signup.signup_id("  ")


def test_a_second_request_after_a_half_done_one_finishes_it_first() -> None:
    """A run stopped at its write-ahead state (a crash, the API limit) is finished before a different
    request starts; the same request again is answered by finishing the stopped run."""
    raw = mongomock.MongoClient().db
    crm = InMemoryCrm()
    app = CrmStates(store=Store(raw), crm=crm)
    app_user = crm.add_app_user(email=OLD_EMAIL)
    raw.profiles.insert_one({"id": 3, "sf_app_user_id": app_user})
    crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED"))
    assert app.change_email(3, "first@example.org").outcome == "halted"
    assert app.change_email(3, "second@example.org").state == "WroteEmailChange"
    sent = [args[1] for name, args in crm.calls if name == "change_user_email"]
    assert sent == ["first@example.org", "first@example.org", "second@example.org"]
    assert crm.app_users[app_user]["email"] == "second@example.org"
    crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED"))
    assert app.change_email(3, "third@example.org").outcome == "halted"
    assert app.change_email(3, "third@example.org").state == "WroteEmailChange"
    assert [args[1] for name, args in crm.calls if name == "change_user_email"][-2:] == ["third@example.org"] * 2
    assert_history_is_path(change_email.SPEC, app.history(3, change_email.NAME))


def test_bad_arguments_are_refused_before_anything_is_touched() -> None:
    raw = mongomock.MongoClient().db
    app = CrmStates(store=Store(raw), crm=InMemoryCrm())
    with pytest.raises(TypeError):
        app.subscribe("", ["Weekly"])
    with pytest.raises(TypeError):
        app.subscribe("a@example.org", "Weekly")
    with pytest.raises(TypeError):
        app.change_email("3", NEW_EMAIL)  # type: ignore[arg-type]
    assert raw.profiles.count_documents({}) == 0 and app.crm.calls == []


# --- end to end: FakeSalesforce over HTTP, the real wire-protocol server --------------------------------

FAST = RetryPolicy(attempts=3, base_delay=0.0, read_timeout=1.0)


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


def _client(fake: FakeSalesforce) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST,
                                       sleep=lambda s: None, token_cache=TokenCache())


def test_change_email_over_http(db, fake: FakeSalesforce) -> None:
    app_user = fake.insert(APP_USER, {"Sefaria_App_Email__c": OLD_EMAIL})
    db.profiles.insert_many([{"id": 1, "sf_app_user_id": app_user}, {"id": 2}])
    app = CrmStates.open(db, _client(fake))

    assert app.change_email(1, "חדש@example.org").state == "WroteEmailChange"
    record = fake.record(APP_USER, app_user)
    assert record["Sefaria_App_Email__c"] == "חדש@example.org"
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == app_user  # the id does not change

    fake.inject(Fault.error(400), times=1, kind="update")
    assert app.change_email(1, "refused@example.org").state == "WroteSalesforceErrorToDb"
    [line] = db.profiles.find_one({"id": 1})["CrmLog"]
    assert line.startswith("EmailChangeSalesforceWriteError-") and "CrmRejected" in line

    updates = fake.counts["update"]
    assert app.change_email(2, NEW_EMAIL).state == "WroteSalesforceErrorToDb"  # no sf_app_user_id: nothing sent
    assert fake.counts["update"] == updates
    assert "the profile has no sf_app_user_id" in db.profiles.find_one({"id": 2})["CrmLog"][0]
    assert_history_is_path(change_email.SPEC, app.history(1, change_email.NAME))


def test_mark_as_spam_and_for_review_over_http(db, fake: FakeSalesforce) -> None:
    spam = fake.insert(APP_USER, {"Sefaria_App_Email__c": "spam@example.org"})
    other = fake.insert(APP_USER, {"Sefaria_App_Email__c": "other@example.org"})
    db.profiles.insert_many([{"id": 1, "sf_app_user_id": spam}, {"id": 2, "sf_app_user_id": other}])
    app = CrmStates.open(db, _client(fake))
    assert app.mark_as_spam(1).state == "WroteMarkedAsSpam"
    assert app.mark_as_spam(2, review=True).state == "WroteMarkedAsSpam"
    # Salesforce has no spam action: both set Manual_Review_Required__c (the client's business).
    assert fake.record(APP_USER, spam)["Manual_Review_Required__c"] is True
    assert fake.record(APP_USER, other)["Manual_Review_Required__c"] is True
    assert app.position(2, mark_as_spam.NAME).detail["action"] == "mark_for_review"
    fake.inject(Fault.error(503), times=3, kind="update")
    assert app.mark_as_spam(1).state == "WroteCrmErrorToDb"
    assert "503" in db.profiles.find_one({"id": 1})["CrmLog"][0]


def test_mailing_list_signup_over_http_with_and_without_a_profile(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_one({"id": 8})
    app = CrmStates.open(db, _client(fake))
    anonymous = app.subscribe("reader@example.org", ["Weekly Parasha"], lang="he")
    signed_in = app.subscribe("member@example.org", ["Daf Yomi"], profile_id=8, first_name="Avi", educator=True)
    assert anonymous.state == signed_in.state == "WroteMailingListSignup"
    assert anonymous.profile_id == mailing_list_signup.signup_id("reader@example.org") < 0
    payloads = [json.loads(r["JSON_STRING__c"]) for r in fake.records(APP_DATA)]
    assert [(p["Sefaria_App_Email__c"], p["Newsletter_Names__c"], p["Hebrew_English__c"]) for p in payloads] == [
        ("reader@example.org", ["Weekly Parasha"], "Hebrew"), ("member@example.org", ["Daf Yomi"], "English")]
    assert payloads[1]["First_Name__c"] == "Avi" and payloads[1]["Educator__c"] is True
    assert fake.records(APP_USER) == []  # email only: no app user is made
    # A second signup of the same address is a new run under the same id; Sefaria's profiles are untouched.
    assert app.subscribe("Reader@Example.org", ["Daf Yomi"]).profile_id == anonymous.profile_id
    assert db.profiles.count_documents({}) == 1
    assert [t.dest for t in app.history(anonymous.profile_id, mailing_list_signup.NAME)].count("WroteMailingListSignup") == 2
    assert_history_is_path(mailing_list_signup.SPEC, app.history(anonymous.profile_id, mailing_list_signup.NAME))


FLOWS = {
    "change_email": dict(kind="update", success="WroteEmailChange", spec=change_email.SPEC,
                         run=lambda app, pid: app.change_email(pid, NEW_EMAIL)),
    "mark_as_spam": dict(kind="update", success="WroteMarkedAsSpam", spec=mark_as_spam.SPEC,
                         run=lambda app, pid: app.mark_as_spam(pid)),
    "mailing_list_signup": dict(kind="create", success="WroteMailingListSignup", spec=mailing_list_signup.SPEC,
                                run=lambda app, pid: app.subscribe("x@example.org", ["Weekly"], profile_id=pid)),
}


@pytest.mark.parametrize("name", list(FLOWS))
def test_db_failure_then_replay_resume_and_report_through_the_cli(name: str, db, fake: FakeSalesforce,
                                                                   mongo_url: str, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """The CRM answers OK and the database refuses the result: LoggedDbFailure, journaled. The operator's
    ``replay`` twice equals once, ``resume`` records the OK without a second CRM request, and ``report``
    counts the machine's states, all unchanged commands."""
    flow = FLOWS[name]
    app_user = fake.insert(APP_USER, {"Sefaria_App_Email__c": OLD_EMAIL})
    db.profiles.insert_one({"id": 5, "sf_app_user_id": app_user})
    journal = tmp_path / "journal.jsonl"
    flaky = CrmStates.open(FlakyDatabase(db, WritePlan({(POSITIONS, "update", 2)})), _client(fake),
                           journal_path=str(journal))
    result = flow["run"](flaky, 5)
    assert result.state == "LoggedDbFailure" and result.journaled
    assert fake.counts[flow["kind"]] == 1
    [entry] = list(read_entries(journal.read_text().splitlines()))
    assert entry.machine == name and entry.transitions[-1].dest == "LoggedDbFailure"

    for key, value in {"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url,
                       "SALESFORCE_CLIENT_ID": fake.client_id, "SALESFORCE_CLIENT_SECRET": fake.client_secret,
                       "CRM_STATES_JOURNAL": str(journal)}.items():
        monkeypatch.setenv(key, value)
    base = ["--mongo-url", mongo_url, "--db", db.name]
    assert main(["replay", str(journal), *base]) == 0
    assert main(["replay", str(journal), *base]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"1 journal entries in {journal}: 0 applied now, 1 already applied (replay restores the " \
                      f"journaled history and profile data)"
    assert out[-1] == f"  1 of their profiles stay in LoggedDbFailure ({name}) until `crm-states resume --machine " \
                      f"{name} --state LoggedDbFailure` moves them on"
    assert main(["resume", "--machine", name, "--state", "LoggedDbFailure", *base]) == 0
    resumed = capsys.readouterr().out
    assert "1 profiles in LoggedDbFailure re-driven:" in resumed and flow["success"] in resumed
    assert fake.counts[flow["kind"]] == 1  # no second request
    assert main(["report", "--json", "--machine", name, *base]) == 0
    states = json.loads(capsys.readouterr().out)[name]
    assert states[flow["success"]]["count"] == 1 and states["LoggedDbFailure"]["count"] == 0
    assert states["LoggedDbFailure"]["kind"] == "db failure" and states[flow["success"]]["kind"] == "final"
    assert_history_is_path(flow["spec"], Store(db).history(5, name))
