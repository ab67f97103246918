"""Helpers of the reliability suite: seeding, running the CLI as a process, and the invariant checks
that read whole collections in one pass (never one query per profile)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from pymongo.database import Database

from crm_states.engine import StateMachine
from crm_states.store import POSITIONS
from crm_states.store.documents import history_from_doc, position_from_doc
from crm_states.testing import FakeSalesforce
from tests.faults import assert_history_is_path

APP_USER = "Sefaria_App_User__c"
ROOT = Path(__file__).resolve().parents[2]

#: Figures of the last run, by test; printed in the terminal summary (see conftest.py).
RESULTS: dict[str, dict[str, Any]] = {}


def record(name: str, **figures: Any) -> None:
    RESULTS.setdefault(name, {}).update(figures)


# --- seeding -----------------------------------------------------------------------------------------

def seed_nb_profiles(db: Database, fake: FakeSalesforce, n: int, *, first_id: int = 1,
                     found_every: int = 3) -> dict[int, str]:
    """``n`` NationBuilder-era profiles; every ``found_every``-th one has an app user in the fake.
    Returns ``{profile id: app user id}`` of those that do."""
    ids = range(first_id, first_id + n)
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 700_000 + i, "email": f"nb{i}@example.org"}
                             for i in ids], ordered=False)
    found_ids = [i for i in ids if (i - first_id) % found_every == 0]
    app_users = fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(700_000 + i),
                                             "Sefaria_App_Email__c": f"nb{i}@example.org"} for i in found_ids])
    return dict(zip(found_ids, app_users))


def seed_signup_profiles(db: Database, n: int, *, first_id: int) -> list[int]:
    """``n`` new users (no nationbuilder_id), some with Hebrew or apostrophed names."""
    ids = list(range(first_id, first_id + n))
    db.profiles.insert_many([{"id": i, "email": f"new{i}@example.org",
                              "first_name": ("רבקה" if i % 2 else "Dov"),
                              "last_name": ("O'Hara" if i % 3 else "בן-עמי")} for i in ids], ordered=False)
    return ids


# --- processes ---------------------------------------------------------------------------------------

def cli_env(mongo_url: str, db_name: str, fake: FakeSalesforce, journal: Path | str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db_name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(journal),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "crm_states.cli", *args]


def cli(env: Mapping[str, str], *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def settled(read: Callable[[], Any], *, quiet: float = 0.5, timeout: float = 60) -> Any:
    """``read()`` once it gives the same answer twice ``quiet`` seconds apart: the server finishes the
    writes a SIGKILLed client had already sent (a bulk write of a whole range) after the client is gone,
    so what the database holds right after a kill is still moving."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = read()
        if now == last:
            return now
        last = now
    return last


# --- invariants --------------------------------------------------------------------------------------

@attrs.define
class HistoryCheck:
    """One pass over the project's positions for one machine."""

    profiles: int = 0
    transitions: int = 0
    violations: list[tuple[Any, str]] = attrs.field(factory=list)
    per_profile: Counter[Any] = attrs.field(factory=Counter)
    runs_per_profile: Counter[Any] = attrs.field(factory=Counter)
    writers_per_profile: Counter[Any] = attrs.field(factory=Counter)
    states: Counter[str] = attrs.field(factory=Counter)

    def assert_clean(self) -> None:
        assert not self.violations, f"{len(self.violations)} bad histories, first: {self.violations[:5]}"


def check_histories(db: Database, spec: StateMachine, profile_filter: Mapping[str, Any] | None = None) -> HistoryCheck:
    """Every profile's history must be exactly one path of the diagram: seqs 1..n without gap or duplicate,
    each run from ``[*]`` after a terminal state, every edge in the diagram with its trigger; and the
    position must stand where its last transition ends. ``profile_filter`` selects profiles by their
    ``profiles`` documents."""
    check = HistoryCheck()
    wanted = ({p["id"] for p in db.profiles.find(profile_filter, {"_id": 0, "id": 1})}
              if profile_filter is not None else None)
    for doc in db[POSITIONS].find({"machine": spec.name}):
        pid = doc["profile_id"]
        if wanted is not None and pid not in wanted:
            continue
        position = position_from_doc(doc)
        history = history_from_doc(doc)
        check.profiles += 1
        check.states[position.state] += 1
        if position.state not in spec.diagram.states:
            check.violations.append((pid, f"state {position.state!r} is not a state of the diagram"))
        if not history:
            check.violations.append((pid, "a state without any transition"))
            continue
        check.transitions += len(history)
        check.per_profile[pid] = len(history)
        check.runs_per_profile[pid] = len({t.run_id for t in history})
        check.writers_per_profile[pid] = len({t.by for t in history})
        try:
            assert_history_is_path(spec, history)
        except AssertionError as exc:
            check.violations.append((pid, f"not a diagram path: {exc}"))
            continue
        last = history[-1]
        if (position.state, position.seq, position.run_id) != (last.dest, last.seq, last.run_id):
            check.violations.append((pid, f"position at {position} but its history ends at {last.dest} seq {last.seq}"))
    return check


def app_users_by(fake: FakeSalesforce, field: str) -> Counter[str]:
    return Counter(str(r.get(field)).lower() for r in fake.records(APP_USER))


def snapshot(db: Database, collections: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every document of every collection (or of ``collections``), in ``_id`` order, for equality."""
    names = sorted(collections or db.list_collection_names())
    return {name: list(db[name].find().sort("_id", 1)) for name in names}
