"""Writing the machines' data into Sefaria's ``profiles`` documents, and only that.

A profile write sets fields (``sf_app_user_id``, ``is_sustainer``) and adds one ``CrmLog`` line per
finding: the newest line of a finding replaces older lines of the same finding, and an older one is not
added at all, so replays and resumes in any order leave one line per finding. The write is guarded by the
inputs its outcome was computed from (``ProfileWrite.guard``): when the profile no longer holds them, or is
gone, nothing is written and the caller is told which.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError

from ..records import ProfileWrite, Transition, finding_of, is_newest
from .errors import StoreUnavailable

#: How a guarded profile write ended, per item.
WRITTEN, CHANGED, ABSENT = "written", "changed", "absent"


@attrs.frozen
class PlannedWrite:
    """One profile's write: ``known`` are the ``CrmLog`` lines the machine already recorded for it."""

    profile_id: int
    write: ProfileWrite
    known: tuple[str, ...] = ()


def merged_write(transitions: Iterable[Transition]) -> ProfileWrite | None:
    """The writes of a step's transitions as one (a step normally carries at most one)."""
    writes = [t.write for t in transitions if t.write is not None and not t.write.empty]
    if not writes:
        return None
    if len(writes) == 1:
        return writes[0]
    sets: dict[str, Any] = {}
    guard: dict[str, Any] = {}
    for w in writes:
        sets.update(w.set)
        guard.update(w.guard)
    lines = [w.crm_log for w in writes if w.crm_log]
    return ProfileWrite(set=sets, crm_log=lines[-1] if lines else None, guard=guard,
                        requires_profile=any(w.requires_profile for w in writes))


def crm_log_change(line: str | None, known: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(line to add or None, known lines it supersedes)``: a line older than a known line of its finding
    is not added; known lines of its finding that are older are removed."""
    if not line or not is_newest(line, known):
        return None, []
    finding = finding_of(line)
    return line, [k for k in known if k != line and finding_of(k) == finding]


def update_of(write: ProfileWrite, known: Sequence[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The ``profiles`` update for ``write`` and the lines to pull after it."""
    line, superseded = crm_log_change(write.crm_log, known)
    update: dict[str, Any] = {}
    if write.set:
        update["$set"] = dict(write.set)
    if line:
        update["$addToSet"] = {"CrmLog": line}
    return (update or None), superseded


def apply_writes(profiles: Collection, planned: Sequence[PlannedWrite]) -> list[str | StoreUnavailable]:
    """Apply every planned write (guarded, in bulk); one result per item: ``WRITTEN``, ``CHANGED`` (the
    profile no longer holds the guard's values), ``ABSENT`` (no such profile), or ``StoreUnavailable``."""
    results: list[str | StoreUnavailable] = [WRITTEN] * len(planned)
    ops: list[tuple[dict[str, Any], dict[str, Any]]] = []
    owners: list[int] = []
    pulls: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i, item in enumerate(planned):
        update, superseded = update_of(item.write, item.known)
        if update is None:  # nothing newer than what the profile was given before
            continue
        ops.append(({"id": item.profile_id, **dict(item.write.guard)}, update))
        owners.append(i)
        if superseded:
            pulls.append(({"id": item.profile_id}, {"$pull": {"CrmLog": {"$in": superseded}}}))
    if not ops:
        return results
    matched = _run(profiles, ops, owners, results)
    if matched < len(ops):
        pending = [i for i in owners if results[i] == WRITTEN]
        _classify(profiles, [planned[i] for i in pending], pending, results)
    if pulls:
        try:
            bulk_update(profiles, pulls)
        except PyMongoError:  # the newer line is there; heal removes the older one later
            pass
    return results


def bulk_update(collection: Collection, ops: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """``update_one`` for one op (no bulk round trip on Sefaria's one-profile path), else one unordered
    bulk; returns how many matched."""
    if len(ops) == 1:
        return collection.update_one(*ops[0]).matched_count
    return collection.bulk_write([UpdateOne(f, u) for f, u in ops], ordered=False).matched_count


def _run(profiles: Collection, ops: Sequence[tuple[dict[str, Any], dict[str, Any]]], owners: list[int],
         results: list[str | StoreUnavailable]) -> int:
    """Send the updates; a failed one marks its item ``StoreUnavailable``. Returns how many matched."""
    try:
        return bulk_update(profiles, ops)
    except BulkWriteError as exc:
        for err in exc.details.get("writeErrors", []):
            results[owners[err["index"]]] = StoreUnavailable(f"writing the profile: {str(err.get('errmsg', ''))[:200]}")
        return int(exc.details.get("nMatched", 0))
    except PyMongoError as exc:
        error = StoreUnavailable(f"writing profiles: {type(exc).__name__}: {exc}"[:300])
        for i in owners:
            results[i] = error
        return len(ops)


def _classify(profiles: Collection, items: Sequence[PlannedWrite], indexes: Sequence[int],
              results: list[str | StoreUnavailable]) -> None:
    """Tell a profile that moved on (guard values differ) from one that is absent, by one read."""
    fields = {name for item in items for name in item.write.guard}
    try:
        found = {doc["id"]: doc for doc in profiles.find({"id": {"$in": [item.profile_id for item in items]}},
                                                          {"_id": 0, "id": 1, **{f: 1 for f in fields}})}
    except PyMongoError as exc:
        for i in indexes:
            results[i] = StoreUnavailable(f"reading profiles back: {type(exc).__name__}")
        return
    for item, i in zip(items, indexes):
        doc = found.get(item.profile_id)
        if doc is None:
            results[i] = ABSENT
        elif any(doc.get(name, _MISSING) != value for name, value in item.write.guard.items()):
            results[i] = CHANGED


_MISSING = object()
