"""The core against a real MongoDB wire-protocol server (SecantusDB in a separate process, or the
MongoDB at CRM_STATES_TEST_MONGO_URL): persistence, compare-and-set, roll-forward, journal replay."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pymongo import MongoClient

from crm_states.api import CrmStates
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.records import START, Transition, new_run_id, utcnow
from crm_states.store import ConcurrentTransition, ProfileNotFound, Store, Step, position_of
from crm_states.testing.mongo import MongoServer
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import assert_history_is_path


@pytest.fixture
def crm() -> InMemoryCrm:
    return InMemoryCrm()


@pytest.fixture
def app(db, crm: InMemoryCrm, tmp_path: Path) -> CrmStates:
    return CrmStates.open(db, crm, journal_path=str(tmp_path / "journal.jsonl"))


def test_both_machines_persist_every_transition(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_many([{"id": 1, "nationbuilder_id": 11}, {"id": 2, "nationbuilder_id": 12},
                             {"id": 3, "email": "dov@example.org", "first_name": "Dov", "last_name": "Ben-Ami"}])
    app_user = crm.add_app_user(nationbuilder_id=11)

    assert app.validate_profile(1).state == "WroteSalesforceAppUserUid"
    assert app.validate_profile(2).state == "WroteNotFound"
    assert app.run_signup(3).state == "WroteSalesforceAppUserUid"

    one = db.profiles.find_one({"id": 1})
    assert one["sf_app_user_id"] == app_user
    assert one["crm_state"][nb.NAME]["state"] == "WroteSalesforceAppUserUid"
    assert set(one["crm_state"][nb.NAME]) >= {"state", "run_id", "seq", "at"}
    assert [t.dest for t in app.history(1, nb.NAME)] == ["NotChecked", "RequestedContact", "OkResponse",
                                                          "WroteSalesforceAppUserUid"]
    doc = db.crm_transitions.find_one({"profile_id": 1, "machine": nb.NAME, "seq": 3})
    assert set(doc) >= {"profile_id", "machine", "run_id", "seq", "source", "dest", "trigger", "at", "detail"}
    assert doc["detail"]["status"] == 200
    two = db.profiles.find_one({"id": 2})
    assert "sf_app_user_id" not in two
    assert len(two["CrmLog"]) == 1 and two["CrmLog"][0].startswith("NbProfileNotFoundInSalesforce-20")
    three = db.profiles.find_one({"id": 3})
    assert three["sf_app_user_id"] == crm.by_external_id["3"]
    for pid, spec in ((1, nb.SPEC), (2, nb.SPEC), (3, signup.SPEC)):
        assert_history_is_path(spec, app.history(pid, spec.name))


def test_calling_again_changes_nothing_and_never_creates_twice(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 5, "email": "a@example.org"})
    first = app.run_signup(5)
    again = app.run_signup(5)
    assert first.state == again.state == "WroteSalesforceAppUserUid"
    assert len(crm.app_users) == 1
    assert len(app.history(5, signup.NAME)) == 4


def test_batch_validation_uses_one_crm_lookup(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 1000 + i} for i in range(1, 51)])
    for i in range(1, 51, 2):
        crm.add_app_user(nationbuilder_id=1000 + i)
    results = app.validate_profiles(list(db.profiles.find()))
    assert [c[0] for c in crm.calls] == ["find_app_users_by_nationbuilder_ids"]
    assert {r.state for r in results[0::2]} == {"WroteSalesforceAppUserUid"}
    assert {r.state for r in results[1::2]} == {"WroteNotFound"}
    assert app.store.count_by_state(nb.NAME) == {"WroteSalesforceAppUserUid": 25, "WroteNotFound": 25}
    assert {p["id"] for p in app.profiles_in_state(nb.NAME, "WroteNotFound")} == set(range(2, 51, 2))


def test_a_machine_gets_its_state_index_when_first_used_and_no_other_machine_does(app: CrmStates, db) -> None:
    def state_indexes() -> list[list[str]]:
        return [[field for field, _ in info["key"]] for info in db.profiles.index_information().values()
                if info["key"][0][0].startswith("crm_state.")]

    assert state_indexes() == []  # opening builds none: each one makes every profile update dearer
    db.profiles.insert_one({"id": 1, "nationbuilder_id": 7})
    app.validate_profile(1)
    assert state_indexes() == [[f"crm_state.{nb.NAME}.state", f"crm_state.{nb.NAME}.at"]]
    plan = db.profiles.find({f"crm_state.{nb.NAME}.state": "WroteNotFound"}).explain()["queryPlanner"]["winningPlan"]
    assert "IXSCAN" in str(plan)
    app.store.count_by_state(signup.NAME)  # listing or counting a machine builds its index too
    assert len(state_indexes()) == 2


class BarrierStore(Store):
    """Holds every commit until two writers have reached it, so they really race."""

    barrier = threading.Barrier(2, timeout=10)

    def commit(self, steps):  # type: ignore[no-untyped-def]
        if steps and steps[0].expected.seq == 0:
            self.barrier.wait()
        return super().commit(steps)


def test_two_writers_on_one_profile_exactly_one_wins(db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 8, "email": "race@example.org"})
    Store(db).ensure_indexes([signup.NAME])
    app = CrmStates(store=BarrierStore(db), crm=crm)
    results = []
    threads = [threading.Thread(target=lambda: results.append(app.run_signup(8))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["conflict", "finished"]
    loser = next(r for r in results if r.outcome == "conflict")
    assert "moved from seq 0" in loser.error and "another writer" in loser.error
    assert len(crm.app_users) == 1
    assert_history_is_path(signup.SPEC, Store(db).history(8, signup.NAME))
    assert len({t.run_id for t in Store(db).history(8, signup.NAME)}) == 1


def test_crash_between_the_two_writes_is_rolled_forward_once(app: CrmStates, db, crm: InMemoryCrm) -> None:
    """A writer died after inserting its transition documents but before moving the profile."""
    db.profiles.insert_one({"id": 20, "nationbuilder_id": 2020})
    crm.add_app_user(nationbuilder_id=2020)
    at = utcnow()
    run = new_run_id(20, 1)
    dangling = [Transition(20, nb.NAME, run, 1, START, "NotChecked", "start", at, by="crashed"),
                Transition(20, nb.NAME, run, 2, "NotChecked", "RequestedContact",
                           nb.SPEC.triggers[("NotChecked", "RequestedContact")], at, {"nationbuilder_id": 2020}, by="crashed")]
    db.crm_transitions.insert_many([t.to_doc() for t in dangling])
    assert position_of(db.profiles.find_one({"id": 20}), nb.NAME).state is None

    result = app.validate_profile(20)

    assert result.state == "WroteSalesforceAppUserUid"
    history = app.history(20, nb.NAME)
    assert [t.run_id for t in history] == [run] * 4  # continued, not duplicated
    assert [t.by for t in history][:2] == ["crashed", "crashed"]
    assert_history_is_path(nb.SPEC, history)


def test_documents_that_do_not_chain_are_dropped(app: CrmStates, db) -> None:
    db.profiles.insert_one({"id": 21, "nationbuilder_id": 2121})
    # A leftover at the slot of seq 1 that does not start a run (a refused writer's document).
    stray = Transition(21, nb.NAME, new_run_id(21, 1), 1, "OkResponse", "WroteSalesforceAppUserUid",
                       "db_write_success", utcnow())
    db.crm_transitions.insert_one(stray.to_doc())
    assert app.validate_profile(21).state == "WroteNotFound"
    assert_history_is_path(nb.SPEC, app.history(21, nb.NAME))


def test_bad_input_is_refused_and_changes_nothing(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 30, "nationbuilder_id": 3030})
    before = list(db.profiles.find({}, {"_id": 0}))
    with pytest.raises(TypeError, match="profile id must be an int"):
        app.validate_profile("30")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        app.run_signup(True)  # type: ignore[arg-type]
    with pytest.raises(ProfileNotFound, match="no profile with id 31"):
        app.run_signup(31)
    with pytest.raises(ValueError, match="unknown machine"):
        list(app.profiles_in_state("nope", "OK"))
    with pytest.raises(ValueError, match="has no state"):
        list(app.profiles_in_state(nb.NAME, "Nope"))
    assert list(db.profiles.find({}, {"_id": 0})) == before
    assert db.crm_transitions.count_documents({}) == 0
    assert crm.calls == []


@pytest.fixture
def failpoint_server(mongo_server_factory) -> MongoServer:
    """A private server of the run's backend whose fail points the test may set."""
    return mongo_server_factory(test_commands=True)


