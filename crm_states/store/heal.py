"""Drift and heal: Sefaria replaces whole profile documents with stale copies, so the data the machines
wrote (``sf_app_user_id``, ``is_sustainer``, ``CrmLog`` lines) can silently vanish from ``profiles``. Each
position records what its machine's finished runs mean the profile to hold (``ProfileData``); ``heal``
compares that with the profiles and writes back what is missing, without a CRM call.

One pass streams the positions that carry data, machine by machine in profile id order (an indexed scan),
merges them per profile, reads the profiles of each batch with one ``$in`` query and writes the fixes of
the batch in one bulk. Where several machines set one field (an app user id from the signup and from the
validation), the newest value wins. A record whose guard no longer holds (the profile's
``nationbuilder_id`` changed since) is not asserted: that profile is due for validation again; a field
removed on purpose (``ProfileData.removed``: the retired nationbuilder_id) still counts as it was. A profile
that does not exist yet (a signup before Sefaria created the document) is counted as waiting and healed by
a later pass. Idempotent: a second pass finds nothing.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from pymongo.errors import PyMongoError

from ..records import ProfileData, finding_of, is_newest
from .errors import StoreUnavailable
from .profile_writes import bulk_update

if TYPE_CHECKING:
    from .core import Store

DEFAULT_BATCH = 1000


@attrs.define
class HealReport:
    """What one pass found: profiles checked, drifted and written back (0 in a dry run), in all and per
    machine (a profile can drift in several machines' data); per machine also the profiles waiting for
    Sefaria to create them and those whose inputs changed since their run."""

    dry_run: bool = False
    checked: int = 0
    drifted_profiles: int = 0
    healed_profiles: int = 0
    drifted: Counter[str] = attrs.field(factory=Counter)
    healed: Counter[str] = attrs.field(factory=Counter)
    waiting: Counter[str] = attrs.field(factory=Counter)
    stale_inputs: Counter[str] = attrs.field(factory=Counter)

    @property
    def total_drifted(self) -> int:
        return self.drifted_profiles


def heal(store: Store, machines: Sequence[str], *, only: Iterable[str] | None = None, dry_run: bool = False,
         batch_size: int = DEFAULT_BATCH, profile_ids: Iterable[int] | None = None) -> HealReport:
    """Find (and unless ``dry_run`` fix) every profile whose data disagrees with what the finished runs of
    ``machines`` recorded. ``only`` limits what is counted and fixed to those machines; every machine in
    ``machines`` is still read, so the newest value of a shared field wins. ``profile_ids`` limits the pass
    to those profiles (the follow-up of one signup)."""
    report = HealReport(dry_run=dry_run)
    counted = set(only) if only is not None else set(machines)
    where = None if profile_ids is None else {"profile_id": {"$in": list(profile_ids)}}
    batch: list[tuple[int, dict[str, ProfileData]]] = []
    for profile_id, records in _records_by_profile(store, machines, where):
        batch.append((profile_id, records))
        if len(batch) >= batch_size:
            _heal_batch(store, batch, counted, report)
            batch = []
    if batch:
        _heal_batch(store, batch, counted, report)
    return report


def _records_by_profile(store: Store, machines: Sequence[str], where: Mapping[str, Any] | None = None
                        ) -> Iterator[tuple[int, dict[str, ProfileData]]]:
    """``(profile id, {machine: data})`` in profile id order, merging one sorted cursor per machine."""
    def stream(machine: str) -> Iterator[tuple[int, str, ProfileData]]:
        for doc in store.scan(machine, {"data": 1}, {"data": {"$exists": True}, **(where or {})}):
            yield doc["profile_id"], machine, ProfileData.from_doc(doc.get("data"))

    current: int | None = None
    records: dict[str, ProfileData] = {}
    for profile_id, machine, data in heapq.merge(*(stream(m) for m in machines), key=lambda row: row[0]):
        if profile_id != current and records:
            yield current, records  # type: ignore[misc]
            records = {}
        current = profile_id
        if not data.empty or data.removed:
            records[machine] = data
    if records and current is not None:
        yield current, records


def _heal_batch(store: Store, batch: Sequence[tuple[int, Mapping[str, ProfileData]]], counted: set[str],
                report: HealReport) -> None:
    fields = {name for _, records in batch for data in records.values() for name in [*data.fields, *data.guard]}
    try:
        profiles = {doc["id"]: doc for doc in store.profiles.find(
            {"id": {"$in": [pid for pid, _ in batch]}}, {"_id": 0, "id": 1, "CrmLog": 1, **{f: 1 for f in fields}})}
    except PyMongoError as exc:
        raise StoreUnavailable(f"heal: reading profiles: {type(exc).__name__}: {exc}"[:300]) from exc
    fixes: list[tuple[dict[str, Any], dict[str, Any]]] = []
    pulls: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for profile_id, records in batch:
        report.checked += 1
        profile = profiles.get(profile_id)
        if profile is None:
            for machine in records.keys() & counted:
                report.waiting[machine] += 1
            continue
        holding = {m: d for m, d in records.items() if _guard_holds(d, _as_based(profile, records))}
        for machine in (records.keys() - holding.keys()) & counted:
            report.stale_inputs[machine] += 1
        sets, lines, superseded, drifted = _expected_changes(holding, profile)
        drifted &= counted
        if not drifted:
            continue
        report.drifted_profiles += 1
        for machine in drifted:
            report.drifted[machine] += 1
        update: dict[str, Any] = {}
        if sets:
            update["$set"] = sets
        if lines:
            update["$addToSet"] = {"CrmLog": {"$each": lines}}
        fixes.append(({"id": profile_id}, update))
        if superseded:
            pulls.append(({"id": profile_id}, {"$pull": {"CrmLog": {"$in": superseded}}}))
        if not report.dry_run:
            for machine in drifted:
                report.healed[machine] += 1
    if report.dry_run or not fixes:
        return
    try:
        bulk_update(store.profiles, fixes)
        report.healed_profiles += len(fixes)
        if pulls:
            bulk_update(store.profiles, pulls)
    except PyMongoError as exc:
        raise StoreUnavailable(f"heal: writing profiles: {type(exc).__name__}: {exc}"[:300]) from exc


def _as_based(profile: Mapping[str, Any], records: Mapping[str, ProfileData]) -> Mapping[str, Any]:
    """The profile as records are judged against: a field some machine removed on purpose (the retired
    nationbuilder_id) still counts with the value it held, unless the profile holds one again."""
    removed = {name: value for data in records.values() for name, value in data.removed.items()}
    return {**removed, **{k: v for k, v in profile.items() if v is not None}} if removed else profile


def _guard_holds(data: ProfileData, profile: Mapping[str, Any]) -> bool:
    return all(profile.get(name) == value for name, value in data.guard.items())


def _expected_changes(records: Mapping[str, ProfileData], profile: Mapping[str, Any]
                      ) -> tuple[dict[str, Any], list[str], list[str], set[str]]:
    """``(fields to set, lines to add, lines to pull, machines whose data drifted)`` for one profile."""
    newest: dict[str, tuple[Any, Any, str]] = {}
    for machine, data in records.items():
        for name, value in data.fields.items():
            at = data.set_at.get(name)
            if name not in newest or (at is not None and (newest[name][1] is None or at > newest[name][1])):
                newest[name] = (value, at, machine)
    sets: dict[str, Any] = {}
    drifted: set[str] = set()
    for name, (value, _, machine) in newest.items():
        if profile.get(name) != value:
            sets[name] = value
            drifted.add(machine)
    have = [line for line in profile.get("CrmLog") or [] if isinstance(line, str)]
    lines: list[str] = []
    superseded: list[str] = []
    for machine, data in records.items():
        for line in data.crm_log:
            if line not in have and is_newest(line, have):
                lines.append(line)
                superseded.extend(h for h in have if finding_of(h) == finding_of(line) and h != line)
                drifted.add(machine)
    return sets, sorted(set(lines)), sorted(set(superseded)), drifted
