"""Snapshots of the CRM's App Users in our own database, for validating profiles without asking the CRM per
profile: the results of one Bulk API 2.0 query job, or the Salesforce report Sefaria's operators export.

``crm_snapshots`` holds one record per snapshot: where it came from (a job id, or a file and its SHA-256),
how far its rows were loaded (pages, rows, the job's next locator or the file's next line), and its state::

    {_id: "<machine>:<source>:<job id | sha256>", machine, source: "bulk" | "export", job_id?, file?, digest?,
     field, table, state, started_at, pages, rows, keyed, refused, locator?, line?, error?, records_processed?}

    states: started -> loading -> loaded -> dropping -> dropped;  failed | expired (not reused)

Its rows live in a temporary collection of ours, ``crm_snapshot_<job id>`` (or ``crm_snapshot_x<digest>``),
one document per row that carries a NationBuilder id, indexed on it: ``{_id: "<page>:<n>", page, nb, id?,
problem?, line?}`` (``id`` a valid App User id, ``problem`` why the row was refused). A page is written
whole and then counted in the record, so a run killed mid-page rewrites that page, never counts it twice.
The collection is dropped once no profile needs it (``drop``: marked ``dropping`` first, so a reader that
finds the collection gone also finds out why, and never takes "no rows" for "not in Salesforce").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

SNAPSHOTS = "crm_snapshots"
TABLE_PREFIX = "crm_snapshot_"
#: States of a snapshot that can still serve or be finished.
USABLE = ("started", "loading", "loaded")


@attrs.frozen
class SnapshotRecord:
    """A snapshot as its record last said."""

    key: str
    machine: str
    source: str
    table: str
    state: str
    field: str = ""
    job_id: str | None = None
    file: str | None = None
    digest: str | None = None
    started_at: dt.datetime | None = None
    pages: int = 0
    rows: int = 0
    keyed: int = 0
    refused: int = 0
    locator: str | None = None
    line: int = 0
    #: The smallest and largest NationBuilder id in the table (its density decides how it is read).
    nb_min: int = 0
    nb_max: int = 0
    error: str | None = None
    records_processed: int | None = None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> SnapshotRecord:
        names = {f.name for f in attrs.fields(cls)} - {"key"}
        return cls(key=doc["_id"], **{k: v for k, v in doc.items() if k in names})


class Snapshots:
    """The records and tables of snapshots; knows no CRM and no machine."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.records = db[SNAPSHOTS]

    # --- records ----------------------------------------------------------------------------------
    def get(self, key: str) -> SnapshotRecord | None:
        doc = self.records.find_one({"_id": key})
        return None if doc is None else SnapshotRecord.from_doc(doc)

    def usable(self, machine: str, source: str, *, newer_than: dt.datetime | None = None,
               **match: Any) -> SnapshotRecord | None:
        """The newest snapshot of ``machine`` from ``source`` that can still serve (matching ``match``,
        started after ``newer_than`` on the database's clock), or None."""
        where: dict[str, Any] = {"machine": machine, "source": source, "state": {"$in": list(USABLE)}, **match}
        if newer_than is not None:
            where["started_at"] = {"$gt": newer_than}
        doc = next(iter(self.records.find(where).sort("started_at", -1).limit(1)), None)
        return None if doc is None else SnapshotRecord.from_doc(doc)

    def create(self, key: str, machine: str, source: str, table: str, **fields: Any) -> SnapshotRecord:
        """A new record in state ``started`` (its time the database's); the existing one if ``key`` exists."""
        doc = {"_id": key, "machine": machine, "source": source, "table": table, "state": "started", "pages": 0,
               "rows": 0, "keyed": 0, "refused": 0, **fields}
        try:
            self.records.insert_one(doc)
            self.records.update_one({"_id": key}, {"$currentDate": {"started_at": True}})
        except DuplicateKeyError:
            pass
        found = self.get(key)
        assert found is not None
        return found

    def move(self, record: SnapshotRecord, state: str, **fields: Any) -> SnapshotRecord | None:
        """Set ``state`` (and ``fields``) if the record is still in the state read; None when it moved."""
        done = self.records.update_one({"_id": record.key, "state": record.state}, {"$set": {"state": state, **fields}})
        return self.get(record.key) if done.matched_count == 1 else None

    def state(self, key: str) -> str | None:
        doc = self.records.find_one({"_id": key}, {"state": 1})
        return None if doc is None else str(doc.get("state"))

    def server_now(self) -> dt.datetime:
        """The database's clock (naive UTC, as pymongo returns dates)."""
        return self.db.command("hello")["localTime"]

    # --- the table --------------------------------------------------------------------------------
    def begin_loading(self, record: SnapshotRecord) -> SnapshotRecord | None:
        """Make the table ready to take page ``record.pages``: its index, and no rows of a page a killed
        run wrote part of. The record moves to ``loading``."""
        table = self.db[record.table]
        table.create_index([("nb", ASCENDING)])
        table.delete_many({"page": {"$gte": record.pages}})
        return record if record.state == "loading" else self.move(record, "loading")

    def write_page(self, record: SnapshotRecord, rows: Sequence[Mapping[str, Any]], *, seen: int,
                   **progress: Any) -> SnapshotRecord | None:
        """Page ``record.pages``: its rows that carry a NationBuilder id (``nb``, and ``id`` or ``problem``)
        inserted, then counted in the record with ``progress`` (the next locator or line). ``seen`` is every
        row the page held. None when the record moved meanwhile (dropped, taken over)."""
        page = record.pages
        docs = [{"_id": f"{page}:{n}", "page": page, **row} for n, row in enumerate(rows)]
        if docs:
            self.db[record.table].insert_many(docs, ordered=False)
        refused = sum(1 for row in rows if row.get("problem"))
        keys = [row["nb"] for row in rows]
        counts = {"pages": page + 1, "rows": record.rows + seen, "keyed": record.keyed + len(docs),
                  "refused": record.refused + refused,
                  "nb_min": min([*keys, record.nb_min] if record.keyed else keys, default=0),
                  "nb_max": max([*keys, record.nb_max], default=0)}
        done = self.records.update_one({"_id": record.key, "state": "loading", "pages": page},
                                       {"$set": {**counts, **progress}})
        return attrs.evolve(record, **counts, **progress) if done.matched_count == 1 else None

    def rows_for(self, record: SnapshotRecord, nationbuilder_ids: Iterable[int]) -> list[dict[str, Any]]:
        """The table's rows holding any of ``nationbuilder_ids``, in few indexed queries: ids that lie close
        together (as the table's density says) are read as one range, the scattered rest in one ``$in``. A
        range read costs per row it passes, an ``$in`` per id it finds, and on some servers (SecantusDB)
        the second is many times the first."""
        wanted = sorted(set(nationbuilder_ids))
        if not wanted:
            return []
        table = self.db[record.table]
        fields = {"_id": 0, "nb": 1, "id": 1, "problem": 1, "line": 1}
        ranges, scattered = _clusters(wanted, record.keyed / max(1, record.nb_max - record.nb_min + 1))
        rows = [row for low, high in ranges for row in table.find({"nb": {"$gte": low, "$lte": high}}, fields)]
        keep = set(wanted)
        found = [row for row in rows if row.get("nb") in keep]
        if scattered:
            found += table.find({"nb": {"$in": scattered}}, fields)
        return found

    def drop(self, record: SnapshotRecord) -> bool:
        """Drop the table: the record says ``dropping`` first (readers re-check it after each query), then
        ``dropped``. False when the record had moved (another run dropped it)."""
        moving = self.move(record, "dropping") if record.state != "dropping" else record
        if moving is None:
            return False
        self.db.drop_collection(record.table)
        return self.move(moving, "dropped") is not None

    def leftovers(self, machine: str) -> list[SnapshotRecord]:
        """Records of ``machine`` whose table may still exist (not dropped yet)."""
        return [SnapshotRecord.from_doc(d) for d in
                self.records.find({"machine": machine, "state": {"$nin": ["dropped"]}})]


#: A range read may pass this many rows it does not need per id it saves from the ``$in``.
RANGE_SLACK = 8
#: A run of ids read as a range has at least this many ids; fewer go to the ``$in``.
RANGE_IDS = 4


def _clusters(wanted: list[int], density: float) -> tuple[list[tuple[int, int]], list[int]]:
    """``(ranges, scattered)``: runs of sorted ids whose gaps hold few rows (``RANGE_SLACK``) become ranges
    when long enough; the other ids are left for one ``$in``."""
    ranges: list[tuple[int, int]] = []
    scattered: list[int] = []
    run = [wanted[0]]
    for value in wanted[1:]:
        if (value - run[-1]) * density <= RANGE_SLACK:
            run.append(value)
            continue
        _settle(run, ranges, scattered)
        run = [value]
    _settle(run, ranges, scattered)
    return ranges, scattered


def _settle(run: list[int], ranges: list[tuple[int, int]], scattered: list[int]) -> None:
    if len(run) >= RANGE_IDS:
        ranges.append((run[0], run[-1]))
    else:
        scattered.extend(run)
