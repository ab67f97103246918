"""What a query selects and how a record looks: fields, parent-relationship paths, WHERE filters.

One level of parent relationship is understood, as ``FakeSalesforce(relationships=...)`` declares them:
``Contact__r.NationBuilder_Id__c`` on an app user is the ``NationBuilder_Id__c`` of the Contact whose id
its ``Contact__c`` holds. JSON records nest the parent (``"Contact__r": {"attributes": ..., ...}``, or
``null`` without one), as Salesforce does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .soql import InvalidField, Soql, match_key
from .storage import Table


class Selecting:
    """Mixed into ``FakeSalesforce``; ``relationships`` maps object -> {relationship: (lookup field, parent)}."""

    relationships: Mapping[str, Mapping[str, tuple[str, str]]]

    if TYPE_CHECKING:
        def _table(self, name: str, *, create: bool = False) -> Table | None: ...

    def _parent(self, table: Table, path: str) -> tuple[str, str, Table, str]:
        """``(relationship, lookup field, parent table, parent field)`` of a one-level path, with the
        org's spellings."""
        relationship, _, rest = path.partition(".")
        declared = {k.lower(): (k, v) for k, v in self.relationships.get(table.name, {}).items()}
        found = declared.get(relationship.lower())
        if found is None or "." in rest:
            raise InvalidField(f"Didn't understand relationship '{relationship}' in field path '{path}'. "
                               f"If you are attempting to use a custom relationship, be sure to append "
                               f"the '__r' after the custom relationship name.")
        name, (lookup_field, parent_name) = found
        parent = self._table(parent_name, create=True)
        assert parent is not None
        return name, table.field(lookup_field), parent, parent.field(rest)

    def _column(self, table: Table, path: str) -> str:
        """A selected field as the org spells it (``Contact__r.NationBuilder_Id__c``): a CSV header."""
        if "." not in path:
            return table.field(path)
        relationship, _, parent, field = self._parent(table, path)
        return f"{relationship}.{field}"

    def _getter(self, table: Table, path: str) -> Callable[[str, Mapping[str, Any]], Any]:
        """A function of ``(record id, row)`` giving the value at ``path``, resolved once (a million
        rows are read through one)."""
        if "." not in path:
            name = table.field(path)
            if name == "Id":
                return lambda record_id, row: record_id
            return lambda record_id, row: row.get(name)
        _, lookup_field, parent, field = self._parent(table, path)
        parents = parent.rows

        def through_parent(record_id: str, row: Mapping[str, Any]) -> Any:
            parent_id = row.get(lookup_field)
            parent_row = parents.get(parent_id) if isinstance(parent_id, str) else None
            if parent_row is None:
                return None
            return parent_id if field == "Id" else parent_row.get(field)
        return through_parent

    def _select(self, table: Table, soql: Soql) -> list[str]:
        """The ids ``soql`` selects, in insertion order; ``InvalidField`` for a path it cannot follow."""
        for f in soql.fields:
            if "." in f:
                self._parent(table, f)
        field = soql.where_field
        ids: Iterable[str]
        if field is None:
            ids = table.rows
        elif soql.op == "!=":
            key, value = match_key(soql.values[0]), self._getter(table, field)
            ids = [rid for rid, row in table.rows.items() if match_key(value(rid, row)) != key]
        elif "." in field:
            _, lookup_field, parent, parent_field = self._parent(table, field)
            parents = dict.fromkeys(pid for v in soql.values for pid in parent.lookup(parent_field, v))
            ids = dict.fromkeys(rid for pid in parents for rid in table.lookup(lookup_field, pid))
        else:
            ids = dict.fromkeys(rid for v in soql.values for rid in table.lookup(field, v))
        return list(itertools.islice(ids, soql.limit))

    def _record_json(self, version: str, table: Table, record_id: str,
                     fields: Sequence[str] | None = None) -> dict[str, Any]:
        row = table.rows[record_id]
        out: dict[str, Any] = {"attributes": _attributes(version, table, record_id)}
        if fields is None:
            out["Id"] = record_id
            out.update(row)
            return out
        for f in fields:
            if "." not in f:
                name = table.field(f)
                out[name] = record_id if name.lower() == "id" else row.get(name)
                continue
            relationship, lookup_field, parent, field = self._parent(table, f)
            parent_id = row.get(lookup_field)
            parent_row = parent.rows.get(parent_id) if isinstance(parent_id, str) else None
            if parent_row is None:
                out[relationship] = None
                continue
            nested = out.get(relationship) or {"attributes": _attributes(version, parent, parent_id)}
            nested[field] = parent_id if field == "Id" else parent_row.get(field)
            out[relationship] = nested
        return out


def _attributes(version: str, table: Table, record_id: str) -> dict[str, str]:
    return {"type": table.name, "url": f"/services/data/v{version}/sobjects/{table.name}/{record_id}"}
