"""The core against a real MongoDB server (started by the tests, or the MongoDB at
CRM_STATES_TEST_MONGO_URL): the project's own collection, compare-and-set, guarded profile writes,
Sefaria's whole-document saves, journal replay."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from crm_states.api import CrmStates
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.records import START, Position, Transition, new_run_id, utcnow
from crm_states.store import POSITIONS, ConcurrentTransition, ProfileNotFound, Step, Store
from crm_states.testing.mongo import MongoServer
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import assert_history_is_path

SEFARIA_FIELDS = ("id", "slug", "nationbuilder_id", "sf_app_user_id", "is_sustainer", "settings")


@pytest.fixture
def crm() -> InMemoryCrm:
    return InMemoryCrm()


@pytest.fixture
def app(db, crm: InMemoryCrm, tmp_path: Path) -> CrmStates:
    return CrmStates.open(db, crm, journal_path=str(tmp_path / "journal.jsonl"))


def sefaria_save(db, profile_id: int, stale: dict) -> None:
    """What Sefaria's ``UserProfile.save()`` does: replace the whole document with its fixed field list,
    from a copy loaded earlier (``stale``); any other field (a ``CrmLog``) is gone afterwards."""
    current = db.profiles.find_one({"id": profile_id})
    db.profiles.replace_one({"_id": current["_id"]}, {k: stale[k] for k in SEFARIA_FIELDS if k in stale})


def test_both_machines_persist_every_transition(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_many([{"id": 1, "nationbuilder_id": 11}, {"id": 2, "nationbuilder_id": 12},
                             {"id": 3, "email": "dov@example.org", "first_name": "Dov", "last_name": "Ben-Ami"}])
    app_user = crm.add_app_user(nationbuilder_id=11)

    assert app.validate_profile(1).state == "WroteSalesforceAppUserUid"
    assert app.validate_profile(2).state == "WroteNotFound"
    assert app.run_signup(3).state == "WroteSalesforceAppUserUid"

    one = db.profiles.find_one({"id": 1})
    assert one["sf_app_user_id"] == app_user
    assert set(one) == {"_id", "id", "nationbuilder_id", "sf_app_user_id"}  # no state inside Sefaria's document
    position = app.position(1, nb.NAME)
    assert position is not None and position.state == "WroteSalesforceAppUserUid" and position.seq == 4
    assert [t.dest for t in app.history(1, nb.NAME)] == ["NotChecked", "RequestedContact", "OkResponse",
                                                          "WroteSalesforceAppUserUid"]
    assert app.history(1, nb.NAME)[2].detail["status"] == 200
    two = db.profiles.find_one({"id": 2})
    assert "sf_app_user_id" not in two
    assert len(two["CrmLog"]) == 1 and two["CrmLog"][0].startswith("NbProfileNotFoundInSalesforce-20")
    three = db.profiles.find_one({"id": 3})
    assert three["sf_app_user_id"] == crm.by_external_id["3"]
    for pid, spec in ((1, nb.SPEC), (2, nb.SPEC), (3, signup.SPEC)):
        assert_history_is_path(spec, app.history(pid, spec.name))
    assert app.position(3, nb.NAME) is None


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
    assert [c[0] for c in crm.calls] == ["lookup_app_users_by_nationbuilder_ids"]
    assert {r.state for r in results[0::2]} == {"WroteSalesforceAppUserUid"}
    assert {r.state for r in results[1::2]} == {"WroteNotFound"}
    assert app.store.count_by_state(nb.NAME) == {"WroteSalesforceAppUserUid": 25, "WroteNotFound": 25}
    assert {p["id"] for p in app.profiles_in_state(nb.NAME, "WroteNotFound")} == set(range(2, 51, 2))


def test_listing_a_state_is_an_indexed_query_on_our_own_collection(app: CrmStates, db) -> None:
    db.profiles.insert_one({"id": 1, "nationbuilder_id": 7})
    app.validate_profile(1)
    keys = [[field for field, _ in info["key"]] for info in db[POSITIONS].index_information().values()]
    assert ["machine", "state", "at"] in keys and ["machine", "profile_id"] in keys
    assert not any(info["key"][0][0].startswith("crm_state") for info in db.profiles.index_information().values())
    plan = db[POSITIONS].find({"machine": nb.NAME, "state": "WroteNotFound"}).sort("at", 1).explain()
    assert "IXSCAN" in str(plan["queryPlanner"]["winningPlan"])


class BarrierStore(Store):
    """Holds every commit from an empty position until two writers have reached it, so they really race."""

    barrier = threading.Barrier(2, timeout=10)

    def commit(self, steps):  # type: ignore[no-untyped-def]
        if steps and steps[0].expected.seq == 0:
            self.barrier.wait()
        return super().commit(steps)


def test_two_writers_on_one_profile_exactly_one_wins(db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 8, "email": "race@example.org"})
    app = CrmStates(store=BarrierStore(db), crm=crm, claim_wait=10)
    app.store.ensure_indexes()
    results = []
    threads = [threading.Thread(target=lambda: results.append(app.run_signup(8))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    # The loser's commit met the winner's; it went on from where the winner stood and adopted its end.
    assert [(r.outcome, r.state) for r in results] == [("finished", "WroteSalesforceAppUserUid")] * 2
    assert len(crm.app_users) == 1 and len([c for c in crm.calls if c[0] == "add_user_to_crm"]) == 1
    assert_history_is_path(signup.SPEC, Store(db).history(8, signup.NAME))
    assert len({t.run_id for t in Store(db).history(8, signup.NAME)}) == 1


class GatedCrm(InMemoryCrm):
    """Holds the create inside the CRM until ``go`` is set, so its run keeps the write-ahead claim."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.go = threading.Event(), threading.Event()

    def add_user_to_crm(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.inside.set()
        self.go.wait(10)
        return super().add_user_to_crm(*args, **kwargs)


class HolderFinishesAfterTheClaimIsMet(Store):
    """The second driver's first read after its take-over failed still sees the live claim; then, before
    it reads again, the holder finishes: the window in which a waiter used to miss the move."""

    def __init__(self, db, crm: GatedCrm, holder: list[threading.Thread]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(db)
        self.crm, self.holder, self.failed = crm, holder, threading.local()

    def take_over(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        taken = super().take_over(*args, **kwargs)
        self.failed.flag = taken is None
        return taken

    def position(self, profile_id: int, machine: str) -> Position:
        seen = super().position(profile_id, machine)
        if getattr(self.failed, "flag", False):
            self.failed.flag = False
            self.crm.go.set()
            self.holder[0].join(10)
        return seen


def test_a_waiter_that_meets_a_claim_just_released_adopts_the_holders_end(db) -> None:
    db.profiles.insert_one({"id": 9, "email": "window@example.org"})
    crm, holder = GatedCrm(), []
    app = CrmStates(store=HolderFinishesAfterTheClaimIsMet(db, crm, holder), crm=crm, claim_wait=30)
    app.store.ensure_indexes()
    first = []
    holder.append(threading.Thread(target=lambda: first.append(app.run_signup(9))))
    holder[0].start()
    assert crm.inside.wait(10)
    started = time.monotonic()
    second = app.run_signup(9)
    assert (first[0].outcome, first[0].state) == ("finished", "WroteSalesforceAppUserUid")
    assert (second.outcome, second.state) == ("finished", "WroteSalesforceAppUserUid")
    # It saw the holder had already moved instead of waiting out claim_wait for a move that had happened.
    assert time.monotonic() - started < app.claim_wait
    assert len([c for c in crm.calls if c[0] == "add_user_to_crm"]) == 1


def test_a_crash_after_the_profile_write_is_simply_driven_again(app: CrmStates, db, crm: InMemoryCrm) -> None:
    """A validation died after writing the profile and before moving its position: the next run looks the
    profile up again and ends where the first one would have, with one history."""
    db.profiles.insert_one({"id": 20, "nationbuilder_id": 2020})
    app_user = crm.add_app_user(nationbuilder_id=2020)
    db.profiles.update_one({"id": 20}, {"$set": {"sf_app_user_id": app_user}})
    assert app.position(20, nb.NAME) is None

    result = app.validate_profile(20)

    assert result.state == "WroteSalesforceAppUserUid"
    assert db.profiles.find_one({"id": 20})["sf_app_user_id"] == app_user
    assert len(app.history(20, nb.NAME)) == 4
    assert_history_is_path(nb.SPEC, app.history(20, nb.NAME))


def test_sefaria_replacing_the_profile_document_loses_no_state(app: CrmStates, db, crm: InMemoryCrm) -> None:
    """Sefaria's save replaces the whole document with a stale copy at any instant: positions, history
    and compare-and-set are unaffected; the data it erased is drift that heal writes back."""
    db.profiles.insert_many([{"id": 70, "nationbuilder_id": 7070, "slug": "a"},
                             {"id": 71, "nationbuilder_id": 7171, "slug": "b"}])
    stale = {p["id"]: p for p in db.profiles.find()}
    app_user = crm.add_app_user(nationbuilder_id=7070)
    app.validate_profiles(list(db.profiles.find()))
    for pid in (70, 71):
        sefaria_save(db, pid, stale[pid])
    assert "sf_app_user_id" not in db.profiles.find_one({"id": 70}) and "CrmLog" not in db.profiles.find_one({"id": 71})
    assert app.position(70, nb.NAME).state == "WroteSalesforceAppUserUid"
    assert app.position(71, nb.NAME).state == "WroteNotFound"

    dry = app.heal(dry_run=True)
    assert dry.drifted[nb.NAME] == 2 and dry.healed[nb.NAME] == 0
    assert "sf_app_user_id" not in db.profiles.find_one({"id": 70})  # a dry run writes nothing
    healed = app.heal()
    assert healed.healed[nb.NAME] == 2
    assert db.profiles.find_one({"id": 70})["sf_app_user_id"] == app_user
    assert db.profiles.find_one({"id": 71})["CrmLog"][0].startswith("NbProfileNotFoundInSalesforce-")
    assert app.heal().total_drifted == 0  # idempotent
    # The machine goes on from where it stood: a restarted run is one more run on the same history.
    assert app.validate_profile(71, restart=True).state == "WroteNotFound"
    assert [t.dest for t in app.history(71, nb.NAME)].count("WroteNotFound") == 2
    assert len(db.profiles.find_one({"id": 71})["CrmLog"]) == 1  # one line per finding, the newest


def test_a_changed_nationbuilder_id_is_never_given_the_old_ids_result(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 72, "nationbuilder_id": 7272})
    crm.add_app_user(nationbuilder_id=7272)
    engine = app.engine(nb.NAME)
    [run] = engine.prepare_all(list(db.profiles.find()))
    db.profiles.update_one({"id": 72}, {"$set": {"nationbuilder_id": 7373}})  # Sefaria changes it mid-lookup
    [result] = engine.drive([run])
    assert result.outcome == "changed"
    assert "sf_app_user_id" not in db.profiles.find_one({"id": 72})
    assert app.position(72, nb.NAME) is None  # nothing committed: looked at again later
    assert app.validate_profile(72).state == "WroteNotFound"


def test_a_profile_deleted_mid_run_is_reported_and_leaves_no_history(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 73, "nationbuilder_id": 7474})
    crm.add_app_user(nationbuilder_id=7474)
    engine = app.engine(nb.NAME)
    [run] = engine.prepare_all(list(db.profiles.find()))
    db.profiles.delete_one({"id": 73})
    [result] = engine.drive([run])
    assert result.outcome == "deleted" and result.state is None
    assert db[POSITIONS].count_documents({"profile_id": 73}) == 0


def test_bad_input_is_refused_and_changes_nothing(app: CrmStates, db, crm: InMemoryCrm) -> None:
    db.profiles.insert_one({"id": 30, "nationbuilder_id": 3030})
    before = list(db.profiles.find({}, {"_id": 0}))
    with pytest.raises(TypeError, match="profile id must be an int"):
        app.validate_profile("30")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        app.run_signup(True)  # type: ignore[arg-type]
    with pytest.raises(ProfileNotFound, match="no profile with id 31"):
        app.validate_profile(31)
    with pytest.raises(ValueError, match="unknown machine"):
        list(app.profiles_in_state("nope", "OK"))
    with pytest.raises(ValueError, match="has no state"):
        list(app.profiles_in_state(nb.NAME, "Nope"))
    assert list(db.profiles.find({}, {"_id": 0})) == before
    assert db[POSITIONS].count_documents({}) == 0
    assert crm.calls == []


def test_a_signup_before_the_profile_exists_reaches_it_once_created(app: CrmStates, db, crm: InMemoryCrm) -> None:
    """Sefaria creates the app user before it saves the Mongo profile: the run needs no document, and
    heal writes the id once the profile exists."""
    result = app.run_signup(80, email="new@example.org", first_name="Noa", last_name="Levi")
    assert result.state == "WroteSalesforceAppUserUid" and len(crm.app_users) == 1
    assert db.profiles.count_documents({}) == 0  # nothing created in Sefaria's collection
    assert app.heal(signup.NAME).waiting[signup.NAME] == 1
    db.profiles.insert_one({"id": 80, "slug": "noa"})  # Sefaria saves the new profile
    assert app.heal().healed[signup.NAME] == 1
    assert db.profiles.find_one({"id": 80})["sf_app_user_id"] == crm.by_external_id["80"]


@pytest.fixture
def failpoint_server(mongo_server_factory) -> MongoServer:
    """A private server of the run's backend whose fail points the test may set."""
    return mongo_server_factory(test_commands=True)


def test_db_outage_takes_failure_edge_journals_and_replays(failpoint_server: MongoServer, tmp_path: Path) -> None:
    """A real server refuses every write: the run lands in the DB-failure state in the journal only;
    replay restores it, and a second replay changes nothing."""
    client: MongoClient = MongoClient(failpoint_server.url)
    db = client.sefaria
    crm = InMemoryCrm()
    journal = tmp_path / "journal.jsonl"
    app = CrmStates.open(db, crm, journal_path=str(journal))
    db.profiles.insert_one({"id": 40, "nationbuilder_id": 4040})
    app_user = crm.add_app_user(nationbuilder_id=4040)
    client.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                          "data": {"failCommands": ["update"], "errorCode": 2}})
    try:
        result = app.validate_profile(40)
    finally:
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    assert result.state == "DbWriteOkErrorLogged" and result.journaled and not result.persisted
    assert app.position(40, nb.NAME) is None
    [entry] = list(read_entries(journal.read_text().splitlines()))
    assert entry.persisted is False and entry.write.set == {"sf_app_user_id": app_user}

    first = replay_file(app.store, journal)
    second = replay_file(app.store, journal)
    assert (first.applied, second.applied, second.unchanged) == (1, 0, 1)
    profile = db.profiles.find_one({"id": 40})
    assert profile["sf_app_user_id"] == app_user
    assert app.position(40, nb.NAME).state == "DbWriteOkErrorLogged"
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
    store.ensure_indexes()
    db.profiles.insert_one({"id": 60})
    first = Transition(60, nb.NAME, new_run_id(60, 1), 1, START, "NotChecked", "start", utcnow(), by="a")
    assert store.commit([Step(60, nb.NAME, Position(), (first,))]) == [None]
    # The second writer read the same (empty) position.
    second = Transition(60, nb.NAME, new_run_id(60, 1), 1, START, "NotChecked", "start", utcnow(), by="b")
    [error] = store.commit([Step(60, nb.NAME, Position(), (second,))])
    assert isinstance(error, ConcurrentTransition) and error.by == "a"
    assert (error.position.state, error.position.seq) == ("NotChecked", 1)
    # A writer continuing from a stale position collides the same way.
    moved = Transition(60, nb.NAME, new_run_id(60, 1), 2, "NotChecked", "RequestedContact", "x", utcnow(), by="a")
    assert store.commit([Step(60, nb.NAME, error.position, (moved,))]) == [None]
    stale = Transition(60, nb.NAME, new_run_id(60, 1), 2, "NotChecked", "ScriptFailureLogged", "y", utcnow(), by="c")
    [error] = store.commit([Step(60, nb.NAME, error.position, (stale,))])
    assert isinstance(error, ConcurrentTransition) and error.position.state == "RequestedContact"
    assert [t.by for t in store.history(60, nb.NAME)] == ["a", "a"]