def test_db_outage_takes_failure_edge_journals_and_replays(failpoint_server: MongoServer, tmp_path: Path) -> None:
    """A real server refuses every insert: the run lands in the DB-failure state in the journal only;
    replay restores it, and a second replay changes nothing."""
    client: MongoClient = MongoClient(failpoint_server.url)
    db = client.sefaria
    crm = InMemoryCrm()
    journal = tmp_path / "journal.jsonl"
    app = CrmStates.open(db, crm, journal_path=str(journal))
    db.profiles.insert_one({"id": 40, "nationbuilder_id": 4040})
    app_user = crm.add_app_user(nationbuilder_id=4040)
    client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                          "data": {"failCommands": ["insert"], "errorCode": 2}})
    try:
        result = app.validate_profile(40)
    finally:
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    assert result.state == "DbWriteOkErrorLogged" and result.journaled
    assert position_of(db.profiles.find_one({"id": 40}), nb.NAME).state is None
    [entry] = list(read_entries(journal.read_text().splitlines()))
    assert entry.persisted is False and entry.write.set == {"sf_app_user_id": app_user}

    first = replay_file(app.store, journal)
    second = replay_file(app.store, journal)
    assert (first.applied, second.applied, second.unchanged) == (1, 0, 1)
    profile = db.profiles.find_one({"id": 40})
    assert profile["sf_app_user_id"] == app_user
    assert position_of(profile, nb.NAME).state == "DbWriteOkErrorLogged"
    assert_history_is_path(nb.SPEC, app.history(40, nb.NAME))

    calls = len(crm.calls)
    assert app.validate_profile(40, restart=True).state == "WroteSalesforceAppUserUid"
    assert len(crm.calls) == calls  # the journaled id was written without asking the CRM again
    client.close()


