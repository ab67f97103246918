"""What the store raises or reports for a step it did not commit."""

from __future__ import annotations

from ..records import Position


class StoreError(Exception):
    """Base of what the store raises or reports."""


class StoreUnavailable(StoreError):
    """MongoDB did not take the write (connection lost, timeout, server error)."""


class ConcurrentTransition(StoreError):
    """Another writer moved the profile first. ``position`` is where the profile stands now and ``by`` the
    run token of the writer that put it there (a run whose own answer was lost recognises itself)."""

    def __init__(self, message: str, position: Position, by: str = "") -> None:
        super().__init__(message)
        self.position = position
        self.by = by


class ProfileNotFound(StoreError):
    """No profile has that ``id``."""


class InputChanged(StoreError):
    """The profile no longer holds the inputs the step's outcome was computed from (its
    ``nationbuilder_id`` changed meanwhile): nothing was committed; look at the profile again."""


class ProfileGone(StoreError):
    """The profile was deleted while its step was in flight; the outcome was not committed."""
