"""sObject Collections: app users created (or upserted) up to 200 in one API request.

Without an external-id field the records go to ``POST /composite/sobjects`` (``allOrNone: false``) and a
request whose answer is lost (a read timeout, a dropped connection, a 5xx, an unreadable answer) is never
re-sent: its records may exist, so ``CrmBatchOutcomeUnknown`` names them for the caller to look up before
creating them again. With ``schema.external_id_field`` the records are upserted on it
(``PATCH /composite/sobjects/<Obj>/<Field>``), which a retry cannot duplicate, so that request is retried
as any other. Results come back per record in input order; every id is checked, and a success whose id
is refused becomes an error that says the record may exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from ..checks import record_id_problem
from ..errors import (
    CrmBatchOutcomeUnknown,
    CrmError,
    CrmInvalidInput,
    CrmTransientError,
)
from ..results import NewAppUser, RecordError, RecordResult
from .schema import MAX_COLLECTION, SalesforceSchema, language
from .transport import Transport

log = logging.getLogger("crm_states.crm")


def create_batches(http: Transport, schema: SalesforceSchema, users: Sequence[NewAppUser], *,
                   batch_size: int = MAX_COLLECTION) -> Iterator[list[RecordResult]]:
    """One request per ``batch_size`` users, yielding each request's results before the next is sent.

    Every input is checked before the first request, so bad input changes nothing.
    """
    if not 1 <= batch_size <= MAX_COLLECTION:
        raise ValueError(f"batch_size must be 1 to {MAX_COLLECTION}")
    records = [_record(schema, i, user) for i, user in enumerate(users)]
    upsert = schema.external_id_field is not None
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        indexes = range(start, start + len(batch))
        body = {"allOrNone": False, "records": batch}
        if upsert:
            answer = http.api("PATCH", f"composite/sobjects/{schema.app_user_object}/{schema.external_id_field}",
                              json=body)
        else:
            answer = _create_once(http, body, indexes, not_sent=range(start + len(batch), len(records)))
        yield _results(answer, indexes, schema.app_user_key_prefix, upsert)


def _record(schema: SalesforceSchema, index: int, user: Any) -> dict[str, Any]:
    if not isinstance(user, NewAppUser):
        raise TypeError(f"user {index} is a {type(user).__name__}, not a NewAppUser")
    record: dict[str, Any] = {
        "attributes": {"type": schema.app_user_object},
        schema.first_name_field: user.first_name,
        schema.last_name_field: user.last_name,
        schema.email_field: user.email,
        schema.language_field: language(user.lang),
        schema.educator_field: bool(user.educator),
    }
    if schema.external_id_field is not None:
        value = user.external_id
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise CrmInvalidInput(f"user {index} has no external_id: an upsert on {schema.external_id_field} "
                                  "needs one for every record")
        record[schema.external_id_field] = str(value)
    return record


def _create_once(http: Transport, body: dict[str, Any], indexes: range, *, not_sent: range) -> Any:
    """The create request, sent once: when its answer is lost, the records' fate is unknown."""
    try:
        return http.api("POST", "composite/sobjects", json=body, policy=attrs.evolve(http.policy, attempts=1))
    except CrmError as exc:
        if not isinstance(exc, CrmTransientError) and exc.code != "MALFORMED_JSON":
            raise  # refused whole (4xx, the daily limit, auth): nothing was created
        raise CrmBatchOutcomeUnknown(
            f"salesforce create of app users {indexes.start}-{indexes.stop - 1}: outcome unknown, not re-sent "
            f"({exc}); look these records up before creating them again",
            in_doubt=tuple(indexes), not_sent=tuple(not_sent)) from exc


def _results(response: Any, indexes: range, prefix: str | None, upsert: bool) -> list[RecordResult]:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, list) or len(answer) != len(indexes) or not all(isinstance(a, dict) for a in answer):
        raise CrmBatchOutcomeUnknown(
            f"salesforce collection answer does not match its {len(indexes)} records; look records "
            f"{indexes.start}-{indexes.stop - 1} up before creating them again", in_doubt=tuple(indexes))
    return [_result(index, one, prefix, upsert) for index, one in zip(indexes, answer)]


def _result(index: int, one: dict[str, Any], prefix: str | None, upsert: bool) -> RecordResult:
    if one.get("success") is True:
        problem = record_id_problem(one.get("id"), prefix)
        if problem:
            return RecordResult(index, error=RecordError(
                "INVALID_ANSWER", f"refused the id Salesforce answered ({problem}); the record may exist"))
        return RecordResult(index, one["id"], created=bool(one.get("created", True)) if upsert else True)
    errors = one.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    fields = first.get("fields")
    return RecordResult(index, error=RecordError(
        str(first.get("statusCode") or "UNKNOWN_ERROR")[:100], str(first.get("message") or "no message")[:300],
        tuple(str(f)[:100] for f in fields) if isinstance(fields, list) else ()))