def test_replay_reads_raw_application_logs(app: CrmStates, db, tmp_path: Path) -> None:
    db.profiles.insert_one({"id": 50})
    entry_line = ('2026-11-24 12:00:00 ERROR crm_states.journal CRM_STATES_JOURNAL {"journal": 1, "entry_id": "e1", '
                  '"profile_id": 50, "machine": "new_user_signup", "transitions": [], "write": {"set": '
                  '{"sf_app_user_id": "a0B000000000000999"}, "crm_log": null}, "error": "x", "persisted": true}')
    log = tmp_path / "app.log"
    log.write_text("\n".join(["2026-11-24 INFO something else", entry_line, "not json {"]) + "\n")
    report = replay_file(app.store, log)
    assert (report.entries, report.applied, report.skipped_lines) == (1, 1, 2)
    assert db.profiles.find_one({"id": 50})["sf_app_user_id"] == "a0B000000000000999"


def test_journal_file_is_append_only_jsonl(tmp_path: Path) -> None:
    from crm_states.journal import JournalEntry
    from crm_states.records import ProfileWrite

    journal = Journal(tmp_path / "j.jsonl")
    for pid in (1, 2):
        journal.record(JournalEntry(pid, nb.NAME, (), ProfileWrite(crm_log="X-2026"), "boom", False))
    entries = list(read_entries((tmp_path / "j.jsonl").read_text().splitlines()))
    assert [e.profile_id for e in entries] == [1, 2]


def test_step_commit_refuses_a_second_writer_from_the_same_position(db) -> None:
    store = Store(db)
    store.ensure_indexes([nb.NAME])
    db.profiles.insert_one({"id": 60})
    first = Transition(60, nb.NAME, new_run_id(60, 1), 1, START, "NotChecked", "start", utcnow(), by="a")
    assert store.commit([Step(60, nb.NAME, position_of(None, nb.NAME), (first,))]) == [None]
    # The second writer read the same (empty) position, so it names its run the same way.
    second = Transition(60, nb.NAME, new_run_id(60, 1), 1, START, "NotChecked", "start", utcnow(), by="b")
    [error] = store.commit([Step(60, nb.NAME, position_of(None, nb.NAME), (second,))])
    assert isinstance(error, ConcurrentTransition) and error.by == "a"
    assert (error.position.state, error.position.seq) == ("NotChecked", 1)
    # A writer continuing from a stale position collides the same way.
    moved = Transition(60, nb.NAME, new_run_id(60, 1), 2, "NotChecked", "RequestedContact", "x", utcnow(), by="a")
    store.commit([Step(60, nb.NAME, error.position, (moved,))])
    stale = Transition(60, nb.NAME, new_run_id(60, 1), 2, "NotChecked", "ScriptFailureLogged", "y", utcnow(), by="c")
    [error] = store.commit([Step(60, nb.NAME, error.position, (stale,))])
    assert isinstance(error, ConcurrentTransition) and error.position.state == "RequestedContact"
    assert [t.by for t in store.history(60, nb.NAME)] == ["a", "a"]
