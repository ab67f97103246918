"""The batch runner for NationBuilder-profile validation (``crm-states validate-nb``).

It streams the ids of profiles whose ``nationbuilder_id`` is truthy and whose validation is not finished
(a cursor, never the collection in memory), cuts them into id ranges, claims each range with an expiring
lease, and drives the range's profiles through the machine in one batch: one batched CRM lookup and bulk
writes per range. Killed at any instant and started again, it finishes the job: finished profiles are
skipped, half-done ones are continued, and the store's compare-and-set rules out a transition twice.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import attrs
import pymongo
from pymongo.errors import ConnectionFailure, CursorNotFound

from machines import nb_profile_validation as nb

from . import metrics
from .api import CrmStates
from .engine import RunResult
from .leases import LEASES, RangeLeases
from .logs import fields
from .store import state_field

log = logging.getLogger("crm_states.runner")

COUNT_SECONDS = 900.0
#: How often in a row the runner's own reads and lease claims are tried again while the database is
#: unreachable (a restart, a failover): with the waits of ``_backoff`` and pymongo's server selection,
#: about half a minute. Validation writes have their own path: a failed commit is a DB-failure state.
DB_RETRIES = 3
T = TypeVar("T")


def _backoff(failure: int) -> float:
    return min(2.0 * failure, 10.0)
PROJECTION = {"_id": 0, "id": 1, "nationbuilder_id": 1, "email": 1, "first_name": 1, "last_name": 1,
              state_field(nb.NAME): 1}


def pending_filter() -> dict[str, Any]:
    """Profiles with a truthy ``nationbuilder_id`` whose validation has not reached a terminal state."""
    return {"nationbuilder_id": {"$nin": [None, False, 0, ""]},
            f"{state_field(nb.NAME)}.state": {"$nin": sorted(nb.SPEC.terminal)}}


@attrs.frozen
class RunnerConfig:
    chunk_size: int = 1000
    concurrency: int = 2
    limit: int | None = None
    dry_run: bool = False
    max_api_calls: int | None = None
    lease_seconds: float = 300.0


@attrs.define
class RunnerReport:
    """What a run did. ``stopped`` says why it ended early (the CRM's limit, ``--max-api-calls``)."""

    pending_at_start: int = 0
    processed: int = 0
    states: Counter[str] = attrs.field(factory=Counter)
    outcomes: Counter[str] = attrs.field(factory=Counter)
    lookups: int = 0
    skipped_ranges: int = 0
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


class Progress:
    """A tqdm bar on a terminal; periodic plain log lines otherwise."""

    def __init__(self, total: int, *, stream: Any = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.every = every
        self.started = self.last = time.monotonic()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="profile", file=self.stream, dynamic_ncols=True)

    def update(self, done: int, report: RunnerReport) -> None:
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(_states_line(report.states), refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = report.processed / max(now - self.started, 1e-9)
            eta = (self.total - report.processed) / rate if rate else float("inf")
            log.info("validated %d/%d profiles, %.0f/s, ETA %.0fs; %s", report.processed, self.total, rate, eta,
                     _states_line(report.states), extra=fields(machine=nb.NAME, processed=report.processed,
                                                               total=self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _reap(in_flight: deque[Future[None]]) -> None:
    """Drop finished ranges from the front, raising what a range raised."""
    while in_flight and in_flight[0].done():
        in_flight.popleft().result()


def _states_line(states: Mapping[str, int]) -> str:
    return ", ".join(f"{state} {count}" for state, count in sorted(states.items()))


class ValidationRunner:
    """Validates every pending NationBuilder profile; several may run at once on one database."""

    def __init__(self, app: CrmStates, config: RunnerConfig = RunnerConfig(), *,
                 progress: Callable[[int], Progress] | None = None) -> None:
        self.app = app
        self.config = config
        self.profiles = app.store.profiles
        self.leases = RangeLeases(app.store.db[LEASES], nb.NAME, seconds=config.lease_seconds)
        self.make_progress = progress or (lambda total: Progress(total))
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> RunnerReport:
        started = time.monotonic()
        # Counting scans every profile: on a million it outlasts the client's 30 s socket timeout on
        # SecantusDB, so this one operation gets its own deadline.
        with pymongo.timeout(COUNT_SECONDS):
            report = RunnerReport(pending_at_start=self.profiles.count_documents(pending_filter()))
        if self.config.dry_run:
            report.processed = min(report.pending_at_start, self.config.limit or report.pending_at_start)
            report.stopped = "dry run: nothing was claimed, sent or written"
            return report
        with pymongo.timeout(COUNT_SECONDS):  # two sorted scans of the pending profiles: as slow as the count
            proposed = self._proposed_ranges(report.pending_at_start)
        base, width = self.leases.agree_ranges(self.config.chunk_size, *proposed)
        if pruned := self.leases.prune():
            log.info("removed %d leases left by runners that died or expired", pruned)
        progress = self.make_progress(min(report.pending_at_start, self.config.limit or report.pending_at_start))
        budget = self.config.limit
        in_flight: deque[Future[None]] = deque()
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="validate") as pool:
            try:
                for index, ids in self._ranges(base, width):
                    if self._stop.is_set() or budget == 0:
                        break
                    _reap(in_flight)
                    if not self._within_api_budget(report, reserved=len(in_flight)):
                        break
                    if not self._outlasting_outages(lambda: self.leases.claim(index)):
                        report.skipped_ranges += 1
                        continue
                    take = ids if budget is None else ids[:budget]
                    budget = None if budget is None else budget - len(take)
                    bounds = (base + index * width, base + (index + 1) * width)
                    in_flight.append(pool.submit(self._validate_range, index, bounds, len(take), report, progress))
                    while len(in_flight) >= self.config.concurrency * 2:
                        in_flight.popleft().result()
                while in_flight:
                    in_flight.popleft().result()
            finally:
                self._stop.set()
                for future in in_flight:
                    future.cancel()
                progress.close()
        report.seconds = time.monotonic() - started
        return report

    def _proposed_ranges(self, pending: int) -> tuple[int, int]:
        """Ranges starting at the first pending id, wide enough for about ``chunk_size`` pending profiles."""
        numeric = {**pending_filter(), "id": {"$type": ["int", "long"]}}  # others are skipped with a warning
        first = self.profiles.find_one(numeric, {"id": 1}, sort=[("id", 1)])
        last = self.profiles.find_one(numeric, {"id": 1}, sort=[("id", -1)])
        if not first or not last or pending == 0:
            return 0, self.config.chunk_size
        span = int(last["id"]) - int(first["id"]) + 1
        return int(first["id"]), max(self.config.chunk_size, round(self.config.chunk_size * span / pending))

    def _ranges(self, base: int, width: int) -> Iterator[tuple[int, list[int]]]:
        """``(range index, pending ids in it)`` in id order, from a cursor over ids only."""
        current: int | None = None
        ids: list[int] = []
        for pid in self._pending_ids():
            index = (pid - base) // width
            if current is not None and index != current:
                yield current, ids
                ids = []
            current = index
            ids.append(pid)
        if current is not None:
            yield current, ids

    def _pending_ids(self) -> Iterator[int]:
        """Pending int ids in order. A cursor the server lost (a restart, a failover) is opened again
        after the last id seen, a few times: the work already claimed is not affected by it."""
        last: int | None = None
        failures = 0
        while True:
            where = pending_filter() if last is None else {**pending_filter(), "id": {"$gt": last}}
            cursor = self.profiles.find(where, {"_id": 0, "id": 1}).sort("id", 1).batch_size(self.config.chunk_size)
            try:
                for doc in cursor:
                    pid = doc.get("id")
                    if not isinstance(pid, int) or isinstance(pid, bool):
                        log.warning("skipping a profile whose id is not an int: %r", pid)
                        continue
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
            finally:
                cursor.close()

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
            # A range query, read after the lease was taken: fresh positions, and far cheaper than $in.
            self.validate_chunk({"id": {"$gte": bounds[0], "$lt": bounds[1]}}, count, report, progress)
        finally:
            self.leases.release(index)

    def validate_chunk(self, where: Mapping[str, Any], count: int, report: RunnerReport,
                       progress: Progress) -> None:
        """The per-chunk step: the pending profiles matching ``where`` (at most ``count``, in id order)
        through one batched CRM lookup and bulk writes, counted into ``report``. Takes no lease: the
        caller holds one (``run``) or relies on the store's compare-and-set (a Celery task)."""
        query = {**pending_filter(), **where}
        profiles = self._outlasting_outages(
            lambda: list(self.profiles.find(query, PROJECTION).sort("id", 1).limit(count)))
        results = self.app.validate_profiles(profiles) if profiles else []
        if any(r.outcome == "conflict" for r in results):
            results = self._after_conflicts(results)
        self.record(results, report, progress)

    def _after_conflicts(self, results: list[RunResult]) -> list[RunResult]:
        """A conflict here means a killed run's documents were just rolled forward: a profile that is now
        finished counts as finished, one left half-way is continued once from where it stands."""
        settled = {r.profile_id: r for r in results
                   if r.outcome == "conflict" and r.state in nb.SPEC.terminal}
        retry = [r.profile_id for r in results if r.outcome == "conflict" and r.profile_id not in settled]
        query = {**pending_filter(), "id": {"$in": retry}}
        again = self._outlasting_outages(lambda: list(self.profiles.find(query, PROJECTION))) if retry else []
        redone = {r.profile_id: r for r in self.app.validate_profiles(again)} if again else {}
        return [redone.get(r.profile_id) or (RunResult(r.profile_id, r.state, "finished")
                                             if r.profile_id in settled else r) for r in results]

    def record(self, results: list[RunResult], report: RunnerReport, progress: Progress) -> None:
        metrics.runner_results(nb.NAME, results)
        with self._lock:
            if results:  # a range another runner finished meanwhile reads no profiles and asks nothing
                report.lookups += 1
            for result in results:
                report.outcomes[result.outcome] += 1
                if result.outcome == "finished" and result.state:
                    report.states[result.state] += 1
                if result.outcome == "halted" and not report.stopped:
                    report.stopped = result.error or "halted"
                    self._stop.set()
            done = sum(1 for r in results if r.outcome != "halted")
            report.processed += done
            progress.update(done, report)

    # --- the API budget -------------------------------------------------------------------------
    def _within_api_budget(self, report: RunnerReport, reserved: int) -> bool:
        """Room for one more range's batched lookup, counting the ranges still in flight."""
        if self.config.max_api_calls is None:
            return True
        if report.lookups + reserved >= self.config.max_api_calls:
            report.stopped = (f"--max-api-calls {self.config.max_api_calls} reached "
                              f"({report.lookups} lookups done, {reserved} in flight)")
            return False
        return True
