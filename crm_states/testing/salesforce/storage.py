"""The fake's records: one table per sObject, with dict indexes on its external-id fields."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .common import salesforce_id, to_id18
from .soql import match_key


class Table:
    """One sObject's records by id, with dict indexes on its external-id fields (``external``: the
    fields an upsert or a retrieve by external id may name) and on its lookup fields (``indexed``)."""

    def __init__(self, name: str, prefix: str, external: Iterable[str], indexed: Iterable[str] = ()) -> None:
        self.name = name
        self.prefix = prefix
        self.rows: dict[str, dict[str, Any]] = {}
        self.external = frozenset(external)
        self.indexes: dict[str, dict[str, str | list[str]]] = {f: {} for f in [*self.external, *indexed]}
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

    def insert(self, fields: Mapping[str, Any], record_id: str | None = None) -> str:
        """Store a record; under ``record_id`` when given (any text: tests seed hostile ids)."""
        if record_id is None:
            record_id = salesforce_id(self.prefix, next(self._serial))
        elif record_id in self.rows:
            raise ValueError(f"{self.name} already has a record {record_id[:40]!r}")
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
class Cursor:
    version: str
    table: Table
    fields: tuple[str, ...]
    ids: Sequence[str]

