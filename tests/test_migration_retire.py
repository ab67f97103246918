"""Retiring nationbuilder_id (machines/retire_nb_ids.py, crm_states/retirement.py) against SecantusDB: it
refuses while validation is unfinished or failed, retires exactly the profiles whose validation still
speaks for them, keeps every removed value where ``--undo`` restores it exactly, and survives Sefaria's
stale saves and MongoDB refusing a write."""

from __future__ import annotations

import uuid
from pathlib import Path

from bson.int64 import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.crm import CrmTransientError
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import Journal, replay_file
from crm_states.store import POSITIONS, Store
from machines import nb_profile_validation as nb
from machines import retire_nb_ids as retire
from tests.faults import FlakyDatabase, WritePlan, assert_history_is_path

ACCEPT = ["WroteNotFound"]


def validated(db, crm: InMemoryCrm, profiles: list[dict], *, found: set[int], journal: Path | None = None) -> CrmStates:
    """``profiles`` validated against ``crm``, where the ids in ``found`` have an App User."""
    db.profiles.insert_many(profiles)
    for p in profiles:
        if p["id"] in found:
            crm.add_app_user(nationbuilder_id=nb.nationbuilder_id(p))
    app = CrmStates(store=Store(db), crm=crm, journal=Journal(journal))
    app.store.ensure_indexes()
    app.validate_profiles(list(db.profiles.find({"nationbuilder_id": {"$exists": True}})))
    return app


def profiles_view(db) -> list[dict]:
    return list(db.profiles.find({}, {"_id": 0}).sort("id", 1))


def test_refuses_while_any_validation_is_unfinished_or_failed_and_changes_nothing(db) -> None:
    crm = InMemoryCrm()
    app = validated(db, crm, [{"id": i, "nationbuilder_id": 100 + i} for i in range(1, 6)], found={1, 2})
    db.profiles.insert_many([{"id": 6, "nationbuilder_id": 106}, {"id": 8, "email": "no-nb@example.org"}])  # never validated
    db.profiles.update_one({"id": 5}, {"$set": {"nationbuilder_id": 555}})  # changed since its validation
    db.profiles.insert_one({"id": 7, "nationbuilder_id": 107})
    crm.fail_next(CrmTransientError("503 from Salesforce"))
    app.validate_profiles([db.profiles.find_one({"id": 7})])
    before = profiles_view(db)

    report = app.retire_nb_ids()
    assert report.refused and report.run is None
    assert report.readiness.blocking == {retire.NOT_VALIDATED: 2, "WroteNotFound": 2, "WroteUnexpectedResponse": 1}
    assert report.readiness.with_id == 7 and report.readiness.to_retire == {"WroteSalesforceAppUserUid": 2}
    still = app.retire_nb_ids(accept=ACCEPT)
    assert still.refused and still.readiness.blocking == {retire.NOT_VALIDATED: 2, "WroteUnexpectedResponse": 1}
    assert profiles_view(db) == before and db[POSITIONS].count_documents({"machine": retire.NAME}) == 0


def test_retires_validated_ids_keeping_each_value_and_app_user_id(db) -> None:
    crm = InMemoryCrm()
    values = {1: 101, 2: Int64(102), 3: "103", 4: " 104 "}
    app = validated(db, crm, [{"id": i, "nationbuilder_id": v} for i, v in values.items()], found={1, 2})
    app_users = {p["id"]: p.get("sf_app_user_id") for p in db.profiles.find()}

    report = app.retire_nb_ids(accept=ACCEPT, chunk_size=2)
    assert not report.refused and report.run.states == {"WroteNbIdRemoved": 4}
    assert report.readiness.to_retire == {"WroteSalesforceAppUserUid": 2, "WroteNotFound": 2}
    assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 0
    assert {p["id"]: p.get("sf_app_user_id") for p in db.profiles.find()} == app_users
    for pid, value in values.items():
        position = app.position(pid, retire.NAME)
        assert retire.same_value(retire.restored(position.detail), value)
        assert position.data.fields == ({"sf_app_user_id": app_users[pid]} if app_users[pid] else {})
        assert_history_is_path(retire.SPEC, app.history(pid, retire.NAME))
    assert app.retire_nb_ids(accept=ACCEPT).readiness.pending == 0  # nothing left: a second run does nothing


