"""The sustainer sync (issue 5): the sync_sustainers machine under hypothesis (random CRM answers x DB
failures), then ``crm_states.sustainers.sync_sustainers`` against FakeSalesforce over HTTP on the real
wire-protocol server: whole-set read first (a read failing on its second page changes nothing), only
differences written, in bulk batches, a second run changes nothing, the demotion guard and ``--force``,
the DB-failure state resumed through the CLI, and ``crm-states sync-sustainers`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mongomock
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient, monitoring

from crm_states.api import CrmStates
from crm_states.cli import main
from crm_states.crm import CrmLimitExceeded, RetryPolicy, SalesforceConnectionManager
from crm_states.crm.memory import InMemoryCrm
from crm_states.crm.salesforce import TokenCache
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.store import POSITIONS, Store
from crm_states.sustainers import sync_sustainers
from crm_states.testing import Fault, FakeSalesforce
from machines import sync_sustainers as machine
from tests.faults import FlakyDatabase, WritePlan, assert_history_is_path, expect_commits
from tests.test_machine_properties import CRM_FAILURES, DB_FAULTS, _check_common

APP_USER = "Sefaria_App_User__c"
FAST = RetryPolicy(attempts=3, base_delay=0.0, read_timeout=1.0)
SPEC = machine.SPEC


# --- the machine, under hypothesis ---------------------------------------------------------------------


def _world(faults: set, tmp: str) -> tuple[CrmStates, InMemoryCrm, Store, WritePlan]:
    raw = mongomock.MongoClient().db
    plan = WritePlan(faults)
    crm = InMemoryCrm()
    app = CrmStates(store=Store(FlakyDatabase(raw, plan)), crm=crm, journal=Journal(Path(tmp) / "j.jsonl"))
    return app, crm, Store(raw), plan


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["sync", "resume"]), read=st.sampled_from(["ok", "limit", *CRM_FAILURES]),
       member=st.booleans(), was=st.sampled_from([True, False, None]), has_crm_id=st.booleans(), faults=DB_FAULTS)
def test_sync_sustainers_histories_are_diagram_paths(mode: str, read: str, member: bool, was: bool | None,
                                                     has_crm_id: bool, faults: set) -> None:
    """``sync``: the sync function over one profile. ``resume``: the machine driven without an input, as
    ``crm-states resume`` does, so that it reads the set itself (and can meet an unexpected response)."""
    with tempfile.TemporaryDirectory() as tmp:
        app, crm, clean, plan = _world(faults, tmp)
        app_user = crm.add_app_user(email="s@example.org")
        crm.sustainers = {app_user} if member else {"a0Bsomeone-else"}
        profile = {"id": 6}
        if has_crm_id:
            profile["sf_app_user_id"] = app_user
        if was is not None:
            profile["is_sustainer"] = was
        clean.profiles.insert_one(dict(profile))
        if read == "limit":
            crm.fail_next(CrmLimitExceeded("REQUEST_LIMIT_EXCEEDED", status=403))
        elif read in CRM_FAILURES:
            crm.fail_next(CRM_FAILURES[read]())
        journal = Path(tmp) / "j.jsonl"

        if mode == "sync":
            report = sync_sustainers(app, max_demote_share=1.0)
            assert [c[0] for c in crm.calls] == ["get_sustainers"]
            if read != "ok":
                # The whole set could not be read: nothing changes, and the report says so.
                assert report.read_failed and report.read_limit == (read == "limit")
                assert clean.positions.count_documents({}) == 0 and clean.get_profile(6) == {
                    **profile, "_id": clean.get_profile(6)["_id"]}
                return
            differs = has_crm_id and bool(was) != member
            assert (report.to_promote, report.to_demote) == ((int(differs and member), int(differs and not member)))
            if not differs:
                assert sum(report.outcomes.values()) == 0 and clean.positions.count_documents({}) == 0
                return
            answered, result_state = "OK", None
        else:
            before = len(crm.calls)
            [result] = app.redrive(machine.NAME, [clean.get_profile(6)])
            asked = crm.calls[before:]
            assert [c[0] for c in asked] == (["get_sustainers"] if has_crm_id else [])
            if has_crm_id and read == "limit":
                # The API limit halts the batch; a read commits nothing before its outcome.
                assert result.outcome == "halted" and clean.positions.count_documents({}) == 0
                return
            answered = "OK" if has_crm_id and read == "ok" else "UnexpectedResponse"
            result_state = result.state

        success = "WroteSustainerStatus" if answered == "OK" else "WroteUnexpectedResponse"
        # A read: one commit holds the whole path with its profile write; if it fails, the next takes the
        # DB-failure edge.
        expected, persisted, commits = expect_commits(faults, [(True, True)], "LoggedDbFailure", [success])
        if result_state is not None:
            assert result_state == expected
        _check_common(SPEC, clean, 6, journal, expected)
        doc = clean.get_profile(6)
        assert clean.position(6, machine.NAME).state == persisted
        written = commits.profile_writes == [True]
        assert doc.get("is_sustainer") == (member if written and answered == "OK" else was)
        logs = doc.get("CrmLog", [])
        assert len(logs) == (1 if written and answered != "OK" else 0)
        if logs:
            assert logs[0].startswith("SustainerSyncUnexpectedRes-") and ": " in logs[0]
        if persisted == "WroteSustainerStatus":
            detail = clean.position(6, machine.NAME).detail
            assert (detail["crm_id"], detail["was"], detail["is_sustainer"]) == (app_user, bool(was), member)

        if expected == "LoggedDbFailure":
            plan.failing.clear()
            replay_file(clean, journal)
            again = replay_file(clean, journal)
            assert (again.applied, again.unchanged) == (0, 1)
            assert clean.position(6, machine.NAME).state == "LoggedDbFailure"
            calls = len(crm.calls)
            [resumed] = app.redrive(machine.NAME, [clean.get_profile(6)])
            if answered == "OK":  # the journaled status is written without reading the CRM again
                assert resumed.state == "WroteSustainerStatus" and len(crm.calls) == calls
                assert clean.get_profile(6)["is_sustainer"] is member
            else:
                assert resumed.state in ("WroteSustainerStatus", "WroteUnexpectedResponse")
            assert_history_is_path(SPEC, clean.history(6, machine.NAME))


def test_bad_arguments() -> None:
    app = CrmStates(store=Store(mongomock.MongoClient().db), crm=InMemoryCrm())
    with pytest.raises(ValueError, match="max_demote_share"):
        sync_sustainers(app, max_demote_share=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        sync_sustainers(app, batch_size=0)


def test_a_malformed_sustainer_id_is_an_incomplete_read() -> None:
    class Odd(InMemoryCrm):
        def get_sustainers(self):
            yield "a0B1"
            yield None

    raw = mongomock.MongoClient().db
    raw.profiles.insert_one({"id": 1, "sf_app_user_id": "a0B1"})
    report = sync_sustainers(CrmStates(store=Store(raw), crm=Odd()))
    assert report.read_failed and "not a non-empty string" in report.read_failed
    assert raw.profiles.find_one({"id": 1}).get("is_sustainer") is None


# --- end to end: FakeSalesforce over HTTP, the real wire-protocol server -----------------------------------


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce(page_size=3) as server:  # small pages: the sustainer query takes several
        yield server


def _client(fake: FakeSalesforce) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST,
                                       sleep=lambda s: None, token_cache=TokenCache())


def _seed(db, fake: FakeSalesforce, *, sustainers: int, current: int, others: int = 4) -> list[str]:
    """``sustainers`` app users flagged in Salesforce, ``others`` not; profiles 1.. hold them in order, the
    first ``current`` marked ``is_sustainer`` in Mongo. Plus two profiles without a CRM id (one marked)."""
    ids = [fake.insert(APP_USER, {"Sefaria_App_Email__c": f"u{i}@example.org", "Sustainer__c": i < sustainers})
           for i in range(sustainers + others)]
    db.profiles.insert_many([{"id": i + 1, "sf_app_user_id": app_user, **({"is_sustainer": True} if i < current else {})}
                             for i, app_user in enumerate(ids)])
    db.profiles.insert_many([{"id": 900, "is_sustainer": True}, {"id": 901, "nationbuilder_id": 5}])
    return ids


def _flags(db) -> dict[int, bool | None]:
    return {p["id"]: p.get("is_sustainer") for p in db.profiles.find({}, {"id": 1, "is_sustainer": 1})}


def test_sync_writes_only_differences_in_bulk_batches_and_a_second_run_changes_nothing(
        db, fake: FakeSalesforce, mongo_url: str) -> None:
    # Salesforce: users 1..6 sustain. Mongo: 1..3 and 9 marked (9 by mistake), 4..6 not yet.
    ids = _seed(db, fake, sustainers=6, current=3)
    db.profiles.update_one({"id": 9}, {"$set": {"is_sustainer": True}})
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "nobody@example.org", "Sustainer__c": True})  # no profile

    class Commands(monitoring.CommandListener):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, int]] = []

        def started(self, event) -> None:
            cmd = event.command
            name = event.command_name
            if name in ("insert", "update"):
                docs = cmd.get("documents") or cmd.get("updates") or []
                self.seen.append((name, cmd[name], len(docs)))

        def succeeded(self, event) -> None:
            pass

        def failed(self, event) -> None:
            pass

    listener = Commands()
    client: MongoClient = MongoClient(mongo_url, event_listeners=[listener])
    try:
        app = CrmStates.open(client[db.name], _client(fake))
        listener.seen.clear()
        report = sync_sustainers(app, batch_size=2, max_demote_share=0.5)
    finally:
        client.close()

    assert report.read_failed is None and report.refused is None
    assert fake.counts["query"] == 1 and fake.counts["query_more"] == 2  # 7 sustainers in pages of 3
    assert (report.sustainers_in_crm, report.matched, report.unmatched) == (7, 6, 1)
    assert (report.current_sustainers, report.sustainers_without_crm_id) == (5, 1)
    assert (report.to_promote, report.to_demote, report.changed, report.problems) == (3, 1, 4, 0)
    flags = _flags(db)
    assert [pid for pid, flag in flags.items() if flag] == [1, 2, 3, 4, 5, 6, 900]  # 900: no CRM id, left alone
    assert flags[9] is False and flags[10] is None and flags[901] is None  # only differences written
    # 4 changes in batches of 2: one bulk profile update and one bulk position update per batch.
    assert listener.seen == [("update", "profiles", 2), ("update", POSITIONS, 2)] * 2
    app = CrmStates.open(db, _client(fake))
    for pid in (4, 9):
        [*_, last] = history = app.history(pid, machine.NAME)
        assert_history_is_path(SPEC, history)
        assert last.dest == "WroteSustainerStatus" and last.write.set == {"is_sustainer": pid == 4}
    assert app.history(1, machine.NAME) == []  # unchanged: no run at all

    positions = list(db[POSITIONS].find())
    again = sync_sustainers(app)
    assert (again.to_promote, again.to_demote, again.changed) == (0, 0, 0)
    assert list(db[POSITIONS].find()) == positions and _flags(db) == flags
    assert ids  # seeded


def test_a_read_failing_on_its_second_page_changes_nothing(db, fake: FakeSalesforce) -> None:
    _seed(db, fake, sustainers=7, current=2)
    before = _flags(db)
    fake.inject(Fault.error(500), times=3, kind="query_more")  # the second page fails past its retries
    report = sync_sustainers(CrmStates.open(db, _client(fake)))
    assert report.read_failed and "500" in report.read_failed
    assert fake.counts["query"] == 1 and fake.counts["query_more"] == 3
    assert report.to_promote == report.to_demote == 0 and not report.outcomes
    assert _flags(db) == before and db[POSITIONS].count_documents({}) == 0
    # The next week's read works: now the sync happens.
    assert CrmStates.open(db, _client(fake)).sync_sustainers().changed == 5  # the entry point for the cron job


def test_the_demotion_guard_refuses_and_force_overrides(db, fake: FakeSalesforce) -> None:
    # Mongo: 10 sustainers. Salesforce now flags 8 of them: demoting 2 is 20%.
    ids = _seed(db, fake, sustainers=10, current=10, others=0)
    for app_user in ids[8:]:
        _unflag(fake, app_user)
    app = CrmStates.open(db, _client(fake))
    before = _flags(db)
    refused = sync_sustainers(app)
    assert refused.refused and "demote 2 of 11 current sustainers" in refused.refused
    assert _flags(db) == before and db[POSITIONS].count_documents({}) == 0
    assert sync_sustainers(app, max_demote_share=0.1, dry_run=True).refused  # a dry run is refused alike
    dry = sync_sustainers(app, max_demote_share=0.2, dry_run=True)  # 2 <= 20% of 11: allowed, but dry
    assert dry.refused is None and dry.to_demote == 2 and _flags(db) == before
    forced = sync_sustainers(app, force=True)
    assert forced.refused is None and forced.changed == 2
    assert _flags(db)[9] is False and _flags(db)[10] is False and _flags(db)[8] is True


def _unflag(fake: FakeSalesforce, app_user: str) -> None:
    with fake._data:  # a change made in Salesforce itself (no API call counted)
        fake._table(APP_USER).update(app_user, {"Sustainer__c": False})


def test_an_empty_sustainer_set_demotes_no_one_without_force(db, fake: FakeSalesforce) -> None:
    """Sefaria's sync "by elimination" demoted everyone on an empty answer; here that is refused."""
    ids = _seed(db, fake, sustainers=3, current=3, others=0)
    for app_user in ids:
        _unflag(fake, app_user)
    report = sync_sustainers(CrmStates.open(db, _client(fake)))
    assert report.sustainers_in_crm == 0 and report.refused and report.to_demote == 3
    assert sum(bool(f) for f in _flags(db).values()) == 4


