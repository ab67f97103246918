"""Expiring leases on ranges of profile ids, so several batch runners on one database never work on
the same profiles at once.

Ranges have a fixed width per machine and chunk size, stored once in ``crm_leases`` (the first runner
picks it from the id density), so every runner with that chunk size cuts the id space the same way. A lease is one document per range;
it expires, and a lease whose owner process is gone from this host is taken over at once, so a runner
killed with SIGKILL and started again does not wait for the expiry.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import uuid

import attrs
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from .records import utcnow

LEASES = "crm_leases"
log = logging.getLogger("crm_states.leases")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.frozen
class Owner:
    host: str
    pid: int
    token: str

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    @property
    def key(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    @staticmethod
    def gone(key: str) -> bool:
        """True when ``key`` names a process on this host that no longer runs."""
        host, _, rest = key.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


class RangeLeases:
    """Leases on id ranges ``[k * width, (k + 1) * width)`` of one machine."""

    def __init__(self, collection: Collection, machine: str, *, seconds: float = 300.0,
                 owner: Owner | None = None) -> None:
        self.collection = collection
        self.machine = machine
        self.seconds = seconds
        self.owner = owner or Owner.me()
        self.prefix = machine

    def agree_ranges(self, chunk_size: int, base: int, width: int) -> tuple[int, int]:
        """``(base, width)`` of the ranges every runner of this machine and chunk size uses: range k is
        ``[base + k * width, base + (k + 1) * width)``. The first runner's proposal wins."""
        key = f"{self.machine}:ranges:{chunk_size}"
        try:
            self.collection.insert_one({"_id": key, "base": int(base), "width": max(1, int(width))})
        except DuplicateKeyError:
            pass
        doc = self.collection.find_one({"_id": key}) or {"base": base, "width": max(1, width)}
        self.prefix = f"{self.machine}:{doc['base']}:{doc['width']}"
        return int(doc["base"]), int(doc["width"])

    def claim(self, index: int) -> bool:
        """Take range ``index`` if it is free, expired, ours, or held by a dead process here."""
        key = f"{self.prefix}:{index}"
        now = utcnow()
        until = now + dt.timedelta(seconds=self.seconds)
        mine = {"owner": self.owner.key, "until": until}
        try:
            self.collection.insert_one({"_id": key, **mine})
            return True
        except DuplicateKeyError:
            pass
        current = self.collection.find_one({"_id": key}) or {}
        holder = current.get("owner", "")
        expired = current.get("until") is not None and _aware(current["until"]) < now
        if holder != self.owner.key and not expired and not Owner.gone(holder):
            return False
        result = self.collection.update_one({"_id": key, "owner": holder}, {"$set": mine})
        return result.modified_count == 1

    def prune(self) -> int:
        """Delete the leases of these ranges that expired or whose owner died on this host (a runner
        killed with SIGKILL never releases them); returns how many. They block nothing, but they would
        pile up in ``crm_leases`` and look like work in progress."""
        now = utcnow()
        stale = [(doc["_id"], doc["owner"])
                 for doc in self.collection.find({"_id": {"$regex": f"^{re.escape(self.prefix)}:"},
                                                  "owner": {"$exists": True}})
                 if (doc.get("until") is not None and _aware(doc["until"]) < now) or Owner.gone(doc["owner"])]
        for key, holder in stale:  # only if the same holder still has it: a takeover meanwhile is kept
            self.collection.delete_one({"_id": key, "owner": holder})
        return len(stale)

    def release(self, index: int) -> None:
        """Give the range back. If the database cannot be reached the lease is left to expire (or to be
        pruned): the range's work is done either way, and failing here would lose nothing but the run."""
        try:
            self.collection.delete_one({"_id": f"{self.prefix}:{index}", "owner": self.owner.key})
        except PyMongoError as exc:
            log.warning("could not release lease %s:%s (%s); it expires in %gs", self.prefix, index,
                        type(exc).__name__, self.seconds)


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
