"""``crm-states demo``: both machines on synthetic profiles, a fake Salesforce on loopback with a mix
of faults, and a database outage window, so every kind of state shows up in one short run."""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from pymongo.database import Database
from pymongo.errors import OperationFailure

from machines import nb_profile_validation as nb
from machines import new_user_signup as signup

from .api import MACHINES, CrmStates
from .crm.http import RetryPolicy
from .crm.salesforce import SalesforceConnectionManager, SalesforceSchema, TokenCache
from .journal import replay_file
from .leases import LEASES
from .records import START
from .report import print_counts
from .runner import Progress, RunnerConfig, ValidationRunner
from .store import POSITIONS
from .testing.salesforce import FakeSalesforce
from .testing.server import Fault, Faults

MARKER = "crm_states_demo"
APP_USER = "Sefaria_App_User__c"
EXTERNAL_IDS = ("NationBuilder_Id__c", "Sefaria_App_Email__c", "Sefaria_User_Id__c")
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
    for name in ("profiles", POSITIONS, LEASES, MARKER):
        db.drop_collection(name)
    db[MARKER].insert_one({"created": True})


def synthetic_profiles(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Seven in ten are NationBuilder-era profiles to validate, the rest new users to sign up; names
    include Hebrew, apostrophes and 20+ characters (which Sefaria's current integration rejects)."""
    profiles = []
    for pid in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        doc: dict[str, Any] = {"id": pid, "slug": f"user-{pid}", "first_name": first, "last_name": last,
                               "email": f"user{pid}+demo@example.org"}
        if pid % 10 < 7:
            doc["nationbuilder_id"] = 700_000 + pid if pid % 499 else "unknown"
        profiles.append(doc)
    return profiles


def _outage(db: Database, on: bool) -> bool:
    """A database outage through a fail point: after the next write (the batch's write-ahead commit),
    every write fails, until it is turned off."""
    try:
        if on:
            db.client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1},
                                     "data": {"failCommands": ["update"], "errorCode": 6,
                                              "errmsg": "demo: database outage"}})
        else:
            db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        return True
    except OperationFailure:  # a real MongoDB without test commands: no outage window then
        return False