def test_db_failure_then_resume_through_the_cli(db, fake: FakeSalesforce, mongo_url: str, tmp_path: Path,
                                               monkeypatch, capsys) -> None:
    _seed(db, fake, sustainers=3, current=0)
    journal = tmp_path / "journal.jsonl"
    flaky = CrmStates.open(FlakyDatabase(db, WritePlan({("profiles", "update", 1)})), _client(fake),
                           journal_path=str(journal))
    report = sync_sustainers(flaky)
    assert report.states == {"LoggedDbFailure": 3} and report.problems == 3 and report.changed == 0
    assert len(list(read_entries(journal.read_text().splitlines()))) == 3
    queries = fake.counts["query"]
    for key, value in {"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url,
                       "SALESFORCE_CLIENT_ID": fake.client_id, "SALESFORCE_CLIENT_SECRET": fake.client_secret,
                       "CRM_STATES_JOURNAL": str(journal)}.items():
        monkeypatch.setenv(key, value)
    base = ["--mongo-url", mongo_url, "--db", db.name]
    assert main(["resume", "--machine", machine.NAME, "--state", "LoggedDbFailure", *base]) == 0
    out = capsys.readouterr().out
    assert "3 profiles in LoggedDbFailure re-driven:" in out and "WroteSustainerStatus" in out
    assert fake.counts["query"] == queries  # the journaled status, no second read
    assert [pid for pid, flag in _flags(db).items() if flag] == [1, 2, 3, 900]
    assert sync_sustainers(CrmStates.open(db, _client(fake))).changed == 0


