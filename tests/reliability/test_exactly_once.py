"""Exactly once, whoever drives: two drivers of one signup (threads; processes with SIGSTOP/SIGCONT around
the request; an operator's resume during a live signup), a claim outlived by a paused driver, hostile CRM
answers, inputs that change while a chunk is in flight, a runner paused past its lease, and figures that
are what the database holds. Each invariant is checked over whole collections."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager, SalesforceSchema
from crm_states.crm.salesforce import TokenCache
from crm_states.journal import Journal, read_entries, replay_file
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import POSITIONS, Store
from crm_states.testing import Fault, FakeSalesforce
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import FlakyDatabase, WritePlan, states_by_profile
from tests.reliability.checks import (
    APP_USER,
    app_users_by,
    check_histories,
    cli,
    cli_command,
    cli_env,
    record,
    seed_nb_profiles,
    seed_signup_profiles,
    wait_until,
)

HERE = Path(__file__).resolve().parent
FAST = RetryPolicy(attempts=3, base_delay=0.0, read_timeout=30.0)
PATHS = {"email": {}, "external-id": {"external_id_field": "Sefaria_User_Id__c"}}


def client(fake: FakeSalesforce, **schema: str) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST, sleep=lambda s: 0,
                                       token_cache=TokenCache(), schema=SalesforceSchema(**schema))


def creates(fake: FakeSalesforce) -> int:
    return fake.counts["create"] + fake.counts["upsert"]


@pytest.fixture
def fake_ids() -> FakeSalesforce:
    with FakeSalesforce(external_ids={APP_USER: ("NationBuilder_Id__c", "Sefaria_App_Email__c",
                                                 "Sefaria_User_Id__c")}) as server:
        yield server


# --- 1. two drivers of one signup ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", list(PATHS))
def test_two_threads_driving_one_signup_make_one_app_user(db, fake_ids: FakeSalesforce, path: str) -> None:
    fake = fake_ids
    users = seed_signup_profiles(db, 5, first_id=10)
    results: list = []
    for uid in users:
        fake.inject(Fault.slow(0.6), times=1, kind="upsert" if path == "external-id" else "create")
        apps = [CrmStates.open(db, client(fake, **PATHS[path])) for _ in range(2)]
        barrier = threading.Barrier(2)

        def drive(app: CrmStates, uid: int = uid) -> None:
            barrier.wait()
            results.append(app.run_signup(uid))

        threads = [threading.Thread(target=drive, args=(app,)) for app in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    by_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert {e: n for e, n in by_email.items() if n != 1} == {} and len(by_email) == len(users)
    assert creates(fake) == len(users)  # one create request per user: the second driver never sent
    outcomes = Counter((r.outcome, r.state) for r in results)
    # The second driver waited for the first one's outcome and adopted it, or says the run is claimed.
    assert set(outcomes) <= {("finished", "WroteSalesforceAppUserUid"), ("claimed", "RequestAddToSalesforce"),
                             ("conflict", "UserCreated"), ("conflict", "RequestAddToSalesforce"),
                             ("conflict", "WroteSalesforceAppUserUid")}, outcomes
    check = check_histories(db, signup.SPEC)
    check.assert_clean()
    assert check.states == Counter({"WroteSalesforceAppUserUid": len(users)})
    assert set(check.runs_per_profile.values()) == {1}
    record(f"12.1 two threads, one signup ({path})", users=len(users), create_requests=creates(fake),
           app_users=len(by_email), outcomes={f"{o}/{s}": n for (o, s), n in outcomes.items()})


def _driver(env: dict[str, str], uid: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(HERE / "signup_driver.py"), str(uid), str(uid)], env=env,
                                stdout=out, stderr=out)


def _summary(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


@pytest.mark.parametrize("path", list(PATHS))
def test_a_driver_paused_mid_request_blocks_a_second_from_sending(db, mongo_url: str, fake_ids: FakeSalesforce,
                                                                  tmp_path: Path, path: str) -> None:
    """Process A's create is in flight when A is SIGSTOPped; process B drives the same signup: it sends
    nothing and says the run is claimed. A is SIGCONTed and finishes: one app user."""
    fake = fake_ids
    [uid] = seed_signup_profiles(db, 1, first_id=500)
    extra = {"SALESFORCE_EXTERNAL_ID_FIELD": "Sefaria_User_Id__c"} if path == "external-id" else {}
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl", CRM_STATES_CLAIM_WAIT="1", **extra)
    kind = "upsert" if path == "external-id" else "create"
    fake.inject(Fault.slow(3.0), times=1, kind=kind)
    first = _driver(env, uid, tmp_path / "a.log")
    assert wait_until(lambda: fake.counts[kind] == 1, 60)  # A's request is in flight
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, str(HERE / "signup_driver.py"), str(uid), str(uid)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert json.loads(second.stdout.strip().splitlines()[-1])["outcomes"] == {"claimed": 1}
        assert fake.counts[kind] == 1  # B sent nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(60) == 0
    assert _summary(tmp_path / "a.log")["states"] == {"WroteSalesforceAppUserUid": 1}
    resumed = cli(env, "resume", "--machine", signup.NAME, "--state", "RequestAddToSalesforce")
    assert "0 profiles in RequestAddToSalesforce re-driven" in resumed.stdout  # nothing left half-way
    assert len(fake.records(APP_USER)) == 1 and creates(fake) == 1
    check_histories(db, signup.SPEC).assert_clean()
    record(f"12.1 SIGSTOP around the request, a second process ({path})", create_requests=creates(fake),
           app_users=len(fake.records(APP_USER)), second_driver="claimed, nothing sent")


def test_resume_during_a_live_signup_sends_nothing(db, mongo_url: str, fake: FakeSalesforce, tmp_path: Path) -> None:
    [uid] = seed_signup_profiles(db, 1, first_id=600)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl", CRM_STATES_CLAIM_WAIT="0")
    fake.inject(Fault.slow(4.0), times=1, kind="create")
    live = _driver(env, uid, tmp_path / "live.log")
    assert wait_until(lambda: fake.counts["create"] == 1, 60)
    resumed = cli(env, "resume", "--machine", signup.NAME, "--state", "RequestAddToSalesforce")
    assert resumed.returncode == 1 and "claimed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert live.wait(60) == 0
    assert len(fake.records(APP_USER)) == 1 and fake.counts["create"] == 1
    assert Store(db).position(uid, signup.NAME).state == "WroteSalesforceAppUserUid"
    record("12.1 resume during a live signup", create_requests=fake.counts["create"],
           resume_said=resumed.stdout.splitlines()[-1][:100])


def test_a_driver_paused_past_its_claim_never_sends_after_it_wakes(db, mongo_url: str, fake: FakeSalesforce,
                                                                   tmp_path: Path) -> None:
    """A's claim expires while it is stopped: B takes the run over, finds no app user yet (Salesforce is still
    processing A's request) and, A not being provably gone, sends nothing: "outcome unknown". A wakes, its
    answer arrives, its commit loses to B's: nothing is sent twice, and a resume finds the app user A made."""
    [uid] = seed_signup_profiles(db, 1, first_id=700)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl", CRM_STATES_CLAIM_SECONDS="1",
                  CRM_STATES_CLAIM_WAIT="0")
    fake.inject(Fault.slow(8.0), times=1, kind="create")
    first = _driver(env, uid, tmp_path / "a.log")
    assert wait_until(lambda: fake.counts["create"] == 1, 60)
    first.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)  # past the claim, on any clock
        second = subprocess.run([sys.executable, str(HERE / "signup_driver.py"), str(uid), str(uid)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert json.loads(second.stdout.strip().splitlines()[-1])["states"] == {"WroteSalesforceErrorToDb": 1}
        position = Store(db).position(uid, signup.NAME)
        assert position.detail.get("outcome_unknown") is True and fake.counts["create"] == 1
        assert wait_until(lambda: len(fake.records(APP_USER)) == 1, 30)  # A's request lands in Salesforce
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(60)
    # A's late answer was not committed: its commit lost to B's, and A reports where the run stands.
    assert _summary(tmp_path / "a.log")["states"] == {"WroteSalesforceErrorToDb": 1}
    resumed = cli(env, "resume", "--machine", signup.NAME, "--state", "WroteSalesforceErrorToDb")
    assert has_state(resumed.stdout, "WroteSalesforceAppUserUid", 1), resumed.stdout + resumed.stderr
    assert fake.counts["create"] == 1 and len(fake.records(APP_USER)) == 1
    assert db.profiles.find_one({"id": uid})["sf_app_user_id"] == fake.records(APP_USER)[0]["Id"]
    check_histories(db, signup.SPEC).assert_clean()
    record("12.1 a driver paused past its claim", create_requests=fake.counts["create"],
           app_users=len(fake.records(APP_USER)), takeover="outcome unknown, nothing sent",
           paused_driver="its late answer not committed", resume="found by email, no create")


def has_state(text: str, state: str, count: int) -> bool:
    return re.search(rf"^\s*{state}\s+{count}\b", text, re.M) is not None


# --- 4. hostile answers ------------------------------------------------------------------------------------

def test_hostile_answers_get_failure_states_never_a_silent_pick(db, fake: FakeSalesforce, tmp_path: Path) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 9000 + i} for i in range(1, 6)])
    twins = [fake.insert(APP_USER, {"NationBuilder_Id__c": "9001"}) for _ in range(2)]
    fake.insert(APP_USER, {"NationBuilder_Id__c": "9002"}, record_id="not an id!")
    fake.insert(APP_USER, {"NationBuilder_Id__c": "9003"}, record_id="a0A" + "x" * 200)
    fake.insert(APP_USER, {"NationBuilder_Id__c": "9004"}, record_id="a0A" + "9" * (9 * 1024 * 1024))
    clean = fake.insert(APP_USER, {"NationBuilder_Id__c": "9005"})
    journal = tmp_path / "journal.jsonl"
    app = CrmStates.open(db, client(fake), journal_path=str(journal))
    results = {r.profile_id: r for r in app.validate_profiles(list(db.profiles.find()))}
    assert {pid: r.state for pid, r in results.items()} == {
        1: "WroteUnexpectedResponse", 2: "WroteUnexpectedResponse", 3: "WroteUnexpectedResponse",
        4: "WroteUnexpectedResponse", 5: "WroteSalesforceAppUserUid"}
    store = Store(db)
    detail = store.position(1, nb.NAME).detail
    assert detail["candidates"] == sorted(twins) and "2 App Users hold NationBuilder id 9001" in detail["error"]
    for pid in (2, 3, 4):
        error = store.position(pid, nb.NAME).detail["error"]
        assert "refused" in error and len(error) <= 300 and "x" * 50 not in error and "9" * 50 not in error
    assert db.profiles.count_documents({"sf_app_user_id": {"$exists": True}}) == 1
    assert db.profiles.find_one({"id": 5})["sf_app_user_id"] == clean
    docs = list(db[POSITIONS].find())
    assert max(len(json.dumps(d, default=str)) for d in docs) < 5_000  # nothing oversized was stored
    assert not journal.exists() or journal.stat().st_size < 10_000
    record("12.4 hostile answers", profiles=5, two_app_users="UnexpectedResponse naming both",
           bad_ids="UnexpectedResponse, short detail", largest_position_document=max(len(json.dumps(d, default=str))
                                                                                    for d in docs))


