"""Pieces the migration's batch jobs share (``crm_states.retirement``, ``crm_states.reconcile``): joining
id-sorted cursors (Sefaria's profiles, the machines' positions) one profile at a time without holding a
collection in memory, reading a chunk's positions, and letting go of the claims of refused writes."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from .records import Position
from .spec import Run, RunResult

log = logging.getLogger("crm_states.streams")


def by_profile(streams: Mapping[str, Iterable[Mapping[str, Any]]]) -> Iterator[tuple[int, dict[str, Mapping[str, Any]]]]:
    """``(profile id, {stream name: document})`` in id order, from streams each sorted by profile id (a
    profile document's ``id``, a position's ``profile_id``). A document whose id is not an int is skipped
    (with a warning for profiles): Sefaria's ids are ints, and nothing else can be matched."""

    def tagged(name: str, docs: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, str, Mapping[str, Any]]]:
        for doc in docs:
            pid = doc["id"] if "id" in doc else doc.get("profile_id")
            if isinstance(pid, bool) or not isinstance(pid, int):
                if "id" in doc:
                    log.warning("skipping a profile whose id is not an int: %r", pid)
                continue
            yield pid, name, doc

    current: int | None = None
    group: dict[str, Mapping[str, Any]] = {}
    for pid, name, doc in heapq.merge(*(tagged(n, d) for n, d in streams.items()), key=lambda row: row[0]):
        if pid != current and group:
            yield current, group  # type: ignore[misc]
            group = {}
        current = pid
        group[name] = doc
    if group and current is not None:
        yield current, group


def positions_for(store: Any, machine: str, where: Mapping[str, Any]) -> dict[int, Position]:
    """The positions of ``machine`` for a chunk's profile filter (the runner's ``{"id": {"$gte", "$lt"}}``
    range, or ``{"id": {"$in": [...]}}`` when it looks at some profiles again): one indexed read."""
    condition = where["id"]
    if "$in" in condition:
        return store.positions_of(machine, condition["$in"])
    return store.positions_between(machine, condition["$gte"], condition["$lt"])


def release_refused(store: Any, machine: str, runs: Sequence[Run], results: Sequence[RunResult]) -> None:
    """A run holding its write-ahead claim whose guarded write was refused (the profile moved on, or was
    deleted) wrote nothing: release the claim, so that looking at the profile again, now, can take it."""
    for run, result in zip(runs, results):
        if result.outcome in ("changed", "deleted") and run.holds_claim:
            store.release(run.profile_id, machine, run.position.seq, run.token)
            run.holds_claim = False
