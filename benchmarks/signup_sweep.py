"""The signup sweep at scale (issue 14.4): ``crm-states signup --pending`` over N users with no app user,
on SecantusDB and a genuine mongod side by side, in one run.

For each server kind (``--servers``, default both): a fresh server process and a FakeSalesforce in this
process answering every request ``--latency`` late (default 50 ms). N profiles (``--users``, default
100,000) carry an email and names and no ids; for one in ``--migrated-every`` of them (default 10) the fake
already holds an App User with that email and no external id (a user migrated from NationBuilder without
one), which the sweep must adopt instead of creating. Printed per server: wall time (spawn to exit), API
requests as Salesforce counts them (the fake's api-usage counter; the OAuth token is not one), the runner's
peak RSS, and the check over whole collections: every profile holds an App User id, and the fake holds
exactly one App User per email. Target: <= 510 API requests for 100,000 users (500 sObject Collections
creates of 200, plus the packed email lookups). Always exits 0: it is a benchmark, not a test.

    python benchmarks/signup_sweep.py [--users N] [--servers secantus,mongod] [--migrated-every K] [--latency S]
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench_common import APP_USER, KINDS, SEED_BATCH, cli_env, client_for, run_cli, server
from pymongo import ASCENDING
from pymongo.database import Database

from crm_states.testing.salesforce import FakeSalesforce

EMAIL_FIELD = "Sefaria_App_Email__c"


def email(pid: int) -> str:
    return f"user{pid}@example.org"


def seed_users(db: Database, n: int) -> None:
    db.profiles.create_index([("id", ASCENDING)])
    for first in range(1, n + 1, SEED_BATCH):
        db.profiles.insert_many([{"id": pid, "slug": f"user-{pid}", "email": email(pid), "first_name": "Ploni",
                                  "last_name": f"Almoni {pid}"}
                                 for pid in range(first, min(n, first + SEED_BATCH - 1) + 1)], ordered=False)


def check(db: Database, fake: FakeSalesforce, n: int) -> list[str]:
    """Every profile holds the id of the one App User with its email; no email has two."""
    per_email = Counter(str(r.get(EMAIL_FIELD)).lower() for r in fake.records(APP_USER))
    twice = [e for e, k in per_email.items() if k > 1]
    wrong = [f"{len(twice)} emails with several App Users, e.g. {twice[:2]}"] if twice else []
    ids = {str(r.get(EMAIL_FIELD)).lower(): r["Id"] for r in fake.records(APP_USER)}
    seen = 0
    for doc in db.profiles.find({}, {"_id": 0, "id": 1, "email": 1, "sf_app_user_id": 1}).batch_size(10_000):
        seen += 1
        if doc.get("sf_app_user_id") != ids.get(doc["email"]):
            wrong.append(f"profile {doc['id']}: sf_app_user_id {doc.get('sf_app_user_id')!r}")
    if seen != n:
        wrong.append(f"{seen} profiles, expected {n}")
    return wrong


def one_server(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with server(kind, work) as db_server, FakeSalesforce(latency=args.latency) as fake:
        migrated = [pid for pid in range(1, args.users + 1) if pid % args.migrated_every == 0]
        fake.insert_many(APP_USER, ({EMAIL_FIELD: email(pid)} for pid in migrated))
        client = client_for(db_server.url)
        db = client[f"sweep_{uuid.uuid4().hex[:6]}"]
        seed_users(db, args.users)
        fake.reset_counts()
        usage = fake.api_usage
        env = {**cli_env(db_server.url, db.name, fake, work), "CRM_STATES_USER_SOURCE": "profiles"}
        run = run_cli(["signup", "--pending"], env)
        wrong = check(db, fake, args.users)
        return {"s": run.seconds, "exit": run.done.returncode, "api": fake.api_usage - usage,
                "requests": dict(fake.counts), "rss_mb": run.peak_mb, "migrated": len(migrated),
                "wrong_n": len(wrong), "wrong": wrong[:3], "said": run.done.stdout.strip().splitlines()[:3],
                "stderr": run.done.stderr.strip().splitlines()[-3:] if run.done.returncode else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--migrated-every", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    kinds = [k for k in args.servers.split(",") if k]
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="crm-sweep-bench-") as tmp:
        for kind in kinds:
            figures[kind] = one_server(kind, args, Path(tmp) / kind)
            print(f"{kind}: {figures[kind]}", flush=True)
    rows = [("wall time, spawn to exit", lambda f: f"{f['s']:.1f} s ({args.users / f['s']:,.0f} users/s)"),
            ("API requests (target <= 510 per 100,000)", lambda f: f"{f['api']:,}"),
            ("peak RSS of the runner", lambda f: f"{f['rss_mb']:.1f} MB"),
            ("App Users adopted by email (migrated)", lambda f: f"{f['migrated']:,}"),
            ("exit code; profiles wrong", lambda f: f"{f['exit']}; {f['wrong_n']}")]
    print(f"\nsignup --pending, {args.users:,} users, latency {args.latency * 1000:.0f} ms")
    print(f"| figure | {' | '.join(kinds)} |")
    print(f"| --- |{' --- |' * len(kinds)}")
    for label, cell in rows:
        print(f"| {label} | {' | '.join(cell(figures[k]) for k in kinds)} |")


if __name__ == "__main__":
    main()
