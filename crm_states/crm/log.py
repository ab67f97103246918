"""``CRM_TYPE=LOG``: the design document's interim migration mode, "write to log", and its loader.

While Salesforce production is being built, every CRM write is appended to a JSON-lines file instead of
being sent; ``load_log`` later replays the file to the real CRM. Each entry is one line::

    {"v": 1, "entry_id": "<uuid hex>", "method": "change_user_email",
     "args": {"crm_id": "...", "new_email": "..."}, "at": "2026-01-31T12:00:00.000000+00:00"}

Writes are durable before the method returns (append, flush, fsync; a thread lock and an ``flock`` keep
lines whole across threads and worker processes). ``add_user_to_crm`` returns ``"pending:<entry_id>"``:
a real CRM id only exists after the load, whose report maps each entry id to the id it created, and
the loader itself translates placeholders used by later entries (e.g. an email change after signup).

Reads raise ``CrmNotSupported`` (a ``CrmError``): the log knows nothing of the people already in the CRM,
and an empty answer would be taken for "no sustainers" or "not found" (Sefaria's sync demoted everyone on
a failed read).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import attrs
import requests

from ..journal import LINE_TOO_LONG, MAX_PROBLEMS, file_lines
from .base import CrmConnectionManager
from .dummy import not_supported
from .errors import CrmConfigError, CrmError, CrmLimitExceeded, CrmRejected

PENDING_PREFIX = "pending:"
_FORMAT_VERSION = 1
_NONE = type(None)

#: Each loggable method and its arguments with their JSON types: what the writer writes and the
#: loader accepts. Every argument is written, defaults included, so an entry replays alone.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "add_user_to_crm": {
        "email": str, "first_name": str, "last_name": str, "lang": str, "educator": bool,
        "external_id": (str, int, _NONE),
    },
    "change_user_email": {"crm_id": str, "new_email": str},
    "add_email_to_mailing_lists": {
        "email": str, "mailing_lists": list, "first_name": (str, _NONE), "last_name": (str, _NONE),
        "lang": str, "educator": bool,
    },
    "mark_as_spam_in_crm": {"crm_id": str},
    "mark_for_review_in_crm": {"crm_id": str},
}


class LogConnectionManager(CrmConnectionManager):
    """Appends every write to ``path`` as one fsynced JSON line; answers no reads."""

    name = "log"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def get_connection(self) -> requests.Session:
        """A plain session: the log talks to no server."""
        return requests.Session()

    def add_user_to_crm(
        self,
        email: str,
        first_name: str,
        last_name: str,
        lang: str = "en",
        educator: bool = False,
        external_id: str | int | None = None,
    ) -> str:
        """Log the create; the returned ``pending:<entry_id>`` is a placeholder, not a CRM id."""
        entry_id = self._append("add_user_to_crm", {
            "email": email, "first_name": first_name, "last_name": last_name, "lang": lang,
            "educator": bool(educator), "external_id": external_id,
        })
        return PENDING_PREFIX + entry_id

    def change_user_email(self, crm_id: str, new_email: str) -> bool:
        self._append("change_user_email", {"crm_id": crm_id, "new_email": new_email})
        return True

    def add_email_to_mailing_lists(
        self,
        email: str,
        mailing_lists: Iterable[str],
        first_name: str | None = None,
        last_name: str | None = None,
        lang: str = "en",
        educator: bool = False,
    ) -> None:
        self._append("add_email_to_mailing_lists", {
            "email": email, "mailing_lists": list(mailing_lists), "first_name": first_name,
            "last_name": last_name, "lang": lang, "educator": bool(educator),
        })

    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        self._append("mark_as_spam_in_crm", {"crm_id": crm_id})
        return True

    def mark_for_review_in_crm(self, crm_id: str) -> bool:
        self._append("mark_for_review_in_crm", {"crm_id": crm_id})
        return True

    @property
    def api_requests(self) -> int:
        """Always 0: the log sends nothing (``load_log`` later sends through the real CRM's client)."""
        return 0

    def find_crm_id(self, email: str | None = None) -> str | None:
        self.needs_email(email)
        raise _no_reads("find_crm_id")

    def get_sustainers(self) -> Iterator[str]:
        raise _no_reads("get_sustainers")

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        raise _no_reads("find_app_users_by_nationbuilder_ids")

    def _append(self, method: str, args: dict[str, Any]) -> str:
        entry_id = uuid.uuid4().hex
        entry = {"v": _FORMAT_VERSION, "entry_id": entry_id, "method": method, "args": args,
                 "at": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        try:
            line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise CrmRejected(f"{method} arguments cannot be logged: {exc}") from None
        if LogEntry.parse(line) is None:  # never write what the loader would skip as invalid
            types = {name: type(value).__name__ for name, value in args.items()}
            raise CrmRejected(f"{method} arguments do not fit the log format: {types}")
        with self._lock:
            try:
                with _open_append(self.path) as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    _write_durably(f, line)
            except OSError as exc:
                raise CrmError(f"could not append {method} to the CRM log {self.path}: {exc}") from exc
        return entry_id


def _no_reads(method: str) -> CrmError:
    return not_supported("LOG", method, code="log_cannot_read")


def _open_append(path: Path) -> IO[bytes]:
    """Open for appending (created 0600: the log holds emails), fsyncing the directory if new."""
    created = not path.exists()
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600), "a+b")
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return f


