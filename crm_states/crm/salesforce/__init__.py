"""The Salesforce client, as a package of small modules; import its names from here.

``client`` (the manager), ``transport`` (token, requests, error mapping), ``queries`` (SOQL pages and
lookups), ``creates`` (app users without duplicates), ``schema`` (names, SOQL literals, limits),
``answers`` (reading answers).
"""

from .client import SalesforceConnectionManager
from .creates import SETTLE_FIRST_WAIT, SETTLE_MAX_WAIT
from .schema import MAX_COMPOSITE, MAX_REQUEST_BYTES, MAX_SOQL_CHARS, SalesforceSchema, soql_quote
from .transport import TokenCache

__all__ = [
    "SalesforceConnectionManager",
    "SalesforceSchema",
    "TokenCache",
    "soql_quote",
    "MAX_COMPOSITE",
    "MAX_REQUEST_BYTES",
    "MAX_SOQL_CHARS",
    "SETTLE_FIRST_WAIT",
    "SETTLE_MAX_WAIT",
]
