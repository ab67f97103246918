"""The Salesforce report Sefaria's operators already export (CSV), read offline, one line at a time.

Its columns (Sefaria's ``scripts/resolve_crm_users.py`` reads the same report): ``Contact: NationBuilder
Id``, ``Contact: Contact ID``, ``Contact: First Name``, ``Contact: Last Name``, ``Sefaria App User:
Sefaria App User Name``, ``Sefaria App User: ID``, ``Sefaria App Email``, ``Contact: Sustainer``
(``Active`` is a sustainer; ``Former`` or anything else is not). The NationBuilder id is the Contact's.

``open_export(path)`` checks the header at once (a file lacking needed columns is refused in one line
naming them; column order, case, surrounding spaces and a BOM do not matter), then yields, per line,
an ``ExportRow`` or an ``ExportProblem`` naming the line and what is wrong (a bad id, an oversized
value, broken CSV, bytes that are not UTF-8) without stopping. Ids are checked as every id a client
returns is (crm.checks): Contact ids must have the Contact key prefix ``003``. The file is streamed:
never held whole in memory.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from typing import IO, Any

import attrs

from .checks import record_id_problem, size_problem

NATIONBUILDER_ID = "Contact: NationBuilder Id"
CONTACT_ID = "Contact: Contact ID"
FIRST_NAME = "Contact: First Name"
LAST_NAME = "Contact: Last Name"
APP_USER_NAME = "Sefaria App User: Sefaria App User Name"
APP_USER_ID = "Sefaria App User: ID"
EMAIL = "Sefaria App Email"
SUSTAINER = "Contact: Sustainer"
#: The columns a row is built from; the names columns are optional.
REQUIRED_COLUMNS = (NATIONBUILDER_ID, CONTACT_ID, APP_USER_ID, EMAIL, SUSTAINER)
CONTACT_KEY_PREFIX = "003"

_NUMBER = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+")  # ASCII digits only


class ExportFormatError(ValueError):
    """The file cannot be read as the report at all (no header, needed columns missing)."""


@attrs.frozen
class ExportRow:
    """One line of the report, checked. ``line`` is the file line it starts on (the header is line 1)."""

    line: int
    nationbuilder_id: int | None
    contact_id: str | None
    app_user_id: str | None
    email: str | None
    sustainer: bool


@attrs.frozen
class ExportProblem:
    """A line that could not be read as a row, and why (never the offending value itself).
    ``nationbuilder_id`` is the line's NationBuilder id when that cell itself was readable, so a refused
    App User can be filed under the id it belongs to; ``app_user_id`` the line's App User id when that cell
    is a valid id (the problem then lies in another column)."""

    line: int
    detail: str
    nationbuilder_id: int | None = None
    app_user_id: str | None = None


class SalesforceExport:
    """An open export: iterate it for ``ExportRow`` and ``ExportProblem`` items, in file order."""

    def __init__(self, path: str | os.PathLike[str], *, app_user_key_prefix: str | None = None,
                 from_line: int = 1) -> None:
        self.path = path
        self.app_user_key_prefix = app_user_key_prefix
        self.from_line = from_line
        self.rows = self.problems = 0
        self._file: IO[str] = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
        try:
            self._reader = csv.reader(self._file)
            self._columns = self._header()
        except BaseException:
            self._file.close()
            raise

    def _header(self) -> dict[str, int]:
        try:
            header = next(self._reader, None)
        except csv.Error as exc:
            raise ExportFormatError(f"{self.path}: the header line is not valid CSV ({exc})") from None
        if not header:
            raise ExportFormatError(f"{self.path}: empty file, no header line")
        names = [h.strip().lstrip("\ufeff").casefold() for h in header]
        columns: dict[str, int] = {}
        for wanted in (*REQUIRED_COLUMNS, FIRST_NAME, LAST_NAME, APP_USER_NAME):
            found = [i for i, name in enumerate(names) if name == wanted.casefold()]
            if len(found) > 1:
                raise ExportFormatError(f"{self.path}: the header has the column {wanted!r} {len(found)} times")
            if found:
                columns[wanted] = found[0]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ExportFormatError(f"{self.path}: the header lacks the column(s) {', '.join(map(repr, missing))}")
        return columns

    def __iter__(self) -> Iterator[ExportRow | ExportProblem]:
        last = self._reader.line_num
        while True:
            start = last + 1
            try:
                values = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if self._reader.line_num == last:  # no progress: the rest of the file is unreadable
                    return
                last = self._reader.line_num
                if start >= self.from_line:
                    yield self._problem(start, f"not valid CSV ({exc})")
                continue
            last = self._reader.line_num
            if start < self.from_line or not any(v.strip() for v in values):
                continue
            item = self._row(start, values)
            if isinstance(item, ExportRow):
                self.rows += 1
            else:
                self.problems += 1
            yield item

    def _problem(self, line: int, detail: str) -> ExportProblem:
        self.problems += 1
        return ExportProblem(line, detail)

    def _row(self, line: int, values: list[str]) -> ExportRow | ExportProblem:
        width = max(self._columns.values()) + 1
        if len(values) < width:
            return ExportProblem(line, f"{len(values)} values, fewer than the header's columns")
        cell = {name: values[i].strip() for name, i in self._columns.items()}
        problems = {name: problem for name, value in cell.items()
                    if (problem := size_problem(value, name) or (_not_utf8(name) if _has_surrogates(value) else None))}
        nationbuilder_id = (_nationbuilder_id(cell[NATIONBUILDER_ID]) if NATIONBUILDER_ID not in problems
                            else problems[NATIONBUILDER_ID])
        app_user = cell[APP_USER_ID] or None
        valid_app_user = app_user if app_user and not record_id_problem(app_user, self.app_user_key_prefix) else None
        if isinstance(nationbuilder_id, str):
            return ExportProblem(line, nationbuilder_id, None, valid_app_user)
        if problems:
            return ExportProblem(line, next(iter(problems.values())), nationbuilder_id, valid_app_user)
        ids: dict[str, str | None] = {}
        for name, prefix in ((CONTACT_ID, CONTACT_KEY_PREFIX), (APP_USER_ID, self.app_user_key_prefix)):
            value = cell[name] or None
            problem = record_id_problem(value, prefix, what=name) if value is not None else None
            if problem:
                return ExportProblem(line, problem, nationbuilder_id, valid_app_user)
            ids[name] = value
        if ids[CONTACT_ID] is None and ids[APP_USER_ID] is None:
            return ExportProblem(line, f"neither a {CONTACT_ID} nor a {APP_USER_ID}")  # no record: no key
        return ExportRow(line, nationbuilder_id, ids[CONTACT_ID], ids[APP_USER_ID], cell[EMAIL] or None,
                         cell[SUSTAINER].casefold() == "active")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SalesforceExport:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def open_export(path: str | os.PathLike[str], *, app_user_key_prefix: str | None = None,
                from_line: int = 1) -> SalesforceExport:
    """The export at ``path``, its header checked (``ExportFormatError``). ``from_line`` skips the lines
    before it, to restart part-way as Sefaria's ``--line N`` did; ``app_user_key_prefix`` checks app user
    ids against the org's prefix when it is known."""
    return SalesforceExport(path, app_user_key_prefix=app_user_key_prefix, from_line=from_line)


def _nationbuilder_id(text: str) -> int | None | str:
    """The id (reports may print ``12,345`` or ``12345.0``), ``None`` when empty, else a problem."""
    if not text:
        return None
    digits = text[:-2] if text.endswith(".0") else text
    if not _NUMBER.fullmatch(digits):
        return f"{NATIONBUILDER_ID} is not a whole number"
    value = int(digits.replace(",", ""))
    if not 0 < value < 2**63:
        return f"{NATIONBUILDER_ID} is out of range (positive, below 2**63)"
    return value


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def _not_utf8(name: str) -> str:
    return f"{name} holds bytes that are not UTF-8"
