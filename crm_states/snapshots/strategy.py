"""The batch runner's snapshot strategy: load a snapshot of the CRM's App Users first, then answer every
range's lookup from it (one indexed query per range, no API request).

Loading is done by one run at a time (a lease on ``<machine>:snapshot``; another run waits for it and then
reuses what it loaded), page by page under the record's compare-and-set, so a run killed at any instant
resumes where the record says. A failed or aborted job is an answer too: every pending profile goes to
``UnexpectedResponse`` with the job's message (``FailedLookup``). Once no profile is pending, the snapshot
collections are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from machines import nb_profile_validation as nb

from ..crm.errors import CrmBadAnswer, CrmJobFailed, CrmLimitExceeded, CrmNotFound
from ..crm.results import Matches, MatchesBuilder
from ..leases import LEASES, RangeLeases
from ..lookups import LookupStrategy, RecordedLookup
from ..spec import Halt
from ..store.snapshots import SnapshotRecord, Snapshots
from .export import lines_detail
from .source import BudgetSpent, Source

if TYPE_CHECKING:
    from ..api import CrmStates
    from ..progress import RunnerReport
    from ..runner import ValidationRunner

log = logging.getLogger("crm_states.snapshots")

#: How often a run waiting for another run's load looks again.
WAIT_FOR_LOADER = 1.0
#: ``CrmBadAnswer`` codes that make a snapshot unusable (its results cannot be read whole): like a failed job.
UNUSABLE = ("INCOMPLETE", "BAD_RESULTS")


class TableLookup(RecordedLookup):
    """Answers from a loaded snapshot's collection. After each query the record is read again: a snapshot
    dropped meanwhile halts the batch (``Halt``), so "no rows" never passes for "not in Salesforce"."""

    def __init__(self, snapshots: Snapshots, record: SnapshotRecord, source: Mapping[str, Any]) -> None:
        self.snapshots = snapshots
        self.record = record
        self.source = dict(source)

    def recorded_app_users(self, ids: Sequence[int]) -> tuple[dict[int, Matches], dict[int, Mapping[str, Any]]]:
        rows = self.snapshots.rows_for(self.record, ids)
        if self.snapshots.state(self.record.key) != "loaded":
            raise Halt(f"snapshot {self.record.key} was dropped while this run read it; run again")
        found: MatchesBuilder[int] = MatchesBuilder()
        lines: dict[int, list[int]] = {}
        for row in rows:
            if row.get("id"):
                found.add(row["nb"], row["id"])
            elif row.get("problem"):
                found.reject(row["nb"], row["problem"])
            if "line" in row:
                lines.setdefault(row["nb"], []).append(row["line"])
        return found.build(), {key: lines_detail(at) for key, at in lines.items()}


class FailedLookup(RecordedLookup):
    """The answer of a job that failed or was aborted, for every id: ``CrmJobFailed``."""

    def __init__(self, record: SnapshotRecord, source: Mapping[str, Any]) -> None:
        self.record = record
        self.source = dict(source)

    def recorded_app_users(self, ids: Sequence[int]) -> tuple[dict[int, Matches], dict[int, Mapping[str, Any]]]:
        raise CrmJobFailed(self.record.error or f"snapshot {self.record.key} failed", job_id=self.record.job_id or "",
                           state="Failed")


class SnapshotLookups(LookupStrategy):
    """``validate-nb --snapshot`` (``BulkSource``) and ``--from-export`` (``ExportSource``)."""

    range_requests = 0  # ranges are answered from our database

    def __init__(self, app: CrmStates, source: Source, *, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(app)
        self.name = source.kind
        self.source = source
        self.snapshots = Snapshots(app.store.db)
        self.sleep = sleep
        self.lookup: RecordedLookup | None = None
        #: The snapshot this run started or reused (for the report, also when the run stopped).
        self.current: SnapshotRecord | None = None
        self.summary: dict[str, Any] = {"source": source.kind}

    def context(self) -> Any:
        return self.lookup

    def api_requests(self) -> int:
        return self.source.api_requests()

    # --- before the ranges ------------------------------------------------------------------------------
    def prepare(self, runner: ValidationRunner, report: RunnerReport) -> bool:
        report.snapshot = self.summary
        lease = RangeLeases(self.app.store.db[LEASES], f"{nb.NAME}:snapshot", seconds=runner.config.lease_seconds)
        waited = False
        while not lease.claim(0):
            if not waited:
                log.info("another run is loading the snapshot; waiting for it to finish")
                waited = True
            self.sleep(WAIT_FOR_LOADER)
        try:
            record = self._ready(runner, report, lambda: lease.renew(0))
        finally:
            lease.release(0)
        if self.current is not None:
            self.summary.update(self._describe(self.snapshots.get(self.current.key) or self.current))
        if record is None:
            return False
        source = self.source.detail(record)
        self.lookup = (FailedLookup(record, source) if record.state == "failed"
                       else TableLookup(self.snapshots, record, source))
        return True

    def _ready(self, runner: ValidationRunner, report: RunnerReport, renew: Callable[[], bool]) -> SnapshotRecord | None:
        """The snapshot loaded (reused or new), or a failed one; None when the run must stop."""
        def spend() -> None:
            limit = runner.config.max_api_calls
            if limit is not None and runner.spent() + 1 > limit:
                raise BudgetSpent(limit)

        record = self.current = self.source.reusable(self.snapshots, nb.NAME)
        self.summary["reused"] = record is not None
        if record is None and not _any_pending(runner):
            # another run loaded a snapshot, validated every profile and dropped it while this one waited
            # for the lease: a new job would export the whole CRM for nobody
            self.summary["nothing_pending"] = True
            return None
        try:
            for attempt in (1, 2):
                if record is None:
                    record = self.source.begin(self.snapshots, nb.NAME, spend)
                self.current = record
                try:
                    return self._load(record, spend, renew)
                except CrmNotFound as exc:  # a recorded job Salesforce no longer has: start a new one, once
                    if attempt == 2 or not self.summary["reused"]:
                        raise
                    log.warning("snapshot %s is gone from the CRM (%s); starting a new one", record.key, exc)
                    self.snapshots.move(record, "expired", error=str(exc)[:300])
                    record, self.summary["reused"] = None, False
        except (CrmJobFailed, CrmBadAnswer) as exc:  # failed, aborted, or results that are not whole
            if isinstance(exc, CrmBadAnswer) and exc.code not in UNUSABLE:
                raise
            assert record is not None
            log.warning("snapshot %s failed: %s", record.key, exc)
            current = self.snapshots.get(record.key) or record
            failed = self.snapshots.move(current, "failed", error=str(exc)[:300])
            return failed or self.snapshots.get(record.key)
        except (BudgetSpent, Halt) as exc:
            report.stopped = str(exc)
        except CrmLimitExceeded as exc:
            report.stopped = f"CRM API limit reached: {exc}"
        return None

    def _load(self, record: SnapshotRecord, spend: Callable[[], None], renew: Callable[[], bool]) -> SnapshotRecord:
        if record.state == "loaded":
            return record
        processed = self.source.wait(record, spend, renew)
        ready = self.snapshots.begin_loading(record)
        if ready is None:
            raise Halt(f"snapshot {record.key} moved while it was being loaded")
        if processed is not None and ready.records_processed != processed:
            ready = self.snapshots.move(ready, "loading", records_processed=processed) or ready
        current: SnapshotRecord | None = ready
        for page in self.source.pages(ready, spend):
            current = self.snapshots.write_page(current, page.rows, seen=page.seen, **page.progress)
            del page  # written: not held while the next page is fetched and parsed
            if current is None or not renew():
                raise Halt(f"snapshot {record.key} was taken over or dropped while this run loaded it; run again")
        self.source.check_complete(current)
        loaded = self.snapshots.move(current, "loaded")
        if loaded is None:
            raise Halt(f"snapshot {record.key} moved while it was being loaded")
        return loaded

    def _describe(self, record: SnapshotRecord) -> dict[str, Any]:
        return {"key": record.key, "state": record.state, "job_id": record.job_id, "file": record.file,
                "rows": record.rows, "keyed": record.keyed, "refused": record.refused, "pages": record.pages,
                "error": record.error}

    # --- after the ranges ---------------------------------------------------------------------------------
    def finish(self, runner: ValidationRunner, report: RunnerReport) -> None:
        """Drop the snapshots once no profile is pending (this run's, and any a killed run left)."""
        if report.stopped or _any_pending(runner):
            return
        dropped = sum(self.snapshots.drop(record) for record in self.snapshots.leftovers(nb.NAME))
        self.summary["dropped"] = dropped


def _any_pending(runner: ValidationRunner) -> bool:
    """Whether a profile is still pending (reads the first one only)."""
    pending = runner.pending_ids()
    try:
        return next(pending, None) is not None
    finally:
        pending.close()
