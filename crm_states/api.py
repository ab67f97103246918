"""Entry points for Sefaria code and tools: run the signup machine for a new user, validate one
profile, list profiles by (machine, state), read a profile's position and history, heal drifted data.
Each driving method returns the ``RunResult`` whose ``state`` is the state the profile ended in.

This is the application layer: it wires the core (engine, store, journal) to ``machines`` and a CRM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from pymongo import MongoClient
from pymongo.database import Database

from machines import (
    change_email,
    mailing_list_signup,
    mark_as_spam,
    nb_profile_validation,
    new_user_signup,
    reconcile_by_email,
    retire_nb_ids,
    sync_sustainers,
)

from . import sustainers
from .crm.base import CrmConnectionManager
from .crm.factory import crm_from_env
from .engine import CLAIM_SECONDS, Engine, RunResult, StateMachine
from .journal import Journal
from .records import Position, Transition, utcnow
from .store import HealReport, ProfileNotFound, Store, heal

#: Every machine the project builds, by name (the diagram's file stem).
MACHINES: Mapping[str, StateMachine] = MappingProxyType({
    nb_profile_validation.NAME: nb_profile_validation.SPEC,
    new_user_signup.NAME: new_user_signup.SPEC,
    change_email.NAME: change_email.SPEC,
    mark_as_spam.NAME: mark_as_spam.SPEC,
    mailing_list_signup.NAME: mailing_list_signup.SPEC,
    sync_sustainers.NAME: sync_sustainers.SPEC,
    retire_nb_ids.NAME: retire_nb_ids.SPEC,
    reconcile_by_email.NAME: reconcile_by_email.SPEC,
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


def _seconds_setting(name: str, default: float, *, zero: bool = False, env: Mapping[str, Any] | None = None) -> float:
    """A positive (or, with ``zero``, non-negative) finite number of seconds from ``env`` (the environment)."""
    text = str((os.environ if env is None else env).get(name) or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")) or (value == 0 and not zero):
        raise ValueError(f"{name} must be a number of seconds {'>= 0' if zero else 'above 0'}, got {text[:40]!r}")
    return value


def connect(mongo_url: str | None = None, db_name: str | None = None, **client_options: Any) -> Database:
    """The database named by the arguments, else by ``MONGO_URL``/``MONGO_DB``; fails fast (5 s)."""
    url = mongo_url or os.environ.get("MONGO_URL") or DEFAULT_MONGO_URL
    client_options.setdefault("serverSelectionTimeoutMS", 5000)
    client_options.setdefault("connectTimeoutMS", 5000)
    client_options.setdefault("socketTimeoutMS", 30000)
    client: MongoClient = MongoClient(url, **client_options)
    return client[db_name or os.environ.get("MONGO_DB") or DEFAULT_DB]


@attrs.define
class Resumed:
    """What ``CrmStates.resume`` did: every re-driven profile's result, and how many it did not try."""

    results: list[RunResult] = attrs.field(factory=list)
    not_tried: int = 0


