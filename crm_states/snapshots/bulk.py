"""A snapshot from one Bulk API 2.0 query job: every App User that has a NationBuilder id (its ``Id``, the
NationBuilder id at the schema's field path, the app email), read page by page (``maxRecords``, the
``Sforce-Locator`` of each page recorded with it).

A job's results are kept by Salesforce for 7 days: a run killed at any point reuses the job it recorded
(polling it again, or reading on from the last locator it recorded) while the job is younger than
``REUSE_SECONDS``; a job Salesforce no longer has is marked expired and a new one started. Every request
(the create, each poll, each page) is one API request and passes ``spend`` first, so ``--max-api-calls``
holds."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..crm.base import requests_sent
from ..crm.errors import CrmBadAnswer, CrmJobFailed, CrmTransientError
from ..spec import Halt
from ..store.snapshots import TABLE_PREFIX, SnapshotRecord, Snapshots
from .source import Page, Renew, Source, Spend, nationbuilder_key

#: Reuse a recorded job while it is younger than this: Salesforce keeps results 7 days; an hour's margin.
REUSE_SECONDS = 7 * 86_400 - 3_600
#: Rows per results page: one request each, and one page in memory at a time (about 20 MB at 50,000).
DEFAULT_PAGE_RECORDS = 50_000
POLL_FIRST_WAIT, POLL_MAX_WAIT = 0.5, 5.0


class BulkSource(Source):
    """Snapshots of the CRM's App Users by Bulk API 2.0 query jobs, through the Salesforce client."""

    kind = "bulk"

    def __init__(self, crm: Any, *, page_records: int = DEFAULT_PAGE_RECORDS, wait_seconds: float = 3600.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if page_records < 1:
            raise ValueError("page_records must be at least 1")
        self.crm = crm
        self.page_records = page_records
        self.wait_seconds = wait_seconds
        self.sleep = sleep

    @property
    def field(self) -> str:
        """The NationBuilder id's field path on the App User (``Contact__r.NationBuilder_Id__c``, say)."""
        return str(self.crm.schema.nationbuilder_id_field)

    def reusable(self, snapshots: Snapshots, machine: str) -> SnapshotRecord | None:
        fresh = snapshots.server_now() - dt.timedelta(seconds=REUSE_SECONDS)
        return snapshots.usable(machine, self.kind, newer_than=fresh, field=self.field)

    def begin(self, snapshots: Snapshots, machine: str, spend: Spend) -> SnapshotRecord:
        spend()
        job = self.crm.start_bulk_query()
        return snapshots.create(f"{machine}:{self.kind}:{job.id}", machine, self.kind, f"{TABLE_PREFIX}{job.id}",
                                job_id=job.id, field=self.field)

    def wait(self, record: SnapshotRecord, spend: Spend, renew: Renew) -> int | None:
        """Poll (with back-off) until ``JobComplete``; ``CrmJobFailed`` for a failed or aborted job."""
        started, pause = time.monotonic(), POLL_FIRST_WAIT
        while True:
            spend()
            job = self.crm.bulk_query_job(record.job_id)
            if job.state == "JobComplete":
                return job.records_processed
            if job.state in ("Failed", "Aborted"):
                raise CrmJobFailed(f"salesforce bulk query job {job.id} {job.state}: "
                                   f"{job.error_message or 'no message'}", job_id=job.id, state=job.state)
            if time.monotonic() - started > self.wait_seconds:
                raise CrmTransientError(f"salesforce bulk query job {job.id} still {job.state} after "
                                        f"{self.wait_seconds:g}s; run again to wait for it")
            if not renew():
                raise Halt(f"another run took over loading snapshot {record.key}; this run stopped loading it")
            self.sleep(pause)
            pause = min(pause * 2, POLL_MAX_WAIT)

    def pages(self, record: SnapshotRecord, spend: Spend) -> Iterator[Page]:
        if record.pages and record.locator is None:  # the last page was read and recorded
            return
        results = self.crm.bulk_query_pages(record.job_id, locator=record.locator, max_records=self.page_records)
        while True:
            spend()
            page = next(results, None)
            if page is None:
                return
            column = _column(page.rows[0], self.field) if page.rows else self.field
            rows = [{"nb": nb, "id": row["Id"]} for row in page.rows if (nb := nationbuilder_key(row.get(column)))]
            rows += [_refused(nb, detail, values) for (_, detail), values in zip(page.rejected, page.rejected_values)
                     if (nb := nationbuilder_key(_value(values, self.field)))]
            yield Page(rows, len(page.rows) + len(page.rejected), {"locator": page.next_locator})
            if page.next_locator is None:
                return
            del page, rows  # one page in memory at a time: not this one while the next is fetched

    def check_complete(self, record: SnapshotRecord) -> None:
        if record.records_processed is not None and record.rows != record.records_processed:
            raise CrmBadAnswer(f"salesforce bulk query job {record.job_id}: {record.rows} rows read, the job counted "
                               f"{record.records_processed}; its results are not whole", code="INCOMPLETE")

    def detail(self, record: SnapshotRecord) -> Mapping[str, Any]:
        return {"bulk_job": record.job_id}

    def api_requests(self) -> int:
        return requests_sent(self.crm)


def _column(row: Mapping[str, str], field: str) -> str:
    """The results' header for ``field`` (Salesforce spells it as the org does: case is ignored)."""
    if "Id" not in row:
        raise CrmBadAnswer("salesforce bulk: the results have no Id column", code="BAD_RESULTS")
    found = next((name for name in row if name.lower() == field.lower()), None)
    if found is None:
        raise CrmBadAnswer(f"salesforce bulk: the results have no column {field}", code="BAD_RESULTS")
    return found


def _refused(nb: int, detail: str, values: Mapping[str, str]) -> dict[str, Any]:
    """A refused row under its NationBuilder id: a refused record when its ``Id`` was the problem; when
    the Id is valid the refusal concerned a column the lookup does not use (the email), so it is that App
    User, as the REST lookup (which selects only the Id and the NationBuilder id) sees it."""
    return {"nb": nb, "id": values["Id"]} if values.get("Id") else {"nb": nb, "problem": detail[:300]}


def _value(values: Mapping[str, str], field: str) -> str | None:
    return next((v for name, v in values.items() if name.lower() == field.lower()), None)
