"""Small frozen values passed between the engine, the store and the journal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import attrs

START = "[*]"


def utcnow() -> dt.datetime:
    """UTC now, truncated to milliseconds: what BSON dates keep, so a value reads back equal."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def iso(at: dt.datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as used in ``CrmLog`` lines and journal entries."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def crm_log_line(code: str, at: dt.datetime, message: str | None = None) -> str:
    """The design document's ``CrmLog`` entry: ``"<Code>-<ISO-8601 UTC>"`` then ``": <message>"``."""
    line = f"{code}-{iso(at)}"
    return f"{line}: {message}" if message else line


@attrs.frozen
class Position:
    """Where a profile stands in one machine, as persisted. ``seq`` counts every transition the profile
    ever took in that machine (across runs), so the next transition's ``seq`` is a claim on the slot."""

    state: str | None = None
    run_id: str | None = None
    seq: int = 0
    detail: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ProfileWrite:
    """The data a transition writes to the profile together with its state: fields to set and at most
    one ``CrmLog`` line. Applied with ``$set``/``$addToSet`` so applying twice equals applying once."""

    set: Mapping[str, Any] = attrs.field(factory=dict)
    crm_log: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"set": dict(self.set), "crm_log": self.crm_log}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> ProfileWrite | None:
        if not doc:
            return None
        return cls(set=dict(doc.get("set") or {}), crm_log=doc.get("crm_log"))


@attrs.frozen
class Transition:
    """One edge a profile took: the unit of history, one document in ``crm_transitions``."""

    profile_id: int
    machine: str
    run_id: str
    seq: int
    source: str
    dest: str
    trigger: str
    at: dt.datetime
    detail: Mapping[str, Any] = attrs.field(factory=dict)
    write: ProfileWrite | None = None
    by: str = ""

    @property
    def key(self) -> str:
        """The document's ``_id``: the natural key (machine, profile_id, seq, run_id), so its uniqueness
        needs no index beyond ``_id``."""
        return transition_key(self.machine, self.profile_id, self.seq, self.run_id)

    def to_doc(self) -> dict[str, Any]:
        doc = {
            "_id": self.key,
            "profile_id": self.profile_id,
            "machine": self.machine,
            "run_id": self.run_id,
            "seq": self.seq,
            "source": self.source,
            "dest": self.dest,
            "trigger": self.trigger,
            "at": self.at,
            "detail": dict(self.detail),
            "by": self.by,
        }
        if self.write is not None:
            doc["write"] = self.write.to_doc()
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Transition:
        return cls(
            profile_id=doc["profile_id"],
            machine=doc["machine"],
            run_id=doc["run_id"],
            seq=doc["seq"],
            source=doc["source"],
            dest=doc["dest"],
            trigger=doc["trigger"],
            at=_aware(doc["at"]),
            detail=dict(doc.get("detail") or {}),
            write=ProfileWrite.from_doc(doc.get("write")),
            by=doc.get("by", ""),
        )

    def to_json(self) -> dict[str, Any]:
        doc = self.to_doc()
        del doc["_id"]
        doc["at"] = iso(self.at)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Transition:
        return cls.from_doc({**doc, "at": dt.datetime.fromisoformat(str(doc["at"]).replace("Z", "+00:00"))})


def new_run_id(profile_id: int, first_seq: int) -> str:
    """A run is named by its profile and first seq: writers starting a run from the same position
    name it alike, which is what makes the store's unique key a compare-and-set."""
    return f"{profile_id}-{first_seq}"


def transition_key(machine: str, profile_id: int, seq: int, run_id: str) -> str:
    return f"{history_prefix(machine, profile_id)}{seq:010d}:{run_id}"


def history_prefix(machine: str, profile_id: int) -> str:
    """The ``_id`` prefix shared by every transition of one profile in one machine."""
    return f"{machine}:{profile_id}:"


def _aware(at: dt.datetime) -> dt.datetime:
    """pymongo hands back naive UTC datetimes unless tz_aware; make them aware either way."""
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
