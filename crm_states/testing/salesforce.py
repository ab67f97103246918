"""``FakeSalesforce``: a loopback server speaking the Salesforce REST shapes our client relies on.

Real HTTP, real status codes and bodies (see /work/shared/reference/crm-apis.md), so the client and an
independent client (simple-salesforce) can both be checked against it. Served:

- ``POST /services/oauth2/token`` (client credentials, HTTP Basic or body ``client_id``/``client_secret``);
- under ``/services/data/vNN.N`` (bearer token required, versions 20.0 up to ``api_version``):
  sObject create / retrieve (by id or external id) / update / delete / upsert by external id,
  ``query`` and ``queryAll`` with ``nextRecordsUrl`` paging, ``composite`` (≤ 25 sub-requests),
  ``limits``.

Choices where Salesforce leaves room: an upsert that updates answers ``upsert_update_status`` (204 by
default, 200 with ``created: false`` when set to 200); ``queryAll`` answers like ``query`` (deletes are
hard, there is no recycle bin); comparisons are Salesforce-like lenient: strings compare
case-insensitively and a number equals its decimal text (so ``NationBuilder_Id__c`` may be seeded as
``123``, ``123.0`` or ``"123"``); composite ``allOrNone`` halts the sub-requests after a failure but
does not roll back earlier writes. The SOQL understood is
``SELECT f1, f2 FROM Obj [WHERE F = lit | F IN (lit, ...)] [LIMIT n]`` where a literal is a quoted
string (with Salesforce's backslash escapes), a number, ``true``, ``false`` or ``null``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import attrs

from .server import Fault, Faults, LoopbackServer, Reply, Request, json_reply

API = r"/services/data/v(?P<version>\d+\.\d)"
MAX_REQUEST_BYTES = 16_384
MAX_SOQL_CHARS = 100_000
MAX_COMPOSITE = 25

#: Key prefixes of the objects we know; other objects get ``a0C``, ``a0D``, ... in order of first use.
KEY_PREFIXES = {
    "Account": "001",
    "Contact": "003",
    "Sefaria_App_User__c": "a0A",
    "Sefaria_App_Data__c": "a0B",
}
DEFAULT_EXTERNAL_IDS: Mapping[str, tuple[str, ...]] = {
    "Sefaria_App_User__c": ("NationBuilder_Id__c", "Sefaria_App_Email__c"),
}
DEFAULT_REQUIRED: Mapping[str, tuple[str, ...]] = {"Sefaria_App_User__c": ("Sefaria_App_Email__c",)}


def sf_errors(code: str, message: str, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Salesforce's error body: a list of ``{message, errorCode[, fields]}``."""
    error: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        error["fields"] = list(fields)
    return [error]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps(sf_errors(code, message)).encode()


#: Salesforce-specific faults, for ``fake.inject(...)``.
UNABLE_TO_LOCK_ROW = Fault.error(400, body=_error_body(
    "UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record or 1 records: a0A000000000001AAA"))
SESSION_EXPIRED = Fault.error(401, body=_error_body("INVALID_SESSION_ID", "Session expired or invalid"))

_FAULT_CODES = {
    400: ("INVALID_REQUEST", "Bad request"),
    401: ("INVALID_SESSION_ID", "Session expired or invalid"),
    403: ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
    404: ("NOT_FOUND", "The requested resource does not exist"),
    500: ("UNKNOWN_EXCEPTION", "An unexpected error occurred. Please include this ErrorId if you contact support"),
    502: ("SERVER_UNAVAILABLE", "Bad gateway"),
    503: ("SERVER_UNAVAILABLE", "Service Unavailable: the server is down for maintenance"),
}
_NOT_FOUND = sf_errors("NOT_FOUND", "The requested resource does not exist")
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def salesforce_id(prefix: str, n: int) -> str:
    """The 18-character id of the ``n``-th record with key prefix ``prefix`` (case-safe suffix).

    The serial is decimal, so only the prefix carries capitals: the suffix is the prefix's letter and
    "AA", which keeps seeding a million records cheap.
    """
    return f"{prefix}000{n:09d}{_CHECKSUM[_capitals(prefix)]}AA"