# --- 3. inputs that change while a chunk is in flight -------------------------------------------------------

def test_profiles_changed_or_deleted_mid_chunk_get_no_stale_result(db, fake: FakeSalesforce) -> None:
    """A co-writer changes, removes or deletes NationBuilder ids while the chunks' lookups are in flight
    (the fake answers late). Afterwards every profile's outcome is about its current id, no profile holds
    an app user of an id it no longer has, and a deleted profile is never counted as validated."""
    n = 600
    found = seed_nb_profiles(db, fake, n, found_every=2)
    fake.faults = fake.faults.__class__(latency=0.05)
    rng = random.Random(12)
    changed: dict[int, object] = {}
    deleted: set[int] = set()
    stop = threading.Event()

    def co_writer() -> None:
        while not stop.is_set():
            pid = rng.randint(1, n)
            roll = rng.random()
            if roll < 0.5:
                value = 700_000 + rng.randint(1, n)
                db.profiles.update_one({"id": pid}, {"$set": {"nationbuilder_id": value}})
                changed[pid] = value
            elif roll < 0.8:
                db.profiles.update_one({"id": pid}, {"$unset": {"nationbuilder_id": ""}})
                changed[pid] = None
            else:
                db.profiles.delete_one({"id": pid})
                deleted.add(pid)
            time.sleep(0.01)

    writer = threading.Thread(target=co_writer)
    writer.start()
    try:
        app = CrmStates.open(db, client(fake))
        first = ValidationRunner(app, RunnerConfig(chunk_size=50, concurrency=2)).run()
    finally:
        stop.set()
        writer.join(10)
    fake.faults = fake.faults.__class__()
    second = ValidationRunner(CrmStates.open(db, client(fake)), RunnerConfig(chunk_size=50)).run()
    app_user_of = {700_000 + pid: app_user for pid, app_user in found.items()}
    store = Store(db)
    positions = store.positions_of(nb.NAME, range(1, n + 1))
    wrong = []
    for profile in db.profiles.find({}, {"_id": 0, "id": 1, "nationbuilder_id": 1, "sf_app_user_id": 1}):
        nb_id = profile.get("nationbuilder_id")
        if nb_id is None:
            continue  # removed: whatever it held before, no result of this run was written for it
        position = positions.get(profile["id"])
        assert position is not None and nb.validated_for(profile, position), (profile, position)
        want = app_user_of.get(nb_id)
        if position.state == "WroteSalesforceAppUserUid" and profile.get("sf_app_user_id") != want:
            wrong.append(profile["id"])
    assert not wrong, wrong[:10]
    for pid in deleted:  # a profile deleted mid-run: never a validation counted for it after its deletion
        assert db.profiles.find_one({"id": pid}) is None
    assert first.deleted + second.deleted <= len(deleted)
    check_histories(db, nb.SPEC).assert_clean()
    record("12.3 inputs changed mid-chunk", profiles=n, changed=len(changed), deleted=len(deleted),
           first_run={"validated": first.processed, "deleted": first.deleted,
                      "changed": first.outcomes.get("changed", 0), "skipped": first.outcomes.get("skipped", 0)},
           second_run_validated=second.processed, stale_results=len(wrong))


