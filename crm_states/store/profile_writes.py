"""Writing the machines' data into Sefaria's ``profiles`` documents, and only that.

A profile write sets fields (``sf_app_user_id``, ``is_sustainer``), removes fields (the retirement of
``nationbuilder_id``) and adds one ``CrmLog`` line per finding: the newest line of a finding replaces older
lines of the same finding, and an older one is not added at all, so replays and resumes in any order leave
one line per finding. The write is guarded by the inputs its outcome was computed from
(``ProfileWrite.guard``) and by the compare-and-set of the fields it moves (``ProfileWrite.expect``: each
still the value read, or already the value written): when the profile no longer holds them, or is gone,
nothing is written and the caller is told which.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

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
    expect: dict[str, Any] = {}
    unset: dict[str, None] = {}
    for w in writes:
        sets.update(w.set)
        guard.update(w.guard)
        unset.update(dict.fromkeys(w.unset))
        expect.update({k: v for k, v in w.expect.items() if k not in expect})  # the first read is the read
    lines = [w.crm_log for w in writes if w.crm_log]
    return ProfileWrite(set=sets, crm_log=lines[-1] if lines else None, guard=guard,
                        requires_profile=any(w.requires_profile for w in writes), unset=tuple(unset), expect=expect)


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
    if write.unset:
        update["$unset"] = dict.fromkeys(write.unset, "")
    if line:
        update["$addToSet"] = {"CrmLog": line}
    return (update or None), superseded


def condition_of(write: ProfileWrite) -> dict[str, Any]:
    """The filter a write is applied under: its guard, and each expected field holding the value read or
    already the value written (``None`` matches an absent field, as MongoDB reads it)."""
    condition = dict(write.guard)
    for field, read in write.expect.items():
        allowed = _allowed(write, field, read)
        condition[field] = allowed[0] if len(allowed) == 1 else {"$in": allowed}
    return condition


def _allowed(write: ProfileWrite, field: str, read: Any) -> list[Any]:
    target = write.target(field)
    return [read] if _same(read, target) else [read, target]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


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
        ops.append(({"id": item.profile_id, **condition_of(item.write)}, update))
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


#: Operations (or ids of an ``$in``) per command: no single command of a large drive (the signup sweep's
#: are 10,000 runs) outlasts the socket timeout on a slow server.
BULK_OPS = 1000

T = TypeVar("T")


def bulks(items: list[T]) -> Iterator[list[T]]:
    """``items`` in slices of at most ``BULK_OPS``: one database command's worth each."""
    for start in range(0, len(items), BULK_OPS):
        yield items[start:start + BULK_OPS]


def bulk_update(collection: Collection, ops: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """``update_one`` for one op (no bulk round trip on Sefaria's one-profile path), else one unordered
    bulk (callers keep it to ``BULK_OPS``); returns how many matched."""
    if len(ops) == 1:
        return collection.update_one(*ops[0]).matched_count
    return collection.bulk_write([UpdateOne(f, u) for f, u in ops], ordered=False).matched_count


def _run(profiles: Collection, ops: list[tuple[dict[str, Any], dict[str, Any]]], owners: list[int],
         results: list[str | StoreUnavailable]) -> int:
    """Send the updates, ``BULK_OPS`` per command; a failed one marks its item ``StoreUnavailable``.
    Returns how many matched (a command that failed whole counts as matched: nothing to classify)."""
    matched = 0
    for chunk, chunk_owners in zip(bulks(ops), bulks(owners)):
        try:
            matched += bulk_update(profiles, chunk)
        except BulkWriteError as exc:
            for err in exc.details.get("writeErrors", []):
                results[chunk_owners[err["index"]]] = StoreUnavailable(
                    f"writing the profile: {str(err.get('errmsg', ''))[:200]}")
            matched += int(exc.details.get("nMatched", 0))
        except PyMongoError as exc:
            error = StoreUnavailable(f"writing profiles: {type(exc).__name__}: {exc}"[:300])
            for i in chunk_owners:
                results[i] = error
            matched += len(chunk)
    return matched


def _classify(profiles: Collection, items: Sequence[PlannedWrite], indexes: Sequence[int],
              results: list[str | StoreUnavailable]) -> None:
    """Tell a profile that moved on (guard or expected values differ) from one that is absent, by reads of
    ``BULK_OPS`` ids."""
    fields = {name for item in items for name in [*item.write.guard, *item.write.expect]}
    ids = [item.profile_id for item in items]
    try:
        found = {doc["id"]: doc for some in bulks(ids)
                 for doc in profiles.find({"id": {"$in": some}}, {"_id": 0, "id": 1, **{f: 1 for f in fields}})}
    except PyMongoError as exc:
        for i in indexes:
            results[i] = StoreUnavailable(f"reading profiles back: {type(exc).__name__}")
        return
    for item, i in zip(items, indexes):
        doc = found.get(item.profile_id)
        if doc is None:
            results[i] = ABSENT
        elif any(doc.get(name, _MISSING) != value for name, value in item.write.guard.items()) or any(
                not any(doc.get(name) == value for value in _allowed(item.write, name, read))
                for name, read in item.write.expect.items()):
            results[i] = CHANGED


_MISSING = object()
