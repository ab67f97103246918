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


class CrmReadTimeout(CrmTransientError):
    """The request went out but no answer came within the read timeout.

    Unlike a connection that could not be made (or a connect timeout), the CRM received the request and
    may still be processing it: Salesforce keeps running a request after the client gives up. Retrying
    is fine for idempotent requests; a create must not be re-sent. ``method`` and ``url`` (redacted)
    say which request it was.
    """

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class CrmOutcomeUnknown(CrmTransientError):
    """A create timed out after reaching the CRM, was not re-sent, and its record did not show up
    within the settle window: it may or may not exist. Resuming later looks it up before creating."""


class CrmBatchOutcomeUnknown(CrmOutcomeUnknown):
    """A batch create went out and its answer was lost: it was not re-sent, and its records may or may
    not exist. ``in_doubt`` lists their input positions (look them up before creating them again),
    ``completed`` the results of the batches answered before it, ``not_sent`` the positions never sent."""

    def __init__(self, message: str, *, in_doubt: tuple[int, ...], completed: tuple[object, ...] = (),
                 not_sent: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt
        self.completed = completed
        self.not_sent = not_sent


class CrmLimitExceeded(CrmError):
    """The daily API allocation is spent (REQUEST_LIMIT_EXCEEDED): stop the batch, resume tomorrow."""


class CrmAuthError(CrmError):
    """Credentials were refused, or a refreshed token was refused again."""


class CrmRejected(CrmError):
    """A 4xx the CRM refused for good: validation failures, duplicates, malformed requests."""


class CrmInvalidInput(CrmRejected, ValueError):
    """Refused before any request: the input cannot be what it claims to be (``validate_email`` and
    ``validate_name``). A ``ValueError`` too, as Sefaria's validators raise and its callers catch."""


class CrmBadAnswer(CrmError):
    """The CRM answered with something that must not pass as data: a malformed record id, an id of
    another object, an oversized value, several records where one was expected. The message says what
    was wrong, never the value itself."""


class CrmJobFailed(CrmError):
    """A Salesforce Bulk API job ended ``Failed`` or ``Aborted``; ``job_id`` and the message say which
    and why (``code`` is the state)."""

    def __init__(self, message: str, *, job_id: str, state: str) -> None:
        super().__init__(message, code=state)
        self.job_id = job_id
        self.state = state


class CrmConfigError(CrmError):
    """The CRM is not configured correctly (a missing setting, an unknown CRM_TYPE)."""


class CrmNotSupported(CrmConfigError):
    """The configured CRM cannot do what was asked (``CRM_TYPE=NONE`` or ``LOG`` asked for a lookup): no
    answer exists, so a machine must never turn this into a verdict such as "not found". ``needs`` names the
    ``CRM_TYPE`` values that can do it."""

    def __init__(self, message: str, *, needs: tuple[str, ...] = ("SALESFORCE",)) -> None:
        super().__init__(message)
        self.needs = needs



def transient_error_text(error: object) -> bool:
    """Whether a recorded error (``"ClassName: message"``, as ``engine.describe`` writes it) names
    ``CrmTransientError`` or one of its subclasses: a failure worth trying again later."""
    if not isinstance(error, str):
        return False
    names: set[str] = set()
    todo: list[type] = [CrmTransientError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return error.partition(":")[0].strip() in names