# --- 5. figures that are what the database holds --------------------------------------------------------------

def test_refused_profile_writes_are_counted_as_db_failures_not_as_validated(db, fake: FakeSalesforce) -> None:
    seed_nb_profiles(db, fake, 300)
    flaky = FlakyDatabase(db, WritePlan({("profiles", "update", n) for n in range(1, 100)}))
    app = CrmStates(store=Store(flaky), crm=client(fake), claim_wait=0)
    report = ValidationRunner(app, RunnerConfig(chunk_size=100, concurrency=1)).run()
    held = Counter(states_by_profile(db, nb.NAME).values())
    assert report.states == held and report.processed == sum(held.values()) == 300
    assert set(held) <= set(nb.SPEC.db_failure_states)  # not one counted as validated
    assert db.profiles.count_documents({"sf_app_user_id": {"$exists": True}}) == 0
    record("12.5 refused profile writes", printed=dict(report.states), database=dict(held))


def test_a_runner_paused_past_its_lease_counts_only_its_own_work(db, mongo_url: str, fake: FakeSalesforce,
                                                                 tmp_path: Path) -> None:
    """Runner A is SIGSTOPped past its leases; runner B takes its ranges over. When A wakes it does not
    renew a lease it lost and does not count profiles B validated: the two printed totals add up to the
    profiles validated, and every per-state count is what the database holds."""
    n = 3000
    seed_nb_profiles(db, fake, n)
    fake.faults = fake.faults.__class__(latency=0.1)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    command = cli_command("validate-nb", "--chunk-size", "100", "--concurrency", "1", "--lease-seconds", "2")
    with open(tmp_path / "a.log", "wb") as out_a:
        a = subprocess.Popen(command, env=env, stdout=out_a, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: db[POSITIONS].count_documents({}) >= 300 or a.poll() is not None, 120)
        a.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3)  # A's leases expire
            b = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        finally:
            a.send_signal(signal.SIGCONT)
        a.wait(300)
    a_out = (tmp_path / "a.log").read_text()
    totals = [int(m.group(1)) for m in re.finditer(r"^(\d+) of \d+ pending profiles validated", a_out + b.stdout, re.M)]
    assert len(totals) == 2, a_out + b.stdout
    held = Counter(states_by_profile(db, nb.NAME).values())
    assert sum(totals) == sum(held.values()) == n, (totals, held)
    for state, count in held.items():
        printed = sum(int(m.group(1)) for m in re.finditer(rf"^\s+{state}\s+(\d+)$", a_out + b.stdout, re.M))
        assert printed == count, (state, printed, count)
    check_histories(db, nb.SPEC).assert_clean()
    record("12.5/12.6 a runner paused past its lease", profiles=n, printed_totals=totals, database=sum(held.values()))


