"""The validate-nb batch runner: batching, leases, limits, several runners at once, SIGKILL at random."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
from pymongo import MongoClient, monitoring

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.results import Matches
from crm_states.crm.salesforce import TokenCache
from crm_states.leases import LEASES, RangeLeases
from crm_states.lookups import RangeLookups
from crm_states.owners import Holder
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import POSITIONS
from crm_states.testing import FakeSalesforce, Fault
from machines import nb_profile_validation as nb
from tests.faults import assert_history_is_path, history_lengths, states_by_profile

APP_USER = "Sefaria_App_User__c"


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


def seed(db, fake: FakeSalesforce, n: int, *, first_id: int = 1) -> set[int]:
    """n profiles with nationbuilder ids; every third one has an app user. Returns the found ids."""
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 50_000 + i} for i in range(first_id, first_id + n)])
    found = set(range(first_id, first_id + n, 3))
    fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(50_000 + i)} for i in sorted(found)])
    return found


def app_for(db, fake: FakeSalesforce) -> CrmStates:
    crm = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                      policy=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda s: None)
    return CrmStates.open(db, crm)


def assert_all_validated(db, found: set[int], n: int) -> None:
    states = states_by_profile(db, nb.NAME)
    assert len(states) == n
    for pid, state in states.items():
        assert state == ("WroteSalesforceAppUserUid" if pid in found else "WroteNotFound"), pid
    per_profile = history_lengths(db, nb.NAME)
    assert set(per_profile.values()) == {4}  # [*] -> NotChecked -> RequestedContact -> X -> Wrote*: no transition twice


def test_runner_validates_every_pending_profile_with_one_lookup_per_range(db, fake: FakeSalesforce) -> None:
    found = seed(db, fake, 2500)
    db.profiles.insert_many([{"id": 9001}, {"id": 9002, "nationbuilder_id": None}, {"id": 9003, "nationbuilder_id": 0}])
    report = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=500)).run()
    assert report.processed == report.pending_at_start == 2500
    assert report.states == {"WroteSalesforceAppUserUid": len(found), "WroteNotFound": 2500 - len(found)}
    assert fake.counts["query"] == 5 and fake.counts["token"] == 1  # 2,500 profiles: 5 lookups
    assert db[POSITIONS].count_documents({"profile_id": {"$gt": 9000}}) == 0
    db.profiles.delete_many({"id": {"$gt": 9000}})
    assert_all_validated(db, found, 2500)
    again = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=500)).run()
    assert again.pending_at_start == 0 and again.processed == 0  # finished profiles are left alone


def test_dry_run_and_limit(db, fake: FakeSalesforce) -> None:
    seed(db, fake, 300)
    dry = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=100, dry_run=True)).run()
    assert dry.pending_at_start == 300 and "dry run" in dry.stopped
    assert fake.total_requests == 0 and db[POSITIONS].count_documents({}) == 0
    limited = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=100, limit=150)).run()
    assert limited.processed == 150
    assert db[POSITIONS].count_documents({"machine": nb.NAME}) == 150


def test_the_api_limit_stops_the_run_and_a_later_run_finishes(db, fake: FakeSalesforce) -> None:
    found = seed(db, fake, 1000)
    fake.daily_limit = 3  # the token, then two lookups, then REQUEST_LIMIT_EXCEEDED
    report = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=200, concurrency=1)).run()
    assert report.stopped and "API limit" in report.stopped
    assert 0 < report.processed < 1000
    assert db.crm_leases.count_documents({"owner": {"$exists": True}}) == 0  # leases released
    fake.daily_limit = 100_000
    ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=200)).run()
    assert_all_validated(db, found, 1000)


def test_max_api_calls_stops_before_the_budget_is_passed(db, fake: FakeSalesforce) -> None:
    seed(db, fake, 1000)
    report = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=100, concurrency=1, max_api_calls=3)).run()
    assert report.stopped and "--max-api-calls 3" in report.stopped
    assert fake.total_requests <= 4  # checked before each range: at most one range past the budget's edge


def test_four_runners_at_once_never_work_on_one_profile_twice(db, fake: FakeSalesforce) -> None:
    found = seed(db, fake, 3000)
    reports = []
    runners = [ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=250, concurrency=2)) for _ in range(4)]
    threads = [threading.Thread(target=lambda r=r: reports.append(r.run())) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sum(r.processed for r in reports) == 3000
    assert sum(r.outcomes["conflict"] for r in reports) == 0
    assert sum(r.skipped_ranges for r in reports) > 0  # they did meet each other's leases
    assert_all_validated(db, found, 3000)


def test_leases_expire_and_dead_owners_are_taken_over(db) -> None:
    mine = RangeLeases(db[LEASES], nb.NAME, seconds=60)
    other = RangeLeases(db[LEASES], nb.NAME, seconds=60)
    assert mine.agree_ranges(100, 1, 100) == other.agree_ranges(100, 7, 400) == (1, 100)
    assert mine.claim(0) and not other.claim(0) and mine.claim(0)
    mine.release(0)
    assert other.claim(0)
    me = Holder.me()
    # A holder on this host, boot and PID namespace whose process does not run: taken over at once.
    dead = RangeLeases(db[LEASES], nb.NAME, holder=Holder(me.host, me.boot_id, me.pid_namespace, 2**22 + 12345,
                                                          "1", "gone"))
    dead.agree_ranges(100, 1, 100)
    assert dead.claim(1)
    assert mine.claim(1)
    # This very PID with another start time is a reused PID, not this process: gone too.
    reused = RangeLeases(db[LEASES], nb.NAME, holder=attrs.evolve(me, started="0", token="old"))
    reused.agree_ranges(100, 1, 100)
    assert reused.claim(6) and mine.claim(6)
    # A holder elsewhere (another host, or another PID namespace) is waited out until its lease expires on
    # the database's clock.
    elsewhere = RangeLeases(db[LEASES], nb.NAME, seconds=0.2, holder=attrs.evolve(me, host="elsewhere", token="x"))
    container = RangeLeases(db[LEASES], nb.NAME, seconds=60, holder=attrs.evolve(me, pid_namespace="pid:[1]", pid=1,
                                                                                 token="c"))
    for lease in (elsewhere, container):
        lease.agree_ranges(100, 1, 100)
    assert elsewhere.claim(2) and container.claim(7)
    assert not mine.claim(2) and not mine.claim(7)
    time.sleep(0.4)
    assert mine.claim(2) and not mine.claim(7)  # expired; the container's PID 1 is not ours to judge
    assert dead.claim(3) and elsewhere.claim(4) and mine.claim(5)
    time.sleep(0.4)
    assert mine.prune() == 2  # the dead holder's and the expired one; the live leases stay
    held = {lease["_id"].rsplit(":", 1)[1] for lease in db[LEASES].find({"owner": {"$exists": True}})}
    assert held == {"0", "1", "2", "5", "6", "7"}
    assert mine.renew(5) and not elsewhere.renew(4)  # a pause past the lease: the lease is not renewed
    with pytest.raises(ValueError):
        RangeLeases(db[LEASES], nb.NAME, seconds=float("nan"))


def test_sigkill_at_random_instants_then_a_final_run_finishes(db, mongo_url: str, fake: FakeSalesforce) -> None:
    """Kill a runner process at random instants, again and again; a last run finishes: every profile
    ends in exactly one diagram state, each history is a path, no transition twice."""
    found = seed(db, fake, 3000)
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret}
    command = [sys.executable, "-m", "crm_states.cli", "validate-nb", "--chunk-size", "100", "--concurrency", "2"]
    rng = random.Random(20261124)
    kills = 0
    validated = {"machine": nb.NAME, "state": {"$in": ["WroteSalesforceAppUserUid", "WroteNotFound"]}}
    for _ in range(6):
        # A random instant of the run, whatever the machine's speed: once a random number of further
        # profiles is written, plus a random fraction of a chunk's time.
        target = db[POSITIONS].count_documents(validated) + rng.randint(1, 400)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while process.poll() is None and db[POSITIONS].count_documents(validated) < target \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(30)
    assert kills >= 5
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_all_validated(db, found, 3000)
    for pid in rng.sample(range(1, 3001), 50):
        assert_history_is_path(nb.SPEC, CrmStates.open(db, fake_crm := app_for(db, fake).crm).history(pid, nb.NAME))
    del fake_crm


def test_lookups_follow_query_pages_and_the_budget_counts_every_request(db, fake: FakeSalesforce) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 50_000 + i} for i in range(1, 301)])
    fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(50_000 + i)} for i in range(1, 301)])
    fake.page_size = 40  # a range of 100 ids answers 100 rows: one query and two nextRecordsUrl pages
    app = app_for(db, fake)
    report = ValidationRunner(app, RunnerConfig(chunk_size=100, concurrency=1, max_api_calls=7)).run()
    assert (fake.counts["query"], fake.counts["query_more"]) == (2, 4)
    assert report.api_requests == fake.api_usage == 6 and report.lookups == 2  # a third range would pass 7
    assert report.stopped == "--max-api-calls 7 reached" and report.states == {"WroteSalesforceAppUserUid": 200}


def test_the_printed_figures_are_what_was_spent_and_what_the_database_holds(db, mongo_url: str,
                                                                            fake: FakeSalesforce) -> None:
    seed(db, fake, 3000)
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret}
    run = subprocess.run([sys.executable, "-m", "crm_states.cli", "validate-nb", "--max-api-calls", "2",
                          "--lookup-size", "1000"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    held = db[POSITIONS].count_documents({"machine": nb.NAME})
    assert held == 2000 and f"{held} of 3000 pending profiles validated" in run.stdout
    assert "2 API requests, 2 batched lookups)" in run.stdout and fake.api_usage == 2
    assert "stopped: --max-api-calls 2 reached (2 API requests spent)" in run.stdout
    assert "in flight" not in run.stdout


class PositionCommits(monitoring.CommandListener):
    """How many operations each ``update`` command on ``crm_positions`` carried (what one drive held)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update" and event.command.get("update") == POSITIONS:
            self.sizes.append(len(event.command.get("updates", [])))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_a_range_is_looked_up_once_and_driven_a_chunk_at_a_time(db, mongo_url: str, fake: FakeSalesforce) -> None:
    found = seed(db, fake, 2500)
    commits = PositionCommits()
    client = MongoClient(mongo_url, event_listeners=[commits])
    try:
        app = app_for(client[db.name], fake)
        report = ValidationRunner(app, RunnerConfig(chunk_size=100, lookup_size=1000, concurrency=2)).run()
    finally:
        client.close()
    assert_all_validated(db, found, 2500)
    assert report.processed == 2500 and report.lookups == 3  # ranges of 1,000, 1,000 and 500
    assert fake.counts["query"] == 3 and report.api_requests == fake.api_usage == 3
    assert commits.sizes and max(commits.sizes) <= 100  # no drive held more than a chunk