def _write_durably(f: IO[bytes], line: bytes) -> None:
    """Append ``line`` after ending any line a crash left torn, so it cannot swallow ours; fsync."""
    end = f.seek(0, os.SEEK_END)
    if end:
        f.seek(end - 1)
        if f.read(1) != b"\n":
            line = b"\n" + line
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


@attrs.frozen
class LogEntry:
    """One valid line of the log."""

    entry_id: str
    method: str
    args: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes) -> LogEntry | None:
        """The entry on ``raw``, or None when the line is not a valid entry (torn, edited, foreign)."""
        entry = cls.check(raw)
        return entry if isinstance(entry, LogEntry) else None

    @classmethod
    def check(cls, raw: bytes) -> LogEntry | str:
        """The entry on ``raw``, or a short reason why the line is not one."""
        if not raw.strip():
            return "a blank line"
        if raw == LINE_TOO_LONG:
            return "longer than 1 MiB: not read"
        try:
            data = json.loads(raw)
        except ValueError:
            return "not JSON (a line cut short by a crash, or not a CRM log line)"
        if not isinstance(data, dict) or data.get("v") != _FORMAT_VERSION:
            return f"not a CRM log entry of version {_FORMAT_VERSION}"
        entry_id, method, args = data.get("entry_id"), data.get("method"), data.get("args")
        schema = _SCHEMA.get(method) if isinstance(method, str) else None
        if not (isinstance(entry_id, str) and entry_id):
            return "no entry_id"
        if schema is None:
            return f"unknown method {str(method)[:40]!r}"
        if not isinstance(args, dict) or args.keys() != schema.keys() \
                or not all(isinstance(args[k], t) for k, t in schema.items()):
            return f"arguments that do not fit {method}"
        if method == "add_email_to_mailing_lists" and not all(isinstance(x, str) for x in args["mailing_lists"]):
            return "mailing_lists must be names"
        return cls(entry_id, method, args)


