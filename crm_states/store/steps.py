"""A step: what one profile commits at once (consecutive transitions from a persisted position)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..records import Claim, Position, ProfileData, Transition


@attrs.frozen
class Step:
    """What one profile commits at once: consecutive transitions from ``expected`` (persisted).
    ``claim``: the last transition enters a write-ahead state, so the step also takes the run's fenced
    claim ``{by: <run token>, owner: <process>, seconds}`` (its time is the database's clock)."""

    profile_id: int
    machine: str
    expected: Position
    transitions: tuple[Transition, ...]
    claim: Mapping[str, Any] | None = None

    @property
    def last(self) -> Transition:
        return self.transitions[-1]

    def data(self) -> ProfileData:
        """The position's data after this step's writes."""
        data = self.expected.data
        for t in self.transitions:
            if t.write is not None and not t.write.empty:
                data = data.with_write(t.write, t.at)
        return data

    def after(self) -> Position:
        """The position once this step is committed (the claim's database time is not known here)."""
        last = self.last
        claim = Claim(self.claim["by"], None, float(self.claim["seconds"]), str(self.claim.get("owner", ""))) \
            if self.claim is not None else None
        return Position(last.dest, last.run_id, last.seq, dict(last.detail), last.at, self.data(), claim, last.by)