@attrs.define
class CrmStates:
    """The machines over one database, one CRM and one journal.

    ``claim_wait``: how long a call that meets a run another live driver holds (a Celery redelivery, an
    operator's resume during a live signup) waits for that driver's outcome before reporting ``claimed``.
    """

    store: Store
    crm: CrmConnectionManager
    journal: Journal = attrs.field(factory=Journal)
    clock: Any = utcnow
    claim_wait: float = 5.0
    claim_seconds: float = CLAIM_SECONDS

    @classmethod
    def open(cls, db: Database, crm: CrmConnectionManager, *, journal_path: str | None = None,
             ensure_indexes: bool = True) -> CrmStates:
        store = Store(db)
        if ensure_indexes:
            store.ensure_indexes()
        return cls(store=store, crm=crm, journal=Journal(journal_path or os.environ.get("CRM_STATES_JOURNAL")))

    @classmethod
    def from_env(cls, db: Database | None = None, *, journal_path: str | None = None,
                 crm: CrmConnectionManager | None = None, env: Mapping[str, Any] | None = None,
                 ensure_indexes: bool = True) -> CrmStates:
        """The ``CrmStates`` the ``crm-states`` commands and the Celery tasks build from the environment:
        the CRM of ``CRM_TYPE`` and Sefaria's CRM settings (``CrmConfigError`` naming a missing one), the
        database ``db`` or else ``MONGO_URL``/``MONGO_DB`` (``connect``), and the journal file of
        ``CRM_STATES_JOURNAL``, else ``journal_path``; ``CRM_STATES_CLAIM_SECONDS`` and
        ``CRM_STATES_CLAIM_WAIT`` set how long a write-ahead claim lasts and how long a call waits for another
        live driver's outcome. One function, so a worker and a shell agree.
        ``crm`` replaces the CRM of ``CRM_TYPE`` (the commands pass a ``LazyCrm``, built on first use).
        ``env`` is where the settings are read (default ``os.environ``; ``crm_states.sefaria`` passes Django's);
        without ``ensure_indexes`` nothing is sent to the database until the first read or commit."""
        settings = os.environ if env is None else env
        crm = crm_from_env(settings) if crm is None else crm
        journal = settings.get("CRM_STATES_JOURNAL") or journal_path
        if db is None:
            db = connect(settings.get("MONGO_URL"), settings.get("MONGO_DB"))
        states = cls.open(db, crm, journal_path=journal, ensure_indexes=ensure_indexes)
        states.claim_seconds = _seconds_setting("CRM_STATES_CLAIM_SECONDS", states.claim_seconds, env=settings)
        states.claim_wait = _seconds_setting("CRM_STATES_CLAIM_WAIT", states.claim_wait, zero=True, env=settings)
        return states

    def engine(self, name: str, *, context: Any = None) -> Engine:
        """The machine's engine; its effects are given ``context`` (default: the machine's own, ``_context``;
        the batch runner's snapshot modes give a recorded lookup instead)."""
        return Engine(machine(name), self.store, self.journal, context=self._context(name) if context is None
                      else context, clock=self.clock, claim_seconds=self.claim_seconds)

    def _context(self, name: str) -> Any:
        """What a machine's effects are given: the CRM, and for the email reconciliation also a read of the
        profiles already holding an App User id (so that one App User is never given to two profiles)."""
        if name == reconcile_by_email.NAME:
            from .reconcile import holders

            return reconcile_by_email.Context(self.crm, lambda ids: holders(self.store, ids))
        return self.crm

    # --- reads: the stable public read API (a read never writes) -----------------------------------
    def position(self, profile_id: int, machine_name: str) -> Position | None:
        """Where the profile stands in the machine (state, seq, run id, detail), or ``None``."""
        found = self.store.position(check_profile_id(profile_id), machine(machine_name).name)
        return found if found.state is not None else None

    def history(self, profile_id: int, machine_name: str) -> list[Transition]:
        """Every transition of the profile in the machine, in seq order."""
        return self.store.history(check_profile_id(profile_id), machine(machine_name).name)

    def profiles_in_state(self, machine_name: str, state: str, *, limit: int = 0) -> Iterator[dict[str, Any]]:
        """The profiles now in ``state``, oldest first (an indexed query): dicts with ``id``, ``state``,
        ``at``, ``seq``, ``run_id`` and ``detail``."""
        spec = machine(machine_name)
        if state not in spec.diagram.states:
            raise ValueError(f"{machine_name} has no state {state!r}; states: {', '.join(spec.diagram.states)}")
        return self.store.in_state(machine_name, state, limit=limit)

    def app_user_id(self, profile_id: int) -> str | None:
        """The profile's Salesforce app user id: the newest one a finished run recorded, else the one on the
        profile document (which Sefaria's stale saves may have erased)."""
        newest: tuple[Any, str] | None = None
        for name in (new_user_signup.NAME, nb_profile_validation.NAME, retire_nb_ids.NAME, reconcile_by_email.NAME):
            data = self.store.position(profile_id, name).data
            value, at = data.fields.get("sf_app_user_id"), data.set_at.get("sf_app_user_id")
            if isinstance(value, str) and value and (newest is None or (at and at > newest[0])):
                newest = (at, value)
        if newest is not None:
            return newest[1]
        profile = self.store.get_profile(profile_id, {"sf_app_user_id": 1}) or {}
        value = profile.get("sf_app_user_id")
        return value if isinstance(value, str) and value else None

    # --- driving ------------------------------------------------------------------------------------
    def _drive_one(self, name: str, profile_id: Any, *, restart: bool, inputs: Mapping[str, Any],
                   needs_profile: bool = True) -> RunResult:
        profile_id = check_profile_id(profile_id)
        profile = self.store.get_profile(profile_id)
        if profile is None:
            if needs_profile:
                raise ProfileNotFound(f"no profile with id {profile_id!r} in '{self.store.profiles.name}'")
            profile = {"id": profile_id}
        engine = self.engine(name)
        result = engine.drive([engine.prepare(profile, restart=restart, inputs=inputs)])[0]
        for _ in range(3):  # another driver moved it, or holds it: go on from where it stands, or adopt its end
            if result.outcome == "claimed" and not self._waited_for_holder(name, profile_id, result.state):
                break
            if result.outcome not in ("conflict", "claimed"):
                break
            result = engine.drive([engine.prepare(profile, inputs=inputs)])[0]
        return result

    def _waited_for_holder(self, name: str, profile_id: int, claimed_at: str | None) -> bool:
        """Wait up to ``claim_wait`` for the live driver holding the profile's run to move it from
        ``claimed_at``, the state the claim was met in; True if it did (it may have done so already)."""
        now = self.store.position(profile_id, name)
        if now.state != claimed_at:
            return True
        seq = now.seq
        deadline = time.monotonic() + self.claim_wait
        while time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if self.store.position(profile_id, name).seq != seq:
                return True
        return False

    def run_signup(self, user_id: int, *, email: str | None = None, first_name: str | None = None,
                   last_name: str | None = None, lang: str = "en", educator: bool = False,
                   restart: bool = False) -> RunResult:
        """Create the new user's Salesforce app user and save its id. Safe to call again, and from several
        drivers at once: a finished profile is left alone, a half-done one is continued, and the CRM never
        gets a second user. The profile document need not exist yet when ``email`` is given: the id reaches it
        once Sefaria has created it (``heal``); without ``email`` the profile is where it is read from, and a
        missing one is ``ProfileNotFound``."""
        inputs = {k: v for k, v in {"email": email, "first_name": first_name, "last_name": last_name,
                                    "lang": lang, "educator": educator}.items() if v is not None}
        return self._drive_one(new_user_signup.NAME, user_id, restart=restart, inputs=inputs,
                               needs_profile=email is None)

    def validate_profile(self, profile_id: int, *, restart: bool = False) -> RunResult:
        """Run the NationBuilder-profile validation for one profile."""
        return self._drive_one(nb_profile_validation.NAME, profile_id, restart=restart, inputs={})

    def validate_profiles(self, profiles: Sequence[Mapping[str, Any]], *, restart: bool = False) -> list[RunResult]:
        """Validate a batch of profile documents with one CRM lookup and bulk writes."""
        engine = self.engine(nb_profile_validation.NAME)
        return engine.drive(engine.prepare_all(profiles, restart=restart))

    def _request(self, name: str, profile_id: Any, inputs: Mapping[str, Any]) -> RunResult:
        """One new CRM request for a profile: a new run, whatever the profile's previous run ended in.
        A run stopped half-way (its write-ahead request may already have gone out) is finished first;
        if it was this very request, its result is the answer, else the new request runs after it."""
        profile_id = check_profile_id(profile_id)
        position = self.store.position(profile_id, name)
        spec = machine(name)
        if position.state is not None and position.state not in spec.terminal:
            first = self._drive_one(name, profile_id, restart=False, inputs={}, needs_profile=False)
            if not first.finished or all(position.detail.get(k) == v for k, v in inputs.items()):
                return first
        return self._drive_one(name, profile_id, restart=True, inputs=inputs, needs_profile=False)

    def change_email(self, profile_id: int, new_email: str) -> RunResult:
        """Tell the CRM that the user changed their email (``change_user_email`` with the user's app user
        id, which does not change). Every call is one request; after a DB failure that followed the CRM's OK,
        calling again with the same email records it without a second request."""
        return self._request(change_email.NAME, profile_id,
                             {"new_email": new_email, "crm_id": self.app_user_id(check_profile_id(profile_id))})

    def mark_as_spam(self, profile_id: int, review: bool = False) -> RunResult:
        """Mark the user as spam in the CRM (``mark_as_spam_in_crm``), or with ``review`` flag it for
        manual review (``mark_for_review_in_crm``)."""
        return self._request(mark_as_spam.NAME, profile_id,
                             {"review": bool(review), "crm_id": self.app_user_id(check_profile_id(profile_id))})

    def subscribe(self, email: str, lists: Sequence[str], *, profile_id: int | None = None,
                  first_name: str | None = None, last_name: str | None = None, lang: str = "en",
                  educator: bool = False) -> RunResult:
        """Sign an email address up for mailing lists (``add_email_to_mailing_lists``; no CRM id).

        With ``profile_id`` (a signed-in user) the run is that user's; without, it is kept under
        ``mailing_list_signup.signup_id(email)`` (see machines/mailing_list_signup.py). The result's
        ``profile_id`` names it."""
        if not isinstance(email, str) or not email.strip():
            raise TypeError(f"email must be a non-empty string, got {email!r}")
        if isinstance(lists, str) or not all(isinstance(x, str) for x in lists):
            raise TypeError(f"lists must be a sequence of list names, got {lists!r}")
        inputs = {"email": email.strip(), "lists": list(lists), "first_name": first_name, "last_name": last_name,
                  "lang": lang, "educator": bool(educator)}
        if profile_id is None:
            profile_id = mailing_list_signup.signup_id(email)
        return self._request(mailing_list_signup.NAME, profile_id, inputs)

    def sync_sustainers(self, *, max_demote_share: float = sustainers.DEFAULT_MAX_DEMOTE_SHARE, force: bool = False,
                        dry_run: bool = False,
                        batch_size: int = sustainers.DEFAULT_BATCH_SIZE) -> sustainers.SyncReport:
        """The weekly sustainer sync (``crm_states.sustainers``): the whole sustainer set read first,
        ``is_sustainer`` written only where it differs, mass demotions refused unless ``force``."""
        return sustainers.sync_sustainers(self, max_demote_share=max_demote_share, force=force, dry_run=dry_run,
                                          batch_size=batch_size)

    def redrive(self, machine_name: str, profiles: Sequence[Mapping[str, Any]]) -> list[RunResult]:
        """Drive a batch of profiles again: a new run from [*] for those in a terminal state (using the
        journaled CRM result where a DB-failure state holds one), the stopped run for the others.
        ``profiles`` name the profiles by ``id`` (documents, or the rows of ``profiles_in_state``): each is
        read afresh from ``profiles`` (one that Sefaria has not created is driven as ``{"id": n}``)."""
        engine = self.engine(machine(machine_name).name)
        ids = [check_profile_id(p["id"]) for p in profiles]
        docs = {d["id"]: d for d in self.store.profiles.find({"id": {"$in": ids}})}
        return engine.drive(engine.prepare_all([docs.get(pid, {"id": pid}) for pid in ids], restart=True))

    def resume(self, machine_name: str, state: str, *, limit: int = 0, batch_size: int = 1000) -> Resumed:
        """Re-drive the profiles now in ``state`` (``crm-states resume``), in batches. Ids are read first, so
        a profile that lands in the same state again is not met twice; each batch re-reads its positions, so
        one moved meanwhile is left alone. A batch that halts (the CRM's limit, no CRM configured) ends it:
        the later batches would meet the same refusal and are counted as not tried."""
        name = machine(machine_name).name
        ids = [row["id"] for row in self.profiles_in_state(name, state, limit=limit)]
        resumed = Resumed()
        engine = self.engine(name)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            positions = self.store.positions_of(name, chunk)
            still = [pid for pid in chunk if pid in positions and positions[pid].state == state]
            docs = {p["id"]: p for p in self.store.profiles.find({"id": {"$in": still}})}
            results = engine.drive([engine.prepare(docs.get(pid, {"id": pid}), positions[pid], restart=True)
                                    for pid in still])
            resumed.results.extend(results)
            if any(r.outcome == "halted" for r in results):
                resumed.not_tried = len(ids) - start - len(chunk)
                break
        return resumed

    def heal(self, machine_name: str | None = None, *, dry_run: bool = False,
             profile_ids: Sequence[int] | None = None) -> HealReport:
        """Write back the data finished runs recorded where Sefaria's profile saves erased it (no CRM call;
        idempotent); with ``dry_run`` only count. ``machine_name`` limits what is counted and fixed,
        ``profile_ids`` the profiles looked at."""
        only = None if machine_name is None else [machine(machine_name).name]
        ids = None if profile_ids is None else [check_profile_id(pid) for pid in profile_ids]
        return heal(self.store, list(MACHINES), only=only, dry_run=dry_run, profile_ids=ids)

    # --- the migration (the design document's flowchart, README "The migration, step by step") ----------
    def retire_nb_ids(self, *, accept: Sequence[str] = (), undo: bool = False, dry_run: bool = False,
                      limit: int | None = None, chunk_size: int = 1000, concurrency: int = 1,
                      lease_seconds: float = 300.0) -> Any:
        """Remove ``nationbuilder_id`` from every validated profile (``crm_states.retirement``): refused, with
        the counts per blocking state, while any profile holding one is not validated or its validation
        stopped in a failure state not in ``accept``; with ``undo``, restore every retired id exactly.
        Returns a ``RetireReport``."""
        from .retirement import retire_nb_ids
        from .runner import RunnerConfig

        config = RunnerConfig(chunk_size=chunk_size, concurrency=concurrency, limit=limit, dry_run=dry_run,
                              lease_seconds=lease_seconds)
        return retire_nb_ids(self, config, accept=accept, undo=undo)

    def reconcile_by_email(self, *, joined_before: Any = None, users: Any = None, dry_run: bool = False,
                           limit: int | None = None, max_api_calls: int | None = None, chunk_size: int = 1000,
                           concurrency: int = 1, lease_seconds: float = 300.0) -> Any:
        """Give each profile without a nationbuilder_id or an App User id (and no signup in flight) the App
        User that has its user's email, if exactly one does (``crm_states.reconcile``); never creates one.
        ``users`` reads emails and join dates (``crm_states.users``; default: Django's ``auth_user`` when
        Django is configured, else the profiles' ``email``/``date_joined``). Returns a ``RunnerReport``."""
        from .reconcile import ReconcileRunner
        from .runner import RunnerConfig

        config = RunnerConfig(chunk_size=chunk_size, concurrency=concurrency, limit=limit, dry_run=dry_run,
                              max_api_calls=max_api_calls, lease_seconds=lease_seconds)
        return ReconcileRunner(self, config, joined_before=joined_before, users=users).run()
