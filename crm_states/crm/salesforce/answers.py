"""Reading Salesforce's answers: error bodies, JSON objects, query pages, record ids, number-ish ids."""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from ..errors import CrmError
from ..http import short


def payload(response: requests.Response) -> Any:
    """The body as JSON when it parses, else as text (error bodies are not always JSON)."""
    try:
        return response.json()
    except ValueError:
        return response.text


def codes(body: Any) -> tuple[list[str], str]:
    """Error codes and the first message of a Salesforce error body (list of errors, or OAuth dict)."""
    if isinstance(body, list):
        errors = [e for e in body if isinstance(e, dict)]
        found = [str(e["errorCode"]) for e in errors if e.get("errorCode")]
        return found, str(errors[0].get("message", "")) if errors else short(json.dumps(body), 200)
    if isinstance(body, dict):
        code = body.get("errorCode") or body.get("error")
        return ([str(code)] if code else []), str(body.get("message") or body.get("error_description") or "")
    return [], short(str(body or ""), 200)


def json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise CrmError("salesforce: expected a JSON object, got no JSON", status=response.status_code) from None
    if not isinstance(body, dict):
        raise CrmError(f"salesforce: expected a JSON object, got {type(body).__name__}", status=response.status_code)
    return body


def json_page(body: Any) -> Mapping[str, Any]:
    records = body.get("records") if isinstance(body, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CrmError("salesforce: query answer has no list of records")
    return body


def record_id_of(record: Any, key: str = "Id") -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise CrmError(f"salesforce: record without an {key}")
    return value


def nationbuilder_ids(ids: Iterable[int]) -> list[int]:
    """Sorted distinct ids; anything but an int is a caller bug, refused before any SOQL is built."""
    out = set()
    for i in ids:
        if isinstance(i, bool):
            raise TypeError("NationBuilder ids are ints, not bools")
        out.add(operator.index(i))
    return sorted(out)


def as_int(value: Any) -> int | None:
    """Salesforce may hold an id as a number (``123.0``) or text (``"123"``): both become ``123``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"-?\d+\.0*", text):
            return int(text.split(".")[0])
    return None
