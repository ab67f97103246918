"""Salesforce's shapes the fake shares across its modules: limits, key prefixes, ids, error bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..server import Fault, Reply, Request, json_reply

API = r"/services/data/v(?P<version>\d+\.\d)"
MAX_REQUEST_BYTES = 16_384
MAX_SOQL_CHARS = 100_000
MAX_COMPOSITE = 25
MAX_COMPOSITE_QUERIES = 5
MAX_COLLECTION = 200

#: Key prefixes of the objects we know; other objects get ``a0C``, ``a0D``, ... in order of first use.
KEY_PREFIXES = {
    "Account": "001",
    "Contact": "003",
    "Sefaria_App_User__c": "a0A",
    "Sefaria_App_Data__c": "a0B",
}
DEFAULT_EXTERNAL_IDS: Mapping[str, tuple[str, ...]] = {
    "Sefaria_App_User__c": ("NationBuilder_Id__c", "Sefaria_App_Email__c"),
    "Contact": ("NationBuilder_Id__c",),
}
#: Parent relationships: object -> {relationship name: (lookup field, parent object)}. An app user links
#: to its Contact, which holds the NationBuilder id (the operators' report shows it so).
DEFAULT_RELATIONSHIPS: Mapping[str, Mapping[str, tuple[str, str]]] = {
    "Sefaria_App_User__c": {"Contact__r": ("Contact__c", "Contact")},
}
DEFAULT_REQUIRED: Mapping[str, tuple[str, ...]] = {"Sefaria_App_User__c": ("Sefaria_App_Email__c",)}


def sf_errors(code: str, message: str, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Salesforce's error body: a list of ``{message, errorCode[, fields]}``."""
    error: dict[str, Any] = {"message": message, "errorCode": code}
    if fields is not None:
        error["fields"] = list(fields)
    return [error]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps(sf_errors(code, message)).encode()


#: Salesforce-specific faults, for ``fake.inject(...)``.
UNABLE_TO_LOCK_ROW = Fault.error(400, body=_error_body(
    "UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record or 1 records: a0A000000000001AAA"))
SESSION_EXPIRED = Fault.error(401, body=_error_body("INVALID_SESSION_ID", "Session expired or invalid"))

FAULT_CODES = {
    400: ("INVALID_REQUEST", "Bad request"),
    401: ("INVALID_SESSION_ID", "Session expired or invalid"),
    403: ("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
    404: ("NOT_FOUND", "The requested resource does not exist"),
    500: ("UNKNOWN_EXCEPTION", "An unexpected error occurred. Please include this ErrorId if you contact support"),
    502: ("SERVER_UNAVAILABLE", "Bad gateway"),
    503: ("SERVER_UNAVAILABLE", "Service Unavailable: the server is down for maintenance"),
}
NOT_FOUND = sf_errors("NOT_FOUND", "The requested resource does not exist")
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def salesforce_id(prefix: str, n: int) -> str:
    """The 18-character id of the ``n``-th record with key prefix ``prefix`` (case-safe suffix).

    The serial is decimal, so only the prefix carries capitals: the suffix is the prefix's letter and
    "AA", which keeps seeding a million records cheap.
    """
    return f"{prefix}000{n:09d}{_CHECKSUM[_capitals(prefix)]}AA"


def _capitals(chunk: str) -> int:
    return sum(1 << j for j, c in enumerate(chunk) if "A" <= c <= "Z")


def to_id18(id15: str) -> str:
    """Salesforce's case-insensitive 18-character form of a 15-character id."""
    return id15 + "".join(_CHECKSUM[_capitals(id15[i:i + 5])] for i in range(0, 15, 5))



def json_body(request: Request) -> dict[str, Any] | Reply:
    """The request's JSON object, or Salesforce's 400 JSON_PARSER_ERROR answer."""
    try:
        body = request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return json_reply(400, sf_errors("JSON_PARSER_ERROR", "The request body is not a JSON object"))
    return body
