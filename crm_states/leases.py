"""Expiring leases on ranges of profile ids, so several batch runners on one database never work on
the same profiles at once.

Ranges have a fixed width per machine and chunk size, stored once in ``crm_leases`` (the first runner
picks it from the id density), so every runner with that chunk size cuts the id space the same way. A lease
is one document per range. Its time is the database's clock: a lease is stamped with the server's time
(``$currentDate``, ``hello.localTime``) and judged against it, so a runner whose own clock is skewed neither
steals a live lease nor keeps a dead one. A lease whose holder is provably gone (``owners``: same host, boot and PID namespace,
no such process) is taken over at once, so a runner killed with SIGKILL and started again does not wait for
the expiry; a holder on another host or in another container is waited out.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from . import owners

LEASES = "crm_leases"
log = logging.getLogger("crm_states.leases")


class RangeLeases:
    """Leases on id ranges ``[base + k * width, base + (k + 1) * width)`` of one machine."""

    def __init__(self, collection: Collection, machine: str, *, seconds: float = 300.0,
                 holder: owners.Holder | None = None) -> None:
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError(f"lease seconds must be a positive number, got {seconds!r}")
        self.collection = collection
        self.machine = machine
        self.seconds = float(seconds)
        self.holder = holder or owners.Holder.me()
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

    def _key(self, index: int) -> str:
        return f"{self.prefix}:{index}"

    def claim(self, index: int) -> bool:
        """Take range ``index`` if it is free, ours, expired on the database's clock, or held by a
        provably gone process. Every change is a compare-and-set on the lease as read."""
        key, me = self._key(index), self.holder.key
        current = self.collection.find_one({"_id": key})
        if current is None:
            try:
                self.collection.insert_one({"_id": key, "owner": me, "seconds": self.seconds, "at": self._now()})
                return True
            except DuplicateKeyError:  # another runner took it between the read and the insert
                return False
        holder = current.get("owner", "")
        if holder != me and not self._expired(current) and not owners.gone(holder):
            return False
        taken = self.collection.update_one({"_id": key, "owner": holder, "at": current.get("at")},
                                           {"$set": {"owner": me, "seconds": self.seconds},
                                            "$currentDate": {"at": True}})
        return taken.modified_count == 1

    def _now(self) -> dt.datetime:
        """The database's clock (``hello.localTime``, naive UTC as pymongo returns dates)."""
        return self.collection.database.command("hello")["localTime"]

    def _expired(self, lease: dict[str, Any]) -> bool:
        at = lease.get("at")
        return at is None or (self._now() - at).total_seconds() > float(lease.get("seconds") or 0)

    def renew(self, index: int) -> bool:
        """Extend our lease on ``index``; False when it is no longer ours (a pause outlived it and another
        runner took it): then this runner must not work on the range, nor count its profiles."""
        try:
            result = self.collection.update_one({"_id": self._key(index), "owner": self.holder.key},
                                                {"$currentDate": {"at": True}})
        except PyMongoError as exc:
            log.warning("could not renew lease %s (%s)", self._key(index), type(exc).__name__)
            return False
        return result.matched_count == 1

    def prune(self) -> int:
        """Delete the leases of these ranges that expired on the database's clock or whose holder is
        provably gone (a runner killed with SIGKILL never releases them); returns how many. They block
        nothing, but they would pile up in ``crm_leases`` and look like work in progress."""
        stale = [(doc["_id"], doc["owner"], doc.get("at"))
                 for doc in self.collection.find({"_id": {"$regex": f"^{re.escape(self.prefix)}:"},
                                                  "owner": {"$exists": True}})
                 if self._expired(doc) or owners.gone(doc["owner"])]
        removed = 0
        for key, holder, at in stale:  # only if the same holder still has it: a takeover meanwhile is kept
            removed += self.collection.delete_one({"_id": key, "owner": holder, "at": at}).deleted_count
        return removed

    def release(self, index: int) -> None:
        """Give the range back. If the database cannot be reached the lease is left to expire (or to be
        pruned): the range's work is done either way, and failing here would lose nothing but the run."""
        try:
            self.collection.delete_one({"_id": self._key(index), "owner": self.holder.key})
        except PyMongoError as exc:
            log.warning("could not release lease %s (%s); it expires in %gs", self._key(index),
                        type(exc).__name__, self.seconds)