def _capitals(chunk: str) -> int:
    return sum(1 << j for j, c in enumerate(chunk) if "A" <= c <= "Z")


def to_id18(id15: str) -> str:
    """Salesforce's case-insensitive 18-character form of a 15-character id."""
    return id15 + "".join(_CHECKSUM[_capitals(id15[i:i + 5])] for i in range(0, 15, 5))


# -- SOQL ------------------------------------------------------------------------------------------

class SoqlError(ValueError):
    """The SOQL text is outside the grammar (the fake answers 400 MALFORMED_QUERY)."""


@attrs.frozen
class Token:
    kind: str  # "ident", "string", "number" or "punct"
    value: Any


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}
_TOKEN = re.compile(r"""\s*(?:
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*) | (?P<number>-?\d+(?:\.\d+)?) | (?P<punct>[(),=]) | (?P<quote>')
)""", re.VERBOSE)


def tokenize_soql(text: str) -> list[Token]:
    """Split SOQL into tokens, decoding string literals' escapes as Salesforce does.

    Escapes: ``\\n \\r \\t \\b \\f`` (either case), ``\\" \\' \\\\``; any other backslash or an
    unterminated string is an error.
    """
    tokens: list[Token] = []
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise SoqlError(f"unexpected character at {pos}: {text[pos:pos + 10]!r}")
            return tokens
        pos = m.end()
        if m["ident"]:
            tokens.append(Token("ident", m["ident"]))
        elif m["number"]:
            tokens.append(Token("number", float(m["number"]) if "." in m["number"] else int(m["number"])))
        elif m["punct"]:
            tokens.append(Token("punct", m["punct"]))
        else:
            value, pos = _read_string(text, pos)
            tokens.append(Token("string", value))


