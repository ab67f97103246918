"""The store: positions, history and the compare-and-set that moves a profile, in the project's own
``crm_positions`` collection (layout in ``documents.py``); machine data for Sefaria's ``profiles`` through
``profile_writes.py``.

A step (consecutive transitions of one profile from a persisted position) commits in two writes:

1. its profile write, if any, guarded by the inputs it was computed from: a profile that moved on
   (``InputChanged``) or vanished (``ProfileGone``, where the outcome needs the profile) gets nothing, and
   the step is not committed;
2. one update of the position document, filtered on the old ``seq`` and upserted, so that it either moves
   the position (state, history, data, claim at once) or fails with a duplicate ``_id`` when another writer
   moved it first (``ConcurrentTransition``). It is written with ``j: true`` added to the URL's write
   concern: it is the commit record that write-ahead relies on.

A crash between the two leaves the profile with data its position does not show yet: the run is simply
driven again (a lookup is asked again; a write-ahead state was committed before its CRM call). Data the
position records but the profile lacks (Sefaria saved a stale copy) is what ``heal`` writes back.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pymongo
from pymongo import ASCENDING, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.write_concern import WriteConcern

from ..records import Position, ProfileWrite, Transition, utcnow
from .documents import (
    POSITION_FIELDS,
    POSITIONS,
    PROFILES,
    history_from_doc,
    listing_row,
    position_from_doc,
    position_key,
)
from .errors import (
    ConcurrentTransition,
    InputChanged,
    ProfileGone,
    ProfileNotFound,
    StoreError,
    StoreUnavailable,
)
from .journaled import apply_journaled
from .profile_writes import (
    ABSENT,
    CHANGED,
    PlannedWrite,
    apply_writes,
    bulk_update,
    bulks,
    merged_write,
)
from .steps import Step

log = logging.getLogger("crm_states.store")

DUPLICATE_KEY = 11000
#: The deadline for building one index on a large collection.
INDEX_BUILD_SECONDS = 900.0


class Store:
    """MongoDB persistence for any machine. Knows no diagram and no CRM."""

    def __init__(self, db: Database, *, profiles: str = PROFILES, positions: str = POSITIONS) -> None:
        self.db = db
        self.profiles: Collection = db[profiles]
        self.positions: Collection = db[positions]
        self._commit_record = self.positions.with_options(write_concern=_journaled(self.positions.write_concern))
        self._indexed = False
        self._index_lock = threading.Lock()

    # --- set-up -------------------------------------------------------------------------------
    def ensure_indexes(self, machines: Iterable[str] = ()) -> None:
        """``profiles.id`` (Sefaria's own lookup key; kept if it exists) and the two indexes of
        ``crm_positions``: (machine, state, at) for listing and counting, (machine, profile_id) for ranges.
        ``machines`` is accepted for compatibility: one index serves every machine."""
        with self._index_lock, pymongo.timeout(INDEX_BUILD_SECONDS):
            if self._indexed:
                return
            _ensure_index(self.profiles, [("id", ASCENDING)])
            _ensure_index(self.positions, [("machine", ASCENDING), ("state", ASCENDING), ("at", ASCENDING)])
            _ensure_index(self.positions, [("machine", ASCENDING), ("profile_id", ASCENDING)])
            self._indexed = True

    def ensure_profile_index(self, field: str) -> None:
        """An ascending index on one field of Sefaria's profiles, unless one on that key exists (the email
        reconciliation asks which profiles hold given App User ids, once per batch)."""
        with pymongo.timeout(INDEX_BUILD_SECONDS):
            _ensure_index(self.profiles, [(field, ASCENDING)])

    def _index(self) -> None:
        if not self._indexed:
            try:
                self.ensure_indexes()
            except PyMongoError as exc:  # the operation itself will meet the outage and report it
                log.warning("could not build the indexes of %s: %s", self.positions.name, type(exc).__name__)

    # --- reads (a read never writes: not even an index; ``open`` and the first commit build them) ---
    def get_profile(self, profile_id: int, projection: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return self.profiles.find_one({"id": profile_id}, projection)

    def require_profile(self, profile_id: int) -> dict[str, Any]:
        try:
            profile = self.get_profile(profile_id)
        except PyMongoError as exc:
            raise StoreUnavailable(f"reading profile {profile_id}: {type(exc).__name__}: {exc}") from exc
        if profile is None:
            raise ProfileNotFound(f"no profile with id {profile_id!r} in '{self.profiles.name}'")
        return profile

    def position(self, profile_id: int, machine: str) -> Position:
        """Where the profile stands in ``machine`` (the empty position when it never started)."""
        try:
            return position_from_doc(self.positions.find_one({"_id": position_key(machine, profile_id)},
                                                             POSITION_FIELDS))
        except PyMongoError as exc:
            raise StoreUnavailable(f"reading position of {profile_id}: {type(exc).__name__}: {exc}") from exc

    def positions_of(self, machine: str, profile_ids: Iterable[int]) -> dict[int, Position]:
        """Positions of the given profiles, ``BULK_OPS`` ids per read (an ``$in`` of 10,000 keys took
        SecantusDB two minutes); profiles that never started are absent."""
        keys = [position_key(machine, pid) for pid in profile_ids]
        positions: dict[int, Position] = {}
        for some in bulks(keys):
            found = self.positions.find({"_id": {"$in": some}}, POSITION_FIELDS)
            positions.update((doc["profile_id"], position_from_doc(doc)) for doc in found)
        return positions

    def positions_between(self, machine: str, low: int, high: int) -> dict[int, Position]:
        """Positions of profiles with ``low <= id < high`` (an indexed range read)."""
        found = self.positions.find({"machine": machine, "profile_id": {"$gte": low, "$lt": high}}, POSITION_FIELDS)
        return {doc["profile_id"]: position_from_doc(doc) for doc in found}

    def scan(self, machine: str, projection: Mapping[str, Any], where: Mapping[str, Any] | None = None,
             *, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Position documents of ``machine`` in profile id order (for joins with ``profiles``)."""
        cursor = self.positions.find({"machine": machine, **(where or {})}, {"_id": 0, "profile_id": 1, **projection})
        return iter(cursor.sort("profile_id", ASCENDING).batch_size(batch_size))

    def history(self, profile_id: int, machine: str) -> list[Transition]:
        """Every transition of the profile in ``machine``, in seq order."""
        try:
            doc = self.positions.find_one({"_id": position_key(machine, profile_id)},
                                          {"profile_id": 1, "machine": 1, "history": 1})
        except PyMongoError as exc:
            raise StoreUnavailable(f"reading history of {profile_id}: {type(exc).__name__}: {exc}") from exc
        return history_from_doc(doc)

    def in_state(self, machine: str, state: str, *, limit: int = 0) -> Iterator[dict[str, Any]]:
        """Profiles of ``machine`` now in ``state``, oldest first (an indexed query): dicts with ``id``,
        ``state``, ``at``, ``seq``, ``run_id`` and ``detail``."""
        cursor = self.positions.find({"machine": machine, "state": state},
                                     {"_id": 0, "profile_id": 1, "state": 1, "at": 1, "seq": 1, "run_id": 1, "detail": 1})
        return (listing_row(doc) for doc in cursor.sort("at", ASCENDING).limit(limit))

    def count_by_state(self, machine: str) -> dict[str, int]:
        return {state: row["count"] for state, row in self.state_summary(machine).items()}

    def state_summary(self, machine: str) -> dict[str, dict[str, Any]]:
        """Per state of ``machine``: ``{count, oldest, newest}`` (one aggregation on the index)."""
        pipeline = [{"$match": {"machine": machine}},
                    {"$group": {"_id": "$state", "count": {"$sum": 1}, "oldest": {"$min": "$at"},
                                "newest": {"$max": "$at"}}}]
        return {row["_id"]: row for row in self.positions.aggregate(pipeline)}

    # --- the compare-and-set ------------------------------------------------------------------
    def commit(self, steps: Sequence[Step]) -> list[StoreError | None]:
        """Persist each step (its guarded profile write, then its position); see the module docstring.
        One entry per step: ``None`` when committed, else the ``StoreError`` that kept it out."""
        results: list[StoreError | None] = [None] * len(steps)
        if not steps:
            return results
        self._index()
        self._write_profiles(steps, results)
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return results
        self._move(steps, todo, results)
        self._take_back_lines(steps, todo, results)
        return results

    def _take_back_lines(self, steps: Sequence[Step], todo: list[int], results: list[StoreError | None]) -> None:
        """A step that lost the compare-and-set had already written its ``CrmLog`` line (the profile write
        goes first): remove it unless the winner recorded the same line, so one finding keeps one line."""
        pulls = []
        for i in todo:
            error = results[i]
            write = merged_write(steps[i].transitions) if isinstance(error, ConcurrentTransition) else None
            if write is not None and write.crm_log and write.crm_log not in error.position.data.crm_log:
                pulls.append(({"id": steps[i].profile_id}, {"$pull": {"CrmLog": write.crm_log}}))
        if pulls:
            try:
                bulk_update(self.profiles, pulls)
            except PyMongoError as exc:  # heal does not remove it: the line stays, one more than needed
                log.warning("could not take back %d CrmLog lines of refused steps: %s", len(pulls), type(exc).__name__)

    def _move(self, steps: Sequence[Step], todo: list[int], results: list[StoreError | None]) -> None:
        """The position updates of the steps ``todo``, in journaled bulks of at most ``BULK_OPS`` (one op: no
        bulk round trip), so that no single command of a large drive outlasts the socket timeout on a slow
        server."""
        for some in bulks(todo):
            self._move_bulk(steps, some, results)

    def _move_bulk(self, steps: Sequence[Step], todo: list[int], results: list[StoreError | None]) -> None:
        if len(todo) == 1:
            i = todo[0]
            try:
                self._commit_record.update_one(*_cas(steps[i]), upsert=True)
            except DuplicateKeyError:
                results[i] = self._conflict(steps[i])
            except PyMongoError as exc:
                results[i] = StoreUnavailable(f"moving the position: {type(exc).__name__}: {exc}"[:300])
            return
        try:
            self._commit_record.bulk_write([UpdateOne(*_cas(steps[i]), upsert=True) for i in todo], ordered=False)
        except BulkWriteError as exc:
            for err in exc.details.get("writeErrors", []):
                i = todo[err["index"]]
                if err.get("code") == DUPLICATE_KEY:
                    results[i] = self._conflict(steps[i])
                else:
                    results[i] = StoreUnavailable(f"moving the position: {str(err.get('errmsg', ''))[:200]}")
            for concern in exc.details.get("writeConcernErrors", []):  # applied, but not journaled as asked
                log.warning("commit record not acknowledged as journaled: %s", str(concern.get("errmsg"))[:200])
        except PyMongoError as exc:
            error = StoreUnavailable(f"moving positions: {type(exc).__name__}: {exc}"[:300])
            for i in todo:
                results[i] = error

    def _write_profiles(self, steps: Sequence[Step], results: list[StoreError | None]) -> None:
        planned: list[PlannedWrite] = []
        owners: list[int] = []
        for i, step in enumerate(steps):
            write = merged_write(step.transitions)
            if write is not None:
                planned.append(PlannedWrite(step.profile_id, write, step.expected.data.crm_log))
                owners.append(i)
        if not planned:
            return
        for item, i, outcome in zip(planned, owners, apply_writes(self.profiles, planned)):
            if isinstance(outcome, StoreError):
                results[i] = outcome
            elif outcome == CHANGED:
                results[i] = InputChanged(f"profile {item.profile_id} no longer holds "
                                          f"{', '.join(sorted(item.write.guard))} as read; not committed")
            elif outcome == ABSENT and item.write.requires_profile:
                results[i] = ProfileGone(f"profile {item.profile_id} was deleted; not committed")

    def _conflict(self, step: Step) -> ConcurrentTransition:
        try:
            now = self.position(step.profile_id, step.machine)
        except StoreError:
            now = Position()
        return ConcurrentTransition(
            f"profile {step.profile_id} in {step.machine} was moved from seq {step.expected.seq} "
            f"({step.expected.state}) by another writer; it is now in {now.state} (seq {now.seq})", now, now.last_by)

    def server_now(self) -> dt.datetime:
        """The database's clock (``hello.localTime``): claims and leases are judged by it, never by this
        process's own clock. A server that does not say (a test double) falls back to ours."""
        try:
            now = self.db.command("hello").get("localTime")
        except (PyMongoError, NotImplementedError):
            now = None
        return (now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)) if now else utcnow()

    def take_over(self, profile_id: int, machine: str, expected: Position, claim: Mapping[str, Any], *,
                  from_holder: str | None = None) -> Position | None:
        """Take the claim of the run at ``expected`` (its seq and claim) for ``claim['by']``: when it was
        released (no claim: its holder knew nothing was sent), when it expired on the database's clock, or,
        with ``from_holder``, when that holder (known dead) still has it. A compare-and-set on the claim as
        read. Returns the position with the new claim, or ``None`` when someone else holds it or it moved."""
        held = expected.claim
        where: dict[str, Any] = {"_id": position_key(machine, profile_id), "seq": expected.seq}
        if held is None:
            where["claim"] = {"$exists": False}
        elif from_holder is not None:
            where["claim.by"] = from_holder
        else:
            if held.at is None or held.at + dt.timedelta(seconds=held.seconds) >= self.server_now():
                return None
            where.update({"claim.by": held.by, "claim.at": held.at})
        update = {"$set": {"claim.by": claim["by"], "claim.owner": claim.get("owner", ""),
                           "claim.seconds": float(claim["seconds"])}, "$currentDate": {"claim.at": True}}
        try:
            if self._commit_record.update_one(where, update).matched_count != 1:
                return None
            return self.position(profile_id, machine)
        except PyMongoError as exc:
            raise StoreUnavailable(f"taking over the claim of {profile_id}: {type(exc).__name__}: {exc}") from exc

    def release(self, profile_id: int, machine: str, seq: int, by: str) -> None:
        """Drop the claim ``by`` holds on the run at ``seq``: its holder knows the CRM write was not sent (the
        CRM's API limit refused it), so the next driver may send it."""
        try:
            self._commit_record.update_one({"_id": position_key(machine, profile_id), "seq": seq, "claim.by": by},
                                           {"$unset": {"claim": ""}})
        except PyMongoError as exc:  # then the claim expires, and the next driver asks before it sends
            log.warning("could not release the claim on %s %s: %s", machine, profile_id, type(exc).__name__)

    def apply_journaled(self, profile_id: int, machine: str, transitions: Sequence[Transition],
                        write: ProfileWrite | None) -> bool:
        """Apply a journal entry (``journaled.apply_journaled``): idempotent; True when anything changed."""
        return apply_journaled(self, profile_id, machine, transitions, write)

    # --- writes outside the machines ----------------------------------------------------------
    def fill_profile(self, profile_id: int, write: ProfileWrite) -> bool:
        """Set the write's fields where they are unset (never over a different value) and add its
        ``CrmLog`` line, if the profile holds the write's guard; True when the profile changed."""
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
            result = self.profiles.update_one({"id": profile_id, **dict(write.guard),
                                               **({"$and": conditions} if conditions else {})}, update)
        except PyMongoError as exc:
            raise StoreUnavailable(f"writing profile {profile_id}: {type(exc).__name__}") from exc
        return result.modified_count > 0


def _cas(step: Step) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guarded position update of a step: filter on the expected seq, set the new position, its data
    and claim, append the history."""
    last = step.last
    data = step.data()
    sets: dict[str, Any] = {"machine": step.machine, "profile_id": step.profile_id, "state": last.dest,
                            "run_id": last.run_id, "seq": last.seq, "at": last.at, "detail": dict(last.detail),
                            "last_by": last.by}
    if data != step.expected.data:
        sets["data"] = data.to_doc()
    update: dict[str, Any] = {"$set": sets, "$push": {"history": {"$each": [t.to_doc() for t in step.transitions]}}}
    if step.claim is not None:
        sets.update({"claim.by": step.claim["by"], "claim.owner": step.claim.get("owner", ""),
                     "claim.seconds": float(step.claim["seconds"])})
        update["$currentDate"] = {"claim.at": True}
    elif step.expected.claim is not None:
        update["$unset"] = {"claim": ""}
    return {"_id": position_key(step.machine, step.profile_id), "seq": step.expected.seq}, update


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
    collection.create_index(keys, **options)
