"""The batch runner for NationBuilder-profile validation (``crm-states validate-nb``).

A profile is pending when it has a truthy ``nationbuilder_id`` and no finished validation of *that*
id (``nb.validated_for``: a profile whose id changed after it was validated is pending again). The runner
finds them by merging two sorted streams (profiles with a NationBuilder id, and the machine's positions;
never a collection in memory), cuts them into id ranges, claims each range with an expiring lease, and
drives the range's profiles through the machine in one batch: one batched CRM lookup and bulk writes per
range. Killed at any instant and started again, it finishes the job: finished profiles are skipped,
half-done ones are continued, and the store's compare-and-set rules out a transition twice.

Where the answers come from is the run's ``LookupStrategy``: by default the CRM, asked once per range
(packed REST queries, every request counted by the client's ``api_requests``); ``crm_states.snapshots``
answers instead from a snapshot of the CRM loaded into our database first (a Bulk API query job, or the
operators' export). The ranges, leases, drive and counting are this module's, whatever the strategy.

What it prints is what the database holds: a profile is counted in a state only when its commit was
acknowledged; a journaled DB failure whose state could not be written is counted apart; profiles another
driver moved are not counted as this run's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import attrs
import pymongo
from pymongo.errors import ConnectionFailure, CursorNotFound

from machines import nb_profile_validation as nb

from . import metrics
from .engine import RunResult
from .leases import LEASES, RangeLeases
from .lookups import LookupStrategy, RangeLookups
from .progress import Progress, RunnerReport
from .protocols import States as CrmStates
from .records import Position
from .store.documents import position_from_doc

__all__ = ["ValidationRunner", "RunnerConfig", "RunnerReport", "Progress", "PROJECTION", "NB_FILTER", "pending_ids",
           "LookupStrategy"]

log = logging.getLogger("crm_states.runner")

COUNT_SECONDS = 900.0
#: How often in a row the runner's own reads and lease claims are tried again while the database is
#: unreachable (a restart, a failover): with the waits of ``_backoff`` and pymongo's server selection,
#: about half a minute. Validation writes have their own path: a failed commit is a DB-failure state.
DB_RETRIES = 3
T = TypeVar("T")

#: Profiles the validation is about: a truthy ``nationbuilder_id``.
NB_FILTER: Mapping[str, Any] = {"nationbuilder_id": {"$nin": [None, False, 0, ""]}}
PROJECTION = {"_id": 0, "id": 1, "nationbuilder_id": 1, "email": 1, "first_name": 1, "last_name": 1}
#: What the pending merge reads of a position.
_POSITION_VIEW = {"state": 1, "detail.input": 1, "detail.input_shown": 1, "seq": 1}


def _backoff(failure: int) -> float:
    return min(2.0 * failure, 10.0)


@attrs.frozen
class RunnerConfig:
    """``chunk_size`` profiles are driven (held in memory, written) together; ``lookup_size`` profiles, a
    range, are leased and looked up together (default: a chunk). Ranges are never narrower than a chunk."""

    chunk_size: int = 1000
    lookup_size: int | None = None
    concurrency: int = 2
    limit: int | None = None
    dry_run: bool = False
    max_api_calls: int | None = None
    lease_seconds: float = 300.0

    @property
    def range_size(self) -> int:
        """Pending profiles per leased range (and per lookup)."""
        return max(self.chunk_size, self.lookup_size or self.chunk_size)


def pending_ids(app: CrmStates, *, after: int | None = None, batch_size: int = 1000) -> Iterator[int]:
    """Ids of pending profiles in id order, from a merge of two sorted cursors (profiles with a
    NationBuilder id; the machine's positions). Profiles whose id is not an int are skipped with a warning."""
    where = dict(NB_FILTER) if after is None else {**NB_FILTER, "id": {"$gt": after}}
    profiles = app.store.profiles.find(where, {"_id": 0, "id": 1, "nationbuilder_id": 1}).sort("id", 1)
    positions = app.store.scan(nb.NAME, _POSITION_VIEW, None if after is None else {"profile_id": {"$gt": after}},
                               batch_size=batch_size)
    current = next(positions, None)
    try:
        for profile in profiles.batch_size(batch_size):
            pid = profile.get("id")
            if not isinstance(pid, int) or isinstance(pid, bool):
                log.warning("skipping a profile whose id is not an int: %r", pid)
                continue
            while current is not None and _before(current["profile_id"], pid):
                current = next(positions, None)
            position = position_from_doc(current) if current is not None and current["profile_id"] == pid else Position()
            if not nb.validated_for(profile, position):
                yield pid
    finally:
        profiles.close()


def _before(a: Any, b: int) -> bool:
    """Positions are sorted by profile id; non-int ids sort apart and never match an int profile."""
    return not isinstance(a, int) or isinstance(a, bool) or a < b


def _reap(in_flight: deque[Future[None]]) -> None:
    """Drop finished ranges from the front, raising what a range raised."""
    while in_flight and in_flight[0].done():
        in_flight.popleft().result()


class ValidationRunner:
    """Validates every pending NationBuilder profile; several may run at once on one database.

    Another batch job over id ranges reuses it by naming its ``machine`` and overriding ``pending_after``,
    ``_read_chunk`` and ``_drive`` (``crm_states.reconcile``, ``crm_states.retirement``)."""

    machine = nb.NAME

    def __init__(self, app: CrmStates, config: RunnerConfig = RunnerConfig(), *,
                 progress: Callable[[int], Progress] | None = None, lookup: LookupStrategy | None = None) -> None:
        self.app = app
        self.config = config
        self.lookup = lookup or LookupStrategy(app)
        self.profiles = app.store.profiles
        self.leases = RangeLeases(app.store.db[LEASES], self.machine, seconds=config.lease_seconds)
        self.make_progress = progress or (lambda total: Progress(total))
        self._lock = threading.Lock()
        self._stop = threading.Event()  # claim no further range (done, a limit, an error)
        self._abort = threading.Event()  # and drive no further batch of a range in flight
        self._api_at_start = 0

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> RunnerReport:
        started = time.monotonic()
        with pymongo.timeout(COUNT_SECONDS):  # a full pass: on a million profiles it outlasts a socket timeout
            first, last, pending = self._survey()
        report = RunnerReport(pending_at_start=pending)
        if self.config.dry_run:
            report.processed = min(pending, self.config.limit or pending)
            report.stopped = "dry run: nothing was claimed, sent or written"
            return report
        self._api_at_start = self.lookup.api_requests()
        if self.lookup.range_requests:
            self.lookup.limit(self.config.max_api_calls)
        try:
            if pending and not self.lookup.prepare(self, report):
                return report
            self._validate_ranges(first, last, pending, report)
            self.lookup.finish(self, report)
        finally:
            report.api_requests = self.lookup.api_requests() - self._api_at_start
            report.seconds = time.monotonic() - started
        return report

    def _validate_ranges(self, first: int, last: int, pending: int, report: RunnerReport) -> None:
        span = (last - first + 1) if pending else 1
        size = self.config.range_size
        base, width = self.leases.agree_ranges(size, first if pending else 0,
                                               max(size, round(size * span / max(pending, 1))))
        if pruned := self.leases.prune():
            log.info("removed %d leases left by runners that died or expired", pruned)
        progress = self.make_progress(min(pending, self.config.limit or pending))
        budget = self.config.limit
        in_flight: deque[Future[None]] = deque()
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="validate") as pool:
            try:
                for index, count in self._ranges(base, width):
                    if self._stop.is_set() or budget == 0:
                        break
                    _reap(in_flight)
                    if not self._within_api_budget(report):
                        break
                    if not self._outlasting_outages(lambda: self.leases.claim(index)):
                        report.skipped_ranges += 1
                        continue
                    take = count if budget is None else min(count, budget)
                    budget = None if budget is None else budget - take
                    bounds = (base + index * width, base + (index + 1) * width)
                    in_flight.append(pool.submit(self._validate_range, index, bounds, take, report, progress))
                    while len(in_flight) >= self.config.concurrency * 2:
                        in_flight.popleft().result()
                while in_flight:
                    in_flight.popleft().result()
            except BaseException:
                self._abort.set()  # an error or an interrupt: ranges in flight stop after their current batch
                raise
            finally:
                self._stop.set()
                for future in in_flight:
                    future.cancel()
                progress.close()

    def _survey(self) -> tuple[int, int, int]:
        """``(first pending id, last pending id, how many)`` in one pass of the merge."""
        first = last = 0
        count = 0
        for pid in self.pending_ids():
            if count == 0:
                first = pid
            last = pid
            count += 1
        return first, last, count

    def _ranges(self, base: int, width: int) -> Iterator[tuple[int, int]]:
        """``(range index, pending profiles in it)`` in id order."""
        current: int | None = None
        count = 0
        for pid in self.pending_ids():
            index = (pid - base) // width
            if current is not None and index != current:
                yield current, count
                count = 0
            current = index
            count += 1
        if current is not None:
            yield current, count

    def pending_ids(self) -> Iterator[int]:
        """``pending_ids``, reopened after the last id seen when the server lost the cursor (a restart,
        a failover), a few times: the work already claimed is not affected by it."""
        last: int | None = None
        failures = 0
        while True:
            try:
                for pid in self.pending_after(last, self.config.chunk_size):
                    failures = 0
                    last = pid
                    yield pid
                return
            except (CursorNotFound, ConnectionFailure) as exc:
                failures += 1
                if failures > DB_RETRIES:
                    raise
                log.warning("the cursor over pending profiles was lost (%s); reopening it after id %s",
                            type(exc).__name__, last)
                time.sleep(_backoff(failures))

    def pending_after(self, after: int | None, batch_size: int) -> Iterator[int]:
        """Pending profile ids above ``after``, in id order."""
        return pending_ids(self.app, after=after, batch_size=batch_size)

    @staticmethod
    def _outlasting_outages(call: Callable[[], T]) -> T:
        """``call()``, tried again after a short wait when the database is unreachable, a few times."""
        for failure in range(1, DB_RETRIES + 1):
            try:
                return call()
            except ConnectionFailure as exc:
                log.warning("database unreachable (%s); trying again", type(exc).__name__)
                time.sleep(_backoff(failure))
        return call()

    def _validate_range(self, index: int, bounds: tuple[int, int], count: int, report: RunnerReport,
                        progress: Progress) -> None:
        try:
            if self._stop.is_set():
                return
            # Renewed right before the lookup: a runner paused past its lease finds it gone and leaves the
            # range (and its count) to the runner that took it over.
            if not self.leases.renew(index):
                with self._lock:
                    report.lost_ranges += 1
                return
            self.validate_chunk({"id": {"$gte": bounds[0], "$lt": bounds[1]}}, count, report, progress)
        finally:
            self.leases.release(index)

    def validate_chunk(self, where: Mapping[str, Any], count: int, report: RunnerReport,
                       progress: Progress) -> None:
        """The per-range step: the pending profiles matching ``where`` (at most ``count``, in id order)
        through one batched CRM lookup and bulk writes, driven ``chunk_size`` at a time, counted into
        ``report``. Takes no lease: the caller holds one (``run``) or relies on the store's compare-and-set
        (a Celery task)."""
        profiles, positions = self._outlasting_outages(lambda: self._read_chunk(where, count))
        if not profiles:
            return
        size = self.config.chunk_size
        lookups = self._range_lookups(profiles, -(-len(profiles) // size))
        shared = isinstance(lookups, RangeLookups)  # one lookup for the range, not one per batch
        asked = False
        for start in range(0, len(profiles), size):
            if self._abort.is_set():
                break
            results = self._drive_batch(profiles[start:start + size], positions, lookups)
            halted = any(r.outcome == "halted" for r in results)
            asked = asked or not halted  # a halted batch asked nothing
            self.record(results, report, progress, lookups=0 if shared else None)
            if halted:
                break  # a limit: the rest of the range stays pending (its answers, if any, were free)
        if shared:
            with self._lock:
                report.lookups += asked

    def _drive_batch(self, profiles: list[dict[str, Any]], positions: Mapping[int, Position],
                     lookups: Any) -> list[RunResult]:
        results = self._drive(profiles, positions, lookups)
        if any(r.outcome == "changed" for r in results):  # an input moved during the lookup: look again
            again = {r.profile_id for r in results if r.outcome == "changed"}
            fresh, fresh_positions = self._outlasting_outages(
                lambda: self._read_chunk({"id": {"$in": sorted(again)}}, len(again)))
            redone = {r.profile_id: r for r in self._drive(fresh, fresh_positions, lookups)} if fresh else {}
            # No longer pending when read again: its NationBuilder id was removed, or another driver did it.
            results = [redone.get(r.profile_id, RunResult(r.profile_id, r.state, "skipped", "no longer pending"))
                       if r.outcome == "changed" else r for r in results]
        return results

    def _range_lookups(self, profiles: list[dict[str, Any]], drives: int) -> Any:
        """What the range's drives look their profiles up in (``LookupStrategy.for_range``); None: each
        drive uses the strategy's context (a runner whose machine looks up something else)."""
        ids = []
        for profile in profiles:
            try:
                ids.append(nb.nationbuilder_id(profile))
            except ValueError:
                pass  # the machine records why (ScriptFailureLogged)
        return self.lookup.for_range(ids, drives)

    def _read_chunk(self, where: Mapping[str, Any], count: int) -> tuple[list[dict[str, Any]], dict[int, Position]]:
        """The chunk's pending profiles (fresh, read after the lease was taken) and their positions."""
        candidates = [p for p in self.profiles.find({**NB_FILTER, **where}, PROJECTION).sort("id", 1)
                      if isinstance(p.get("id"), int) and not isinstance(p["id"], bool)]
        bounds = where.get("id")
        if isinstance(bounds, Mapping) and set(bounds) == {"$gte", "$lt"}:  # one range read: an $in costs per hit
            positions = self.app.store.positions_between(nb.NAME, bounds["$gte"], bounds["$lt"])
        else:
            positions = self.app.store.positions_of(nb.NAME, [p["id"] for p in candidates])
        pending = [p for p in candidates if not nb.validated_for(p, positions.get(p["id"], Position()))]
        return pending[:count], positions

    def _drive(self, profiles: list[dict[str, Any]], positions: Mapping[int, Position],
               lookups: Any = None) -> list[RunResult]:
        engine = self.app.engine(nb.NAME, context=self.lookup.context() if lookups is None else lookups)
        return engine.drive([engine.prepare(p, positions.get(p["id"], Position()), restart=True) for p in profiles])

    def record(self, results: list[RunResult], report: RunnerReport, progress: Progress, *,
               lookups: int | None = None) -> None:
        """Count a batch's results; ``lookups`` it made (default: one, unless the batch halted)."""
        metrics.runner_results(self.machine, results)
        with self._lock:
            report.lookups += any(r.outcome != "halted" for r in results) if lookups is None else lookups
            done = report.add(results)
            if report.stopped:
                self._stop.set()
            progress.update(done, report)

    # --- the API budget -------------------------------------------------------------------------
    def spent(self) -> int:
        """API requests this run has sent so far (the CRM client's own count)."""
        return self.lookup.api_requests() - self._api_at_start

    def _within_api_budget(self, report: RunnerReport) -> bool:
        """Whether another range is worth claiming: requests are left. Each lookup itself is held to the
        budget exactly, counting those in flight (``BudgetedLookups``): a range past it halts untouched."""
        if self.config.max_api_calls is None or not self.lookup.range_requests:
            return True
        if self.spent() >= self.config.max_api_calls:
            report.stopped = f"--max-api-calls {self.config.max_api_calls} reached"
            return False
        return True