def read_log(path: str | os.PathLike[str]) -> Iterator[tuple[int, LogEntry | str]]:
    """``(line number, entry or the reason it is none)`` for each line of a CRM log;
    ``CrmConfigError`` when there is no such file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CrmConfigError(f"no CRM log at {path}") from None
    return _checked_lines(f)


def _checked_lines(f: IO[bytes]) -> Iterator[tuple[int, LogEntry | str]]:
    with f:
        for number, raw in enumerate(file_lines(f), 1):
            yield number, LogEntry.check(raw)


@attrs.frozen
class LoadReport:
    """What one ``load_log`` run did, enough for a CLI to print what it sent.

    ``created`` maps the entry id of each create to the CRM id it made: rewrite ``pending:<entry_id>``
    ids stored in profiles with it. ``stopped`` is set when the CRM's API allocation ran out
    (``CrmLimitExceeded``): the rest of the log was not tried; run the load again later.
    """

    sent: dict[str, int]
    skipped_already_loaded: int
    invalid_lines: int
    failed: list[tuple[str, CrmError]]
    created: dict[str, str]
    stopped: str | None = None
    #: The first invalid lines as ``(line number, reason)`` (``invalid_lines`` counts them all).
    invalid: tuple[tuple[int, str], ...] = ()

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def load_log(
    path: str | os.PathLike[str],
    target: CrmConnectionManager,
    *,
    state_path: str | os.PathLike[str] | None = None,
) -> LoadReport:
    """Replay the log at ``path`` to ``target``, each entry at most once over any number of runs.

    Each entry sent is recorded (fsynced) in the state file, default ``<path>.loaded``, with the id it
    created; later runs skip recorded entries, and retry failed ones. Only a crash between the CRM's
    answer and that record can resend an entry; creates carry their ``external_id`` so the target's
    idempotent create returns the existing app user then. Invalid lines are skipped, counted and the first
    ones named (line number, reason). One
    load at a time: a second concurrent load on the same state file raises ``CrmError``.
    """
    log_path = Path(path)
    state = Path(state_path) if state_path is not None else Path(f"{log_path}.loaded")
    lines = read_log(log_path)
    sent: Counter[str] = Counter()
    created: dict[str, str] = {}
    failed: list[tuple[str, CrmError]] = []
    invalid: list[tuple[int, str]] = []
    skipped = 0
    stopped: str | None = None
    with _LoadState(state) as done:
        for number, entry in lines:
            if not isinstance(entry, LogEntry):
                invalid.append((number, entry))
                continue
            if entry.entry_id in done.ids:
                skipped += 1
                continue
            try:
                result = _replay(entry, target, done.ids)
            except CrmLimitExceeded as exc:
                failed.append((entry.entry_id, exc))
                stopped = str(exc)
                break
            except CrmError as exc:
                failed.append((entry.entry_id, exc))
                continue
            done.record(entry.entry_id, result)
            sent[entry.method] += 1
            if result is not None:
                created[entry.entry_id] = result
    return LoadReport(dict(sent), skipped, len(invalid), failed, created, stopped, tuple(invalid[:MAX_PROBLEMS]))


def _replay(entry: LogEntry, target: CrmConnectionManager, done: Mapping[str, str | None]) -> str | None:
    args = dict(entry.args)
    if "crm_id" in args:
        args["crm_id"] = _resolve(args["crm_id"], done)
    result = getattr(target, entry.method)(**args)
    return str(result) if entry.method == "add_user_to_crm" else None


def _resolve(crm_id: str, done: Mapping[str, str | None]) -> str:
    """A CRM id for ``crm_id``: itself, or the id the create behind a ``pending:`` placeholder made."""
    if not crm_id.startswith(PENDING_PREFIX):
        return crm_id
    real = done.get(crm_id[len(PENDING_PREFIX):])
    if real is None:
        raise CrmError(f"{crm_id} names a create that has not been loaded", code="unresolved_placeholder")
    return real


class _LoadState:
    """The sidecar of loaded entries: ``{"entry_id", "crm_id"}`` lines, locked for one load at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: dict[str, str | None] = {}

    def __enter__(self) -> _LoadState:
        self._file = _open_append(self.path)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise CrmError(f"another load is using {self.path}", code="load_in_progress") from None
        self._file.seek(0)
        for raw in self._file:
            try:
                data = json.loads(raw)
            except ValueError:
                continue  # a record torn by a crash: that entry is simply not loaded yet
            if isinstance(data, dict) and isinstance(data.get("entry_id"), str):
                crm_id = data.get("crm_id")
                self.ids[data["entry_id"]] = crm_id if isinstance(crm_id, str) else None
        return self

    def record(self, entry_id: str, crm_id: str | None) -> None:
        line = json.dumps({"entry_id": entry_id, "crm_id": crm_id}, separators=(",", ":")).encode() + b"\n"
        _write_durably(self._file, line)
        self.ids[entry_id] = crm_id

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()
