"""The weekly sustainer sync (the design document's "Syncing sustainers"), fixing Sefaria's sync "by
elimination", where a failed read of the CRM demoted everyone.

``sync_sustainers(app)`` is what the weekly cron job calls (``crm-states sync-sustainers`` is the same
from a shell):

1. Read the WHOLE sustainer set from the CRM first (``get_sustainers()``, every page). If the read fails
   or is incomplete (an error part-way through paging, an id that is not a non-empty string), nothing is
   changed and the report says why (``read_failed``).
2. Stream the profiles that have a CRM id (``sf_app_user_id``; the sustainer ids are app user ids) from a
   cursor and note each one whose ``is_sustainer`` differs from the set. Only the sustainer id set and the
   ids of the profiles to change are held in memory, never the collection. A profile without a CRM id is
   left alone: the CRM cannot speak for it (a sustainer among them is counted, not demoted).
3. Refuse to demote more than ``max_demote_share`` of the current sustainers (profiles with
   ``is_sustainer: true``) in one run unless ``force``: a CRM that suddenly reports far fewer sustainers
   is more likely broken than right. Nothing is changed then either (``refused``).
4. Change the differing profiles in batches, each change one run of the ``sync_sustainers`` machine
   (machines/sync_sustainers.py) with the status read as its input: one bulk insert of transitions and one
   bulk profile update per batch. The profile is read again before its run and skipped if it no longer
   differs, so a second sync (or one racing this one) changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from machines import sync_sustainers as machine

from .crm.errors import CrmLimitExceeded
from .engine import describe
from .protocols import States as CrmStates
from .records import Position

log = logging.getLogger("crm_states.sustainers")


DEFAULT_MAX_DEMOTE_SHARE = 0.1
DEFAULT_BATCH_SIZE = 1000
#: What the plan and the apply step read of a profile.
_PLAN_FIELDS = {"_id": 0, "id": 1, "sf_app_user_id": 1, "is_sustainer": 1}


class SustainerReadError(Exception):
    """The CRM's sustainer set could not be read whole. ``limit``: the CRM's API limit stopped it."""

    def __init__(self, message: str, *, limit: bool = False) -> None:
        super().__init__(message)
        self.limit = limit


@attrs.define
class SyncReport:
    """What a sync found and did. ``changed`` is the number of profiles whose ``is_sustainer`` was written."""

    dry_run: bool = False
    read_failed: str | None = None
    read_limit: bool = False
    refused: str | None = None
    sustainers_in_crm: int = 0
    matched: int = 0
    unmatched: int = 0
    current_sustainers: int = 0
    sustainers_without_crm_id: int = 0
    to_promote: int = 0
    to_demote: int = 0
    skipped: int = 0
    states: Counter[str] = attrs.field(factory=Counter)
    outcomes: Counter[str] = attrs.field(factory=Counter)
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return self.states.get("WroteSustainerStatus", 0)

    @property
    def problems(self) -> int:
        """Runs that did not end in the final state (DB failures, conflicts, interruptions)."""
        return sum(self.outcomes.values()) - self.changed

    @property
    def demote_share(self) -> float:
        return self.to_demote / self.current_sustainers if self.current_sustainers else (1.0 if self.to_demote else 0.0)


def read_sustainer_set(crm: Any) -> frozenset[str]:
    """Every sustainer id, or ``SustainerReadError``: a partial set is never returned."""
    ids: set[str] = set()
    try:
        for crm_id in crm.get_sustainers():
            if not isinstance(crm_id, str) or not crm_id:
                raise ValueError(f"the CRM answered a sustainer id that is not a non-empty string: {crm_id!r}")
            ids.add(crm_id)
    except CrmLimitExceeded as exc:
        raise SustainerReadError(describe(exc), limit=True) from exc
    except Exception as exc:  # whatever broke the read, the set is not whole
        raise SustainerReadError(describe(exc)) from exc
    return frozenset(ids)


def sync_sustainers(app: CrmStates, *, max_demote_share: float = DEFAULT_MAX_DEMOTE_SHARE, force: bool = False,
                    dry_run: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> SyncReport:
    """Set each profile's ``is_sustainer`` from the CRM's sustainer set; see the module docstring."""
    if not 0.0 <= max_demote_share <= 1.0:
        raise ValueError(f"max_demote_share must be between 0 and 1, got {max_demote_share!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    started = time.monotonic()
    report = SyncReport(dry_run=dry_run)
    try:
        sustainers = read_sustainer_set(app.crm)
    except SustainerReadError as exc:
        report.read_failed, report.read_limit = str(exc), exc.limit
        log.error("sustainer sync: the CRM's sustainer set could not be read whole; nothing changed: %s", exc)
        report.seconds = time.monotonic() - started
        return report
    report.sustainers_in_crm = len(sustainers)

    changes = _plan(app, sustainers, report)
    if report.to_demote > max_demote_share * report.current_sustainers and not force:
        report.refused = (f"the sync would demote {report.to_demote} of {report.current_sustainers} current "
                          f"sustainers ({report.demote_share:.1%}), more than the limit of {max_demote_share:.1%}")
        log.error("sustainer sync refused, nothing changed: %s", report.refused)
    elif not dry_run:
        _apply(app, changes, report, batch_size)
    report.seconds = time.monotonic() - started
    return report


def _profiles_with_crm_id(app: CrmStates, projection: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    return iter(app.store.profiles.find({"sf_app_user_id": {"$exists": True}}, projection).batch_size(1000))


def _plan(app: CrmStates, sustainers: frozenset[str], report: SyncReport) -> dict[int, bool]:
    """One pass over the profiles with a CRM id: the profiles to change, by id, and their new status."""
    changes: dict[int, bool] = {}
    matched: set[str] = set()
    sustainers_with_id = 0
    for profile in _profiles_with_crm_id(app, _PLAN_FIELDS):
        crm_id = machine.crm_id_of(profile)
        if crm_id is None:
            continue
        current = bool(profile.get("is_sustainer"))
        target = crm_id in sustainers
        sustainers_with_id += current
        if target:
            matched.add(crm_id)
        if current != target:
            changes[profile["id"]] = target
            if target:
                report.to_promote += 1
            else:
                report.to_demote += 1
    report.matched = len(matched)
    report.unmatched = len(sustainers) - len(matched)
    report.current_sustainers = app.store.profiles.count_documents({"is_sustainer": True})
    report.sustainers_without_crm_id = max(0, report.current_sustainers - sustainers_with_id)
    return changes


def _apply(app: CrmStates, changes: Mapping[int, bool], report: SyncReport, batch_size: int) -> None:
    engine = app.engine(machine.NAME)
    for ids in _chunks(sorted(changes), batch_size):
        profiles = list(app.store.profiles.find({"id": {"$in": ids}}, _PLAN_FIELDS))
        positions = app.store.positions_of(machine.NAME, [p["id"] for p in profiles])
        runs = []
        for profile in profiles:
            target = changes.get(profile["id"])
            if target is None or bool(profile.get("is_sustainer")) == target:
                report.skipped += 1  # changed meanwhile (another sync), or a duplicate id
                continue
            runs.append(engine.prepare(profile, positions.get(profile["id"], Position()), restart=True,
                                       inputs={"is_sustainer": target}))
        for result in engine.drive(runs):
            report.outcomes[result.outcome] += 1
            report.states[result.state or "not started"] += 1
        log.info("sustainer sync: %d of %d changes done", sum(report.outcomes.values()), len(changes))


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