class SignupProgress:
    """The signup phase's progress: a tqdm bar on a terminal (as the validation phase has), else a line at
    every tenth of the users."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.done, self.shown = total, stream, 0, 0
        self.states: Counter[str] = Counter()
        self.bar = None
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="signup", file=stream, dynamic_ncols=True)

    def update(self, results: list[Any]) -> None:
        self.done += len(results)
        self.states.update(r.state or "not started" for r in results)
        states = ", ".join(f"{state} {n}" for state, n in sorted(self.states.items()))
        if self.bar is not None:
            self.bar.update(len(results))
            self.bar.set_postfix_str(states, refresh=False)
        elif self.stream is not None and (self.done * 10 // max(self.total, 1) > self.shown or self.done == self.total):
            self.shown = self.done * 10 // max(self.total, 1)
            print(f"signed up {self.done}/{self.total} new users; {states}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_demo(db: Database, *, profiles: int, seed: int, journal_path: Path, out: TextIO,
             progress: TextIO | None = None) -> int:
    rng = random.Random(seed)
    started = time.monotonic()
    reset(db)
    if journal_path.exists():
        journal_path.unlink()
    docs = synthetic_profiles(profiles, rng)
    db.profiles.insert_many(docs)
    nb_profiles = [d for d in docs if "nationbuilder_id" in d]
    new_users = [d for d in docs if "nationbuilder_id" not in d]
    faults = Faults(seed=seed, error_rates={503: 0.01, 500: 0.005})  # retried within the client's budget

    with FakeSalesforce(faults=faults, external_ids={APP_USER: EXTERNAL_IDS}) as fake:
        fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(d["nationbuilder_id"]), "Sefaria_App_Email__c": d["email"]}
                                    for d in nb_profiles if isinstance(d["nationbuilder_id"], int) and rng.random() < 0.6])
        crm = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                          schema=SalesforceSchema(external_id_field="Sefaria_User_Id__c"),
                                          policy=RetryPolicy(attempts=4, base_delay=0.01, read_timeout=1.0))
        app = CrmStates.open(db, crm, journal_path=str(journal_path))

        chunk = max(10, min(1000, len(nb_profiles) // 8))
        print(f"Validating {len(nb_profiles)} NationBuilder-era profiles against the fake Salesforce at {fake.url} "
              f"(chunks of {chunk}) ...", file=out, flush=True)
        # A Salesforce outage past the retry budget (4 attempts) of at least one chunk's lookup, whichever
        # way the two concurrent lookups share it, and one answer slower than the client's 1 s timeout.
        fake.inject(Fault.error(503), times=8, kind="query")
        fake.inject(Fault.slow(1.5), times=1, kind="query")
        validation = ValidationRunner(app, RunnerConfig(chunk_size=chunk, concurrency=2),
                                      progress=lambda total: Progress(total, stream=progress)).run()

        print(f"Signing up {len(new_users)} new users ...", file=out, flush=True)
        fake.expire_tokens()  # the session expires once: the client fetches one new token
        engine = app.engine(signup.NAME)
        size = max(5, min(100, len(new_users) // 10))
        batches = [new_users[i:i + size] for i in range(0, len(new_users), size)]
        # The journal file gets every entry; the demo keeps its hundred JSON log lines off the screen.
        logging.getLogger("crm_states.journal").setLevel(logging.CRITICAL)
        bar = SignupProgress(len(new_users), progress)
        for index, batch in enumerate(batches):
            if index == 0:
                fake.inject(Fault.error(503), times=4, kind="upsert")  # one signup fails past the retry budget
            outage = index == min(1, len(batches) - 1) and _outage(db, True)
            try:
                bar.update(engine.drive(engine.prepare_all(batch)))
            finally:
                if outage:
                    _outage(db, False)
        bar.close()
        served = dict(fake.counts)

    print(f"\nValidation: {validation.processed} profiles in {validation.seconds:.1f}s "
          f"({validation.rate:.0f}/s, {validation.lookups} batched lookups).", file=out)
    print("Fake Salesforce served " + ", ".join(f"{n} {kind}" for kind, n in sorted(served.items()) if n)
          + " requests.", file=out)
    if journal_path.exists():
        replayed = replay_file(app.store, journal_path, machines=MACHINES)
        print(f"{replayed.entries} signups met the database outage; their results were journaled to {journal_path} "
              f"and replaying it restored {replayed.applied} (crm-states replay {journal_path} does the same). "
              f"They stay in LoggedDbFailure until `crm-states resume --machine {signup.NAME} --state LoggedDbFailure` "
              f"records them.", file=out)
    _print_paths(app, docs, out)
    print("", file=out)
    print_counts(db, out)
    print(f"\n{profiles} profiles in {time.monotonic() - started:.1f}s. "
          "`crm-states report` shows these counts again from the database left in ./.crm-states/.", file=out)
    return 0


def _print_paths(app: CrmStates, docs: list[dict[str, Any]], out: TextIO) -> None:
    """Each profile's path when there are few, else each distinct path with how many took it. Paths come
    from one pass over the positions and their histories (the demo's own, small database)."""
    steps: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for doc in app.store.positions.find({}, {"_id": 0, "profile_id": 1, "machine": 1, "history.seq": 1,
                                             "history.dest": 1}):
        steps[(doc["machine"], doc["profile_id"])] = [(t["seq"], t["dest"]) for t in doc.get("history") or ()]
    paths: Counter[tuple[str, str]] = Counter()
    lines = []
    for doc in docs:
        machine = nb.NAME if "nationbuilder_id" in doc else signup.NAME
        path = " → ".join([START, *(dest for _, dest in sorted(steps.get((machine, doc["id"]), [])))])
        paths[(machine, path)] += 1
        lines.append(f"  {doc['id']:>5}  {machine:<22} {path}")
    if len(docs) <= 60:
        print("\nPaths:", file=out)
        print("\n".join(lines), file=out)
        return
    print("\nDistinct paths (profiles):", file=out)
    for (machine, path), count in sorted(paths.items()):
        print(f"  {count:>6}  {machine:<22} {path}", file=out)
