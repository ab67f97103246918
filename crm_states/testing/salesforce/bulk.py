"""The fake's Bulk API 2.0 query jobs: create, poll, results in CSV pages with locators, abort, delete.

A job moves ``UploadComplete`` -> ``InProgress`` -> ``JobComplete`` over ``bulk_polls`` polls (its
records are selected when it completes), or turns ``Failed`` on poll ``bulk_fail_at`` with
``bulk_fail_message``; both knobs are read when a job is created. Results are CSV (every value
quoted, nulls empty, header row of the org's field spellings such as ``Contact__r.NationBuilder_Id__c``)
in pages of ``maxRecords`` (default ``bulk_page_size``); ``Sforce-Locator`` names the next page (the
string ``null`` after the last) and ``Sforce-NumberOfRecords`` counts the page's rows; gzip when the
client accepts it. Jobs are kept ``BULK_RESULT_DAYS`` days (``age_bulk_jobs`` moves them back in time),
after which every request for them answers 404. Each request counts as one API call, as a REST call does.
"""

from __future__ import annotations

import base64
import binascii
import csv
import gzip
import io
import itertools
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from ..server import Reply, Request, json_reply
from .common import NOT_FOUND, json_body, salesforce_id, sf_errors
from .soql import Soql, SoqlError, parse_soql
from .storage import Table

BULK_RESULT_DAYS = 7
_TERMINAL = ("JobComplete", "Failed", "Aborted")


@attrs.define
class BulkJob:
    """One query job as the fake holds it."""

    id: str
    operation: str
    query: str
    soql: Soql
    table: Table
    fields: tuple[str, ...]
    line_ending: str
    polls_to_complete: int
    fail_at: int | None
    fail_message: str
    created: float
    api_version: str
    state: str = "UploadComplete"
    polls: int = 0
    ids: list[str] | None = None
    error_message: str | None = None

    def info(self) -> dict[str, Any]:
        """The job's JSON, as ``POST /jobs/query`` and ``GET /jobs/query/{id}`` answer it."""
        out: dict[str, Any] = {
            "id": self.id, "operation": self.operation, "object": self.table.name,
            "createdById": "005000000000001AAA", "state": self.state, "concurrencyMode": "Parallel",
            "contentType": "CSV", "apiVersion": float(self.api_version), "lineEnding": self.line_ending,
            "columnDelimiter": "COMMA",
            "createdDate": time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(self.created)),
        }
        if self.ids is not None:
            out["numberRecordsProcessed"] = len(self.ids)
        if self.error_message is not None:
            out["errorMessage"] = self.error_message
        return out


