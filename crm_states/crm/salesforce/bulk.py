"""Bulk API 2.0 query jobs, for a runner that reads every app user and holds one page at a time.

``start`` creates a job (``POST /jobs/query``, CSV, COMMA, LF); ``wait`` polls it with back-off until
``JobComplete`` (a ``Failed`` or ``Aborted`` job raises ``CrmJobFailed`` naming it and its message);
``pages`` reads its results (``GET .../results?maxRecords=N[&locator=L]``, gzip) one page per request,
each with the locator that fetched it and the one that fetches the next, so a killed run resumes from
the last locator it finished. Salesforce keeps a job's results 7 days: a finished job is reused by its
id, and an expired one is a ``CrmNotFound`` that says so. Every request (create, poll, page) is one
API request and counts in ``api_requests``. Each row's ``Id`` is checked as every id the client
returns is; a row with a bad id or an oversized value is refused (listed in ``rejected``), not passed on.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import attrs

from ..checks import MAX_VALUE_CHARS, record_id_problem, size_problem
from ..errors import CrmError, CrmJobFailed, CrmNotFound, CrmTransientError
from ..http import short
from .answers import json_object
from .schema import SalesforceSchema
from .transport import Transport

log = logging.getLogger("crm_states.crm")

#: Rows per results page unless told otherwise (simple-salesforce's default too).
DEFAULT_PAGE_RECORDS = 50_000
#: Polls wait this long first, then twice as long each time, up to the cap.
POLL_FIRST_WAIT = 0.5
POLL_MAX_WAIT = 5.0


@attrs.frozen
class BulkJob:
    """A query job as Salesforce last described it."""

    id: str
    state: str
    operation: str = "query"
    records_processed: int | None = None
    error_message: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("JobComplete", "Failed", "Aborted")


@attrs.frozen
class BulkPage:
    """One page of a job's results: its rows (CSV header -> text, ``""`` for null), the locator that
    fetched it (``None`` for the first) and the one for the next (``None`` after the last), and a
    ``(row number, detail)`` for each row refused. ``rejected_values`` holds, for each refused row in the
    same order, the values of its columns that pass the checks (its ``Id`` only when that is a valid id;
    nothing when the row has the wrong width), so a caller can file the refusal under the row's key, or see
    that it concerned a column it does not need."""

    job_id: str
    locator: str | None
    next_locator: str | None
    rows: list[dict[str, str]]
    rejected: tuple[tuple[int, str], ...] = ()
    rejected_values: tuple[dict[str, str], ...] = ()


def app_users_soql(schema: SalesforceSchema) -> str:
    """Every app user with a NationBuilder id: its id, the NationBuilder id (path) and the app email."""
    nb = schema.nationbuilder_id_field
    return f"SELECT Id, {nb}, {schema.email_field} FROM {schema.app_user_object} WHERE {nb} != null"


class BulkQueries:
    """The job requests, through the client's transport (token, retries, counting)."""

    def __init__(self, http: Transport) -> None:
        self.http = http

    def start(self, soql: str, *, all_rows: bool = False) -> BulkJob:
        body = {"operation": "queryAll" if all_rows else "query", "query": soql, "contentType": "CSV",
                "columnDelimiter": "COMMA", "lineEnding": "LF"}
        job = self._job(json_object(self.http.api("POST", "jobs/query", json=body)))
        log.info("salesforce bulk query job %s started (%s)", job.id, job.state)
        return job

    def status(self, job_id: str) -> BulkJob:
        """One poll; the job's ``errorMessage`` comes back redacted and shortened, fit for a detail."""
        job = self._job(json_object(self._call("GET", job_id, "")))
        if job.error_message:
            job = attrs.evolve(job, error_message=short(self.http.redact(job.error_message), 300))
        return job

    def wait(self, job_id: str, *, timeout: float = 3600.0) -> BulkJob:
        """Poll until the job completes. Time counts on the wall clock or as the waits asked of
        ``sleep``, whichever is more, so an injected no-op ``sleep`` still bounds the polls."""
        started, slept, wait = time.monotonic(), 0.0, POLL_FIRST_WAIT
        while True:
            job = self.status(job_id)
            if job.state == "JobComplete":
                return job
            if job.state in ("Failed", "Aborted"):
                raise CrmJobFailed(f"salesforce bulk query job {job_id} {job.state}: "
                                   f"{short(self.http.redact(job.error_message or 'no message'), 300)}",
                                   job_id=job_id, state=job.state)
            remaining = timeout - max(time.monotonic() - started, slept)
            if remaining <= 0:
                raise CrmTransientError(f"salesforce bulk query job {job_id} still {job.state} after {timeout:g}s; "
                                        "wait for it again by its id, or abort it")
            pause = min(wait, remaining)
            self.http.sleep(pause)
            slept += pause
            wait = min(wait * 2, POLL_MAX_WAIT)

    def pages(self, job_id: str, *, locator: str | None = None, max_records: int = DEFAULT_PAGE_RECORDS,
              key_prefix: str | None = None) -> Iterator[BulkPage]:
        """The job's result pages from ``locator`` on (the start when ``None``), fetched one at a time."""
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        while True:
            params = {"maxRecords": str(max_records), **({"locator": locator} if locator else {})}
            response = self._call("GET", job_id, "/results", params=params,
                                  headers={"Accept": "text/csv", "Accept-Encoding": "gzip"})
            nxt = response.headers.get("Sforce-Locator")
            if nxt is not None and size_problem(nxt, "Sforce-Locator"):
                raise CrmError(f"salesforce bulk job {job_id}: refused a locator over {MAX_VALUE_CHARS} characters")
            next_locator = None if nxt in (None, "", "null") else nxt
            rows, rejected, values = _parse(response.content, key_prefix)
            del response  # its body is parsed: not held while the caller works
            yield BulkPage(job_id, locator, next_locator, rows, rejected, values)
            del rows, rejected, values  # the page was given away: not held while the next one is fetched
            if next_locator is None:
                return
            locator = next_locator

    def abort(self, job_id: str) -> BulkJob:
        return self._job(json_object(self._call("PATCH", job_id, "", json={"state": "Aborted"})))

    def delete(self, job_id: str) -> None:
        self._call("DELETE", job_id, "")

    def _call(self, method: str, job_id: str, tail: str, **kwargs: Any) -> Any:
        if not isinstance(job_id, str) or record_id_problem(job_id):
            raise CrmError(f"not a bulk job id: {short(repr(job_id), 40)}")
        try:
            return self.http.api(method, f"jobs/query/{quote(job_id)}{tail}", **kwargs)
        except CrmNotFound as exc:
            raise CrmNotFound(f"salesforce bulk query job {job_id} not found: Salesforce keeps a job and its "
                              f"results 7 days, then deletes them; start a new job ({exc})",
                              status=exc.status, code=exc.code) from None

    @staticmethod
    def _job(body: dict[str, Any]) -> BulkJob:
        job_id, state = body.get("id"), body.get("state")
        if not isinstance(job_id, str) or record_id_problem(job_id) or not isinstance(state, str):
            raise CrmError("salesforce bulk: the job answer lacks a valid id or state")
        processed = body.get("numberRecordsProcessed")
        message = body.get("errorMessage")
        return BulkJob(job_id, state, str(body.get("operation", "query")),
                       processed if isinstance(processed, int) and not isinstance(processed, bool) else None,
                       message if isinstance(message, str) else None)


