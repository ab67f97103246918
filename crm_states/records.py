"""Small frozen values passed between the engine, the store and the journal."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

START = "[*]"
#: How many ``CrmLog`` lines one machine keeps per profile in its record of what the profile should hold.
MAX_CRM_LOG_LINES = 20


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


_LOG_LINE = re.compile(r"^(?P<code>[A-Za-z][A-Za-z0-9_]*)-(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)"
                       r"(?:: (?P<message>.*))?$", re.S)


def finding_of(line: str) -> tuple[str, str | None]:
    """What a ``CrmLog`` line says, without when: ``(code, message)``. Two lines with one finding are the
    same news at two times; a profile keeps only the newest. A line not in our format is its own finding."""
    m = _LOG_LINE.match(line)
    return (m["code"], m["message"]) if m else (line, None)


def merge_crm_log(lines: Iterable[str], new: Iterable[str], limit: int = MAX_CRM_LOG_LINES) -> tuple[str, ...]:
    """``lines`` plus ``new``, one line per finding (the newest: ISO times sort as text), newest last,
    at most ``limit``."""
    newest: dict[tuple[str, str | None], str] = {}
    for line in [*lines, *new]:
        key = finding_of(line)
        if key not in newest or _stamp(line) >= _stamp(newest[key]):
            newest[key] = line
    return tuple(sorted(newest.values(), key=_stamp)[-limit:])


def is_newest(line: str, lines: Iterable[str]) -> bool:
    """Whether no line of ``lines`` says the same finding later than ``line``."""
    finding, stamp = finding_of(line), _stamp(line)
    return all(_stamp(other) <= stamp for other in lines if finding_of(other) == finding)


def _stamp(line: str) -> str:
    m = _LOG_LINE.match(line)
    return m["at"] if m else ""


@attrs.frozen
class ProfileWrite:
    """The data a transition writes to the profile together with its state: fields to set, fields to remove
    (``unset``) and at most one ``CrmLog`` line. ``guard``: profile fields the run read its inputs from (the
    nationbuilder_id it looked up); the write, and the outcome with it, is committed only while they still
    hold these values, and the data recorded is tied to them (``ProfileData.guard``).
    ``expect``: a compare-and-set on fields the write itself moves, ``{field: value read}`` (``None``: absent):
    the write lands only while each still holds the value read or already the value this write gives it (its
    ``set`` value; absent when in ``unset``), so writing it again after a crash is a no-op, never a refusal,
    and a value someone else wrote meanwhile is never overwritten. Unlike the guard, no basis of the data.
    ``requires_profile``: without a profile the outcome means nothing (a validation), so it is not
    committed; a signup's outcome is committed anyway and reaches the profile once Sefaria creates it."""

    set: Mapping[str, Any] = attrs.field(factory=dict)
    crm_log: str | None = None
    guard: Mapping[str, Any] = attrs.field(factory=dict)
    requires_profile: bool = False
    unset: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    expect: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def empty(self) -> bool:
        return not self.set and not self.crm_log and not self.unset

    def target(self, field: str) -> Any:
        """The value this write leaves in ``field``: its ``set`` value, ``None`` (absent) when unset, else
        the value expected."""
        if field in self.unset:
            return None
        return self.set.get(field, self.expect.get(field))

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"set": dict(self.set), "crm_log": self.crm_log}
        if self.guard:
            doc["guard"] = dict(self.guard)
        if self.requires_profile:
            doc["requires_profile"] = True
        if self.unset:
            doc["unset"] = list(self.unset)
        if self.expect:
            doc["expect"] = dict(self.expect)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> ProfileWrite | None:
        if not doc:
            return None
        return cls(set=dict(doc.get("set") or {}), crm_log=doc.get("crm_log"), guard=dict(doc.get("guard") or {}),
                   requires_profile=bool(doc.get("requires_profile")), unset=tuple(doc.get("unset") or ()),
                   expect=dict(doc.get("expect") or {}))


