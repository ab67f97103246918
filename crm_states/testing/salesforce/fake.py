"""``FakeSalesforce``: a loopback server speaking the Salesforce REST shapes our client relies on.

Real HTTP, real status codes and bodies (see /work/shared/reference/crm-apis.md), so the client and an
independent client (simple-salesforce) can both be checked against it. Served:

- ``POST /services/oauth2/token`` (client credentials, HTTP Basic or body ``client_id``/``client_secret``);
- under ``/services/data/vNN.N`` (bearer token required, versions 20.0 up to ``api_version``):
  sObject create / retrieve (by id or external id) / update / delete / upsert by external id,
  ``query`` and ``queryAll`` with ``nextRecordsUrl`` paging, ``composite`` (≤ 25 sub-requests, ≤ 5 of
  them queries, query-more calls or collections: composite.py), sObject Collections create and upsert
  (sobjects.py), Bulk API 2.0 query jobs (bulk.py), ``limits``. Every request under
  ``/services/data`` is one API call.

Contacts and app users are linked by the app user's ``Contact__c`` (``relationships``), and queries
follow one level of parent relationship (``Contact__r.NationBuilder_Id__c``: select.py).

Choices where Salesforce leaves room: an upsert that updates answers ``upsert_update_status`` (204 by
default, 200 with ``created: false`` when set to 200); ``queryAll`` answers like ``query`` (deletes are
hard, there is no recycle bin); comparisons are Salesforce-like lenient: strings compare
case-insensitively and a number equals its decimal text (so ``NationBuilder_Id__c`` may be seeded as
``123``, ``123.0`` or ``"123"``); composite ``allOrNone`` halts the sub-requests after a failure but
does not roll back earlier writes. The SOQL understood is
``SELECT f1, f2 FROM Obj [WHERE F = lit | F != lit | F IN (lit, ...)] [LIMIT n]`` where a field may be a
relationship path and a literal is a quoted string (with Salesforce's backslash escapes), a number,
``true``, ``false`` or ``null``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import itertools
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..server import Faults, LoopbackServer, Reply, Request, json_reply
from .bulk import BulkRoutes
from .common import (
    API,
    BASE62,
    DEFAULT_EXTERNAL_IDS,
    DEFAULT_RELATIONSHIPS,
    DEFAULT_REQUIRED,
    FAULT_CODES,
    KEY_PREFIXES,
    MAX_REQUEST_BYTES,
    NOT_FOUND,
    sf_errors,
)
from .composite import CompositeRoutes
from .rest import RestRoutes
from .sobjects import CollectionRoutes
from .storage import Cursor, Table


class FakeSalesforce(RestRoutes, CompositeRoutes, CollectionRoutes, BulkRoutes, LoopbackServer):
    """A Salesforce org on 127.0.0.1. See the module docstring for what it serves and how it chooses.

    Runtime knobs (plain attributes): ``client_secret`` (rotate it to refuse the next token request),
    ``token_call_limit`` (each token then serves that many API calls and answers 401
    INVALID_SESSION_ID after), ``daily_limit``/``api_usage`` (403 REQUEST_LIMIT_EXCEEDED once usage
    reaches the limit), ``page_size``, ``upsert_update_status``, ``required_fields``, ``unique_fields``
    (DUPLICATE_VALUE in collections), ``bulk_polls`` / ``bulk_fail_at`` / ``bulk_fail_message`` /
    ``bulk_page_size`` (bulk.py). Recorded: ``soql_log`` (every SOQL text received, composite
    sub-requests included), ``issued_tokens``, ``bulk_jobs``, ``bulk_gzipped``, ``counts`` (requests by
    kind: token, create, get, get_by_external_id, update, upsert, delete, query, query_all, query_more,
    composite, collection_create, collection_upsert, bulk_create, bulk_poll, bulk_results, bulk_abort,
    bulk_delete, limits, unmatched). ``insert(..., record_id=)`` seeds records under hostile ids.
    """

    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",
        api_version: str = "60.0",
        tls: bool = False,
        faults: Faults | None = None,
        latency: float = 0.0,
        page_size: int = 2000,
        daily_limit: int = 100_000,
        token_call_limit: int | None = None,
        upsert_update_status: int = 204,
        external_ids: Mapping[str, Sequence[str]] = DEFAULT_EXTERNAL_IDS,
        required_fields: Mapping[str, Sequence[str]] = DEFAULT_REQUIRED,
        objects: Iterable[str] = ("Account", "Contact", "Sefaria_App_User__c", "Sefaria_App_Data__c"),
        relationships: Mapping[str, Mapping[str, tuple[str, str]]] = DEFAULT_RELATIONSHIPS,
        unique_fields: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        faults = faults or Faults()
        super().__init__(tls=tls, faults=attrs.evolve(faults, latency=latency) if latency else faults)
        self.client_id = client_id
        self.client_secret = client_secret
        self.api_version = api_version
        self.page_size = page_size
        self.daily_limit = daily_limit
        self.api_usage = 0
        self.token_call_limit = token_call_limit
        self.upsert_update_status = upsert_update_status
        self.required_fields = {k: tuple(v) for k, v in required_fields.items()}
        self.unique_fields = {k: tuple(v) for k, v in (unique_fields or {}).items()}
        self.soql_log: list[str] = []
        self.issued_tokens: list[str] = []
        self._external_ids = {k: tuple(v) for k, v in external_ids.items()}
        self.relationships = {k: dict(v) for k, v in relationships.items()}
        self._data = threading.RLock()
        self._tables: dict[str, Table] = {}
        self._tokens: dict[str, int | None] = {}
        self._cursors: collections.OrderedDict[str, Cursor] = collections.OrderedDict()
        self._cursor_serial = itertools.count(1)
        self._custom_prefixes = (f"a0{c}" for c in BASE62[12:])
        for name in objects:
            self._table(name, create=True)
        self._bulk_init()
        self._add_routes()

    # -- Python API for tests and benchmarks ---------------------------------------------------------

    def insert(self, sobject: str, fields: Mapping[str, Any], *, record_id: str | None = None) -> str:
        """Seed one record (no validation, no API usage); returns its 18-character id. ``record_id``
        stores it under an id of the test's choosing, hostile ones included (malformed, oversized)."""
        with self._data:
            return self._table(sobject, create=True).insert(fields, record_id)

    def insert_many(self, sobject: str, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """Seed many records at once (benchmarks seed 100k–1M ``Sefaria_App_User__c``)."""
        with self._data:
            table = self._table(sobject, create=True)
            return [table.insert(row) for row in rows]

    def records(self, sobject: str) -> list[dict[str, Any]]:
        """Copies of every record of ``sobject``, each with its ``Id``."""
        with self._data:
            table = self._table(sobject)
            return [] if table is None else [{"Id": rid, **row} for rid, row in table.rows.items()]

    def record(self, sobject: str, record_id: str) -> dict[str, Any] | None:
        with self._data:
            table = self._table(sobject)
            row = None if table is None else table.rows.get(record_id)
            return None if row is None else {"Id": record_id, **row}

    def expire_tokens(self) -> None:
        """Revoke every issued token: the next API call answers 401 INVALID_SESSION_ID."""
        with self._data:
            self._tokens.clear()

    def issue_token(self) -> str:
        """A valid access token without the OAuth round trip (for clients given a session id)."""
        token = f"00D000000000001!{secrets.token_urlsafe(48)}"
        with self._data:
            self._tokens[token] = self.token_call_limit
            self.issued_tokens.append(token)
        return token

    # -- LoopbackServer hooks ------------------------------------------------------------------------

    def admit(self, request: Request, kind: str) -> Reply | None:
        """Size limit, then the bearer token, then the daily quota; counts one API call."""
        size = len(request.method) + len(request.target) + 11 + sum(
            len(k) + len(v) + 4 for k, v in request.headers.items())
        if size > MAX_REQUEST_BYTES:
            status = 414 if len(request.target) > MAX_REQUEST_BYTES else 431
            return Reply(status, {"Content-Type": "text/html"}, b"<html><body>Request too large</body></html>")
        if not request.path.startswith("/services/data/"):
            return None
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        with self._data:
            if token not in self._tokens or self._tokens[token] == 0:
                self._tokens.pop(token, None)
                return json_reply(401, sf_errors("INVALID_SESSION_ID", "Session expired or invalid"))
            if self.api_usage >= self.daily_limit:
                return json_reply(403, sf_errors("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."))
            self.api_usage += 1
            left = self._tokens[token]
            if left is not None:
                self._tokens[token] = left - 1
        return None

    def fault_reply(self, request: Request, status: int) -> Reply:
        code, message = FAULT_CODES.get(status, (f"HTTP_{status}", f"Injected status {status}"))
        return json_reply(status, sf_errors(code, message))

    def finish_reply(self, request: Request, reply: Reply) -> Reply:
        usage = f"api-usage={self.api_usage}/{self.daily_limit}"
        return attrs.evolve(reply, headers={**reply.headers, "Sforce-Limit-Info": usage})

    # -- routes --------------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        obj, one = r"/sobjects/(?P<sobject>\w+)", r"/(?P<id>[^/]+)"
        ext = r"/(?P<field>\w+)/(?P<value>[^/]+)"
        routes = [
            ("POST", r"/services/oauth2/token", self._token, "token"),
            ("GET", API + r"/limits/?", self._limits, "limits"),
            ("GET", API + r"/query/?", self._query, "query"),
            ("GET", API + r"/queryAll/?", self._query, "query_all"),
            ("GET", API + r"/(?:query|queryAll)/(?P<locator>01g\w+)-(?P<offset>\d+)", self._query_more, "query_more"),
            ("POST", API + r"/composite/?", self._composite, "composite"),
            ("POST", API + obj + "/?", self._create, "create"),
            ("GET", API + obj + one, self._get, "get"),
            ("GET", API + obj + ext, self._get_by_external_id, "get_by_external_id"),
            ("PATCH", API + obj + one, self._update, "update"),
            ("PATCH", API + obj + ext, self._upsert, "upsert"),
            ("DELETE", API + obj + one, self._delete, "delete"),
            *self._collection_routes(API),
            *self._bulk_routes(API),
        ]
        for method, pattern, handler, kind in routes:
            self.route(method, pattern, self._versioned(handler), kind=kind)
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE", "HEAD"):
            self.route(method, r".*", lambda request, m: json_reply(404, NOT_FOUND), kind="unmatched")

    def _versioned(self, handler: Any) -> Any:
        """Answer 404 for API versions this org does not have (20.0 up to ``api_version``)."""
        def wrapped(request: Request, m: re.Match[str]) -> Reply:
            version = m.groupdict().get("version")
            if version is not None and not 20.0 <= float(version) <= float(self.api_version):
                return json_reply(404, NOT_FOUND)
            return handler(request, m)
        return wrapped

    def _table(self, name: str, *, create: bool = False) -> Table | None:
        table = self._tables.get(name.lower())
        if table is None and create:
            prefix = KEY_PREFIXES.get(name) or next(self._custom_prefixes)
            lookups = [lookup for lookup, _ in self.relationships.get(name, {}).values()]
            table = self._tables[name.lower()] = Table(name, prefix, self._external_ids.get(name, ()), lookups)
        return table

    def _token(self, request: Request, m: re.Match[str]) -> Reply:
        form = request.form()
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                client_id = client_secret = None
        if form.get("grant_type") != "client_credentials":
            return json_reply(400, {"error": "unsupported_grant_type", "error_description": "grant type not supported"})
        if not (hmac.compare_digest(str(client_id).encode(), self.client_id.encode())
                and hmac.compare_digest(str(client_secret).encode(), self.client_secret.encode())):
            return json_reply(400, {"error": "invalid_grant", "error_description": "authentication failure"})
        issued_at = str(int(time.time() * 1000))
        identity = f"{self.url}/id/00D000000000001AAA/005000000000001AAA"
        signature = base64.b64encode(hmac.new(self.client_secret.encode(), (identity + issued_at).encode(),
                                              hashlib.sha256).digest()).decode()
        return json_reply(200, {"access_token": self.issue_token(), "instance_url": self.url, "id": identity,
                                "token_type": "Bearer", "issued_at": issued_at, "signature": signature})

    def _limits(self, request: Request, m: re.Match[str]) -> Reply:
        return json_reply(200, {"DailyApiRequests": {"Max": self.daily_limit,
                                                     "Remaining": max(0, self.daily_limit - self.api_usage)}})

