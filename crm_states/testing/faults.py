"""Injectable faults for the loopback fakes: one spoiled answer (``Fault``) and seeded random rates (``Faults``)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Literal

import attrs

FaultKind = Literal["status", "drop", "slow", "malformed_json"]


@attrs.frozen
class Fault:
    """One spoiled answer. Build with the class methods; ``body``/``headers`` override an error's body."""

    kind: FaultKind
    status: int = 0
    seconds: float = 0.0
    processed: bool = False
    body: bytes | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def error(cls, status: int, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
              processed: bool = False) -> Fault:
        """Answer ``status`` instead of the handler (``body`` defaults to the server's ``fault_reply``)."""
        return cls("status", status=status, body=body, headers=dict(headers or {}), processed=processed)

    @classmethod
    def drop(cls, *, processed: bool = False) -> Fault:
        """Close the socket without an answer."""
        return cls("drop", processed=processed)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait ``seconds`` and then answer normally (the handler runs after the wait)."""
        return cls("slow", seconds=seconds)

    @classmethod
    def malformed_json(cls, *, processed: bool = False) -> Fault:
        """Answer 200 with a JSON content type and a truncated JSON body."""
        return cls("malformed_json", processed=processed)


@attrs.frozen
class Faults:
    """Seeded random faults applied to every request; the same seed and order give the same faults.

    ``latency`` is added to every answer; each rate is a probability per request, drawn once per
    request from one uniform number (drop, then slow, then malformed JSON, then each error status).
    """

    seed: int = 0
    latency: float = 0.0
    error_rates: Mapping[int, float] = attrs.field(factory=dict)
    drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 30.0
    malformed_json_rate: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self._total() > 1.0:
            raise ValueError("fault rates add up to more than 1")

    def _total(self) -> float:
        return self.drop_rate + self.slow_rate + self.malformed_json_rate + sum(self.error_rates.values())

    def draw(self, rng: random.Random) -> Fault | None:
        if not self._total():
            return None
        x = rng.random()
        buckets: list[tuple[float, Fault]] = [
            (self.drop_rate, Fault.drop()),
            (self.slow_rate, Fault.slow(self.slow_seconds)),
            (self.malformed_json_rate, Fault.malformed_json()),
            *((rate, Fault.error(status)) for status, rate in sorted(self.error_rates.items())),
        ]
        for rate, fault in buckets:
            if x < rate:
                return fault
            x -= rate
        return None
