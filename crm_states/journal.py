"""The journal: what a machine meant to write when MongoDB refused it.

The design document says of the ``...ErrorLogged`` states: "the response should have gotten written
to Mongo but did not. Pull these from logs and write to Mongo." So each entry is one structured JSON
log line (marked, so it can be found in an application log) and, when a path is configured, one line
appended to a JSONL file and fsynced before the machine goes on. ``replay`` applies entries
idempotently: replaying twice changes what replaying once did, and nothing more.

An acknowledged entry is never lost: each append starts on a fresh line (a crash mid-append leaves a torn
line; the next append ends it first), finishes short writes and fsyncs before returning. The reader
recovers every complete entry, also one glued to a torn line by an older writer (it looks for JSON objects
where a line's text breaks off), and counts and names the lines it could not read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import attrs

from . import metrics
from .logs import fields
from .records import ProfileWrite, Transition, iso, utcnow

log = logging.getLogger("crm_states.journal")

#: Marks a journal entry inside an application log line: ``... CRM_STATES_JOURNAL {json}``.
MARKER = "CRM_STATES_JOURNAL "
VERSION = 1
#: Longer lines are not read (a binary file without newlines must not fill memory); entries are a few KB.
MAX_LINE = 1 << 20
#: How many unreadable lines a report names (all are counted).
MAX_PROBLEMS = 20
#: What ``file_lines`` gives for a line longer than ``MAX_LINE`` (NUL: never part of a valid line).
LINE_TOO_LONG = b"\x00(a line longer than 1 MiB)\n"

#: ``os.write``'s shape: may write fewer bytes than given and returns how many it wrote.
Writer = Callable[[int, bytes], int]


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
    """Writes entries to the log and, with a ``path``, durably to an append-only JSONL file.

    ``write`` is the system call that appends (``os.write``; tests inject one that writes short)."""

    def __init__(self, path: str | Path | None = None, *, write: Writer = os.write) -> None:
        self.path = Path(path) if path else None
        self._write = write
        self._lock = threading.Lock()

    def record(self, entry: JournalEntry) -> None:
        """Log the entry and append it to the file; returns only once it is on disk. An ``OSError`` means it
        was not journaled: the bytes it wrote are cut off again where the file allows."""
        line = json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True)
        state = entry.transitions[-1].dest if entry.transitions else None
        log.error("%s%s", MARKER, line, extra=fields(machine=entry.machine, state=state, profile_id=entry.profile_id,
                                                     kind="journal", outcome="journaled", entry_id=entry.entry_id))
        metrics.journal_entry(entry.machine, state or "")
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # appenders in other processes wait: the fresh-line check holds
                self._append(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)  # also releases the lock
            if created:
                _fsync_dir(self.path.parent)

    def _append(self, fd: int, data: bytes) -> None:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a crash cut the last append short: end its line so it cannot swallow this one
        try:
            while data:
                written = self._write(fd, data)
                if written <= 0:
                    raise OSError(errno.EIO, f"journal write to {self.path} wrote nothing")
                data = data[written:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)  # leave no torn line behind when the file lets us
            except OSError:
                pass
            raise


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@attrs.define
class ReadReport:
    """What reading a journal or a log found. ``skipped_lines`` are lines that are not journal entries (an
    application log's other lines); ``torn_lines`` hold an entry cut short (a crash mid-append) or stray
    bytes; ``invalid_entries`` are complete entries that do not validate. ``problems`` names the first
    ``MAX_PROBLEMS`` of the last two as ``(line number, reason)``."""

    entries: int = 0
    skipped_lines: int = 0
    torn_lines: int = 0
    invalid_entries: int = 0
    problems: list[tuple[int, str]] = attrs.field(factory=list)

    @property
    def unreadable(self) -> int:
        return self.torn_lines + self.invalid_entries

    def problem(self, line: int, reason: str, *, torn: bool) -> None:
        if torn:
            self.torn_lines += 1
        else:
            self.invalid_entries += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append((line, reason))


_DECODER = json.JSONDecoder()


def _is_entry(doc: Any) -> bool:
    return isinstance(doc, dict) and "journal" in doc and "entry_id" in doc


def _objects(text: str) -> tuple[list[Any], bool]:
    """The JSON objects of a JSONL line, and whether part of it is no complete object (torn or stray).
    After a break it tries each later ``{``, so an entry glued to a torn one is still found."""
    found: list[Any] = []
    torn = False
    pos = end = 0
    while (start := text.find("{", pos)) >= 0:
        torn = torn or bool(text[end:start].strip(" \t\r\n"))
        try:
            doc, end = _DECODER.raw_decode(text, start)
        except ValueError:
            torn, pos, end = True, start + 1, start + 1
            continue
        if _is_entry(doc):
            found.append(doc)
        elif not torn and not text[:start].strip(" \t\r\n"):  # the line's own object: a JSON-formatted log
            more, broken = _marked_values(doc)                   # line may carry a marked entry as text
            found.extend(more)
            torn = torn or broken
        pos = end
    torn = torn or bool(text[end:].strip(" \t\r\n"))
    return found, torn


def _marked_values(doc: dict[str, Any]) -> tuple[list[Any], bool]:
    found: list[Any] = []
    torn = False
    for value in doc.values():
        if isinstance(value, str) and MARKER in value:
            more, broken = _after_markers(value)
            found.extend(more)
            torn = torn or broken
    return found, torn


def _after_markers(text: str) -> tuple[list[Any], bool]:
    """The JSON value after each ``MARKER`` of an application log line; a marker inside a decoded entry's
    text is part of that entry, not a new one."""
    found: list[Any] = []
    torn = False
    pos = 0
    while (mark := text.find(MARKER, pos)) >= 0:
        start = mark + len(MARKER)
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            if not text.startswith("{", start):
                raise ValueError("no JSON object after the marker")
            doc, pos = _DECODER.raw_decode(text, start)
        except ValueError:
            torn, pos = True, start
            continue
        found.append(doc)
    return found, torn


def _read_line(number: int, raw: str | bytes, report: ReadReport,
               machines: Collection[str] | None) -> list[JournalEntry]:
    if raw == LINE_TOO_LONG:
        report.problem(number, "longer than 1 MiB: not read", torn=True)
        return []
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("{") or "\x00" in text:
        docs, torn = _objects(text)
    elif MARKER in text:
        docs, torn = _after_markers(text)
    else:
        report.skipped_lines += 1
        return []
    if not docs and not torn:
        report.skipped_lines += 1  # JSON that is not a journal entry (another program's line)
        return []
    if torn:
        what = ("NUL bytes (binary data, or zeros a crash left)" if "\x00" in text
                else "an entry cut short (a crash mid-append?)")
        report.problem(number, f"torn: {what}" + (f"; {len(docs)} complete entries recovered from it" if docs else ""),
                       torn=True)
    entries = []
    for doc in docs:
        try:
            entry = JournalEntry.from_json(doc)
            if machines is not None and entry.machine not in machines:
                raise ValueError(f"unknown machine {entry.machine[:60]!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            report.problem(number, f"invalid entry: {reason[:120]}", torn=False)
            continue
        report.entries += 1
        entries.append(entry)
    return entries


def read_entries(lines: Iterable[str | bytes], report: ReadReport | None = None, *,
                 machines: Collection[str] | None = None) -> Iterator[JournalEntry]:
    """Journal entries from JSONL lines or from raw application log lines carrying ``MARKER``. Other lines
    are counted in ``report``; torn lines and invalid entries (with ``machines``: also an entry naming a
    machine not in it) are counted and named there."""
    report = report if report is not None else ReadReport()
    for number, line in enumerate(lines, 1):
        yield from _read_line(number, line, report, machines)


def file_lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file; a line longer than ``MAX_LINE`` comes as ``LINE_TOO_LONG``."""
    while line := f.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield LINE_TOO_LONG
            continue
        yield line


def read_file(path: str | Path, report: ReadReport | None = None, *,
              machines: Collection[str] | None = None) -> Iterator[JournalEntry]:
    """``read_entries`` over a journal file or an application log."""
    with open(path, "rb") as f:
        yield from read_entries(file_lines(f), report, machines=machines)


class JournalTarget(Protocol):
    """Where entries are applied: the store's ``apply_journaled``."""

    def apply_journaled(self, profile_id: int, machine: str, transitions: Any, write: Any) -> bool: ...


@attrs.define
class ReplayReport:
    """What a replay did; ``read`` says what reading found (torn lines, invalid entries, other lines).
    ``profiles`` holds, per machine, the profiles whose entries were applied or found already applied."""

    entries: int = 0
    applied: int = 0
    unchanged: int = 0
    skipped_lines: int = 0
    failed: list[tuple[str, str]] = attrs.field(factory=list)
    read: ReadReport = attrs.field(factory=ReadReport)
    profiles: dict[str, set[int]] = attrs.field(factory=dict)


def replay(target: JournalTarget, lines: Iterable[str | bytes], *,
           machines: Collection[str] | None = None) -> ReplayReport:
    """Apply every journal entry in ``lines`` (a JSONL journal or an application log) to ``target``."""
    report = ReplayReport()
    for entry in read_entries(lines, report.read, machines=machines):
        try:
            changed = target.apply_journaled(entry.profile_id, entry.machine, entry.transitions, entry.write)
        except Exception as exc:  # one bad entry must not stop the others; it is reported
            report.failed.append((entry.entry_id, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        report.profiles.setdefault(entry.machine, set()).add(entry.profile_id)
        if changed:
            report.applied += 1
        else:
            report.unchanged += 1
    report.entries = report.read.entries
    report.skipped_lines = report.read.skipped_lines
    return report


def replay_file(target: JournalTarget, path: str | Path, *, machines: Collection[str] | None = None) -> ReplayReport:
    with open(path, "rb") as f:
        return replay(target, file_lines(f), machines=machines)
