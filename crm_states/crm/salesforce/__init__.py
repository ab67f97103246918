"""The Salesforce client, as a package of small modules; import its names from here.

``client`` (the manager), ``transport`` (token, requests, error mapping), ``queries`` (SOQL pages and
packed lookups), ``creates`` (app users without duplicates), ``bulk`` (Bulk API 2.0 query jobs),
``schema`` (names, field paths, SOQL literals, limits), ``answers`` (reading answers).
"""

from .bulk import BulkJob, BulkPage
from .client import SalesforceConnectionManager
from .creates import SETTLE_FIRST_WAIT, SETTLE_MAX_WAIT
from .schema import (
    MAX_COMPOSITE,
    MAX_REQUEST_BYTES,
    MAX_SOQL_CHARS,
    SalesforceSchema,
    soql_quote,
)
from .transport import TokenCache

__all__ = [
    "SalesforceConnectionManager",
    "BulkJob",
    "BulkPage",
    "SalesforceSchema",
    "TokenCache",
    "soql_quote",
    "MAX_COMPOSITE",
    "MAX_REQUEST_BYTES",
    "MAX_SOQL_CHARS",
    "SETTLE_FIRST_WAIT",
    "SETTLE_MAX_WAIT",
]
