"""The profiles now in one state, read for a person: ``crm-states report --state S --csv FILE`` streams them
into a CSV, and the HTML report lists the ones waiting longest. Both join our ``crm_positions`` with Sefaria's
``profiles`` batch by batch (one ``$in`` read each), and a profile Sefaria has not created still gets its row.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from pymongo.database import Database

from .records import iso
from .store import Store

CSV_COLUMNS = ("id", "nationbuilder_id", "email", "first_name", "last_name", "sf_app_user_id", "last_crm_log", "since")


def export_csv(db: Database, machine: str, state: str, out: TextIO, *, batch_size: int = 1000) -> int:
    """Stream the profiles of ``machine`` now in ``state`` (oldest first) into ``out`` as CSV; returns the
    number of profiles written. A profile Sefaria has not created (or deleted) still gets its row."""
    store = Store(db)
    projection = {"_id": 0, "id": 1, "nationbuilder_id": 1, "email": 1, "first_name": 1, "last_name": 1,
                  "sf_app_user_id": 1, "CrmLog": {"$slice": -1}}
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for rows in _batches(store.in_state(machine, state), batch_size):
        profiles = {p["id"]: p for p in store.profiles.find({"id": {"$in": [r["id"] for r in rows]}}, projection)}
        for row in rows:
            profile = profiles.get(row["id"], {})
            writer.writerow([_cell(row["id"]), _cell(profile.get("nationbuilder_id")), _cell(profile.get("email")),
                             _cell(profile.get("first_name")), _cell(profile.get("last_name")),
                             _cell(profile.get("sf_app_user_id")), _cell(_last_line(profile, row)),
                             _cell(row.get("at"))])
            n += 1
    return n


def first_in_state(db: Database, machine: str, state: str, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` profiles longest in ``state`` (oldest first), each ``{id, last_crm_log, since}``: what the
    HTML report shows of a failure state. ``since`` is a datetime (or None), ``last_crm_log`` a string or None."""
    if limit < 1:  # pymongo reads a limit of 0 as "no limit"
        raise ValueError(f"limit must be at least 1, got {limit}")
    store = Store(db)
    rows = list(store.in_state(machine, state, limit=limit))
    profiles = {p["id"]: p for p in store.profiles.find({"id": {"$in": [r["id"] for r in rows]}},
                                                        {"_id": 0, "id": 1, "CrmLog": {"$slice": -1}})}
    return [{"id": r["id"], "last_crm_log": _last_line(profiles.get(r["id"], {}), r), "since": r.get("at")}
            for r in rows]


def _last_line(profile: Mapping[str, Any], row: Mapping[str, Any]) -> str | None:
    """The profile's last ``CrmLog`` line; where Sefaria's save erased it, the run's own error detail."""
    log = profile.get("CrmLog")
    if isinstance(log, list) and log:
        return str(log[-1])
    error = (row.get("detail") or {}).get("error")
    return str(error) if error else None


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return iso(value)
    return str(value)
