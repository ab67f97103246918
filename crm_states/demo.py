"""``crm-states demo``: both machines on synthetic profiles, a fake Salesforce on loopback with a mix
of faults, and a database outage window, so every kind of state shows up in one short run."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from pymongo.database import Database
from pymongo.errors import OperationFailure

from machines import nb_profile_validation as nb
from machines import new_user_signup as signup

from .api import CrmStates
from .crm.http import RetryPolicy
from .crm.salesforce import SalesforceConnectionManager, TokenCache
from .journal import replay_file
from .records import START
from .report import print_counts
from .testing.salesforce import FakeSalesforce
from .testing.server import Fault

MARKER = "crm_states_demo"
FIRST = ["Sarah", "Moshe", "Aviva", "Yosef", "Miriam", "Shira", "Eitan", "שרה", "יוסף", "Noa", "Siobhán", "D'Arcy",
         "Bartholomew-Alexander"]
LAST = ["Cohen", "Levi", "O'Brien", "Ben-David", "כהן", "לוי", "Abramowitz-Rosenberg-Katz", "D'Angelo", "Mizrahi"]


class DemoRefused(RuntimeError):
    """The target database holds data that is not the demo's: the demo will not touch it."""


def reset(db: Database) -> None:
    """Start from an empty demo database; refuse a database with profiles the demo did not make."""
    if db.profiles.estimated_document_count() and db[MARKER].estimated_document_count() == 0:
        raise DemoRefused(f"database {db.name!r} has profiles that the demo did not create; "
                          "point --db at an empty database")
    for name in ("profiles", "crm_transitions", MARKER):
        db.drop_collection(name)
    db[MARKER].insert_one({"created": True})


def synthetic_profiles(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Half NationBuilder-era profiles to validate, half new users to sign up; names include Hebrew,
    apostrophes and 20+ characters (which Sefaria's current integration rejects)."""
    profiles = []
    for pid in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        doc: dict[str, Any] = {"id": pid, "slug": f"user-{pid}", "first_name": first, "last_name": last,
                               "email": f"user{pid}+demo@example.org"}
        if pid % 2:
            doc["nationbuilder_id"] = 700_000 + pid if pid % 23 else "unknown"
        profiles.append(doc)
    return profiles


def _outage(db: Database, on: bool) -> bool:
    """Make the server refuse inserts after the next one (a database outage), through a fail point."""
    try:
        if on:
            db.client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1},
                                     "data": {"failCommands": ["insert"], "errorCode": 6,
                                              "errmsg": "demo: database outage"}})
        else:
            db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        return True
    except OperationFailure:  # a real MongoDB without test commands: no outage window then
        return False


def run_demo(db: Database, *, profiles: int, seed: int, journal_path: Path, out: TextIO) -> int:
    rng = random.Random(seed)
    started = time.monotonic()
    reset(db)
    if journal_path.exists():
        journal_path.unlink()
    docs = synthetic_profiles(profiles, rng)
    db.profiles.insert_many(docs)
    nb_profiles = [d for d in docs if "nationbuilder_id" in d]
    new_users = [d for d in docs if "nationbuilder_id" not in d]

    with FakeSalesforce(token_call_limit=12) as fake:
        for doc in nb_profiles:
            if isinstance(doc["nationbuilder_id"], int) and rng.random() < 0.6:
                fake.insert("Sefaria_App_User__c", {"NationBuilder_Id__c": str(doc["nationbuilder_id"]),
                                                    "Sefaria_App_Email__c": doc["email"]})
        crm = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                          policy=RetryPolicy(attempts=3, base_delay=0.01, read_timeout=1.0))
        app = CrmStates.open(db, crm, journal_path=str(journal_path))

        print(f"Validating {len(nb_profiles)} NationBuilder-era profiles against {fake.url} ...", file=out)
        chunks = [nb_profiles[i:i + 10] for i in range(0, len(nb_profiles), 10)]
        for index, chunk in enumerate(chunks):
            if index == 1:  # one chunk meets a Salesforce outage longer than the retry budget
                fake.inject(Fault.error(503), times=3, kind="query")
            app.validate_profiles(chunk)

        print(f"Signing up {len(new_users)} new users ...", file=out)
        outage_for = {new_users[i]["id"] for i in (2, 3) if i < len(new_users)}
        for index, doc in enumerate(new_users):
            if index == 1:
                fake.inject(Fault.error(503), times=3, kind="create")
            if index == 4:
                fake.inject(Fault.slow(1.5), times=3)  # slower than the client's 1 s read timeout
            outage = doc["id"] in outage_for and _outage(db, True)
            try:
                app.run_signup(doc["id"], email="" if index == 5 else None)
            finally:
                if outage:
                    _outage(db, False)
        requests_served = fake.total_requests

    print("", file=out)
    _print_paths(app, docs, out)
    if journal_path.exists():
        report = replay_file(app.store, journal_path)
        print(f"\n{report.entries} runs met the database outage and were journaled to {journal_path}; "
              f"replaying it restored {report.applied} (crm-states replay {journal_path} does the same).", file=out)
    print("", file=out)
    print_counts(db, out)
    print(f"Fake Salesforce served {requests_served} requests; {profiles} profiles in "
          f"{time.monotonic() - started:.1f}s.", file=out)
    return 0


def _print_paths(app: CrmStates, docs: list[dict[str, Any]], out: TextIO) -> None:
    """Each profile's path when there are few, else each distinct path with how many took it."""
    paths: Counter[tuple[str, str]] = Counter()
    lines = []
    for doc in docs:
        machine = nb.NAME if "nationbuilder_id" in doc else signup.NAME
        path = " → ".join([START, *(t.dest for t in app.history(doc["id"], machine))])
        paths[(machine, path)] += 1
        lines.append(f"  {doc['id']:>5}  {machine:<22} {path}")
    if len(docs) <= 60:
        print("Paths:", file=out)
        print("\n".join(lines), file=out)
        return
    print("Distinct paths (profiles):", file=out)
    for (machine, path), count in sorted(paths.items()):
        print(f"  {count:>6}  {machine:<22} {path}", file=out)