def test_a_profile_whose_app_user_changed_or_vanished_is_not_retired_until_healed(db) -> None:
    crm = InMemoryCrm()
    app = validated(db, crm, [{"id": i, "nationbuilder_id": 100 + i} for i in (1, 2, 3)], found={1, 2, 3})
    db.profiles.update_one({"id": 1}, {"$unset": {"sf_app_user_id": ""}})  # a stale save erased it
    db.profiles.update_one({"id": 2}, {"$set": {"sf_app_user_id": "a0Bsomeoneelse"}})

    report = app.retire_nb_ids()
    assert report.run.states == {"ValidationNoLongerHolds": 2, "WroteNbIdRemoved": 1}
    assert {p["id"] for p in db.profiles.find({"nationbuilder_id": {"$exists": True}})} == {1, 2}
    assert "the validation recorded" in app.position(1, retire.NAME).detail["error"]
    again = app.retire_nb_ids()  # judged as they stand: not driven again
    assert again.readiness.settled == 2 and again.run.processed == 0 and len(app.history(1, retire.NAME)) == 2
    assert app.heal().healed["nb_profile_validation"] == 2  # the validation's record puts both ids back
    healed = app.retire_nb_ids()
    assert healed.run.states == {"WroteNbIdRemoved": 2}
    assert [t.run_id for t in app.history(1, retire.NAME)].count("1-3") == 4  # a second run of its own


def test_a_retired_id_that_a_stale_save_brings_back_is_found_and_retired_again(db) -> None:
    crm = InMemoryCrm()
    app = validated(db, crm, [{"id": 1, "nationbuilder_id": Int64(101), "bio": "x"}], found={1})
    stale = db.profiles.find_one({"id": 1})  # Sefaria's registration flow holds this copy...
    app.retire_nb_ids()
    db.profiles.replace_one({"_id": stale["_id"]}, stale)  # ...and saves it whole after the retirement

    dry = app.retire_nb_ids(dry_run=True)
    assert dry.readiness.reappeared == 1 and dry.run is None
    again = app.retire_nb_ids()
    assert again.readiness.reappeared == 1 and again.run.states == {"WroteNbIdRemoved": 1}
    assert "nationbuilder_id" not in db.profiles.find_one({"id": 1})
    assert len({t.run_id for t in app.history(1, retire.NAME)}) == 2
    # A stale save that erases the App User id after the retirement: heal writes it back from this machine.
    db.profiles.update_one({"id": 1}, {"$unset": {"sf_app_user_id": ""}})
    healed = app.heal()
    assert healed.healed[retire.NAME] == 1 and db.profiles.find_one({"id": 1})["sf_app_user_id"] == stale["sf_app_user_id"]
    undo = app.retire_nb_ids(undo=True)
    assert undo.run.states == {"WroteNbIdRestored": 1}
    assert type(db.profiles.find_one({"id": 1})["nationbuilder_id"]) is Int64


def test_undo_never_writes_over_another_nationbuilder_id(db) -> None:
    crm = InMemoryCrm()
    app = validated(db, crm, [{"id": 1, "nationbuilder_id": 101}, {"id": 2, "nationbuilder_id": 102}], found={1, 2})
    app.retire_nb_ids()
    db.profiles.update_one({"id": 2}, {"$set": {"nationbuilder_id": 999}})
    undo = app.retire_nb_ids(undo=True)
    assert undo.run.states == {"WroteNbIdRestored": 1, "RestoreRefused": 1}
    assert [p["nationbuilder_id"] for p in db.profiles.find().sort("id", 1)] == [101, 999]
    assert app.retire_nb_ids(undo=True).readiness.to_restore == 0


