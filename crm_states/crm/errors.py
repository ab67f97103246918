"""One small hierarchy for every CRM failure: callers branch on the class, never on ``False``."""

from __future__ import annotations


class CrmError(Exception):
    """A CRM call failed. ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def message(self) -> str:
        return str(self)


class CrmNotFound(CrmError):
    """The record asked for does not exist (404 / NOT_FOUND / no_matches)."""


class CrmTransientError(CrmError):
    """Worth retrying later: 5xx, timeouts, dropped connections, UNABLE_TO_LOCK_ROW, 429.

    ``retry_after`` is the server's requested wait in seconds (a 429's Retry-After), when it gave one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class CrmLimitExceeded(CrmError):
    """The daily API allocation is spent (REQUEST_LIMIT_EXCEEDED): stop the batch, resume tomorrow."""


class CrmAuthError(CrmError):
    """Credentials were refused, or a refreshed token was refused again."""


class CrmRejected(CrmError):
    """A 4xx the CRM refused for good: validation failures, duplicates, malformed requests."""


class CrmConfigError(CrmError):
    """The CRM is not configured correctly (a missing setting, an unknown CRM_TYPE)."""
