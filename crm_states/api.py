"""Entry points for Sefaria code and tools: run the signup machine for a new user, validate one
profile, list profiles by (machine, state). Each returns the ``RunResult`` whose ``state`` is the
state the profile ended in.

This is the application layer: it wires the core (engine, store, journal) to ``machines`` and a CRM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from pymongo import MongoClient
from pymongo.database import Database

from machines import new_user_signup, nb_profile_validation

from .crm.base import CrmConnectionManager
from .engine import Engine, RunResult, StateMachine
from .journal import Journal
from .records import Transition, utcnow
from .store import Store

#: Every machine the project builds, by name (the diagram's file stem).
MACHINES: Mapping[str, StateMachine] = MappingProxyType({
    nb_profile_validation.NAME: nb_profile_validation.SPEC,
    new_user_signup.NAME: new_user_signup.SPEC,
})

DEFAULT_MONGO_URL = "mongodb://127.0.0.1:27017"
DEFAULT_DB = "sefaria"


def check_profile_id(value: Any) -> int:
    """Sefaria's user ids are ints; anything else is refused before anything is touched."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"profile id must be an int (Sefaria's user id), got {type(value).__name__} {value!r}")
    return value


def machine(name: str) -> StateMachine:
    try:
        return MACHINES[name]
    except KeyError:
        raise ValueError(f"unknown machine {name!r}; known: {', '.join(sorted(MACHINES))}") from None


def connect(mongo_url: str | None = None, db_name: str | None = None, **client_options: Any) -> Database:
    """The database named by the arguments, else by ``MONGO_URL``/``MONGO_DB``; fails fast (5 s)."""
    url = mongo_url or os.environ.get("MONGO_URL") or DEFAULT_MONGO_URL
    client_options.setdefault("serverSelectionTimeoutMS", 5000)
    client_options.setdefault("connectTimeoutMS", 5000)
    client_options.setdefault("socketTimeoutMS", 30000)
    client: MongoClient = MongoClient(url, **client_options)
    return client[db_name or os.environ.get("MONGO_DB") or DEFAULT_DB]


@attrs.define
class CrmStates:
    """The machines over one database, one CRM and one journal."""

    store: Store
    crm: CrmConnectionManager
    journal: Journal = attrs.field(factory=Journal)
    clock: Any = utcnow

    @classmethod
    def open(cls, db: Database, crm: CrmConnectionManager, *, journal_path: str | None = None,
             ensure_indexes: bool = True) -> CrmStates:
        store = Store(db)
        if ensure_indexes:
            store.ensure_indexes(MACHINES)
        return cls(store=store, crm=crm, journal=Journal(journal_path or os.environ.get("CRM_STATES_JOURNAL")))

    def engine(self, name: str) -> Engine:
        return Engine(machine(name), self.store, self.journal, context=self.crm, clock=self.clock)

    def _drive_one(self, name: str, profile_id: Any, *, restart: bool, inputs: Mapping[str, Any]) -> RunResult:
        profile_id = check_profile_id(profile_id)
        self.store.settle(profile_id, name)  # finish what a crash left half-written; ProfileNotFound if absent
        profile = self.store.require_profile(profile_id)
        engine = self.engine(name)
        return engine.drive([engine.prepare(profile, restart=restart, inputs=inputs)])[0]

    def run_signup(self, user_id: int, *, email: str | None = None, first_name: str | None = None,
                   last_name: str | None = None, lang: str = "en", educator: bool = False,
                   restart: bool = False) -> RunResult:
        """Create the new user's Salesforce app user and save its id. Safe to call again: a finished
        profile is left alone, a half-done one is continued, and the CRM never gets a second user."""
        inputs = {k: v for k, v in {"email": email, "first_name": first_name, "last_name": last_name,
                                    "lang": lang, "educator": educator}.items() if v is not None}
        return self._drive_one(new_user_signup.NAME, user_id, restart=restart, inputs=inputs)

    def validate_profile(self, profile_id: int, *, restart: bool = False) -> RunResult:
        """Run the NationBuilder-profile validation for one profile."""
        return self._drive_one(nb_profile_validation.NAME, profile_id, restart=restart, inputs={})

    def validate_profiles(self, profiles: Sequence[Mapping[str, Any]], *, restart: bool = False) -> list[RunResult]:
        """Validate a batch of profile documents with one CRM lookup and bulk writes."""
        engine = self.engine(nb_profile_validation.NAME)
        return engine.drive([engine.prepare(p, restart=restart) for p in profiles])

    def redrive(self, machine_name: str, profiles: Sequence[Mapping[str, Any]]) -> list[RunResult]:
        """Drive a batch of profiles again: a new run from [*] for those in a terminal state (using the
        journaled CRM result where a DB-failure state holds one), the stopped run for the others."""
        engine = self.engine(machine(machine_name).name)
        return engine.drive([engine.prepare(p, restart=True) for p in profiles])

    def profiles_in_state(self, machine_name: str, state: str, *, limit: int = 0,
                          projection: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        spec = machine(machine_name)
        if state not in spec.diagram.states:
            raise ValueError(f"{machine_name} has no state {state!r}; states: {', '.join(spec.diagram.states)}")
        return self.store.profiles_in_state(machine_name, state, limit=limit, projection=projection)

    def history(self, profile_id: int, machine_name: str) -> list[Transition]:
        return self.store.history(check_profile_id(profile_id), machine(machine_name).name)
