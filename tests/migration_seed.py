"""Seeding and comparing for the migration's tests: NationBuilder-era profiles validated against
FakeSalesforce, migrated users without a NationBuilder id, and whole-database snapshots without the
values that differ from run to run (times, run tokens, claims)."""

from __future__ import annotations

import re
from typing import Any

from bson.int64 import Int64
from pymongo.database import Database

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import TokenCache
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import POSITIONS
from crm_states.testing import FakeSalesforce

APP_USER = "Sefaria_App_User__c"
NB_BASE = 700_000


def salesforce(fake: FakeSalesforce) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                       policy=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda s: None)


def app_for(db: Database, fake: FakeSalesforce, **kwargs: Any) -> CrmStates:
    return CrmStates.open(db, salesforce(fake), **kwargs)


def nb_value(i: int) -> Any:
    """The NationBuilder id of profile ``i`` in the shapes Sefaria's documents hold: int, int64, digits,
    digits with spaces."""
    n = NB_BASE + i
    return [n, Int64(n), str(n), f" {n} "][i % 4]


def seed_nb_profiles(db: Database, ids: range) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": nb_value(i), "email": f"nb{i}@example.org"} for i in ids])


def seed_nb_app_users(fake: FakeSalesforce, ids: range, *, every: int = 3) -> dict[int, str]:
    """An App User for every ``every``-th profile; ``{profile id: app user id}``."""
    found = [i for i in ids if i % every == 0]
    made = fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(NB_BASE + i), "Sefaria_App_Email__c": f"nb{i}@example.org"}
                                       for i in found])
    return dict(zip(found, made))


def validate_all(db: Database, fake: FakeSalesforce, chunk_size: int = 200) -> None:
    report = ValidationRunner(app_for(db, fake), RunnerConfig(chunk_size=chunk_size)).run()
    assert report.processed == report.pending_at_start


def seed_orphans(db: Database, ids: range) -> None:
    """Migrated users without a nationbuilder_id or an App User id; some emails in capitals or with an
    apostrophe; every fifth holds a ``pending:`` placeholder of the interim log mode."""
    db.profiles.insert_many([{"id": j, "email": orphan_email(j),
                              **({"sf_app_user_id": f"pending:{j:032x}"} if j % 5 == 0 else {})} for j in ids])


def orphan_email(j: int) -> str:
    return f"O'Reader{j}@Example.org" if j % 4 == 0 else f"reader{j}@example.org"


def seed_orphan_app_users(fake: FakeSalesforce, ids: range) -> dict[str, int]:
    """One App User for every third orphan, two for every seventh (ambiguous); ``{email: how many}``."""
    rows, made = [], {}
    for j in ids:
        copies = 2 if j % 7 == 0 else 1 if j % 3 == 0 else 0
        rows += [{"Sefaria_App_Email__c": orphan_email(j).lower()}] * copies
        if copies:
            made[orphan_email(j).lower()] = copies
    fake.insert_many(APP_USER, rows)
    return made


# --- comparing whole databases ----------------------------------------------------------------------------

_STAMP = re.compile(r"-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_RUN_VALUES = {"at", "by", "last_by", "claim", "set_at", "_id"}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in _RUN_VALUES}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return _STAMP.sub("-<time>", value)
    return (type(value).__name__, value) if isinstance(value, Int64) else value


def database_view(db: Database) -> dict[str, list[Any]]:
    """Every collection the project touches (profiles, positions, leases), in id order, without what
    differs between two equal runs: times (CrmLog stamps included), run tokens, claims, ObjectIds."""
    view = {"profiles": [_plain(d) for d in db.profiles.find().sort("id", 1)],
            POSITIONS: [_plain({**d, "key": d["_id"]}) for d in db[POSITIONS].find().sort("_id", 1)],
            "crm_leases": [_plain({**d, "key": d["_id"]}) for d in db.crm_leases.find().sort("_id", 1)]}
    return view
