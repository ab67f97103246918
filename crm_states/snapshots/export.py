"""A snapshot from the Salesforce report Sefaria's operators export (``crm.export.open_export``): no API
request, no CRM needed. The report's NationBuilder id is the Contact's; each App User row is filed under it
with the file line it came from, and a line refused by the reader (a bad App User id, an oversized value)
under its NationBuilder id when that cell was readable, so it is an unclear answer rather than none.

A file is known by its SHA-256: a run killed while loading reuses what it loaded of the same content and
reads on from the last line it recorded."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..crm.export import ExportProblem, ExportRow, open_export
from ..store.snapshots import TABLE_PREFIX, SnapshotRecord, Snapshots
from .source import Page, Source, Spend

#: Lines per page written to the snapshot collection (and recorded as progress).
PAGE_LINES = 10_000
#: How many file lines a detail lists for one NationBuilder id.
SHOWN_LINES = 10


class ExportSource(Source):
    """Snapshots of the operators' export file at ``path``."""

    kind = "export"

    def __init__(self, path: str | os.PathLike[str], *, app_user_key_prefix: str | None = None,
                 page_lines: int = PAGE_LINES) -> None:
        self.path = Path(path).resolve()
        self.app_user_key_prefix = app_user_key_prefix
        self.page_lines = page_lines
        self._digest: str | None = None
        with open_export(self.path, app_user_key_prefix=app_user_key_prefix):  # the header, checked now
            pass

    @property
    def digest(self) -> str:
        """The file's SHA-256, read once in blocks."""
        if self._digest is None:
            sha = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            self._digest = sha.hexdigest()
        return self._digest

    def reusable(self, snapshots: Snapshots, machine: str) -> SnapshotRecord | None:
        return snapshots.usable(machine, self.kind, digest=self.digest)

    def begin(self, snapshots: Snapshots, machine: str, spend: Spend) -> SnapshotRecord:
        load = f"{self.digest[:16]}{uuid.uuid4().hex[:8]}"  # a file loaded again after its drop: a new table
        return snapshots.create(f"{machine}:{self.kind}:{load}", machine, self.kind, f"{TABLE_PREFIX}x{load}",
                                file=str(self.path), digest=self.digest, field="Contact: NationBuilder Id")

    def pages(self, record: SnapshotRecord, spend: Spend) -> Iterator[Page]:
        with open_export(self.path, app_user_key_prefix=self.app_user_key_prefix, from_line=record.line + 1) as export:
            rows: list[dict[str, Any]] = []
            seen = last = 0
            for item in export:
                seen, last = seen + 1, item.line
                row = _row(item)
                if row is not None:
                    rows.append(row)
                if seen == self.page_lines:
                    yield Page(rows, seen, {"line": last})
                    rows, seen = [], 0
            if seen:
                yield Page(rows, seen, {"line": last})

    def detail(self, record: SnapshotRecord) -> Mapping[str, Any]:
        return {"export_file": record.file}


def _row(item: ExportRow | ExportProblem) -> dict[str, Any] | None:
    """What the snapshot keeps of one line: an App User under its Contact's NationBuilder id, a Contact
    without an App User (named in the detail, no match), or a refused App User id filed under its id."""
    if item.nationbuilder_id is None:
        return None
    if isinstance(item, ExportProblem) and item.app_user_id is None:
        return {"nb": item.nationbuilder_id, "problem": item.detail[:300], "line": item.line}
    if isinstance(item, ExportProblem):  # a valid App User id: the problem lies in a column the lookup does not use
        return {"nb": item.nationbuilder_id, "id": item.app_user_id, "line": item.line}
    if item.app_user_id is None:
        return {"nb": item.nationbuilder_id, "line": item.line}
    return {"nb": item.nationbuilder_id, "id": item.app_user_id, "line": item.line}


def lines_detail(lines: list[int]) -> dict[str, Any]:
    """The detail naming the file lines an answer was read from (the first few, and how many)."""
    shown = sorted(lines)[:SHOWN_LINES]
    return {"export_lines": shown, **({"export_lines_total": len(lines)} if len(lines) > SHOWN_LINES else {})}
