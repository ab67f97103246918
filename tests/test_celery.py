"""The Celery tasks (crm_states.celery_tasks) through a real worker on a real broker.

``redis-server`` (Debian's package) runs as a subprocess on a free loopback port, and ``celery -A
crm_states.celery_tasks worker`` as another, configured only from the environment as the command line is:
the test's SecantusDB (``MONGO_URL``/``MONGO_DB``) and a FakeSalesforce on loopback (``CRM_TYPE`` and the
``SALESFORCE_*`` settings). The test sends tasks with ``.delay`` and reads the outcome from MongoDB and
from the fake's request counters.

Without ``redis-server`` (and no way to install it with apt-get as root), the same tests run on Celery's
in-memory transport with a worker in a thread, and ``test_the_broker_is_a_real_redis_server`` is skipped
saying so. ``CRM_STATES_TEST_CELERY=memory`` forces that fallback.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from pymongo import MongoClient
from pymongo.database import Database

celery = pytest.importorskip("celery", reason="the celery extra is not installed (pip install -e \".[dev]\")")

from crm_states.api import CrmStates  # noqa: E402
from crm_states.celery_tasks import CrmTasks, make_app, register_tasks  # noqa: E402
from crm_states.store import POSITIONS, Store  # noqa: E402
from crm_states.testing import Fault, FakeSalesforce  # noqa: E402
from crm_states.testing.mongo import free_port  # noqa: E402
from machines import nb_profile_validation as nb  # noqa: E402
from machines import new_user_signup as signup  # noqa: E402

log = logging.getLogger(__name__)

APP_USER = "Sefaria_App_User__c"
TIMEOUT = 60


# --- redis-server ------------------------------------------------------------------------------------------

def find_redis_server() -> tuple[str | None, str]:
    """``(path to redis-server or None, why not)``. Installs Debian's package when root and apt-get exist."""
    if os.environ.get("CRM_STATES_TEST_CELERY") == "memory":
        return None, "CRM_STATES_TEST_CELERY=memory"
    found = shutil.which("redis-server")
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "redis-server is not on PATH and apt-get cannot be used here (not root, or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + 240
    for step in (["apt-get", "install", "-y", "-qq", "redis-server"], ["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "redis-server"]):
        if shutil.which("redis-server") or time.monotonic() > deadline:
            break
        try:
            subprocess.run(step, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=max(1.0, deadline - time.monotonic()), check=False)
        except subprocess.TimeoutExpired:
            break
    found = shutil.which("redis-server")
    return (found, "") if found else (None, "redis-server is not on PATH and `apt-get install redis-server` failed")


@attrs.define
class Redis:
    url: str
    version: str
    process: subprocess.Popen[bytes]


def start_redis(executable: str, directory: Path) -> Redis:
    """``redis-server`` on a free loopback port, nothing persisted; returns once it answers PING."""
    import redis

    port = free_port()
    with open(directory / "redis.log", "ab") as out:
        process = subprocess.Popen([executable, "--save", "", "--appendonly", "no", "--port", str(port),
                                    "--bind", "127.0.0.1", "--dir", str(directory)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: "
                                   f"{(directory / 'redis.log').read_text()[-2000:]}")
            try:
                if client.ping():
                    return Redis(f"redis://127.0.0.1:{port}", client.info("server")["redis_version"], process)
            except redis.RedisError:
                if time.monotonic() > deadline:
                    stop(process)
                    raise RuntimeError(f"redis-server did not answer PING on port {port} in 15 s") from None
                time.sleep(0.05)
    finally:
        client.close()


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: only the process this test started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# --- the world: database, fake Salesforce, broker, worker ----------------------------------------------------

@attrs.define
class World:
    db: Database
    fake: FakeSalesforce
    tasks: CrmTasks
    mode: str  # "redis" or "memory"
    note: str = ""
    redis: Redis | None = None


@pytest.fixture(scope="module")
def world(mongo_client: MongoClient, mongo_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("celery")
    db = mongo_client[f"celery_{uuid.uuid4().hex[:12]}"]
    env = {"MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_STATES_JOURNAL": str(tmp / "journal.jsonl"),
           "CRM_STATES_RETRY_BACKOFF": "1"}
    executable, why = find_redis_server()
    with FakeSalesforce() as fake:
        env.update({"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url,
                    "SALESFORCE_CLIENT_ID": fake.client_id, "SALESFORCE_CLIENT_SECRET": fake.client_secret})
        try:
            if executable:
                yield from _with_redis(executable, tmp, env, db, fake)
            else:
                yield from _in_memory(why, env, db, fake)
        finally:
            mongo_client.drop_database(db.name)


def _with_redis(executable: str, tmp: Path, env: dict[str, str], db: Database, fake: FakeSalesforce) -> Iterator[World]:
    redis = start_redis(executable, tmp)
    broker, backend = f"{redis.url}/0", f"{redis.url}/1"
    worker_env = {**os.environ, **env, "CRM_STATES_BROKER_URL": broker, "CRM_STATES_RESULT_BACKEND": backend}
    client = make_app(broker, backend)
    tasks = register_tasks(client)
    worker_log = tmp / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        with open(worker_log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "crm_states.celery_tasks", "worker", "--pool=solo", "-c", "1",
                 "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"crm-states-test-{os.getpid()}@%h"],
                env=worker_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for_worker(client, worker, worker_log)
        log.info("celery worker %d on redis-server %s at %s", worker.pid, redis.version, redis.url)
        yield World(db, fake, tasks, "redis", redis=redis)
    finally:
        if worker is not None:
            stop(worker)
            if worker.returncode not in (0, None):
                log.warning("celery worker exited with %s; its log:\n%s", worker.returncode,
                            worker_log.read_text()[-4000:])
        client.close()
        stop(redis.process)


def _wait_for_worker(client: Any, worker: subprocess.Popen[bytes], worker_log: Path) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the celery worker exited with {worker.returncode}:\n{worker_log.read_text()[-4000:]}")
        if client.control.ping(timeout=0.5):
            return
    stop(worker)
    raise RuntimeError(f"the celery worker did not answer ping in 45 s:\n{worker_log.read_text()[-4000:]}")


def _in_memory(why: str, env: dict[str, str], db: Database, fake: FakeSalesforce) -> Iterator[World]:
    from celery.contrib.testing.worker import start_worker

    note = (f"redis-server unavailable ({why}): the Celery tests ran on Celery's in-memory transport "
            f"(memory://) with an in-thread worker, not on a real Redis broker and worker process")
    log.warning(note)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        client = make_app("memory://", "cache+memory://")
        client.conf.broker_transport_options = {"polling_interval": 0.05}
        states: list[CrmStates] = []

        def open_states() -> CrmStates:
            if not states:
                states.append(CrmStates.from_env())
            return states[0]

        tasks = register_tasks(client, open_states=open_states, retry_backoff=1)
        with start_worker(client, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=15):
            yield World(db, fake, tasks, "memory", note=note)
        assert states, "the tasks did not use the open_states given to register_tasks"
        states[0].store.db.client.close()


# --- seeding and checks ----------------------------------------------------------------------------------------

def seed_nb(world: World, ids: range) -> set[int]:
    """NationBuilder-era profiles; every third one has an app user in Salesforce. Returns the found ids."""
    world.db.profiles.insert_many([{"id": i, "nationbuilder_id": 70_000 + i, "email": f"nb{i}@example.org"}
                                   for i in ids])
    found = set(ids[::3])
    world.fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(70_000 + i),
                                       "Sefaria_App_Email__c": f"nb{i}@example.org"} for i in sorted(found)])
    return found


def nb_states(world: World, ids: list[int]) -> dict[int, str | None]:
    known = Store(world.db).positions_of(nb.NAME, ids)
    return {pid: known[pid].state if pid in known else None for pid in ids}


def assert_untouched(world: World, ids: list[int]) -> None:
    """Never read into a machine: no state, no transition, no CRM log, no CRM id."""
    touched = world.db.profiles.count_documents({"id": {"$in": ids}, "$or": [
        {"CrmLog": {"$exists": True}}, {"sf_app_user_id": {"$exists": True}}]})
    assert touched == 0
    assert world.db[POSITIONS].count_documents({"profile_id": {"$in": ids}}) == 0


def delta(fake: FakeSalesforce, kind: str) -> Callable[[], int]:
    before = fake.counts[kind]
    return lambda: fake.counts[kind] - before


def expected(found: set[int], ids: list[int]) -> dict[int, str]:
    return {i: "WroteSalesforceAppUserUid" if i in found else "WroteNotFound" for i in ids}


# --- the tests ---------------------------------------------------------------------------------------------------

def test_validate_chunk_validates_exactly_the_listed_profiles_with_one_lookup(world: World) -> None:
    found = seed_nb(world, range(1, 41))
    chunk = list(range(1, 41, 2))   # the odd ids; the even ones, between them, are not in the chunk
    outside = list(range(2, 41, 2))
    queries = delta(world.fake, "query")
    summary = world.tasks.validate_chunk.delay(profile_ids=chunk).get(timeout=TIMEOUT)
    assert nb_states(world, chunk) == expected(found, chunk)
    assert queries() == 1  # one batched lookup for the whole chunk
    query = world.fake.soql_log[-1]
    assert " IN (" in query and all(f"'{70_000 + i}'" in query for i in chunk)
    assert not any(f"'{70_000 + i}'" in query for i in outside)
    assert_untouched(world, outside)
    hits = len(found & set(chunk))
    assert summary["states"] == {"WroteSalesforceAppUserUid": hits, "WroteNotFound": len(chunk) - hits}
    assert summary["chunk_states"] == summary["states"]
    assert summary["processed"] == len(chunk) and summary["lookups"] == 1 and summary["pending_after"] == 0
    assert summary["attempt"] == 1 and summary["stopped"] is None

    again = world.tasks.validate_chunk.delay(profile_ids=chunk).get(timeout=TIMEOUT)
    assert again["processed"] == 0 and queries() == 1  # finished profiles are left alone: no second lookup
    assert again["chunk_states"] == summary["states"]


def test_validate_chunk_takes_an_id_range(world: World) -> None:
    found = seed_nb(world, range(101, 131))
    world.db.profiles.update_one({"id": 110}, {"$set": {"nationbuilder_id": None}})  # in the range, not pending
    queries = delta(world.fake, "query")
    summary = world.tasks.validate_chunk.delay(id_range=[101, 121]).get(timeout=TIMEOUT)
    chunk = [i for i in range(101, 121) if i != 110]
    assert nb_states(world, chunk) == expected(found, chunk)
    assert queries() == 1 and summary["processed"] == 19 and summary["chunk"] == {"id_range": [101, 121]}
    assert summary["chunk_states"]["not started"] == 1
    assert_untouched(world, list(range(121, 131)) + [110])


def test_a_transient_crm_failure_is_retried_by_celery(world: World) -> None:
    found = seed_nb(world, range(201, 211))
    chunk = list(range(201, 211))
    world.fake.inject(Fault.error(503), times=4, kind="query")  # past the client's retry budget: one lookup fails
    summary = world.tasks.validate_chunk.delay(profile_ids=chunk).get(timeout=TIMEOUT)
    assert summary["attempt"] == 2
    assert nb_states(world, chunk) == expected(found, chunk)
    history = [t.dest for t in Store(world.db).history(201, nb.NAME)]
    assert history[:5] == ["NotChecked", "RequestedContact", "UnexpectedResponse", "WroteUnexpectedResponse",
                           "NotChecked"]  # the first attempt's failure, then a new run


def test_the_api_limit_is_not_retried(world: World) -> None:
    seed_nb(world, range(301, 311))
    chunk = list(range(301, 311))
    queries = delta(world.fake, "query")
    limit = world.fake.daily_limit
    world.fake.daily_limit = world.fake.api_usage  # REQUEST_LIMIT_EXCEEDED from now on
    try:
        summary = world.tasks.validate_chunk.delay(profile_ids=chunk).get(timeout=TIMEOUT)
    finally:
        world.fake.daily_limit = limit
    assert summary["attempt"] == 1 and "limit" in summary["stopped"]
    assert queries() == 1 and summary["processed"] == 0 and summary["pending_after"] == len(chunk)
    resumed = world.tasks.validate_chunk.delay(profile_ids=chunk).get(timeout=TIMEOUT)  # "tomorrow"
    assert resumed["pending_after"] == 0 and resumed["processed"] == len(chunk)


def test_run_signup_through_the_worker_makes_one_app_user(world: World) -> None:
    world.db.profiles.insert_one({"id": 1000, "email": "chana@example.org", "first_name": "חנה",
                                  "last_name": "O'Neil"})
    first = world.tasks.run_signup.delay(1000, lang="he").get(timeout=TIMEOUT)
    assert first["state"] == "WroteSalesforceAppUserUid" and first["outcome"] == "finished"
    again = world.tasks.run_signup.delay(1000).get(timeout=TIMEOUT)
    assert again["state"] == "WroteSalesforceAppUserUid"
    [app_user] = [r for r in world.fake.records(APP_USER) if r.get("Sefaria_App_Email__c") == "chana@example.org"]
    profile = world.db.profiles.find_one({"id": 1000})
    assert profile["sf_app_user_id"] == app_user["Id"]
    assert Store(world.db).position(profile["id"], signup.NAME).state == "WroteSalesforceAppUserUid"
    missing = world.tasks.run_signup.delay(1001)
    with pytest.raises(Exception, match="no profile with id 1001"):
        missing.get(timeout=TIMEOUT)


def test_a_signup_stopped_by_a_transient_failure_is_retried_and_makes_one_app_user(world: World) -> None:
    world.db.profiles.insert_one({"id": 1100, "email": "retry@example.org"})
    world.fake.inject(Fault.error(503), times=4, kind="create")  # every create of the first attempt fails
    result = world.tasks.run_signup.delay(1100).get(timeout=TIMEOUT)
    assert result["attempt"] == 2 and result["state"] == "WroteSalesforceAppUserUid"
    states = [t.dest for t in Store(world.db).history(1100, signup.NAME)]
    assert "WroteSalesforceErrorToDb" in states and states[-1] == "WroteSalesforceAppUserUid"
    assert len([r for r in world.fake.records(APP_USER) if r.get("Sefaria_App_Email__c") == "retry@example.org"]) == 1


def test_sync_sustainers_through_the_worker_returns_the_sync_report(world: World) -> None:
    sustainers = [world.fake.insert(APP_USER, {"Sefaria_App_Email__c": f"s{i}@example.org", "Sustainer__c": True})
                  for i in range(3)]
    lapsed = world.fake.insert(APP_USER, {"Sefaria_App_Email__c": "lapsed@example.org", "Sustainer__c": False})
    world.db.profiles.insert_many([{"id": 2000 + i, "sf_app_user_id": sid, "is_sustainer": False}
                                   for i, sid in enumerate(sustainers)]
                                  + [{"id": 2010, "sf_app_user_id": lapsed, "is_sustainer": True}])
    refused = world.tasks.sync_sustainers.delay().get(timeout=TIMEOUT)  # demoting 1 of 1 is past 10 %
    assert refused["refused"] and refused["changed"] == 0
    assert refused["to_promote"] == 3 and refused["to_demote"] == 1 and refused["sustainers_in_crm"] == 3
    report = world.tasks.sync_sustainers.delay(force=True).get(timeout=TIMEOUT)
    assert report["refused"] is None and report["read_failed"] is None
    assert report["changed"] == 4 and report["states"] == {"WroteSustainerStatus": 4} and report["problems"] == 0
    assert {p["id"]: p["is_sustainer"] for p in world.db.profiles.find({"id": {"$gte": 2000, "$lt": 2100}})} == {
        2000: True, 2001: True, 2002: True, 2010: False}
    again = world.tasks.sync_sustainers.delay().get(timeout=TIMEOUT)
    assert again["changed"] == 0 and again["to_promote"] == again["to_demote"] == 0


def test_the_last_attempt_returns_its_summary_and_bad_arguments_are_not_retried(world: World) -> None:
    """Run in this process (``apply``), with no retry left: the failure stays a state, reported, not raised."""
    from crm_states.crm import RetryPolicy, SalesforceConnectionManager

    crm = SalesforceConnectionManager(world.fake.url, world.fake.client_id, world.fake.client_secret,
                                      policy=RetryPolicy(attempts=1, base_delay=0.0))
    app = CrmStates.open(world.db, crm)
    local = register_tasks(make_app("memory://"), open_states=lambda: app, max_retries=0)
    seed_nb(world, range(401, 406))
    world.fake.inject(Fault.error(503), kind="query")
    summary = local.validate_chunk.apply(kwargs={"id_range": [401, 406]}).get()
    assert summary["retries_exhausted"] is True and summary["chunk_states"] == {"WroteUnexpectedResponse": 5}
    for bad in ({}, {"profile_ids": [1], "id_range": [1, 2]}, {"profile_ids": ["1"]}, {"id_range": [5, 5]}):
        outcome = local.validate_chunk.apply(kwargs=bad)
        assert outcome.failed() and isinstance(outcome.result, (TypeError, ValueError)), bad


def test_signup_sweep_signs_up_the_users_a_signup_missed(world: World) -> None:
    joined = dt.datetime(2025, 5, 5)
    ids = list(range(5001, 5011))
    world.db.profiles.insert_many([{"id": i, "email": f"sweep{i}@example.org", "date_joined": joined} for i in ids])
    world.fake.insert(APP_USER, {"Sefaria_App_Email__c": "sweep5003@example.org"})  # migrated: adopted
    creates = delta(world.fake, "collection_create")
    window = {"joined_after": "2025-05-01", "joined_before": "2025-05-06T00:00:00+00:00"}
    summary = world.tasks.signup_sweep.delay(older_than=0, **window).get(timeout=TIMEOUT)
    assert summary["states"] == {"WroteSalesforceAppUserUid": 10} and summary["pending"] == 10
    assert summary["app_users"] == {"adopted by email": 1, "created": 9} and creates() == 1
    positions = Store(world.db).positions_of(signup.NAME, ids)
    assert {p.state for p in positions.values()} == {"WroteSalesforceAppUserUid"} and len(positions) == 10
    again = world.tasks.signup_sweep.delay(older_than=0, **window).get(timeout=TIMEOUT)
    assert again["pending"] == 0 and again["signed_up_before"] == 10 and creates() == 1


def test_the_broker_is_a_real_redis_server(world: World) -> None:
    if world.mode != "redis":
        pytest.skip(world.note)
    assert world.redis is not None and world.redis.process.poll() is None
    assert world.tasks.validate_chunk.app.conf.broker_url.startswith(world.redis.url)
    print(f"redis-server {world.redis.version} at {world.redis.url}")
