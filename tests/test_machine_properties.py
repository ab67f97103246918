"""Hypothesis: for random CRM outcomes x DB failures at each write, every persisted history is a path of
the diagram from [*], the final state is the one the outcomes imply, and the side effects match it.

Runs on mongomock for speed (one profile at a time, so no bulk_write); tests/test_store_mongo.py shows
the same machinery on a real server. ``Commits`` models the store's protocol: a step's guarded profile
write (an update of ``profiles``) comes first, then its position (an update of ``crm_positions``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mongomock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.crm import CrmError, CrmRejected, CrmTransientError
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.store import POSITIONS, Store
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import FlakyDatabase, WritePlan, assert_history_is_path, expect_commits

CRM_FAILURES = {
    "5xx": lambda: CrmTransientError("503 Service Unavailable", status=503),
    "timeout": lambda: CrmTransientError("timeout on GET /services/data/v60.0/query"),
    "malformed": lambda: CrmError("malformed JSON in response"),
    "rejected": lambda: CrmRejected("400 MALFORMED_QUERY", status=400),
    "bug": lambda: RuntimeError("unexpected bug"),
}
DB_FAULTS = st.sets(st.sampled_from([(POSITIONS, "update", 1), (POSITIONS, "update", 2), (POSITIONS, "update", 3),
                                     ("profiles", "update", 1), ("profiles", "update", 2)]), max_size=3)


NB_SUCCESS = {"OkResponse": "WroteSalesforceAppUserUid", "NotFound": "WroteNotFound",
              "UnexpectedResponse": "WroteUnexpectedResponse"}
NB_FAILURE = {"OkResponse": "DbWriteOkErrorLogged", "NotFound": "DbWriteNotFoundErrorLogged",
              "UnexpectedResponse": "DbWriteUnexpectedResFailure"}
NB_LOG = {"WroteNotFound": "NbProfileNotFoundInSalesforce-", "WroteUnexpectedResponse": "NbProfileUnexpectedRes-"}


def _world(faults: set, journal_dir: str) -> tuple[CrmStates, InMemoryCrm, Store, WritePlan]:
    raw = mongomock.MongoClient().db
    plan = WritePlan(faults)
    crm = InMemoryCrm()
    Store(raw).ensure_indexes()
    app = CrmStates(store=Store(FlakyDatabase(raw, plan)), crm=crm, journal=Journal(Path(journal_dir) / "j.jsonl"))
    return app, crm, Store(raw), plan


def _check_common(spec, clean: Store, profile_id: int, journal: Path, expected_final: str | None) -> None:
    history = clean.history(profile_id, spec.name)
    assert_history_is_path(spec, history)
    persisted = clean.position(profile_id, spec.name).state
    assert persisted == (history[-1].dest if history else None)
    entries = list(read_entries(journal.read_text().splitlines())) if journal.exists() else []
    assert (len(entries) == 1) == (expected_final in spec.db_failure_states)
    assert len(entries) <= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crm_outcome=st.sampled_from(["found", "absent", *CRM_FAILURES]), faults=DB_FAULTS,
       junk_id=st.booleans())
def test_nb_validation_histories_are_diagram_paths(crm_outcome: str, faults: set, junk_id: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        clean.profiles.insert_one({"id": 7, "nationbuilder_id": "n/a" if junk_id else 4242})
        if crm_outcome == "found":
            app_user = crm.add_app_user(nationbuilder_id=4242)
        elif crm_outcome != "absent":
            crm.fail_next(CRM_FAILURES[crm_outcome]())

        result = app.validate_profile(7)

        # The lookup is a read, so a run's transitions are committed once, with the outcome and its
        # write; if that fails, a second commit takes the DB-failure edge.
        if junk_id:
            assert crm.calls == []
            expected, persisted_expected, commits = expect_commits(faults, [(False, False)], "", ["ScriptFailureLogged"])
            if expected is None:
                assert result.outcome == "interrupted"
        else:
            mid = {"found": "OkResponse", "absent": "NotFound"}.get(crm_outcome, "UnexpectedResponse")
            expected, persisted_expected, commits = expect_commits(faults, [(True, True)], NB_FAILURE[mid],
                                                                  [NB_SUCCESS[mid]])
        if expected is not None:
            assert result.state == expected
        journal = Path(tmp) / "j.jsonl"
        _check_common(nb.SPEC, clean, 7, journal, expected)
        profile = clean.get_profile(7)
        assert clean.position(7, nb.NAME).state == persisted_expected
        if persisted_expected == "ScriptFailureLogged":
            error = clean.position(7, nb.NAME).detail["error"]
            assert "nationbuilder_id must be a positive integer below 2**63, got 'n/a'" in error
        profile_written = commits.profile_writes[:1] == [True]
        assert ("sf_app_user_id" in profile) == (profile_written and mid == "OkResponse" if not junk_id else False)
        if crm_outcome == "found" and profile_written:
            assert profile["sf_app_user_id"] == app_user
        logs = profile.get("CrmLog", [])
        wrote_log = not junk_id and profile_written and NB_SUCCESS[mid] in NB_LOG
        assert len(logs) == (1 if wrote_log else 0)
        if logs:
            assert logs[0].startswith(NB_LOG[NB_SUCCESS[mid]])

        if expected in nb.SPEC.db_failure_states:
            # The journal restores what Mongo refused; a second replay changes nothing.
            assert replay_file(clean, journal).applied == 1
            second = replay_file(clean, journal)
            assert (second.applied, second.unchanged) == (0, 1)
            profile = clean.get_profile(7)
            assert clean.position(7, nb.NAME).state == expected
            if expected == "DbWriteOkErrorLogged":
                assert profile["sf_app_user_id"] == app_user
            assert_history_is_path(nb.SPEC, clean.history(7, nb.NAME))
            # Resuming writes the journaled result without asking the CRM again.
            plan.failing.clear()
            calls = len(crm.calls)
            resumed = app.validate_profile(7, restart=True)
            if expected == "DbWriteOkErrorLogged":
                assert resumed.state == "WroteSalesforceAppUserUid"
                assert len(crm.calls) == calls
            assert_history_is_path(nb.SPEC, clean.history(7, nb.NAME))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crm_outcome=st.sampled_from(["ok", "bad_email", *CRM_FAILURES]), faults=DB_FAULTS)
def test_signup_histories_are_diagram_paths(crm_outcome: str, faults: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        clean.profiles.insert_one({"id": 9})
        if crm_outcome in CRM_FAILURES:
            crm.fail_next(CRM_FAILURES[crm_outcome]())
        email = 12345 if crm_outcome == "bad_email" else "new.user@example.org"

        result = app.run_signup(9, email=email, first_name="Shira", last_name="O'Neil")  # type: ignore[arg-type]

        creates = [c for c in crm.calls if c[0] == "add_user_to_crm"]
        mid = "OK" if crm_outcome == "ok" else "UnexpectedResponse"
        final = {"OK": "WroteSalesforceAppUserUid", "UnexpectedResponse": "WroteSalesforceErrorToDb"}[mid]
        # Commit 1 is write-ahead (the position only, before the create); commit 2 writes the outcome.
        expected, persisted_expected, commits = expect_commits(faults, [(False, False), (True, True)],
                                                               "LoggedDbFailure", ["RequestAddToSalesforce", final])
        if expected is None:
            assert result.outcome == "interrupted" and creates == []
        else:
            assert result.state == expected
            assert len(creates) == (0 if crm_outcome == "bad_email" else 1)
            if creates:
                assert creates[0][1][5] == 9  # external_id: the Sefaria user id, for idempotent create
        journal = Path(tmp) / "j.jsonl"
        _check_common(signup.SPEC, clean, 9, journal, expected)
        profile = clean.get_profile(9)
        assert clean.position(9, signup.NAME).state == persisted_expected
        profile_written = commits.profile_writes[:1] == [True]
        assert ("sf_app_user_id" in profile) == (profile_written and mid == "OK")
        logs = profile.get("CrmLog", [])
        assert len(logs) == (1 if profile_written and mid == "UnexpectedResponse" else 0)
        if logs:
            assert logs[0].startswith("NewUserSalesforceWriteError-")
            assert ": " in logs[0]

        if expected == "LoggedDbFailure":
            plan.failing.clear()
            assert replay_file(clean, journal).applied == 1
            assert replay_file(clean, journal).applied == 0
            created = len(crm.app_users)
            resumed = app.run_signup(9, email="new.user@example.org", restart=True)
            assert resumed.state in ("WroteSalesforceAppUserUid", "WroteSalesforceErrorToDb")
            assert len(crm.app_users) == 1 and created <= 1  # never a second app user
            if created:
                assert resumed.state == "WroteSalesforceAppUserUid"
                assert clean.get_profile(9)["sf_app_user_id"] == next(iter(crm.app_users))
            assert_history_is_path(signup.SPEC, clean.history(9, signup.NAME))