@attrs.frozen
class ProfileData:
    """What the finished runs of one machine mean a profile document to hold: field values (with when each
    was set, so the newest of several machines wins), the guard they were computed under, and the
    ``CrmLog`` lines. Sefaria replaces whole profile documents with stale copies; ``heal`` writes this back.
    ``removed``: fields the machine removed on purpose, with the value they held (the retirement of
    nationbuilder_id): records computed from that value still stand on it."""

    fields: Mapping[str, Any] = attrs.field(factory=dict)
    set_at: Mapping[str, dt.datetime] = attrs.field(factory=dict)
    guard: Mapping[str, Any] = attrs.field(factory=dict)
    crm_log: tuple[str, ...] = ()
    removed: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def empty(self) -> bool:
        return not self.fields and not self.crm_log

    def with_write(self, write: ProfileWrite, at: dt.datetime) -> ProfileData:
        """This record after ``write`` at ``at``. A write computed from other inputs (another guard: the
        nationbuilder_id changed) starts the fields afresh: values learnt from the old inputs no longer hold.
        A field the write removes is no longer the machine's to hold. ``CrmLog`` lines are history and stay."""
        same_basis = not write.guard or dict(write.guard) == dict(self.guard)
        fields = {name: value for name, value in {**(self.fields if same_basis else {}), **write.set}.items()
                  if name not in write.unset}
        set_at = {name: when for name, when in {**(self.set_at if same_basis else {}),
                                                **{name: at for name in write.set}}.items() if name in fields}
        lines = merge_crm_log(self.crm_log, [write.crm_log] if write.crm_log else [])
        guard = dict(write.guard) if write.guard else dict(self.guard)
        removed = {**{k: v for k, v in self.removed.items() if k not in write.set},
                   **{name: write.expect.get(name) for name in write.unset}}
        return ProfileData(fields, set_at, guard, lines, removed)

    def to_doc(self) -> dict[str, Any]:
        doc = {"fields": dict(self.fields), "set_at": dict(self.set_at), "guard": dict(self.guard),
               "crm_log": list(self.crm_log)}
        return {**doc, "removed": dict(self.removed)} if self.removed else doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> ProfileData:
        if not doc:
            return cls()
        return cls(dict(doc.get("fields") or {}), {k: _aware(v) for k, v in (doc.get("set_at") or {}).items()},
                   dict(doc.get("guard") or {}), tuple(doc.get("crm_log") or ()), dict(doc.get("removed") or {}))


@attrs.frozen
class Claim:
    """A driver's fenced hold on a run at a write-ahead state: ``by`` (the run token) may send the CRM write;
    ``at`` is the database's clock when it was taken, ``seconds`` how long it lasts and ``owner`` the
    process holding it (``owners.Holder.key``). Nobody else sends."""

    by: str
    at: dt.datetime | None
    seconds: float
    owner: str = ""

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Claim | None:
        if not doc or not doc.get("by"):
            return None
        at = doc.get("at")
        return cls(str(doc["by"]), _aware(at) if isinstance(at, dt.datetime) else None, float(doc.get("seconds") or 0),
                   str(doc.get("owner") or ""))


@attrs.frozen
class Position:
    """Where a profile stands in one machine, as persisted. ``seq`` counts every transition the profile
    ever took in that machine (across runs), so the next transition's ``seq`` is a claim on the slot."""

    state: str | None = None
    run_id: str | None = None
    seq: int = 0
    detail: Mapping[str, Any] = attrs.field(factory=dict)
    at: dt.datetime | None = None
    data: ProfileData = attrs.field(factory=ProfileData)
    claim: Claim | None = None
    last_by: str = ""


@attrs.frozen
class Transition:
    """One edge a profile took: the unit of history."""

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

    def to_doc(self) -> dict[str, Any]:
        """The history entry: everything but the machine and profile, which its position document names."""
        doc = {"run_id": self.run_id, "seq": self.seq, "source": self.source, "dest": self.dest,
               "trigger": self.trigger, "at": self.at, "detail": dict(self.detail), "by": self.by}
        if self.write is not None:
            doc["write"] = self.write.to_doc()
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], *, profile_id: int | None = None,
                 machine: str | None = None) -> Transition:
        return cls(
            profile_id=doc["profile_id"] if profile_id is None else profile_id,
            machine=doc["machine"] if machine is None else machine,
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
        doc["profile_id"] = self.profile_id
        doc["machine"] = self.machine
        doc["at"] = iso(self.at)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Transition:
        return cls.from_doc({**doc, "at": dt.datetime.fromisoformat(str(doc["at"]).replace("Z", "+00:00"))})


def new_run_id(profile_id: int, first_seq: int) -> str:
    """A run is named by its profile and first seq: writers starting a run from the same position name it
    alike, so a run id never depends on who drives it."""
    return f"{profile_id}-{first_seq}"


def _aware(at: dt.datetime) -> dt.datetime:
    """pymongo hands back naive UTC datetimes unless tz_aware; make them aware either way."""
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