def _read_string(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if c == "'":
            return "".join(out), pos + 1
        if c == "\\":
            nxt = text[pos + 1:pos + 2]
            decoded = _ESCAPES.get(nxt.lower() if nxt.isalpha() else nxt)
            if decoded is None:
                raise SoqlError(f"invalid escape sequence \\{nxt} at {pos}")
            out.append(decoded)
            pos += 2
        else:
            out.append(c)
            pos += 1
    raise SoqlError("unterminated string literal")


@attrs.frozen
class Soql:
    """A parsed query: ``values`` is the literal list of ``WHERE field = lit`` / ``IN (...)``."""

    fields: tuple[str, ...]
    sobject: str
    where_field: str | None = None
    values: tuple[Any, ...] = ()
    limit: int | None = None


_NULL = object()


def parse_soql(text: str) -> Soql:
    tokens = tokenize_soql(text)
    pos = 0

    def peek_word() -> str | None:
        return tokens[pos].value.upper() if pos < len(tokens) and tokens[pos].kind == "ident" else None

    def take(kind: str, value: str | None = None) -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise SoqlError(f"unexpected end of query, wanted {value or kind}")
        token = tokens[pos]
        if token.kind != kind or (value is not None and str(token.value).upper() != value):
            raise SoqlError(f"unexpected {token.value!r}, wanted {value or kind}")
        pos += 1
        return token.value

    def literal() -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise SoqlError("unexpected end of query, wanted a literal")
        token = tokens[pos]
        pos += 1
        if token.kind in ("string", "number"):
            return token.value
        word = str(token.value).lower()
        if token.kind == "ident" and word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": _NULL}[word]
        raise SoqlError(f"unexpected {token.value!r}, wanted a literal")

    take("ident", "SELECT")
    fields = [take("ident")]
    while pos < len(tokens) and tokens[pos] == Token("punct", ","):
        pos += 1
        fields.append(take("ident"))
    take("ident", "FROM")
    sobject = take("ident")
    where_field, values, limit = None, (), None
    if peek_word() == "WHERE":
        pos += 1
        where_field = take("ident")
        if peek_word() == "IN":
            pos += 1
            take("punct", "(")
            found = [literal()]
            while pos < len(tokens) and tokens[pos] == Token("punct", ","):
                pos += 1
                found.append(literal())
            take("punct", ")")
            values = tuple(found)
        else:
            take("punct", "=")
            values = (literal(),)
    if peek_word() == "LIMIT":
        pos += 1
        limit = take("number")
        if not isinstance(limit, int) or limit < 0:
            raise SoqlError("LIMIT wants a non-negative integer")
    if pos != len(tokens):
        raise SoqlError(f"unexpected {tokens[pos].value!r} after the query")
    return Soql(tuple(fields), sobject, where_field, values, limit)


def match_key(value: Any) -> str | None:
    """What Salesforce-like comparison compares: strings case-insensitively, numbers by their text."""
    if value is None or value is _NULL:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and float(value).is_integer():
        return str(int(value))
    return str(value).lower()


# -- storage -----------------------------------------------------------------------------------------

class _Table:
    """One sObject's records by id, with dict indexes on its external-id fields."""

    def __init__(self, name: str, prefix: str, indexed: Iterable[str]) -> None:
        self.name = name
        self.prefix = prefix
        self.rows: dict[str, dict[str, Any]] = {}
        self.indexes: dict[str, dict[str, str | list[str]]] = {f: {} for f in indexed}
        self.names: dict[str, str] = {"id": "Id", **{f.lower(): f for f in self.indexes}}
        self._spellings: dict[str, str] = {}  # as written -> canonical, so seeding skips .lower()
        self._serial = itertools.count(1)

    def field(self, name: str) -> str:
        """The canonical spelling of a field name (Salesforce names are case-insensitive)."""
        return self.names.get(name.lower(), name)

    def _canonical(self, name: str) -> str:
        """Like ``field``, but the first spelling of a new field becomes its canonical one."""
        canonical = self._spellings.get(name)
        if canonical is None:
            canonical = self._spellings[name] = self.names.setdefault(name.lower(), name)
        return canonical

    def insert(self, fields: Mapping[str, Any]) -> str:
        record_id = salesforce_id(self.prefix, next(self._serial))
        row = {self._canonical(k): v for k, v in fields.items()}
        self.rows[record_id] = row
        self._index(record_id, row)
        return record_id

    def update(self, record_id: str, fields: Mapping[str, Any]) -> None:
        row = self.rows[record_id]
        changes = {self._canonical(k): v for k, v in fields.items()}
        self._unindex(record_id, {k: row.get(k) for k in changes})
        row.update(changes)
        self._index(record_id, changes)

    def delete(self, record_id: str) -> None:
        self._unindex(record_id, self.rows.pop(record_id))

    def lookup(self, field: str, value: Any) -> list[str]:
        """Ids whose ``field`` equals ``value``: a dict lookup when indexed, a scan otherwise."""
        field, key = self.field(field), match_key(value)
        if field == "Id":
            record_id = to_id18(value) if isinstance(value, str) and len(value) == 15 else value
            return [record_id] if isinstance(record_id, str) and record_id in self.rows else []
        index = self.indexes.get(field)
        if index is not None and key is not None:
            hit = index.get(key)
            return [] if hit is None else [hit] if isinstance(hit, str) else list(hit)
        return [rid for rid, row in self.rows.items() if match_key(row.get(field)) == key]

    def _index(self, record_id: str, values: Mapping[str, Any]) -> None:
        for field, index in self.indexes.items():
            key = match_key(values.get(field))
            if key is None:
                continue
            hit = index.get(key)
            if hit is None:
                index[key] = record_id
            elif isinstance(hit, str):
                index[key] = [hit, record_id]
            else:
                hit.append(record_id)

    def _unindex(self, record_id: str, values: Mapping[str, Any]) -> None:
        for field, index in self.indexes.items():
            key = match_key(values.get(field))
            hit = index.get(key) if key is not None else None
            if hit == record_id:
                del index[key]
            elif isinstance(hit, list):
                hit.remove(record_id)
                if len(hit) == 1:
                    index[key] = hit[0]


@attrs.frozen
class _Cursor:
    version: str
    table: _Table
    fields: tuple[str, ...]
    ids: Sequence[str]


class FakeSalesforce(LoopbackServer):
    """A Salesforce org on 127.0.0.1. See the module docstring for what it serves and how it chooses.

    Runtime knobs (plain attributes): ``client_secret`` (rotate it to refuse the next token request),
    ``token_call_limit`` (each token then serves that many API calls and answers 401
    INVALID_SESSION_ID after), ``daily_limit``/``api_usage`` (403 REQUEST_LIMIT_EXCEEDED once usage
    reaches the limit), ``page_size``, ``upsert_update_status``, ``required_fields``. Recorded:
    ``soql_log`` (every SOQL text received, composite sub-requests included), ``issued_tokens``,
    ``counts`` (requests by kind: token, create, get, get_by_external_id, update, upsert, delete,
    query, query_all, query_more, composite, limits, unmatched).
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
        self.soql_log: list[str] = []
        self.issued_tokens: list[str] = []
        self._external_ids = {k: tuple(v) for k, v in external_ids.items()}
        self._data = threading.RLock()
        self._tables: dict[str, _Table] = {}
        self._tokens: dict[str, int | None] = {}
        self._cursors: collections.OrderedDict[str, _Cursor] = collections.OrderedDict()
        self._cursor_serial = itertools.count(1)
        self._custom_prefixes = (f"a0{c}" for c in _BASE62[12:])
        for name in objects:
            self._table(name, create=True)
        self._add_routes()

    # -- Python API for tests and benchmarks ---------------------------------------------------------

    def insert(self, sobject: str, fields: Mapping[str, Any]) -> str:
        """Seed one record (no validation, no API usage); returns its 18-character id."""
        with self._data:
            return self._table(sobject, create=True).insert(fields)

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
        code, message = _FAULT_CODES.get(status, (f"HTTP_{status}", f"Injected status {status}"))
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
        ]
        for method, pattern, handler, kind in routes:
            self.route(method, pattern, self._versioned(handler), kind=kind)
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE", "HEAD"):
            self.route(method, r".*", lambda request, m: json_reply(404, _NOT_FOUND), kind="unmatched")

    def _versioned(self, handler: Any) -> Any:
        """Answer 404 for API versions this org does not have (20.0 up to ``api_version``)."""
        def wrapped(request: Request, m: re.Match[str]) -> Reply:
            version = m.groupdict().get("version")
            if version is not None and not 20.0 <= float(version) <= float(self.api_version):
                return json_reply(404, _NOT_FOUND)
            return handler(request, m)
        return wrapped

    def _table(self, name: str, *, create: bool = False) -> _Table | None:
        table = self._tables.get(name.lower())
        if table is None and create:
            prefix = KEY_PREFIXES.get(name) or next(self._custom_prefixes)
            table = self._tables[name.lower()] = _Table(name, prefix, self._external_ids.get(name, ()))
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

    def _body(self, request: Request) -> dict[str, Any] | Reply:
        try:
            body = request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return json_reply(400, sf_errors("JSON_PARSER_ERROR", "The request body is not a JSON object"))
        return body

    def _missing(self, sobject: str, row: Mapping[str, Any], fields: Iterable[str]) -> Reply | None:
        required = set(self.required_fields.get(sobject, ()))
        missing = [f for f in fields if f in required and row.get(f) in (None, "")]
        if missing:
            return json_reply(400, sf_errors("REQUIRED_FIELD_MISSING",
                                             f"Required fields are missing: [{', '.join(missing)}]", missing))
        return None

    def _create(self, request: Request, m: re.Match[str]) -> Reply:
        body = self._body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            table = self._table(m["sobject"])
            if table is None:
                return json_reply(404, _NOT_FOUND)
            fields = {table.field(k): v for k, v in body.items() if k != "attributes"}
            invalid = self._missing(table.name, fields, self.required_fields.get(table.name, ()))
            if invalid:
                return invalid
            record_id = table.insert(fields)
        return json_reply(201, {"id": record_id, "success": True, "errors": []})

    def _record_json(self, version: str, table: _Table, record_id: str,
                     fields: Sequence[str] | None = None) -> dict[str, Any]:
        row = table.rows[record_id]
        out: dict[str, Any] = {"attributes": {"type": table.name,
                                              "url": f"/services/data/v{version}/sobjects/{table.name}/{record_id}"}}
        if fields is None:
            out["Id"] = record_id
            out.update(row)
        else:
            for f in fields:
                name = table.field(f)
                out[name] = record_id if name.lower() == "id" else row.get(name)
        return out

    def _one(self, m: re.Match[str]) -> tuple[_Table, list[str]] | Reply:
        """The table and matching ids for a by-id or by-external-id path."""
        table = self._table(m["sobject"])
        if table is None:
            return json_reply(404, _NOT_FOUND)
        if "field" in m.groupdict():
            field = table.field(m["field"])
            if field not in table.indexes and field != "Id":
                return json_reply(404, sf_errors(
                    "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {m['field']}"))
            return table, table.lookup(field, unquote(m["value"]))
        return table, table.lookup("Id", unquote(m["id"]))

    def _several(self, version: str, table: _Table, ids: Sequence[str]) -> Reply:
        return json_reply(300, [f"/services/data/v{version}/sobjects/{table.name}/{rid}" for rid in ids])

    def _get(self, request: Request, m: re.Match[str]) -> Reply:
        fields = request.param("fields")
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            if not ids:
                return json_reply(404, _NOT_FOUND)
            if len(ids) > 1:
                return self._several(m["version"], table, ids)
            wanted = [f.strip() for f in fields.split(",")] if fields else None
            return json_reply(200, self._record_json(m["version"], table, ids[0], wanted))

    _get_by_external_id = _get

    def _update(self, request: Request, m: re.Match[str]) -> Reply:
        body = self._body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            if not ids:
                return json_reply(404, _NOT_FOUND)
            fields = {table.field(k): v for k, v in body.items() if k != "attributes"}
            invalid = self._missing(table.name, fields, fields)
            if invalid:
                return invalid
            table.update(ids[0], fields)
        return Reply(204)

    def _upsert(self, request: Request, m: re.Match[str]) -> Reply:
        body = self._body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            fields = {table.field(k): v for k, v in body.items() if k != "attributes"}
            if len(ids) > 1:
                return self._several(m["version"], table, ids)
            if ids:
                invalid = self._missing(table.name, fields, fields)
                if invalid:
                    return invalid
                table.update(ids[0], fields)
                if self.upsert_update_status == 204:
                    return Reply(204)
                return json_reply(200, {"id": ids[0], "success": True, "errors": [], "created": False})
            fields[table.field(m["field"])] = unquote(m["value"])
            invalid = self._missing(table.name, fields, self.required_fields.get(table.name, ()))
            if invalid:
                return invalid
            record_id = table.insert(fields)
        return json_reply(201, {"id": record_id, "success": True, "errors": [], "created": True})

    def _delete(self, request: Request, m: re.Match[str]) -> Reply:
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            if not ids:
                return json_reply(404, _NOT_FOUND)
            table.delete(ids[0])
        return Reply(204)

    def _query(self, request: Request, m: re.Match[str]) -> Reply:
        text = request.param("q")
        if text is None:
            return json_reply(400, sf_errors("MALFORMED_QUERY", "A query string is required (q=)"))
        with self._data:
            self.soql_log.append(text)
            if len(text) > MAX_SOQL_CHARS:
                return json_reply(400, sf_errors(
                    "MALFORMED_QUERY", f"SOQL statements cannot be longer than {MAX_SOQL_CHARS} characters"))
            try:
                soql = parse_soql(text)
            except SoqlError as exc:
                return json_reply(400, sf_errors("MALFORMED_QUERY", str(exc)))
            table = self._table(soql.sobject)
            if table is None:
                return json_reply(400, sf_errors("INVALID_TYPE", f"sObject type '{soql.sobject}' is not supported."))
            ids = list(self._select(table, soql))
            locator = salesforce_id("01g", next(self._cursor_serial))
            self._cursors[locator] = _Cursor(m["version"], table, soql.fields, ids)
            while len(self._cursors) > 64:
                self._cursors.popitem(last=False)
            return self._page(locator, 0)

    def _select(self, table: _Table, soql: Soql) -> Iterator[str]:
        if soql.where_field is None:
            ids: Iterable[str] = table.rows
        else:
            ids = dict.fromkeys(rid for v in soql.values for rid in table.lookup(soql.where_field, v))
        return itertools.islice(ids, soql.limit)

    def _page(self, locator: str, offset: int) -> Reply:
        cursor = self._cursors.get(locator)
        if cursor is None or offset > len(cursor.ids):
            return json_reply(400, sf_errors("INVALID_QUERY_LOCATOR", "invalid query locator"))
        end = offset + self.page_size
        records = [self._record_json(cursor.version, cursor.table, rid, cursor.fields)
                   for rid in cursor.ids[offset:end] if rid in cursor.table.rows]
        page: dict[str, Any] = {"totalSize": len(cursor.ids), "done": end >= len(cursor.ids), "records": records}
        if not page["done"]:
            page["nextRecordsUrl"] = f"/services/data/v{cursor.version}/query/{locator}-{end}"
        return json_reply(200, page)

    def _query_more(self, request: Request, m: re.Match[str]) -> Reply:
        with self._data:
            return self._page(m["locator"], int(m["offset"]))

    def _composite(self, request: Request, m: re.Match[str]) -> Reply:
        body = self._body(request)
        if isinstance(body, Reply):
            return body
        subrequests = body.get("compositeRequest")
        if not isinstance(subrequests, list) or not subrequests:
            return json_reply(400, sf_errors("JSON_PARSER_ERROR", "compositeRequest must be a non-empty list"))
        if len(subrequests) > MAX_COMPOSITE:
            return json_reply(400, sf_errors("LIMIT_EXCEEDED", f"Limit of {MAX_COMPOSITE} subrequests exceeded"))
        results, halted = [], False
        for sub in subrequests:
            ref = sub.get("referenceId")
            if halted:
                results.append({"body": sf_errors("PROCESSING_HALTED", "The transaction was rolled back since "
                                                  "another operation in the same transaction failed."),
                                "httpHeaders": {}, "httpStatusCode": 400, "referenceId": ref})
                continue
            url, payload = str(sub.get("url", "")), sub.get("body")
            if url.startswith("/services/data/"):
                reply = self.call(Request(str(sub.get("method", "GET")).upper(), url, request.headers,
                                          b"" if payload is None else json.dumps(payload).encode()))
            else:
                reply = json_reply(400, sf_errors("INVALID_URL", "composite sub-requests stay under /services/data"))
            results.append({"body": json.loads(reply.body) if reply.body else None,
                            "httpHeaders": {k: v for k, v in reply.headers.items() if k.lower() == "location"},
                            "httpStatusCode": reply.status, "referenceId": ref})
            halted = bool(body.get("allOrNone")) and reply.status >= 400
        return json_reply(200, {"compositeResponse": results})
