"""``validate-nb`` answered three ways (a REST lookup per range, ``--snapshot``: one Bulk API query job,
``--from-export``: the operators' report) gives the same final states on the same data; the snapshot modes'
own promises: requests counted, resumable, failed jobs, dropped snapshots, two runs at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.cli.validate_modes import summary_lines
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import SalesforceSchema, TokenCache
from crm_states.leases import LEASES, RangeLeases
from crm_states.records import finding_of
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.snapshots import BulkSource, ExportSource, SnapshotLookups, TableLookup
from crm_states.store import POSITIONS
from crm_states.store.snapshots import SNAPSHOTS, Snapshots
from crm_states.testing import FakeSalesforce
from machines import nb_profile_validation as nb
from tests.faults import states_by_profile
from tests.reliability.checks import check_histories
from tests.snapshot_world import EXPECTED, ON_CONTACT, SCHEMA_ENV, kind_of, seed_org, seed_profiles, write_export

ROOT = Path(__file__).resolve().parents[1]
PROFILES = range(1, 601)


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def other_dbs(mongo_client):
    names = [f"{prefix}_{os.getpid()}_{id(mongo_client) % 10_000}" for prefix in ("snap", "export")]
    yield [mongo_client[n] for n in names]
    for n in names:
        mongo_client.drop_database(n)


def env_for(mongo_url: str, db, fake: FakeSalesforce, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
            "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
            "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(tmp_path / f"{db.name}.jsonl"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **SCHEMA_ENV, **extra}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crm_states.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def printed_counts(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (Wrote\w+|\w+Logged|DbWrite\w+)\s+(\d+)$", out, re.M)}


def outcome_of(db) -> dict[int, tuple]:
    """Per profile: its state, the app user id written and the findings of its CrmLog (no times)."""
    states = states_by_profile(db, nb.NAME)
    return {p["id"]: (states.get(p["id"]), p.get("sf_app_user_id"),
                      tuple(sorted(finding_of(line)[0] for line in p.get("CrmLog", []))))
            for p in db.profiles.find({}, {"_id": 0, "id": 1, "sf_app_user_id": 1, "CrmLog": 1})}


def client_for(fake: FakeSalesforce, **schema) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                       policy=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda s: None,
                                       schema=SalesforceSchema(**schema))


def test_the_three_modes_give_the_same_final_states(db, other_dbs, mongo_url, fake, tmp_path) -> None:
    clean = seed_org(fake, PROFILES)
    export = write_export(fake, tmp_path / "report.csv")
    rest_db, snap_db, export_db = db, *other_dbs
    for target in (rest_db, snap_db, export_db):
        seed_profiles(target, PROFILES)

    before = dict(fake.counts)
    rest = cli(env_for(mongo_url, rest_db, fake, tmp_path), "validate-nb", "--chunk-size", "100")
    rest_requests = fake.api_usage
    snap = cli(env_for(mongo_url, snap_db, fake, tmp_path), "validate-nb", "--snapshot", "--page-records", "150")
    snap_requests = fake.api_usage - rest_requests
    usage = fake.api_usage
    offline = cli({**env_for(mongo_url, export_db, fake, tmp_path), "CRM_TYPE": ""}, "validate-nb", "--from-export",
                  str(export))
    assert fake.api_usage == usage, "--from-export made an API request"
    for run in (rest, snap, offline):  # unclear answers are verdicts recorded (WroteUnexpectedResponse): exit 0
        assert run.returncode == 0, run.stdout + run.stderr

    outcomes = [outcome_of(d) for d in (rest_db, snap_db, export_db)]
    assert outcomes[0] == outcomes[1] == outcomes[2]
    by_kind = Counter((kind_of(pid), state) for pid, (state, _, _) in outcomes[0].items())
    assert all(state == EXPECTED[kind] for kind, state in by_kind)
    assert {pid: app for pid, (_, app, _) in outcomes[0].items() if app} == clean

    # Printed figures are the database's, and each mode's cost is what the fake counted.
    for run, target in ((rest, rest_db), (snap, snap_db), (offline, export_db)):
        assert printed_counts(run.stdout) == Counter(states_by_profile(target, nb.NAME).values()), run.stdout
        check = check_histories(target, nb.SPEC)
        check.assert_clean()
        assert check.profiles == len(PROFILES)
    # One range of 600 (the default lookup size is 10,000), driven 100 at a time.
    assert "600 of 600 pending profiles validated" in rest.stdout and f"{rest_requests} API requests, 1 batched" in rest.stdout
    assert fake.counts["query"] - before.get("query", 0) == 1  # one packed GET for the range
    job = re.search(r"from Bulk API query job (750\w+)", snap.stdout).group(1)
    pages = fake.counts["bulk_results"]
    assert snap_requests == 1 + fake.counts["bulk_poll"] + pages and f"{snap_requests} API requests)" in snap.stdout
    assert pages == -(-len(fake.records("Sefaria_App_User__c")) // 150)
    assert f"from the export {export.resolve()}" in offline.stdout and "0 API requests" in offline.stdout

    # Each history names where its answer came from; the snapshots were dropped once nothing was pending.
    for target in (snap_db, export_db):
        assert [c for c in target.list_collection_names() if c.startswith("crm_snapshot_")] == []
        assert {r["state"] for r in target[SNAPSHOTS].find()} == {"dropped"}
    details = [target[POSITIONS].find_one({"profile_id": 1})["history"][-1]["detail"] for target in other_dbs]
    assert details[0]["bulk_job"] == job
    assert details[1]["export_file"] == str(export.resolve()) and details[1]["export_lines"]
    two = next(pid for pid in PROFILES if kind_of(pid) == "two")
    detail = export_db[POSITIONS].find_one({"profile_id": two})["detail"]
    assert len(detail["export_lines"]) == 2 and "2 App Users hold NationBuilder id" in detail["error"]


def world(db, fake, n: int = 120) -> CrmStates:
    seed_org(fake, range(1, n + 1))
    seed_profiles(db, range(1, n + 1))
    return CrmStates.open(db, client_for(fake, nationbuilder_id_field=ON_CONTACT, app_user_key_prefix="a0A"))


def snapshot_run(app: CrmStates, **config) -> tuple[ValidationRunner, SnapshotLookups]:
    lookup = SnapshotLookups(app, BulkSource(app.crm, page_records=config.pop("page_records", 20), sleep=lambda s: None),
                             sleep=lambda s: None)
    return ValidationRunner(app, RunnerConfig(chunk_size=50, **config), lookup=lookup), lookup


def test_a_stopped_load_resumes_from_its_recorded_page_with_the_same_job(db, fake) -> None:
    app = world(db, fake)
    users = len(fake.records("Sefaria_App_User__c"))
    first = snapshot_run(app, max_api_calls=5)[0].run()  # the job, two polls, two pages: then the budget
    assert first.stopped == "--max-api-calls 5 reached" and first.api_requests == 5 and first.processed == 0
    [record] = Snapshots(db).records.find()
    assert (record["state"], record["pages"], record["rows"]) == ("loading", 2, 40)
    second = snapshot_run(app)[0].run()
    assert fake.counts["bulk_create"] == 1 and second.snapshot["reused"]  # the recorded job, read on
    assert second.processed == 120 and second.snapshot["rows"] == users
    assert second.api_requests == 1 + -(-(users - 40) // 20)  # one poll, then the pages after the second
    assert Counter(states_by_profile(db, nb.NAME).values()) == Counter(EXPECTED[kind_of(p)] for p in range(1, 121))


def test_a_failed_job_is_unexpected_response_for_every_profile_it_covered(db, fake) -> None:
    app = world(db, fake)
    fake.bulk_fail_at = 1
    report = snapshot_run(app)[0].run()
    assert report.snapshot["state"] == "failed" and "QUERY_TIMEOUT" in report.snapshot["error"]
    assert report.states == {"WroteUnexpectedResponse": 120}
    position = app.position(1, nb.NAME)
    assert position.detail["bulk_job"] == report.snapshot["job_id"] and "Failed" in position.detail["error"]
    assert report.snapshot["job_id"] in position.detail["error"]
    profile = db.profiles.find_one({"id": 1})
    assert profile["CrmLog"][0].startswith("NbProfileUnexpectedRes-") and "QUERY_TIMEOUT" in profile["CrmLog"][0]


def test_a_job_salesforce_no_longer_keeps_is_replaced_and_an_old_one_not_reused(db, fake) -> None:
    app = world(db, fake)
    snapshot_run(app, max_api_calls=3)[0].run()  # started and polled, nothing loaded
    fake.age_bulk_jobs(8 * 86_400)  # Salesforce deleted it; our record is still fresh by its own clock
    report = snapshot_run(app)[0].run()
    assert fake.counts["bulk_create"] == 2 and not report.snapshot["reused"] and report.processed == 120
    assert [r["state"] for r in Snapshots(db).records.find()] == ["dropped", "dropped"]  # the expired one too
    assert "not found" in Snapshots(db).records.find_one({"job_id": "750000000000001AAA"})["error"]
    db.profiles.insert_one({"id": 500, "nationbuilder_id": 1})
    snapshot_run(app, max_api_calls=3)[0].run()
    Snapshots(db).records.update_many({"state": "loading"}, {"$set": {"started_at": Snapshots(db).server_now()
                                                                      .replace(year=2020)}})
    snapshot_run(app)[0].run()
    assert fake.counts["bulk_create"] == 4  # a week-old record is not reused


def test_a_snapshot_dropped_while_read_halts_instead_of_saying_not_found(db, fake) -> None:
    app = world(db, fake, n=30)
    runner, lookup = snapshot_run(app, limit=10)
    runner.run()
    record = lookup.current
    snapshots = Snapshots(db)
    assert snapshots.get(record.key).state == "loaded"
    snapshots.drop(snapshots.get(record.key))
    stale = TableLookup(snapshots, snapshots.get(record.key), {"bulk_job": record.job_id})
    pending = [p for p in db.profiles.find({"id": {"$gt": 10}}) if app.position(p["id"], nb.NAME) is None][:5]
    engine = app.engine(nb.NAME, context=stale)
    results = engine.drive(engine.prepare_all(pending))
    assert {r.outcome for r in results} == {"halted"} and "dropped" in results[0].error
    assert all(app.position(p["id"], nb.NAME) is None for p in pending)  # nothing recorded


def test_two_snapshot_runs_at_once_share_one_job(db, fake) -> None:
    app = world(db, fake)
    fake.bulk_polls = 4
    reports = []
    runs = [snapshot_run(CrmStates.open(db, app.crm))[0] for _ in range(2)]
    threads = [threading.Thread(target=lambda r=r: reports.append(r.run())) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert fake.counts["bulk_create"] == 1 and sum(r.processed for r in reports) == 120
    # the run that waited either reused the loaded job or, when the other had finished and dropped it
    # meanwhile (a fast server), found nothing pending: never a second job
    [starter] = [r for r in reports if r.snapshot.get("job_id") and not r.snapshot["reused"]]
    [waiter] = [r for r in reports if r is not starter]
    assert waiter.snapshot["reused"] or (waiter.snapshot.get("nothing_pending") and waiter.processed == 0)
    check_histories(db, nb.SPEC).assert_clean()


def test_a_run_that_waited_while_another_validated_everything_starts_no_job(db, fake) -> None:
    app = world(db, fake)
    holder = RangeLeases(db[LEASES], f"{nb.NAME}:snapshot", seconds=60)
    assert holder.claim(0)  # "another run is loading"
    finished = []

    def other_run_ends_meanwhile(_: float) -> None:
        if not finished:
            holder.release(0)
            finished.append(snapshot_run(CrmStates.open(db, app.crm))[0].run())

    waiter, lookup = snapshot_run(CrmStates.open(db, app.crm))
    lookup.sleep = other_run_ends_meanwhile
    report = waiter.run()
    [first] = finished
    assert first.processed == 120 and first.snapshot["dropped"] == 1 and not first.snapshot["reused"]
    assert report.pending_at_start == 120 and report.processed == 0 and not report.stopped
    assert report.snapshot["nothing_pending"] and fake.counts["bulk_create"] == 1
    assert Snapshots(db).records.count_documents({"state": {"$ne": "dropped"}}) == 0
    assert "another run validated every pending profile" in "\n".join(summary_lines(report))


def test_from_export_refuses_a_wrong_file_before_anything_starts(db, mongo_url, fake, tmp_path) -> None:
    seed_profiles(db, range(1, 5))
    env = {**env_for(mongo_url, db, fake, tmp_path), "CRM_TYPE": ""}
    bad = tmp_path / "bad.csv"
    bad.write_text("Name,Email\nRuth,r@example.org\n")
    run = cli(env, "validate-nb", "--from-export", str(bad))
    assert run.returncode == 2 and "lacks the column" in run.stderr and "nothing done" in run.stderr
    missing = cli(env, "validate-nb", "--from-export", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    both = cli(env, "validate-nb", "--from-export", str(bad), "--snapshot")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert db[POSITIONS].count_documents({}) == 0 and SNAPSHOTS not in db.list_collection_names()
    assert fake.total_requests == 0


def test_export_load_resumes_by_line_and_reuses_the_same_content(db, fake, tmp_path) -> None:
    app = world(db, fake, n=60)
    export = write_export(fake, tmp_path / "r.csv")
    source = ExportSource(export, app_user_key_prefix="a0A", page_lines=7)
    lookup = SnapshotLookups(app, source)
    snapshots = Snapshots(db)
    record = source.begin(snapshots, nb.NAME, lambda: None)
    record = snapshots.begin_loading(record)
    pages = source.pages(record, lambda: None)
    for _ in range(3):  # a run killed after three pages
        page = next(pages)
        record = snapshots.write_page(record, page.rows, seen=page.seen, **page.progress)
    assert record.line == 22 and record.rows == 21
    report = ValidationRunner(app, RunnerConfig(chunk_size=25), lookup=lookup).run()
    assert report.snapshot["reused"] and report.processed == 60
    lines = sum(1 for _ in open(export)) - 1
    assert report.snapshot["rows"] == lines and db[SNAPSHOTS].count_documents({}) == 1
    assert Counter(states_by_profile(db, nb.NAME).values()) == Counter(EXPECTED[kind_of(p)] for p in range(1, 61))
    assert json.loads(json.dumps(report.snapshot, default=str))["source"] == "export"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.integers(1, 5000), max_size=300), asked=st.lists(st.integers(1, 5100), max_size=200))
def test_a_snapshot_is_read_in_ranges_and_one_in_and_finds_exactly_the_rows_asked(db, keys, asked) -> None:
    snapshots = Snapshots(db)
    record = snapshots.begin_loading(snapshots.create(f"t:{len(keys)}:{hash(tuple(keys))}", "t", "bulk",
                                                      f"crm_snapshot_t{abs(hash(tuple(keys)))}"))
    rows = [{"nb": k, "id": f"id{n}"} for n, k in enumerate(keys)]
    record = snapshots.write_page(record, rows, seen=len(rows), locator=None)
    found = sorted((r["nb"], r["id"]) for r in snapshots.rows_for(record, asked))
    assert found == sorted((r["nb"], r["id"]) for r in rows if r["nb"] in set(asked))
    db.drop_collection(record.table)