# --- 7. one CrmLog line per finding --------------------------------------------------------------------------

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.sampled_from(["replay", "resume", "validate"]), min_size=1, max_size=6))
def test_replay_and_resume_in_any_order_leave_one_line_per_finding(db, fake: FakeSalesforce, tmp_path_factory,
                                                                   order: list[str]) -> None:
    for name in db.list_collection_names():
        db.drop_collection(name)
    journal = tmp_path_factory.mktemp("journal") / "journal.jsonl"
    db.profiles.insert_one({"id": 1, "nationbuilder_id": 4711})
    flaky = CrmStates(store=Store(FlakyDatabase(db, WritePlan({("profiles", "update", 1)}))), crm=client(fake),
                      journal=Journal(journal), claim_wait=0)
    assert flaky.validate_profile(1).state == "DbWriteNotFoundErrorLogged"  # the 404 line was journaled
    app = CrmStates.open(db, client(fake), journal_path=str(journal))
    for step in order:
        if step == "replay":
            replay_file(app.store, journal)
        elif step == "resume":
            app.resume(nb.NAME, Store(db).position(1, nb.NAME).state)
        else:
            app.validate_profile(1, restart=True)
        lines = db.profiles.find_one({"id": 1}).get("CrmLog") or []
        found = [line for line in lines if line.startswith("NbProfileNotFoundInSalesforce-")]
        assert len(found) <= 1, (order, lines)
    written = [t.write.crm_log for t in Store(db).history(1, nb.NAME) if t.write and t.write.crm_log]
    entries = [e.write.crm_log for e in read_entries(journal.read_text().splitlines())]
    lines = db.profiles.find_one({"id": 1}).get("CrmLog") or []
    # One line for the finding, and it is the newest one any run or journal entry recorded.
    assert lines == [max(written + entries, key=lambda line: line.split("-", 1)[1][:24])], (order, lines)