def test_mongodb_refusing_the_removal_is_journaled_and_resumed(db, tmp_path: Path) -> None:
    crm = InMemoryCrm()
    validated(db, crm, [{"id": i, "nationbuilder_id": 100 + i} for i in (1, 2)], found={1})
    journal = tmp_path / "journal.jsonl"
    flaky = FlakyDatabase(db, WritePlan({("profiles", "update", 1)}))  # profile 1's removal is refused
    app = CrmStates(store=Store(flaky), crm=crm, journal=Journal(journal))
    plain = CrmStates(store=Store(db), crm=crm)
    first = app.retire_nb_ids(accept=ACCEPT, chunk_size=1, limit=1)
    assert first.run.states == {"DbWriteRemovalErrorLogged": 1} and db.profiles.find_one({"id": 1})["nationbuilder_id"] == 101
    assert {r.state for r in plain.resume(retire.NAME, "DbWriteRemovalErrorLogged").results} == {"WroteNbIdRemoved"}
    # Profile 2: its removal lands, then the commit of its position is refused (the 2nd position write of
    # its run: the 1st records the value).
    flaky.plan.failing = {("crm_positions", "update", flaky.plan.counts[("crm_positions", "update")] + 2)}
    second = app.retire_nb_ids(accept=ACCEPT, chunk_size=1)
    assert second.run.states == {"DbWriteRemovalErrorLogged": 1} and "nationbuilder_id" not in db.profiles.find_one({"id": 2})
    assert replay_file(plain.store, journal).failed == [] and replay_file(plain.store, journal).applied == 0
    resumed = plain.resume(retire.NAME, "DbWriteRemovalErrorLogged")  # the value comes from the stopped run
    assert {r.state for r in resumed.results} == {"WroteNbIdRemoved"}
    assert retire.restored(plain.position(2, retire.NAME).detail) == 102
    undo = plain.retire_nb_ids(undo=True)
    assert undo.run.states == {"WroteNbIdRestored": 2}
    assert [p["nationbuilder_id"] for p in db.profiles.find().sort("id", 1)] == [101, 102]


class MovingStore(Store):
    """Sefaria saves the profile between the retirement's check and its removal."""

    moved = False

    def commit(self, steps):  # type: ignore[no-untyped-def]
        for step in steps:
            if not self.moved and any(t.write is not None and t.write.unset for t in step.transitions):
                self.profiles.update_one({"id": step.profile_id}, {"$set": {"sf_app_user_id": "a0Bchanged"}})
                self.moved = True
        return super().commit(steps)


def test_a_profile_moved_during_the_removal_lets_its_claim_go_and_is_judged_again(db) -> None:
    crm = InMemoryCrm()
    validated(db, crm, [{"id": 1, "nationbuilder_id": 101}], found={1})
    app = CrmStates(store=MovingStore(db), crm=crm)
    report = app.retire_nb_ids()
    # Refused by the compare-and-set, the claim released, looked at again at once: not "claimed".
    assert report.run.states == {"ValidationNoLongerHolds": 1} and report.run.outcomes == {"finished": 1}
    position = app.position(1, retire.NAME)
    assert position.detail["after_recording"] and position.claim is None
    assert db.profiles.find_one({"id": 1})["nationbuilder_id"] == 101
    assert app.retire_nb_ids(undo=True).run.states == {"WroteNbIdRestored": 1}  # nothing lost either way


ids = st.one_of(st.integers(1, 2**62).map(int), st.integers(1, 2**62).map(Int64),
                st.integers(1, 10**18).map(str), st.integers(1, 10**18).map(lambda n: f"  {n} "))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.tuples(ids, st.booleans()), min_size=1, max_size=6,
                       unique_by=lambda v: nb.nationbuilder_id({"nationbuilder_id": v[0]})))  # one id, one person
def test_undo_restores_every_retired_id_exactly(mongo_client, values) -> None:
    db = mongo_client[f"t_{uuid.uuid4().hex[:12]}"]
    try:
        crm = InMemoryCrm()
        profiles = [{"id": i, "nationbuilder_id": value} for i, (value, _) in enumerate(values, start=1)]
        found = {i for i, (_, has) in enumerate(values, start=1) if has}
        app = validated(db, crm, profiles, found=found)
        before = profiles_view(db)
        retired = app.retire_nb_ids(accept=ACCEPT, chunk_size=2)
        assert retired.run.states == {"WroteNbIdRemoved": len(values)}
        assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 0
        undone = app.retire_nb_ids(undo=True, chunk_size=3)
        assert undone.run.states == {"WroteNbIdRestored": len(values)}
        after = profiles_view(db)
        assert after == before
        assert [type(p["nationbuilder_id"]) for p in after] == [type(p["nationbuilder_id"]) for p in before]
        assert app.retire_nb_ids(undo=True).readiness.to_restore == 0
    finally:
        mongo_client.drop_database(db.name)
