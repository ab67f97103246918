"""Structured fields on the library's log records, for logs Sefaria ships as JSON.

The library logs through ``logging`` with readable messages and, on the records that matter to an operator,
fields passed as ``extra=fields(...)``. Sefaria's structlog setup renders them as JSON keys::

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.ExtraAdder(),
                           structlog.processors.TimeStamper(fmt="iso")],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()])

The names are a contract (dashboards and alerts key on them); each field is left out when it has no value.
No field ever holds a secret: URLs are redacted before they reach a message, and no field holds one.
"""

from __future__ import annotations

from typing import Any

#: Every structured field the library sets, and what it holds.
FIELDS: dict[str, str] = {
    "machine": "the machine (diagram) name, e.g. new_user_signup",
    "state": "the state a profile is in or reached",
    "profile_id": "Sefaria's profile id",
    "kind": "what happened: a CRM request's method and path shape (GET query), or the event (journal)",
    "outcome": "how it ended: ok, retried, interrupted, journaled, finished, conflict, halted ...",
    "error_class": "the class of the error, e.g. CrmTransientError",
    "attempt": "which try of a CRM request failed (1 is the first)",
    "wait_seconds": "how long before the next try",
    "entry_id": "a journal entry's id (crm-states replay applies it)",
    "processed": "profiles done so far in a run",
    "total": "profiles a run set out to do",
}


def fields(**values: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: the given fields that have a value. An unknown name is a bug here,
    so it fails loudly in tests rather than leaking a new key into dashboards unannounced."""
    unknown = set(values) - FIELDS.keys()
    if unknown:
        raise ValueError(f"not a structured log field: {', '.join(sorted(unknown))}")
    return {name: value for name, value in values.items() if value is not None}
