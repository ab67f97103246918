"""The journal: what a machine meant to write when MongoDB refused it.

The design document says of the ``...ErrorLogged`` states: "the response should have gotten written
to Mongo but did not. Pull these from logs and write to Mongo." So each entry is one structured JSON
log line (marked, so it can be found in an application log) and, when a path is configured, one line
appended to a JSONL file and fsynced before the machine goes on. ``replay`` applies entries
idempotently: replaying twice changes what replaying once did, and nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import attrs

from . import metrics
from .logs import fields
from .records import ProfileWrite, Transition, iso, utcnow

log = logging.getLogger("crm_states.journal")

#: Marks a journal entry inside an application log line: ``... CRM_STATES_JOURNAL {json}``.
MARKER = "CRM_STATES_JOURNAL "
VERSION = 1


@attrs.frozen
class JournalEntry:
    """A DB-failure state reached: the transitions that may be missing from Mongo and the intended
    profile write. ``persisted`` says whether the transitions themselves reached Mongo."""

    profile_id: int
    machine: str
    transitions: tuple[Transition, ...]
    write: ProfileWrite | None
    error: str
    persisted: bool
    entry_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        return {
            "journal": VERSION,
            "entry_id": self.entry_id,
            "at": iso(utcnow()),
            "profile_id": self.profile_id,
            "machine": self.machine,
            "transitions": [t.to_json() for t in self.transitions],
            "write": self.write.to_doc() if self.write else None,
            "error": self.error,
            "persisted": self.persisted,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JournalEntry:
        if doc.get("journal") != VERSION:
            raise ValueError(f"not a journal entry of version {VERSION}")
        profile_id = doc["profile_id"]
        if not isinstance(profile_id, int) or isinstance(profile_id, bool):
            raise ValueError(f"profile_id must be an int, got {profile_id!r}")
        return cls(
            profile_id=profile_id,
            machine=str(doc["machine"]),
            transitions=tuple(Transition.from_json(t) for t in doc.get("transitions") or ()),
            write=ProfileWrite.from_doc(doc.get("write")),
            error=str(doc.get("error", "")),
            persisted=bool(doc.get("persisted")),
            entry_id=str(doc["entry_id"]),
        )


class Journal:
    """Writes entries to the log and, with a ``path``, durably to an append-only JSONL file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def record(self, entry: JournalEntry) -> None:
        line = json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True)
        state = entry.transitions[-1].dest if entry.transitions else None
        log.error("%s%s", MARKER, line, extra=fields(machine=entry.machine, state=state, profile_id=entry.profile_id,
                                                     kind="journal", outcome="journaled", entry_id=entry.entry_id))
        metrics.journal_entry(entry.machine, state or "")
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)


@attrs.define
class ReadReport:
    """What reading a journal or a log found."""

    entries: int = 0
    skipped_lines: int = 0


def read_entries(lines: Iterable[str], report: ReadReport | None = None) -> Iterator[JournalEntry]:
    """Journal entries from JSONL lines or from raw application log lines carrying ``MARKER``.
    Lines that are neither are skipped and counted in ``report``."""
    report = report if report is not None else ReadReport()
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            entry = JournalEntry.from_json(_entry_doc(text))
        except (ValueError, KeyError, TypeError, AttributeError):
            report.skipped_lines += 1
            continue
        report.entries += 1
        yield entry


def _entry_doc(text: str) -> Any:
    """The JSON of a journal line, of a plain log line carrying ``MARKER``, or of a JSON log line (structlog's
    rendering of the library's records) whose message carries it."""
    if MARKER not in text:
        return json.loads(text)
    try:
        return json.loads(text.split(MARKER, 1)[1])
    except ValueError:
        line = json.loads(text)  # a JSON log line: the entry is inside one of its string values
    for value in line.values() if isinstance(line, dict) else ():
        if isinstance(value, str) and MARKER in value:
            return json.loads(value.split(MARKER, 1)[1])
    raise ValueError("no journal entry in this line")


class JournalTarget(Protocol):
    """Where entries are applied: the store's ``apply_journaled``."""

    def apply_journaled(self, profile_id: int, machine: str, transitions: Any, write: Any) -> bool: ...


@attrs.define
class ReplayReport:
    entries: int = 0
    applied: int = 0
    unchanged: int = 0
    skipped_lines: int = 0
    failed: list[tuple[str, str]] = attrs.field(factory=list)


def replay(target: JournalTarget, lines: Iterable[str]) -> ReplayReport:
    """Apply every journal entry in ``lines`` (a JSONL journal or an application log) to ``target``."""
    read = ReadReport()
    report = ReplayReport()
    for entry in read_entries(lines, read):
        try:
            changed = target.apply_journaled(entry.profile_id, entry.machine, entry.transitions, entry.write)
        except Exception as exc:  # one bad entry must not stop the others; it is reported
            report.failed.append((entry.entry_id, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        if changed:
            report.applied += 1
        else:
            report.unchanged += 1
    report.entries = read.entries
    report.skipped_lines = read.skipped_lines
    return report


def replay_file(target: JournalTarget, path: str | Path) -> ReplayReport:
    with open(path, encoding="utf-8", errors="replace") as lines:
        return replay(target, lines)