class BulkRoutes:
    """Mixed into ``FakeSalesforce``."""

    _data: threading.RLock
    bulk_polls: int
    bulk_fail_at: int | None
    bulk_fail_message: str
    bulk_page_size: int
    bulk_jobs: dict[str, BulkJob]
    bulk_gzipped: int
    _bulk_serial: Iterator[int]

    if TYPE_CHECKING:
        def _table(self, name: str, *, create: bool = False) -> Table | None: ...
        def _select(self, table: Table, soql: Soql) -> list[str]: ...
        def _column(self, table: Table, path: str) -> str: ...
        def _getter(self, table: Table, path: str) -> Any: ...

    def _bulk_init(self) -> None:
        self.bulk_polls = 2
        self.bulk_fail_at = None
        self.bulk_fail_message = "QUERY_TIMEOUT: Your query request was running for too long."
        self.bulk_page_size = 50_000
        self.bulk_jobs = {}
        self.bulk_gzipped = 0  # result pages sent gzip-compressed
        self._bulk_serial = itertools.count(1)

    def age_bulk_jobs(self, seconds: float) -> None:
        """Move every job's creation back by ``seconds`` (past 7 days a job is gone)."""
        with self._data:
            for job in self.bulk_jobs.values():
                job.created -= seconds

    def _bulk_routes(self, api: str) -> list[tuple[str, str, Any, str]]:
        job = api + r"/jobs/query/(?P<job>[A-Za-z0-9]+)"
        return [
            ("POST", api + r"/jobs/query/?", self._bulk_create, "bulk_create"),
            ("GET", job + "/?", self._bulk_poll, "bulk_poll"),
            ("GET", job + r"/results/?", self._bulk_results, "bulk_results"),
            ("PATCH", job + "/?", self._bulk_abort, "bulk_abort"),
            ("DELETE", job + "/?", self._bulk_delete, "bulk_delete"),
        ]

    # -- handlers --------------------------------------------------------------------------------------

    def _bulk_create(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        operation, text = body.get("operation"), body.get("query")
        line_ending = body.get("lineEnding", "LF")
        problem = (f"unknown operation {operation!r}: query or queryAll" if operation not in ("query", "queryAll")
                   else "a query (SOQL text) is required" if not isinstance(text, str) or not text.strip()
                   else "contentType must be CSV" if body.get("contentType", "CSV") != "CSV"
                   else "this org serves columnDelimiter COMMA" if body.get("columnDelimiter", "COMMA") != "COMMA"
                   else "lineEnding must be LF or CRLF" if line_ending not in ("LF", "CRLF") else None)
        if problem:
            return json_reply(400, sf_errors("INVALIDJOB", problem))
        assert isinstance(text, str)
        try:
            soql = parse_soql(text)
        except SoqlError as exc:
            return json_reply(400, sf_errors("INVALIDJOB", f"MALFORMED_QUERY: {exc}"))
        with self._data:
            table = self._table(soql.sobject)
            if table is None:
                return json_reply(400, sf_errors("INVALIDJOB", f"INVALID_TYPE: sObject type '{soql.sobject}' "
                                                 "is not supported."))
            try:
                fields = tuple(self._column(table, f) for f in soql.fields)
            except SoqlError as exc:
                return json_reply(400, sf_errors("INVALIDJOB", f"INVALID_FIELD: {exc}"))
            job = BulkJob(salesforce_id("750", next(self._bulk_serial)), str(operation), text, soql, table, fields,
                          str(line_ending), max(1, self.bulk_polls), self.bulk_fail_at, self.bulk_fail_message,
                          time.time(), m["version"])
            self.bulk_jobs[job.id] = job
            return json_reply(200, job.info())

    def _job(self, m: re.Match[str]) -> BulkJob | Reply:
        job = self.bulk_jobs.get(m["job"])
        if job is None or time.time() - job.created > BULK_RESULT_DAYS * 86_400:
            return json_reply(404, NOT_FOUND)
        return job

    def _bulk_poll(self, request: Request, m: re.Match[str]) -> Reply:
        with self._data:
            job = self._job(m)
            if isinstance(job, Reply):
                return job
            if job.state not in _TERMINAL:
                job.polls += 1
                if job.fail_at is not None and job.polls >= job.fail_at:
                    job.state, job.error_message = "Failed", job.fail_message
                elif job.polls >= job.polls_to_complete:
                    job.ids = self._select(job.table, job.soql)
                    job.state = "JobComplete"
                else:
                    job.state = "InProgress"
            return json_reply(200, job.info())

    def _bulk_abort(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            job = self._job(m)
            if isinstance(job, Reply):
                return job
            if body.get("state") != "Aborted":
                return json_reply(400, sf_errors("INVALIDJOB", "a query job can only be set to Aborted"))
            if job.state in _TERMINAL:
                return json_reply(400, sf_errors("INVALIDJOBSTATE", f"the job is already {job.state}"))
            job.state = "Aborted"
            return json_reply(200, job.info())

    def _bulk_delete(self, request: Request, m: re.Match[str]) -> Reply:
        with self._data:
            job = self._job(m)
            if isinstance(job, Reply):
                return job
            if job.state == "InProgress":
                return json_reply(400, sf_errors("INVALIDJOBSTATE", "a job in progress cannot be deleted"))
            del self.bulk_jobs[job.id]
        return Reply(204)

    def _bulk_results(self, request: Request, m: re.Match[str]) -> Reply:
        max_records, locator = request.param("maxRecords"), request.param("locator")
        size = int(max_records) if max_records and max_records.isdigit() and int(max_records) > 0 else None
        if max_records is not None and size is None:
            return json_reply(400, sf_errors("INVALIDURL", "maxRecords must be a positive integer"))
        offset = 0 if locator is None else _offset(locator)
        if offset is None:
            return json_reply(400, sf_errors("INVALIDLOCATOR", "the locator is not one this job issued"))
        with self._data:
            job = self._job(m)
            if isinstance(job, Reply):
                return job
            if job.state != "JobComplete" or job.ids is None:
                return json_reply(400, sf_errors("INVALIDJOBSTATE", f"the job is {job.state}, not JobComplete"))
            if offset > len(job.ids):
                return json_reply(400, sf_errors("INVALIDLOCATOR", "the locator is past the job's results"))
            end = min(len(job.ids), offset + (size or self.bulk_page_size))
            rows = self._csv_rows(job, job.ids[offset:end])
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\r\n" if job.line_ending == "CRLF" else "\n")
        writer.writerow(job.fields)
        writer.writerows(rows)
        data = text.getvalue().encode("utf-8")
        headers = {"Content-Type": "text/csv", "Sforce-NumberOfRecords": str(len(rows)),
                   "Sforce-Locator": _locator(end) if end < len(job.ids) else "null"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            data, headers["Content-Encoding"] = gzip.compress(data, compresslevel=1), "gzip"
            with self._data:
                self.bulk_gzipped += 1
        return Reply(200, headers, data)

    def _csv_rows(self, job: BulkJob, ids: list[str]) -> list[list[str]]:
        table = job.table
        getters = [self._getter(table, f) for f in job.soql.fields]
        rows = table.rows
        return [[_csv_value(get(rid, rows[rid])) for get in getters] for rid in ids if rid in rows]


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _locator(offset: int) -> str:
    """Opaque to clients; like Salesforce's, the base64 of the next offset."""
    return base64.b64encode(str(offset).encode()).decode().rstrip("=")


def _offset(locator: str) -> int | None:
    try:
        text = base64.b64decode(locator + "=" * (-len(locator) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
