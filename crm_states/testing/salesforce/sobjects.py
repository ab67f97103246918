"""The fake's sObject Collections: create (``POST /composite/sobjects``) and upsert by external id
(``PATCH /composite/sobjects/<Obj>/<Field>``), up to 200 records, per-record results in input order.

Per-record errors as Salesforce words them: ``REQUIRED_FIELD_MISSING`` (``required_fields``),
``DUPLICATE_VALUE`` (a ``unique_fields`` value already held, or given twice in one request; an external
id given twice in one upsert), ``DUPLICATE_EXTERNAL_ID`` (an external id several records hold),
``INVALID_TYPE``. With ``allOrNone`` one failure fails every record (``ALL_OR_NONE_OPERATION_ROLLED_BACK``)
and nothing is written. One request is one API call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..server import Reply, Request, json_reply
from .common import MAX_COLLECTION, json_body, sf_errors
from .soql import match_key
from .storage import Table

Outcome = dict[str, Any]


def _failure(code: str, message: str, fields: Iterable[str] = ()) -> Outcome:
    return {"success": False, "errors": [{"statusCode": code, "message": message, "fields": list(fields)}]}


class CollectionRoutes:
    """Mixed into ``FakeSalesforce``."""

    _data: threading.RLock
    required_fields: dict[str, tuple[str, ...]]
    unique_fields: dict[str, tuple[str, ...]]

    if TYPE_CHECKING:
        def _table(self, name: str, *, create: bool = False) -> Table | None: ...

    def _collection_routes(self, api: str) -> list[tuple[str, str, Any, str]]:
        return [
            ("POST", api + r"/composite/sobjects/?", self._collection_create, "collection_create"),
            ("PATCH", api + r"/composite/sobjects/(?P<sobject>\w+)/(?P<field>\w+)/?", self._collection_upsert,
             "collection_upsert"),
        ]

    def _records(self, request: Request) -> tuple[list[Any], bool] | Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        records = body.get("records")
        if not isinstance(records, list) or not records:
            return json_reply(400, sf_errors("JSON_PARSER_ERROR", "records must be a non-empty list"))
        if len(records) > MAX_COLLECTION:
            return json_reply(400, sf_errors("EXCEEDED_ID_LIMIT", f"record limit reached. cannot submit more "
                                             f"than {MAX_COLLECTION} records into this call"))
        return records, bool(body.get("allOrNone"))

    def _collection_create(self, request: Request, m: re.Match[str]) -> Reply:
        parsed = self._records(request)
        if isinstance(parsed, Reply):
            return parsed
        records, all_or_none = parsed
        with self._data:
            plans: list[tuple[Table, dict[str, Any]] | Outcome] = []
            seen: set[tuple[str, str, str]] = set()
            for record in records:
                kind = record.get("attributes", {}).get("type") if isinstance(record, dict) else None
                table = self._table(kind) if isinstance(kind, str) else None
                if table is None:
                    plans.append(_failure("INVALID_TYPE", "Must send a concrete entity type."))
                    continue
                fields = {table.field(k): v for k, v in record.items() if k != "attributes"}
                if "Id" in fields:
                    plans.append(_failure("INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call",
                                          ["Id"]))
                    continue
                plans.append(self._check(table, fields, self.required_fields.get(table.name, ()), seen, None)
                             or (table, fields))
            return json_reply(200, self._apply(plans, all_or_none, created=None))

    def _collection_upsert(self, request: Request, m: re.Match[str]) -> Reply:
        parsed = self._records(request)
        if isinstance(parsed, Reply):
            return parsed
        records, all_or_none = parsed
        with self._data:
            table = self._table(m["sobject"])
            if table is None:
                return json_reply(404, sf_errors("NOT_FOUND", "The requested resource does not exist"))
            key = table.field(m["field"])
            if key not in table.external:
                return json_reply(400, sf_errors("INVALID_FIELD", f"Field name provided, {m['field']} is not an "
                                                 f"External ID or indexed field for {table.name}"))
            plans: list[tuple[Table, dict[str, Any]] | Outcome] = []
            seen: set[tuple[str, str, str]] = set()
            given = [match_key(r.get(key)) if isinstance(r, dict) else None for r in records]
            for record, value in zip(records, given):
                if not isinstance(record, dict) or value is None:
                    plans.append(_failure("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{key}]", [key]))
                    continue
                if given.count(value) > 1:
                    plans.append(_failure("DUPLICATE_VALUE", f"Duplicate external id specified: {value}", [key]))
                    continue
                fields = {table.field(k): v for k, v in record.items() if k not in ("attributes", "Id")}
                hits = table.lookup(key, record[key])
                if len(hits) > 1:
                    plans.append(_failure("DUPLICATE_EXTERNAL_ID", f"{key}: more than one record found for "
                                          f"external id field: {hits}", [key]))
                    continue
                required = fields if hits else self.required_fields.get(table.name, ())
                plans.append(self._check(table, fields, required, seen, hits[0] if hits else None)
                             or (table, {**fields, "Id": hits[0]} if hits else fields))
            return json_reply(200, self._apply(plans, all_or_none, created=True))

    def _check(self, table: Table, fields: Mapping[str, Any], required: Iterable[str],
               seen: set[tuple[str, str, str]], own: str | None) -> Outcome | None:
        """A failure for a record that misses a required field or repeats a unique value, else None."""
        needed = set(self.required_fields.get(table.name, ()))
        missing = [f for f in required if f in needed and fields.get(f) in (None, "")]
        if missing:
            return _failure("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)
        for field in self.unique_fields.get(table.name, ()):
            value = match_key(fields.get(field))
            if value is None:
                continue
            holders = [rid for rid in table.lookup(field, fields.get(field)) if rid != own]
            if holders or (table.name, field, value) in seen:
                return _failure("DUPLICATE_VALUE", f"duplicate value found: {field} duplicates value on record "
                                f"with id: {holders[0] if holders else 'in this request'}", [field])
            seen.add((table.name, field, value))
        return None

    @staticmethod
    def _apply(plans: list[tuple[Table, dict[str, Any]] | Outcome], all_or_none: bool,
               created: bool | None) -> list[Outcome]:
        """Write the planned records (none of them when ``all_or_none`` and one failed)."""
        if all_or_none and any(isinstance(p, dict) for p in plans):
            return [p if isinstance(p, dict) else _failure(
                "ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back because not all records were valid "
                "and the request was using AllOrNone header") for p in plans]
        out: list[Outcome] = []
        for plan in plans:
            if isinstance(plan, dict):
                out.append(plan)
                continue
            table, fields = plan
            existing = fields.pop("Id", None)
            if existing is not None:
                table.update(existing, fields)
                out.append({"id": existing, "success": True, "errors": [], "created": False})
                continue
            made = {"id": table.insert(fields), "success": True, "errors": []}
            out.append(made if created is None else {**made, "created": True})
        return out
