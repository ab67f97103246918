"""What a snapshot source gives the loader: a record to start or reuse, then pages of rows keyed by
NationBuilder id, each page resumable from the record's progress."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from ..store.snapshots import SnapshotRecord, Snapshots

#: Called before each API request a source sends; raises ``BudgetSpent`` when none is left.
Spend = Callable[[], None]
#: Called after each poll and page, to keep the loader's lease; False when another run took it.
Renew = Callable[[], bool]

#: The largest NationBuilder id a row may carry and still be stored (MongoDB's 64-bit ints).
MAX_NATIONBUILDER_ID = 2**63 - 1


class BudgetSpent(Exception):
    """``--max-api-calls`` leaves no request for the source's next one."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"--max-api-calls {limit} reached")


@attrs.frozen
class Page:
    """Rows of one page that carry a NationBuilder id (``{"nb", "id" | "problem", "line"?}``), how many rows
    the page held in all, and the progress to record with it (the next locator, the last line read)."""

    rows: list[dict[str, Any]]
    seen: int
    progress: Mapping[str, Any]


class Source(abc.ABC):
    """One kind of snapshot (``kind`` names it in records and reports)."""

    kind: str = ""

    @abc.abstractmethod
    def reusable(self, snapshots: Snapshots, machine: str) -> SnapshotRecord | None:
        """A snapshot this source made earlier that can still serve, or None."""

    @abc.abstractmethod
    def begin(self, snapshots: Snapshots, machine: str, spend: Spend) -> SnapshotRecord:
        """Start a new snapshot (a job, a file's record) and record it."""

    def wait(self, record: SnapshotRecord, spend: Spend, renew: Renew) -> int | None:
        """Wait until the snapshot's rows can be read; how many rows it holds when the source says."""
        return None

    @abc.abstractmethod
    def pages(self, record: SnapshotRecord, spend: Spend) -> Iterator[Page]:
        """The pages after the record's progress, one at a time."""

    def check_complete(self, record: SnapshotRecord) -> None:
        """Raise when the rows read are not the whole snapshot."""

    @abc.abstractmethod
    def detail(self, record: SnapshotRecord) -> Mapping[str, Any]:
        """What every outcome answered from this snapshot names (the job id, the file)."""

    def api_requests(self) -> int:
        """API requests this source has sent (0 for a file)."""
        return 0


def nationbuilder_key(value: Any) -> int | None:
    """A row's NationBuilder id as the CRM lookup reads it (``123``, ``"123"``, ``"123.0"``), or None."""
    from ..crm.salesforce.answers import as_int

    number = as_int(value)
    return number if number is not None and 0 < number <= MAX_NATIONBUILDER_ID else None