def _parse(content: bytes, key_prefix: str | None) -> tuple[list[dict[str, str]], tuple[tuple[int, str], ...],
                                                              tuple[dict[str, str], ...]]:
    """Rows of one CSV page; a row with a bad ``Id``, an oversized value or the wrong width is refused
    (with the values of its other columns that pass the size check)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise CrmError("salesforce bulk: a results page is not UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise CrmError("salesforce bulk: a results page has no header row")
    rows: list[dict[str, str]] = []
    rejected: list[tuple[int, str]] = []
    kept: list[dict[str, str]] = []
    id_column = header.index("Id") if "Id" in header else None
    try:
        width = len(header)
        for number, values in enumerate(reader, start=1):
            problem = None
            if len(values) != width:
                problem = f"{len(values)} values for {width} columns"
            elif max(map(len, values), default=0) > MAX_VALUE_CHARS:  # the detail only when needed
                problem = next(p for c, v in zip(header, values) if (p := size_problem(v, c)))
            elif id_column is not None:
                problem = record_id_problem(values[id_column], key_prefix)
            if problem:
                rejected.append((number, problem))
                kept.append({} if len(values) != width else
                            {c: v for i, (c, v) in enumerate(zip(header, values))
                             if not (size_problem(v, c) if i != id_column else record_id_problem(v, key_prefix))})
            else:
                rows.append(dict(zip(header, values)))
    except csv.Error as exc:  # a field past the csv module's limit, a stray quote: the page is unusable
        raise CrmError(f"salesforce bulk: a results page is not valid CSV after row {len(rows) + len(rejected)}: "
                       f"{short(str(exc), 80)}") from None
    return rows, tuple(rejected), tuple(kept)
