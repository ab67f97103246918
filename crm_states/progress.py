"""What a batch run reports: its counts (only what the database acknowledged) and its progress display."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .logs import fields
from .spec import RunResult

log = logging.getLogger("crm_states.runner")


@attrs.define
class RunnerReport:
    """What a run did. ``states`` counts profiles whose commit the database acknowledged, by the state
    they are in; ``unrecorded`` profiles met a DB failure whose state could not be written either (their
    intended write is in the journal); ``by_others`` were moved by another driver meanwhile (not counted
    as this run's); ``deleted`` profiles vanished while in flight (never counted as validated); ``stopped``
    says why the run ended early (the CRM's limit, ``--max-api-calls``)."""

    pending_at_start: int = 0
    processed: int = 0
    states: Counter[str] = attrs.field(factory=Counter)
    outcomes: Counter[str] = attrs.field(factory=Counter)
    unrecorded: int = 0
    by_others: int = 0
    deleted: int = 0
    lookups: int = 0
    api_requests: int = 0
    skipped_ranges: int = 0
    lost_ranges: int = 0
    stopped: str | None = None
    seconds: float = 0.0
    #: Where the answers came from in a snapshot mode (``crm_states.snapshots``): source, job id or file,
    #: rows loaded, and whether the snapshot was reused or dropped.
    snapshot: dict[str, Any] | None = None

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    def add(self, results: Iterable[RunResult]) -> int:
        """Count a batch's results; returns how many profiles this run settled (for the progress bar)."""
        done = 0
        for result in results:
            self.outcomes[result.outcome] += 1
            if result.outcome == "finished" and result.state and result.persisted:
                self.states[result.state] += 1
                self.processed += 1
                done += 1
            elif result.outcome == "finished":
                self.unrecorded += 1
                done += 1
            elif result.outcome == "conflict":
                self.by_others += 1
            elif result.outcome == "deleted":
                self.deleted += 1
            elif result.outcome == "halted" and not self.stopped:
                self.stopped = result.error or "halted"
        return done


class Progress:
    """A tqdm bar on a terminal; periodic plain log lines otherwise."""

    def __init__(self, total: int, *, stream: Any = None, every: float = 10.0, unit: str = "profile") -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.every = every
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, done: int, report: RunnerReport | None = None, states: Mapping[str, int] | None = None) -> None:
        self.done += done
        states = states if states is not None else (report.states if report is not None else {})
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(states_line(states), refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%d/%d done, %.0f/s, ETA %.0fs; %s", self.done, self.total, rate, eta, states_line(states),
                     extra=fields(processed=self.done, total=self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def states_line(states: Mapping[str, int]) -> str:
    return ", ".join(f"{state} {count}" for state, count in sorted(states.items()))