# --- the command, as a subprocess ---------------------------------------------------------------------------


def test_sync_sustainers_command(db, fake: FakeSalesforce, mongo_url: str, tmp_path: Path) -> None:
    ids = _seed(db, fake, sustainers=10, current=10, others=0)
    for app_user in ids[7:]:
        _unflag(fake, app_user)  # 3 of the 11 current sustainers are to be demoted: 27%
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(tmp_path / "j.jsonl")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crm_states.cli", "sync-sustainers", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    before = _flags(db)
    dry = run("--dry-run", "--max-demote-share", "0.3")
    assert dry.returncode == 0, dry.stderr
    assert "10 sustainers in the CRM" not in dry.stdout and "7 sustainers in the CRM" in dry.stdout
    assert "to promote 0, to demote 3 (27.3% of current sustainers; limit 30.0%)" in dry.stdout
    assert "dry run: nothing written" in dry.stdout and _flags(db) == before

    refused = run()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("crm-states: refused: the sync would demote 3 of 11") and "--force" in refused.stderr
    assert _flags(db) == before

    forced = run("--force")
    assert forced.returncode == 0, forced.stderr
    assert "3 profiles changed" in forced.stdout and "WroteSustainerStatus" in forced.stdout
    again = run()
    assert again.returncode == 0 and "to promote 0, to demote 0" in again.stdout and "0 profiles changed" in again.stdout

    fake.inject(Fault.error(400), times=1, kind="query_more")
    failed = run()
    assert failed.returncode == 1
    assert failed.stderr.startswith("crm-states: could not read the whole sustainer set from the CRM")
    assert "nothing changed" in failed.stderr and failed.stdout == ""
    bad = run("--max-demote-share", "2")
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
