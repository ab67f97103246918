"""Throughput of NationBuilder-profile validation: the naive per-profile loop against ``crm-states validate-nb``.

Setup: N profiles (``--profiles``, default 10,000) with a ``nationbuilder_id``; the odd-numbered half have an
app user (``Sefaria_App_User__c`` with ``NationBuilder_Id__c`` as text) in a ``FakeSalesforce`` answering every
request 150 ms late (``--latency``). MongoDB is a SecantusDB process started here on a temp dir (or
``--mongo-url``). Two databases get identical profiles, so each side starts from a fresh state:

(a) naive, as the diagram literally reads: per profile one ``GET .../sobjects/Sefaria_App_User__c/
    NationBuilder_Id__c/{id}`` (bearer token fetched once from the fake's token endpoint, not timed;
    404 = not found) and one ``update_one`` (``$set sf_app_user_id`` or ``$push`` a CrmLog line),
    sequentially. At 150 ms per profile this is timed over a sample (``--naive-sample``, default 200: the
    first profiles, half of them found) and its rate is applied to N.
(b) the runner: ``crm-states validate-nb`` as a subprocess (``python -m crm_states.cli``) configured by
    ``MONGO_URL``, ``MONGO_DB``, ``CRM_TYPE=SALESFORCE``, ``SALESFORCE_*``; its wall time is taken from
    spawn to exit (interpreter start-up and imports included).

Printed: profiles/s of both, the ratio (b)/(a), CRM requests per 10,000 profiles of (b) by kind, and the
wall time of (b), each next to its target (ratio >= 100; <= 10 CRM requests per 10,000 profiles, counted
as Salesforce counts API requests against the daily allocation: the fake's api-usage counter, which leaves
out the OAuth token request, printed apart with every other HTTP request;
100,000 profiles in <= 120 s, which applies to ``--profiles 100000``). Then (b) is verified: every profile
must end in WroteSalesforceAppUserUid (with the app user id the fake made) or WroteNotFound (with a
NbProfileNotFoundInSalesforce CrmLog line) as seeded, checked with a count per state. Timings are wall
clock on whatever else the machine is doing. Always exits 0: it is a benchmark, not a test.

    python benchmarks/validate_throughput.py [--profiles N] [--naive-sample S] [--chunk-size C]
        [--concurrency K] [--latency SECONDS] [--mongo-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests
from pymongo import ASCENDING, MongoClient
from pymongo.database import Database

from crm_states.records import crm_log_line
from crm_states.runner import RunnerConfig, pending_filter
from crm_states.store import state_field
from crm_states.testing.mongo import MongoServer
from crm_states.testing.salesforce import FakeSalesforce
from machines import nb_profile_validation as nb

TARGET_RATIO = 100.0
TARGET_REQUESTS_PER_10K = 10.0
TARGET_SECONDS_PER_100K = 120.0
API = "/services/data/v60.0"
APP_USER = "Sefaria_App_User__c"
NB_FIELD = "NationBuilder_Id__c"
SEED_BATCH = 5000
STATE = f"{state_field(nb.NAME)}.state"
FIRST = ["Sarah", "Moshe", "Aviva", "Yosef", "שרה", "יוסף", "D'Arcy", "Bartholomew-Alexander"]
LAST = ["Cohen", "Levi", "O'Brien", "כהן", "Abramowitz-Rosenberg-Katz", "Mizrahi"]


def nb_id(pid: int) -> int:
    return 700_000 + pid


def found(pid: int) -> bool:
    """The seeded half: odd profile ids have an app user in Salesforce."""
    return pid % 2 == 1


def profile(pid: int) -> dict[str, Any]:
    return {"id": pid, "slug": f"user-{pid}", "first_name": FIRST[pid % len(FIRST)], "last_name": LAST[pid % len(LAST)],
            "email": f"user{pid}@example.org", "nationbuilder_id": nb_id(pid),
            "date_joined": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=pid)}


def batches(n: int, size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(1, n + 1, size):
        yield [profile(pid) for pid in range(start, min(n, start + size - 1) + 1)]


def seed_profiles(dbs: Sequence[Database], n: int) -> None:
    for db in dbs:
        db.profiles.create_index([("id", ASCENDING)])  # Sefaria's profiles have it; the naive update uses it
    for batch in batches(n, SEED_BATCH):
        for db in dbs:
            db.profiles.insert_many([dict(doc) for doc in batch], ordered=False)


def seed_salesforce(fake: FakeSalesforce, n: int) -> dict[int, str]:
    """App users for the found half; returns profile id -> app user id."""
    pids = [pid for pid in range(1, n + 1) if found(pid)]
    ids = fake.insert_many(APP_USER, ({NB_FIELD: str(nb_id(pid)), "Sefaria_App_Email__c": f"user{pid}@example.org"}
                                      for pid in pids))
    return dict(zip(pids, ids))


# -- (a) naive ----------------------------------------------------------------------------------------

def naive(db: Database, fake: FakeSalesforce, pids: Sequence[int]) -> tuple[float, Counter[str]]:
    """``pids`` is a contiguous id range, read with one query. Per profile one GET by external id and one update_one, sequentially. Returns (seconds, outcomes)."""
    session = requests.Session()
    session.trust_env = False
    token = session.post(f"{fake.url}/services/oauth2/token", data={"grant_type": "client_credentials"},
                         auth=(fake.client_id, fake.client_secret), timeout=30)
    token.raise_for_status()
    body = token.json()
    instance, bearer = body["instance_url"].rstrip("/"), body["access_token"]
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    cursor = db.profiles.find({"id": {"$gte": pids[0], "$lte": pids[-1]}}, {"_id": 0, "id": 1, "nationbuilder_id": 1})
    for doc in list(cursor.sort("id", 1)):
        pid = doc["id"]
        response = session.get(f"{instance}{API}/sobjects/{APP_USER}/{NB_FIELD}/{doc['nationbuilder_id']}",
                               headers=headers, timeout=30)
        now = dt.datetime.now(dt.timezone.utc)
        if response.status_code == 200:
            db.profiles.update_one({"id": pid}, {"$set": {"sf_app_user_id": response.json()["Id"]}})
            outcomes["found"] += 1
        elif response.status_code == 404:
            db.profiles.update_one({"id": pid}, {"$push": {"CrmLog": crm_log_line("NbProfileNotFoundInSalesforce", now)}})
            outcomes["not found"] += 1
        else:
            db.profiles.update_one({"id": pid}, {"$push": {"CrmLog": crm_log_line(
                "NbProfileUnexpectedRes", now, f"HTTP {response.status_code}")}})
            outcomes[f"HTTP {response.status_code}"] += 1
    seconds = time.perf_counter() - started
    session.close()
    return seconds, outcomes


def check_naive(db: Database, pids: Sequence[int], app_users: dict[int, str]) -> list[str]:
    wrong = []
    for doc in db.profiles.find({"id": {"$in": list(pids)}}, {"_id": 0, "id": 1, "sf_app_user_id": 1, "CrmLog": 1}):
        pid = doc["id"]
        if found(pid) and doc.get("sf_app_user_id") != app_users[pid]:
            wrong.append(f"profile {pid}: sf_app_user_id {doc.get('sf_app_user_id')!r}, expected {app_users[pid]}")
        if not found(pid) and not any(str(x).startswith("NbProfileNotFoundInSalesforce-") for x in doc.get("CrmLog", [])):
            wrong.append(f"profile {pid}: no NbProfileNotFoundInSalesforce line in CrmLog")
    return wrong


# -- (b) the runner -----------------------------------------------------------------------------------

def run_runner(url: str, db_name: str, fake: FakeSalesforce, work: Path, chunk_size: int,
               concurrency: int) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "MONGO_URL": url, "MONGO_DB": db_name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(work / "journal.jsonl")}
    env.pop("SALESFORCE_API_VERSION", None)
    command = [sys.executable, "-m", "crm_states.cli", "validate-nb", "--chunk-size", str(chunk_size),
               "--concurrency", str(concurrency), "--data-dir", str(work / "cli")]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done


def check_runner(db: Database, n: int, app_users: dict[int, str]) -> tuple[Counter[str], list[str]]:
    """Count per state, and every profile's end state and written data against the seeding."""
    states: Counter[str] = Counter()
    wrong: list[str] = []
    seen = 0
    projection = {"_id": 0, "id": 1, "sf_app_user_id": 1, "CrmLog": 1, STATE: 1}
    for doc in db.profiles.find({}, projection).batch_size(5000):
        seen += 1
        pid = doc["id"]
        state = ((doc.get("crm_state") or {}).get(nb.NAME) or {}).get("state") or "(not started)"
        states[state] += 1
        if found(pid):
            if state != "WroteSalesforceAppUserUid" or doc.get("sf_app_user_id") != app_users[pid]:
                wrong.append(f"profile {pid}: {state}, sf_app_user_id {doc.get('sf_app_user_id')!r}, "
                             f"expected WroteSalesforceAppUserUid with {app_users[pid]}")
        elif state != "WroteNotFound" or not any(
                str(x).startswith("NbProfileNotFoundInSalesforce-") for x in doc.get("CrmLog", [])):
            wrong.append(f"profile {pid}: {state}, CrmLog {doc.get('CrmLog')!r}, expected WroteNotFound")
    if seen != n:
        wrong.append(f"{seen} profiles in the database, expected {n}")
    return states, wrong


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=10_000, help="profiles to validate (default 10000)")
    parser.add_argument("--naive-sample", type=int, default=200,
                        help="profiles the naive loop is timed on (default 200)")
    parser.add_argument("--chunk-size", type=int, default=RunnerConfig().chunk_size,
                        help=f"passed to validate-nb (default {RunnerConfig().chunk_size}, the runner's)")
    parser.add_argument("--concurrency", type=int, default=RunnerConfig().concurrency,
                        help=f"passed to validate-nb (default {RunnerConfig().concurrency}, the runner's)")
    parser.add_argument("--latency", type=float, default=0.150, help="fake Salesforce latency per request (s)")
    parser.add_argument("--mongo-url", help="use this MongoDB instead of starting SecantusDB")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop through the finally blocks
    n = max(2, args.profiles)
    sample = max(2, min(args.naive_sample, n))

    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        server = None
        if args.mongo_url:
            url, where = args.mongo_url, f"MongoDB at {args.mongo_url}"
        else:
            server = MongoServer(work / "db", log_path=work / "secantusd.log").start()
            url, where = server.url, f"SecantusDB started by this benchmark (data under {work / 'db'})"
        client: MongoClient = MongoClient(url)
        stamp = uuid.uuid4().hex[:8]
        names = (f"bench_validate_naive_{stamp}", f"bench_validate_runner_{stamp}")
        db_naive, db_runner = client[names[0]], client[names[1]]
        fake = FakeSalesforce(latency=args.latency).start()
        try:
            t0 = time.perf_counter()
            seed_profiles([db_naive, db_runner], n)
            app_users = seed_salesforce(fake, n)
            seeded = time.perf_counter() - t0

            print(f"profiles: {n} with a nationbuilder_id, {len(app_users)} of them app users in FakeSalesforce "
                  f"(latency {args.latency * 1000:.0f} ms per request)")
            print(f"database: {where}; two databases with identical profiles (seeded in {seeded:.1f}s)")
            print("timings: wall clock on a shared 2-core machine (other work may run meanwhile)")
            print()

            # (a) naive
            pids = list(range(1, sample + 1))
            fake.reset_counts()
            naive_s, naive_outcomes = naive(db_naive, fake, pids)
            naive_counts = dict(fake.counts)
            naive_rate = sample / naive_s
            naive_wrong = check_naive(db_naive, pids, app_users)
            print(f"(a) naive: per profile one GET by external id + one update_one, sequential")
            print(f"    timed on a SAMPLE of {sample} of the {n} profiles (the first {sample}; "
                  f"{naive_outcomes['found']} found, {naive_outcomes['not found']} not found"
                  + "".join(f", {v} {k}" for k, v in naive_outcomes.items() if k not in ("found", "not found"))
                  + "); token fetched once, before timing")
            print(f"    {naive_s:.1f}s for {sample} profiles = {naive_rate:.2f} profiles/s "
                  f"({naive_s / sample * 1000:.0f} ms/profile); all {n} would take ~{n / naive_rate:.0f}s")
            print(f"    CRM requests: {', '.join(f'{k} {v}' for k, v in sorted(naive_counts.items()))} "
                  f"(= {10_000:,} per 10,000 profiles, plus tokens)")
            print(f"    check: {'every sampled profile written as seeded' if not naive_wrong else f'{len(naive_wrong)} WRONG: ' + '; '.join(naive_wrong[:5])}")
            print()

            # (b) the runner
            fake.reset_counts()
            usage_before = fake.api_usage
            wall, done = run_runner(url, names[1], fake, work, args.chunk_size, args.concurrency)
            counts = Counter(fake.counts)
            total = fake.total_requests
            api_calls = fake.api_usage - usage_before
            rate = n / wall
            states, wrong = check_runner(db_runner, n, app_users)
            pending = db_runner.profiles.count_documents(pending_filter())
            reported = re.search(r"validated in ([\d.]+)s", done.stdout)
            print(f"(b) runner: {sys.executable} -m crm_states.cli validate-nb --chunk-size {args.chunk_size} "
                  f"--concurrency {args.concurrency}  (exit {done.returncode})")
            print(f"    chunk size {args.chunk_size}, concurrency {args.concurrency}")
            for line in done.stdout.rstrip().splitlines():
                print(f"    | {line}")
            if done.returncode != 0 or wrong:
                for line in done.stderr.rstrip().splitlines()[-15:]:
                    print(f"    stderr| {line}")
            print(f"    wall time (spawn to exit, start-up included): {wall:.1f}s for {n} profiles = {rate:.0f} profiles/s"
                  + (f"; the runner's own clock: {reported.group(1)}s" if reported else ""))
            print()

            ratio = rate / naive_rate
            per_10k = api_calls * 10_000 / n
            print("figures against targets")
            print(f"  naive (a): {naive_rate:10.2f} profiles/s   (sample of {sample})")
            print(f"  runner (b): {rate:9.0f} profiles/s   (all {n})")
            print(f"  ratio (b)/(a): {ratio:8.0f}            target >= {TARGET_RATIO:.0f}: {verdict(ratio >= TARGET_RATIO)}")
            print(f"  CRM API requests per 10,000 profiles (b): {per_10k:.1f} ({api_calls} for {n}; the fake's "
                  f"api-usage counter)   target <= {TARGET_REQUESTS_PER_10K:.0f}: "
                  f"{verdict(per_10k <= TARGET_REQUESTS_PER_10K)}")
            print(f"  all HTTP requests to the fake (b), the OAuth token requests included: {total} = "
                  f"{total * 10_000 / n:.1f} per 10,000")
            for kind, count in sorted(counts.items()):
                print(f"      {kind:<20} {count:>6}   = {count * 10_000 / n:7.1f} per 10,000")
            if fake.fault_counts:
                print(f"      faults injected: {dict(fake.fault_counts)}")
            if n == 100_000:
                print(f"  wall time of (b) for {n} profiles: {wall:.1f}s   target <= {TARGET_SECONDS_PER_100K:.0f}s: "
                      f"{verdict(wall <= TARGET_SECONDS_PER_100K)}")
            else:
                print(f"  wall time of (b) for {n} profiles: {wall:.1f}s   target <= {TARGET_SECONDS_PER_100K:.0f}s "
                      f"for 100,000 (run with --profiles 100000); at this run's rate 100,000 would take "
                      f"~{100_000 / rate:.0f}s")
            print()
            print(f"verification of (b): count per state in {names[1]}")
            for state, count in sorted(states.items()):
                expected = (len(app_users) if state == "WroteSalesforceAppUserUid"
                            else n - len(app_users) if state == "WroteNotFound" else 0)
                print(f"  {state:<30} {count:>8}   expected {expected}")
            print(f"  still pending (pending_filter): {pending}")
            if wrong:
                print(f"  FAIL: {len(wrong)} profiles not as seeded, e.g.: " + "; ".join(wrong[:5]))
            else:
                print(f"  OK: every one of the {n} profiles ended in WroteSalesforceAppUserUid (with the fake's "
                      f"app user id) or WroteNotFound (with a NbProfileNotFoundInSalesforce CrmLog line) as seeded")
        finally:
            fake.stop()
            for name in names:
                client.drop_database(name)
            client.close()
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it does not fail the caller
        print(f"benchmark error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(0)
