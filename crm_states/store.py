"""All MongoDB persistence, in one place: profiles' current states, the transition history, the
compare-and-set that moves a profile, roll-forward after a crash, and applying journaled writes.

Layout (Sefaria's ``profiles`` collection, extended):

- ``profiles``: ``{id, nationbuilder_id, sf_app_user_id, email?, first_name?, last_name?, CrmLog: [str],
  crm_state: {<machine>: {state, run_id, seq, at, detail}}}``
- ``crm_transitions``: one document per transition,
  ``{profile_id, machine, run_id, seq, source, dest, trigger, at, detail, write?, by}``.

``seq`` numbers every transition of a profile in a machine across runs, and ``run_id`` follows from the
position a transition leaves (the run it continues, or ``"<profile_id>-<seq>"`` for a run it starts), so
the unique key (profile_id, machine, run_id, seq) of transition ``seq = n + 1`` is the same for every
writer moving a profile from ``n``: inserting it claims the right to move the profile. That key is the
document's ``_id`` (``<machine>:<profile_id>:<seq>:<run_id>``), so it is unique without a secondary index
(each one costs every insert), and the document after a position is one of two known ``_id``s (the run
continued, or a new run begun): history and roll-forward walk the chain by ``_id`` lookups. The transition document is the commit record; the profile update (guarded by the old
``seq``) follows. A crash between the two leaves a document the profile did not follow; ``settle``
finds and applies it, exactly once, and removes documents that do not chain onto the profile's state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import pymongo
from pymongo import ASCENDING, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from .records import START, Position, ProfileWrite, Transition, new_run_id, transition_key

log = logging.getLogger("crm_states.store")

PROFILES = "profiles"
TRANSITIONS = "crm_transitions"
DUPLICATE_KEY = 11000


class StoreError(Exception):
    """Base of what the store raises or reports."""


class StoreUnavailable(StoreError):
    """MongoDB did not take the write (connection lost, timeout, server error)."""


class ConcurrentTransition(StoreError):
    """Another writer moved the profile first. ``position`` is where the profile stands now."""

    def __init__(self, message: str, position: Position, by: str = "") -> None:
        super().__init__(message)
        self.position = position
        self.by = by


class ProfileNotFound(StoreError):
    """No profile has that ``id``."""


@attrs.frozen
class Step:
    """What one profile commits at once: consecutive transitions from ``expected`` (persisted)."""

    profile_id: int
    machine: str
    expected: Position
    transitions: tuple[Transition, ...]

    @property
    def last(self) -> Transition:
        return self.transitions[-1]


def state_field(machine: str) -> str:
    return f"crm_state.{machine}"


def position_of(profile: Mapping[str, Any] | None, machine: str) -> Position:
    """A profile document's position in ``machine`` (the empty position when it never started)."""
    cur = ((profile or {}).get("crm_state") or {}).get(machine)
    if not cur:
        return Position()
    return Position(state=cur.get("state"), run_id=cur.get("run_id"), seq=int(cur.get("seq", 0)),
                    detail=dict(cur.get("detail") or {}))


def _cas_filter(profile_id: int, machine: str, expected: Position) -> dict[str, Any]:
    if expected.seq == 0:
        return {"id": profile_id, state_field(machine): {"$exists": False}}
    return {"id": profile_id, f"{state_field(machine)}.seq": expected.seq}


def _profile_update(machine: str, transitions: Sequence[Transition]) -> dict[str, Any]:
    last = transitions[-1]
    sets: dict[str, Any] = {
        state_field(machine): {"state": last.dest, "run_id": last.run_id, "seq": last.seq, "at": last.at,
                               "detail": dict(last.detail)},
    }
    lines: list[str] = []
    for t in transitions:
        if t.write is not None:
            sets.update(t.write.set)
            if t.write.crm_log:
                lines.append(t.write.crm_log)
    update: dict[str, Any] = {"$set": sets}
    if lines:
        update["$addToSet"] = {"CrmLog": {"$each": lines}}
    return update


def _chains(position: Position, transitions: Sequence[Transition]) -> bool:
    """True when the transitions continue the profile from ``position`` without a gap or a jump."""
    state, run_id, seq = position.state, position.run_id, position.seq
    for t in transitions:
        if t.seq != seq + 1:
            return False
        if t.source != START and (t.source != state or t.run_id != run_id):
            return False
        state, run_id, seq = t.dest, t.run_id, t.seq
    return True


