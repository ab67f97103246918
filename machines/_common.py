"""Pieces both core machines share: reading profile inputs, turning CRM errors into details."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crm_states.crm import CrmConfigError, CrmError, CrmLimitExceeded
from crm_states.engine import Halt, Run, describe


def journaled_app_user_id(run: Run) -> str | None:
    """The app user id a previous run got from the CRM but could not write (a DB-failure state):
    resuming writes it without asking the CRM again, so no second app user can appear."""
    intended = run.prior.get("intended") or {}
    value = (intended.get("set") or {}).get("sf_app_user_id")
    return value if isinstance(value, str) and value else None


def crm_failure(exc: Exception) -> Mapping[str, Any]:
    """The detail of a failed CRM call. The daily API limit halts the batch instead, and so does a CRM that
    is not configured or cannot answer (``CrmConfigError``, ``CrmNotSupported``): no answer came, so no
    verdict may be recorded; the runs stay where they were persisted. So does an answer source that halts
    itself (a snapshot dropped while it was read)."""
    if isinstance(exc, Halt):
        raise exc
    if isinstance(exc, CrmLimitExceeded):
        raise Halt(f"CRM API limit reached: {exc}") from exc
    if isinstance(exc, CrmConfigError):
        raise Halt(f"no CRM to ask: {exc}") from exc
    detail: dict[str, Any] = {"error": describe(exc)}
    if isinstance(exc, CrmError) and exc.status is not None:
        detail["status"] = exc.status
    return detail


def text_input(run: Run, field: str, *, required: bool) -> str | None:
    """A string input for the CRM from the caller's inputs or the profile; wrong types are errors."""
    value = run.inputs.get(field, run.profile.get(field))
    if value is None or value == "":
        if required:
            raise ValueError(f"{field} is missing")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    return value


def journaled_ok(run: Run, request: Mapping[str, Any]) -> bool:
    """A previous run got OK for this very request but its DB write failed: record it, do not resend."""
    prior = run.prior
    return (bool(prior.get("intended")) and prior.get("answer") == "OK"
            and all(prior.get(k) == v for k, v in request.items()))