def test_a_failed_range_lookup_fails_its_first_batch_and_the_others_ask_for_themselves(db,
                                                                                     fake: FakeSalesforce) -> None:
    found = seed(db, fake, 300)
    fake.inject(Fault.error(503), times=2, kind="query")  # both tries of the range's one lookup
    report = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=100, lookup_size=300, concurrency=1)).run()
    states = states_by_profile(db, nb.NAME)
    assert {states[pid] for pid in range(1, 101)} == {"WroteUnexpectedResponse"}
    for pid in range(101, 301):
        assert states[pid] == ("WroteSalesforceAppUserUid" if pid in found else "WroteNotFound"), pid
    assert fake.counts["query"] == 4 and report.lookups == 1  # the range's two tries, then one per later batch


def test_validate_nb_by_default_asks_ten_thousand_ids_in_one_request(db, mongo_url: str, fake: FakeSalesforce) -> None:
    seed(db, fake, 3000)
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret}
    dry = subprocess.run([sys.executable, "-m", "crm_states.cli", "validate-nb", "--dry-run", "--chunk-size", "500"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert "a run would make about 1 batched lookups" in dry.stdout, dry.stdout + dry.stderr
    run = subprocess.run([sys.executable, "-m", "crm_states.cli", "validate-nb", "--chunk-size", "500"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3000 of 3000 pending profiles validated" in run.stdout
    assert "1 API requests, 1 batched lookups)" in run.stdout and fake.api_usage == 1
    assert db[POSITIONS].count_documents({"machine": nb.NAME}) == 3000


def test_range_lookups_ask_the_range_once_and_only_new_ids_after_it() -> None:
    class Crm:
        def __init__(self) -> None:
            self.asked: list[list[int]] = []

        def lookup_app_users_by_nationbuilder_ids(self, ids):
            self.asked.append(sorted(ids))
            return {key: Matches(key, (f"a0A{key:012d}",)) for key in ids if key % 2}

    crm = Crm()
    lookups = RangeLookups(crm, [1, 2, 3, 4])
    assert set(lookups.lookup_app_users_by_nationbuilder_ids([1, 2])) == {1}
    assert set(lookups.lookup_app_users_by_nationbuilder_ids([3, 4, 9])) == {3, 9}  # 9: its id changed meanwhile
    assert crm.asked == [[1, 2, 3, 4], [9]]


def test_a_range_whose_lookup_was_paid_for_is_finished_when_the_budget_runs_out(db, fake: FakeSalesforce) -> None:
    found = seed(db, fake, 2500)
    config = RunnerConfig(chunk_size=100, lookup_size=1000, concurrency=2, max_api_calls=1)
    report = ValidationRunner(app_for(db, fake), config).run()
    assert report.stopped == "--max-api-calls 1 reached" and report.api_requests == fake.api_usage == 1
    states = states_by_profile(db, nb.NAME)
    assert report.processed == len(states) == 1000  # every batch of the one range looked up, none of the others
    assert sorted(states) == list(range(1, 1001))
    assert all(state == ("WroteSalesforceAppUserUid" if pid in found else "WroteNotFound") for pid, state in states.items())