#: The deadline for building one index on a large collection.
INDEX_BUILD_SECONDS = 900.0


class Store:
    """MongoDB persistence for any machine. Knows no diagram and no CRM."""

    def __init__(self, db: Database, *, profiles: str = PROFILES, transitions: str = TRANSITIONS) -> None:
        self.db = db
        self.profiles: Collection = db[profiles]
        self.transitions: Collection = db[transitions]
        # The transition documents are the commit record, written before any CRM call they lead to, so
        # they are acknowledged only once journaled: with w:1 alone, a server killed a moment later may
        # drop them (SecantusDB loses its last ~100 ms) and a CRM side effect would go unrecorded. The
        # profile update after them stays w:1: it is a cache of the history that settle() rebuilds.
        self._commit_record = self.transitions.with_options(write_concern=_journaled(self.transitions.write_concern))
        self._indexed: set[str] = set()
        self._index_lock = threading.Lock()

    # --- set-up -------------------------------------------------------------------------------
    def ensure_indexes(self, machines: Iterable[str] = ()) -> None:
        """The ``id`` index of the compare-and-set, and the state index of each machine named.

        A machine's state index serves "profiles of machine M in state S"; every index also makes each
        profile update dearer, so a store builds it the first time it commits, lists or counts for that
        machine (see ``_index_for``), never for machines this process does not use.
        """
        # Building an index over a million profiles can outlast the client's socket timeout.
        with self._index_lock, pymongo.timeout(INDEX_BUILD_SECONDS):
            if "" not in self._indexed:
                _ensure_index(self.profiles, [("id", ASCENDING)])
                self._indexed.add("")
            # crm_transitions needs none: its _id is the unique (machine, profile_id, seq, run_id) key.
            for machine in machines:
                if machine not in self._indexed:
                    _ensure_index(self.profiles, [(f"{state_field(machine)}.state", ASCENDING),
                                                  (f"{state_field(machine)}.at", ASCENDING)])
                    self._indexed.add(machine)

    def _index_for(self, machines: Iterable[str]) -> None:
        missing = [m for m in machines if m not in self._indexed]
        if missing:
            try:
                self.ensure_indexes(missing)
            except PyMongoError as exc:  # the write itself will meet the outage and report it
                log.warning("could not build the state index of %s: %s", ", ".join(missing), type(exc).__name__)

    # --- reads --------------------------------------------------------------------------------
    def get_profile(self, profile_id: int) -> dict[str, Any] | None:
        return self.profiles.find_one({"id": profile_id})

    def require_profile(self, profile_id: int) -> dict[str, Any]:
        try:
            profile = self.get_profile(profile_id)
        except PyMongoError as exc:
            raise StoreUnavailable(f"reading profile {profile_id}: {type(exc).__name__}: {exc}") from exc
        if profile is None:
            raise ProfileNotFound(f"no profile with id {profile_id!r} in '{self.profiles.name}'")
        return profile

    def profiles_in_state(self, machine: str, state: str, *, limit: int = 0,
                          projection: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Profiles of ``machine`` now in ``state``, oldest first (an indexed query)."""
        self._index_for([machine])
        cursor = self.profiles.find({f"{state_field(machine)}.state": state}, projection)
        return iter(cursor.sort(f"{state_field(machine)}.at", ASCENDING).limit(limit))

    def count_by_state(self, machine: str) -> dict[str, int]:
        self._index_for([machine])
        field = f"${state_field(machine)}.state"
        pipeline = [{"$match": {f"{state_field(machine)}.state": {"$exists": True}}},
                    {"$group": {"_id": field, "n": {"$sum": 1}}}]
        return {row["_id"]: row["n"] for row in self.profiles.aggregate(pipeline)}

    def history(self, profile_id: int, machine: str) -> list[Transition]:
        """A profile's transitions in one machine, in seq order."""
        return self._chain(profile_id, machine, Position())

    def _chain(self, profile_id: int, machine: str, position: Position) -> list[Transition]:
        """The transition documents that continue ``position``, in order. Each next document has one of
        two ``_id``s; one found there that does not chain (a refused writer's leftover) is removed."""
        chain: list[Transition] = []
        while True:
            keys = [transition_key(machine, profile_id, position.seq + 1, new_run_id(profile_id, position.seq + 1))]
            if position.run_id:
                keys.append(transition_key(machine, profile_id, position.seq + 1, position.run_id))
            found = [Transition.from_doc(d) for d in self.transitions.find({"_id": {"$in": keys}})]
            following = [t for t in found if _chains(position, [t])]
            for stray in (t for t in found if t not in following):
                log.warning("profile %s %s: dropping transition seq %d that does not chain onto %s", profile_id,
                            machine, stray.seq, position.state)
                self.transitions.delete_one({"_id": stray.key})
            if not following:
                return chain
            t = following[0]
            chain.append(t)
            position = Position(t.dest, t.run_id, t.seq, dict(t.detail))

    # --- the compare-and-set ------------------------------------------------------------------
    def commit(self, steps: Sequence[Step]) -> list[StoreError | None]:
        """Persist each step (its transition documents, then the guarded profile update), in bulk.

        Returns one entry per step: ``None`` when committed, else the ``StoreError`` for that step
        (``ConcurrentTransition`` after rolling the profile forward, or ``StoreUnavailable``). A step
        whose documents were inserted is committed even if the profile update then failed: the
        documents are the commit record and ``settle`` applies them.
        """
        results: list[StoreError | None] = [None] * len(steps)
        self._index_for({step.machine for step in steps})
        docs: list[dict[str, Any]] = []
        owner: list[int] = []
        for i, step in enumerate(steps):
            for t in step.transitions:
                docs.append(t.to_doc())
                owner.append(i)
        if not docs:
            return results
        try:
            self._commit_record.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            refused = {err["index"] for err in exc.details.get("writeErrors", [])}
            for err in exc.details.get("writeErrors", []):
                i = owner[err["index"]]
                if err.get("code") == DUPLICATE_KEY:
                    results[i] = ConcurrentTransition("slot taken", Position())
                elif results[i] is None:
                    results[i] = StoreUnavailable(f"inserting transition: {str(err.get('errmsg', ''))[:200]}")
            # Only what this call inserted: a refused document's _id is the winner's document.
            self._discard([d["_id"] for i, (d, o) in enumerate(zip(docs, owner))
                           if results[o] is not None and i not in refused])
        except PyMongoError as exc:
            error = StoreUnavailable(f"inserting transitions: {type(exc).__name__}: {exc}")
            return [error] * len(steps)

        for i, step in enumerate(steps):
            if isinstance(results[i], ConcurrentTransition):
                results[i] = self._conflict(step)
        committed = [i for i, r in enumerate(results) if r is None]
        self._apply([steps[i] for i in committed])
        return results

    def _discard(self, ids: list[str]) -> None:
        """Remove the documents a refused step did insert, so they cannot be mistaken for history."""
        if not ids:
            return
        try:
            self.transitions.delete_many({"_id": {"$in": ids}})
        except PyMongoError:  # settle() drops documents that do not chain, should any remain
            log.warning("could not discard %d refused transition documents; settle will", len(ids))

    def _conflict(self, step: Step) -> ConcurrentTransition:
        try:
            now = self.settle(step.profile_id, step.machine)
            last = self.transitions.find_one(
                {"_id": transition_key(step.machine, step.profile_id, now.seq, now.run_id or "")}, {"by": 1})
        except (StoreError, PyMongoError):
            now, last = Position(), None
        return ConcurrentTransition(
            f"profile {step.profile_id} in {step.machine} was moved from seq {step.expected.seq} "
            f"({step.expected.state}) by another writer; it is now in {now.state} (seq {now.seq})", now,
            (last or {}).get("by", ""))

    def _apply(self, steps: Sequence[Step]) -> None:
        """The guarded profile updates of committed steps; a miss is settled, never forced."""
        if not steps:
            return
        ops = [(_cas_filter(s.profile_id, s.machine, s.expected), _profile_update(s.machine, s.transitions))
               for s in steps]
        try:  # one profile (Sefaria's signup path) needs no bulk round trip
            if len(ops) == 1:
                matched = self.profiles.update_one(*ops[0]).matched_count
            else:
                matched = self.profiles.bulk_write([UpdateOne(f, u) for f, u in ops], ordered=False).matched_count
            if matched == len(ops):
                return
        except PyMongoError as exc:
            log.warning("profile update after %d committed transitions failed (%s); settling", len(ops),
                        type(exc).__name__)
        for s in steps:
            try:
                self.settle(s.profile_id, s.machine)
            except StoreError as exc:
                log.warning("profile %s stays behind its history until settled: %s", s.profile_id, exc)

    def settle(self, profile_id: int, machine: str) -> Position:
        """Roll the profile forward through transition documents it did not follow (a crash between
        the two writes); drop documents that do not chain onto it. Returns the settled position."""
        try:
            profile = self.profiles.find_one({"id": profile_id}, {state_field(machine): 1})
            if profile is None:
                raise ProfileNotFound(f"no profile with id {profile_id!r}")
            position = position_of(profile, machine)
            chain = self._chain(profile_id, machine, position)
            if not chain:
                return position
            result = self.profiles.update_one(_cas_filter(profile_id, machine, position),
                                              _profile_update(machine, chain))
            if result.matched_count == 0:  # someone else settled or moved it meanwhile: read again
                return self.settle(profile_id, machine)
            log.info("profile %s %s rolled forward to %s (seq %d)", profile_id, machine, chain[-1].dest, chain[-1].seq)
            last = chain[-1]
            return Position(last.dest, last.run_id, last.seq, dict(last.detail))
        except PyMongoError as exc:
            raise StoreUnavailable(f"settling profile {profile_id}: {type(exc).__name__}: {exc}") from exc

    # --- journaled writes ---------------------------------------------------------------------
    def apply_journaled(self, profile_id: int, machine: str, transitions: Sequence[Transition],
                        write: ProfileWrite | None) -> bool:
        """Apply what a DB failure kept out of Mongo: record ``transitions`` if the profile still stands
        where they start, and apply ``write`` without overwriting a different value. Idempotent.
        Returns True when anything changed."""
        changed = False
        position = self.settle(profile_id, machine)
        if transitions and _chains(position, transitions):
            step = Step(profile_id, machine, position, tuple(transitions))
            error = self.commit([step])[0]
            if isinstance(error, StoreUnavailable):
                raise error
            changed = error is None
        if write is not None:
            changed = self._apply_write(profile_id, write) or changed
        return changed

    def fill_profile(self, profile_id: int, write: ProfileWrite) -> bool:
        """Set the write's fields where they are unset (never over a different value) and add its
        ``CrmLog`` line; True when the profile changed."""
        return self._apply_write(profile_id, write)

    def _apply_write(self, profile_id: int, write: ProfileWrite) -> bool:
        conditions = [{"$or": [{field: {"$exists": False}}, {field: None}, {field: value}]}
                      for field, value in write.set.items()]
        update: dict[str, Any] = {}
        if write.set:
            update["$set"] = dict(write.set)
        if write.crm_log:
            update["$addToSet"] = {"CrmLog": write.crm_log}
        if not update:
            return False
        try:
            result = self.profiles.update_one({"id": profile_id, **({"$and": conditions} if conditions else {})}, update)
        except PyMongoError as exc:
            raise StoreUnavailable(f"applying journaled write to {profile_id}: {type(exc).__name__}") from exc
        if result.matched_count == 0:
            log.warning("journaled write for profile %s not applied: the profile is gone or holds other values",
                        profile_id)
        return result.modified_count > 0


def _journaled(concern: WriteConcern) -> WriteConcern:
    """``concern`` (the URL's, w:majority say) with ``j: true`` added, unless it is unacknowledged."""
    document = concern.document
    if document.get("w") == 0:
        return concern
    return WriteConcern(**{**document, "j": True})


def _ensure_index(collection: Collection, keys: list[tuple[str, int]], **options: Any) -> None:
    """Create an index unless one on the same keys exists (Sefaria's own ``id`` index, say)."""
    try:
        existing = collection.index_information()
    except OperationFailure:
        existing = {}
    if any(list(info.get("key", [])) == keys for info in existing.values()):
        return
    try:
        collection.create_index(keys, **options)
    except DuplicateKeyError as exc:  # only unique indexes on crm_transitions: existing data is corrupt
        raise StoreError(f"cannot create unique index {options.get('name')} on {collection.name}: {exc}") from exc
