"""The floor: the database writes ``validate-nb`` makes for N profiles, done with plain pymongo bulk calls and
no engine, no CRM, no reads. What the runner costs above it is ours to drive down.

Per chunk of profiles, as the store commits a validated chunk (``crm_states/store/core.py``):

1. one unordered bulk of ``profiles`` updates, each guarded by the ``nationbuilder_id`` it was computed from:
   ``$set sf_app_user_id`` for a found profile, ``$addToSet`` of its ``NbProfileNotFoundInSalesforce`` line
   otherwise;
2. one unordered bulk of ``crm_positions`` upserts with ``j: true``, each filtered on ``seq: 0`` and carrying
   the position, its data record and the four-transition history
   ([*] -> NotChecked -> RequestedContact -> OkResponse|NotFound -> Wrote...), document for document the
   shape the store writes.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient, UpdateOne
from pymongo.database import Database
from pymongo.write_concern import WriteConcern

MACHINE = "nb_profile_validation"
PATH_FOUND = ["NotChecked", "RequestedContact", "OkResponse", "WroteSalesforceAppUserUid"]
PATH_NOT_FOUND = ["NotChecked", "RequestedContact", "NotFound", "WroteNotFound"]
TRIGGERS = ["start", "send_http_request_to_salesforce", "on_200_ok", "db_write_success"]


def _iso(at: dt.datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def chunk_writes(ids: list[int], nb_id: Callable[[int], int], app_user: Callable[[int], str | None],
                 token: str) -> tuple[list[UpdateOne], list[UpdateOne]]:
    """The two bulks of one chunk."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    profiles, positions = [], []
    for pid in ids:
        user = app_user(pid)
        path = PATH_FOUND if user else PATH_NOT_FOUND
        line = None if user else f"NbProfileNotFoundInSalesforce-{_iso(now)}"
        detail = {"nationbuilder_id": nb_id(pid), "input": nb_id(pid), "status": 200 if user else 404,
                  **({"app_user_id": user} if user else {})}
        write = {"set": {"sf_app_user_id": user} if user else {}, "crm_log": line,
                 "guard": {"nationbuilder_id": nb_id(pid)}, "requires_profile": True}
        history: list[dict[str, Any]] = []
        for seq, (source, dest, trigger) in enumerate(zip(["[*]", *path[:-1]], path, TRIGGERS), start=1):
            history.append({"run_id": f"{pid}-1", "seq": seq, "source": source, "dest": dest, "trigger": trigger,
                            "at": now, "detail": detail if seq > 1 else {}, "by": token,
                            **({"write": write} if seq == 4 else {})})
        profiles.append(UpdateOne({"id": pid, "nationbuilder_id": nb_id(pid)},
                                  {"$set": {"sf_app_user_id": user}} if user else {"$addToSet": {"CrmLog": line}}))
        data = {"fields": {"sf_app_user_id": user} if user else {}, "set_at": {"sf_app_user_id": now} if user else {},
                "guard": {"nationbuilder_id": nb_id(pid)}, "crm_log": [] if user else [line]}
        positions.append(UpdateOne(
            {"_id": f"{MACHINE}:{pid}", "seq": 0},
            {"$set": {"machine": MACHINE, "profile_id": pid, "state": path[-1], "run_id": f"{pid}-1", "seq": 4,
                      "at": now, "detail": detail, "last_by": token, "data": data},
             "$push": {"history": {"$each": history}}}, upsert=True))
    return profiles, positions


def run_floor(db: Database, ids: list[int], chunk_size: int, nb_id: Callable[[int], int],
              app_user: Callable[[int], str | None]) -> float:
    """Seconds to make the writes of ``ids`` in chunks of ``chunk_size`` (the profiles must exist)."""
    _indexes(db)
    started = time.perf_counter()
    for start in range(0, len(ids), chunk_size):
        _write_chunk(db, ids[start:start + chunk_size], nb_id, app_user)
    return time.perf_counter() - started


def run_floor_parallel(url: str, db_name: str, ids: list[int], chunk_size: int, writers: int,
                       nb_id: Callable[[int], int], app_user: Callable[[int], str | None]) -> float:
    """``run_floor`` from ``writers`` forked processes, each with its own client, chunk k to writer k mod W."""
    with MongoClient(url) as client:
        _indexes(client[db_name])
    global _JOB
    _JOB = (url, db_name, ids, chunk_size, writers, nb_id, app_user)  # inherited by the forked writers
    context = multiprocessing.get_context("fork")
    started = time.perf_counter()
    with context.Pool(writers) as pool:
        pool.map(_writer, range(writers))
    return time.perf_counter() - started


_JOB: tuple[Any, ...] = ()


def _writer(index: int) -> None:
    url, db_name, ids, chunk_size, writers, nb_id, app_user = _JOB
    with MongoClient(url) as client:
        for start in range(index * chunk_size, len(ids), writers * chunk_size):
            _write_chunk(client[db_name], ids[start:start + chunk_size], nb_id, app_user)


def _indexes(db: Database) -> None:
    db.crm_positions.create_index([("machine", 1), ("state", 1), ("at", 1)])
    db.crm_positions.create_index([("machine", 1), ("profile_id", 1)])


def _write_chunk(db: Database, ids: list[int], nb_id: Callable[[int], int],
                 app_user: Callable[[int], str | None]) -> None:
    profile_ops, position_ops = chunk_writes(ids, nb_id, app_user, "floor")
    db.profiles.bulk_write(profile_ops, ordered=False)
    db.crm_positions.with_options(write_concern=WriteConcern(j=True)).bulk_write(position_ops, ordered=False)
