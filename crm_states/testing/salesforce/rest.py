"""The fake's REST routes: sObject create / retrieve / update / upsert / delete, query and query-more."""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from ..server import Reply, Request, json_reply
from .common import MAX_SOQL_CHARS, NOT_FOUND, json_body, salesforce_id, sf_errors
from .select import Selecting
from .soql import InvalidField, SoqlError, parse_soql
from .storage import Cursor, Table


class RestRoutes(Selecting):
    """Handlers for the single-record and query endpoints; ``FakeSalesforce`` mixes them in."""

    _data: threading.RLock
    _cursors: collections.OrderedDict[str, Cursor]
    _cursor_serial: Iterator[int]
    soql_log: list[str]
    page_size: int
    upsert_update_status: int
    required_fields: dict[str, tuple[str, ...]]

    def _missing(self, sobject: str, row: Mapping[str, Any], fields: Iterable[str]) -> Reply | None:
        required = set(self.required_fields.get(sobject, ()))
        missing = [f for f in fields if f in required and row.get(f) in (None, "")]
        if missing:
            return json_reply(400, sf_errors("REQUIRED_FIELD_MISSING",
                                             f"Required fields are missing: [{', '.join(missing)}]", missing))
        return None

    def _create(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            table = self._table(m["sobject"])
            if table is None:
                return json_reply(404, NOT_FOUND)
            fields = {table.field(k): v for k, v in body.items() if k != "attributes"}
            invalid = self._missing(table.name, fields, self.required_fields.get(table.name, ()))
            if invalid:
                return invalid
            record_id = table.insert(fields)
        return json_reply(201, {"id": record_id, "success": True, "errors": []})

    def _one(self, m: re.Match[str]) -> tuple[Table, list[str]] | Reply:
        """The table and matching ids for a by-id or by-external-id path."""
        table = self._table(m["sobject"])
        if table is None:
            return json_reply(404, NOT_FOUND)
        if "field" in m.groupdict():
            field = table.field(m["field"])
            if field not in table.external and field != "Id":
                return json_reply(404, sf_errors(
                    "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {m['field']}"))
            return table, table.lookup(field, unquote(m["value"]))
        return table, table.lookup("Id", unquote(m["id"]))

    def _several(self, version: str, table: Table, ids: Sequence[str]) -> Reply:
        return json_reply(300, [f"/services/data/v{version}/sobjects/{table.name}/{rid}" for rid in ids])

    def _get(self, request: Request, m: re.Match[str]) -> Reply:
        fields = request.param("fields")
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            if not ids:
                return json_reply(404, NOT_FOUND)
            if len(ids) > 1:
                return self._several(m["version"], table, ids)
            wanted = [f.strip() for f in fields.split(",")] if fields else None
            return json_reply(200, self._record_json(m["version"], table, ids[0], wanted))

    _get_by_external_id = _get

    def _update(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        with self._data:
            found = self._one(m)
            if isinstance(found, Reply):
                return found
            table, ids = found
            if not ids:
                return json_reply(404, NOT_FOUND)
            fields = {table.field(k): v for k, v in body.items() if k != "attributes"}
            invalid = self._missing(table.name, fields, fields)
            if invalid:
                return invalid
            table.update(ids[0], fields)
        return Reply(204)

    def _upsert(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
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
                return json_reply(404, NOT_FOUND)
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
            try:
                ids = self._select(table, soql)
            except InvalidField as exc:
                return json_reply(400, sf_errors("INVALID_FIELD", str(exc)))
            locator = salesforce_id("01g", next(self._cursor_serial))
            self._cursors[locator] = Cursor(m["version"], table, soql.fields, ids)
            while len(self._cursors) > 64:
                self._cursors.popitem(last=False)
            return self._page(locator, 0)

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

