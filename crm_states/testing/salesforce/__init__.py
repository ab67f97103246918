"""``FakeSalesforce`` and its parts, as a package of small modules; import their names from here.

``fake`` (the server: tokens, admission, the Python API for tests), ``rest`` (sObjects and queries),
``composite``, ``soql`` (the query language it understands), ``storage`` (tables and indexes),
``common`` (limits, ids, error bodies).
"""

from .common import (
    KEY_PREFIXES,
    MAX_COMPOSITE,
    MAX_REQUEST_BYTES,
    MAX_SOQL_CHARS,
    SESSION_EXPIRED,
    UNABLE_TO_LOCK_ROW,
    salesforce_id,
    sf_errors,
    to_id18,
)
from .fake import FakeSalesforce
from .soql import Soql, SoqlError, Token, match_key, parse_soql, tokenize_soql

__all__ = [
    "FakeSalesforce",
    "KEY_PREFIXES",
    "MAX_COMPOSITE",
    "MAX_REQUEST_BYTES",
    "MAX_SOQL_CHARS",
    "SESSION_EXPIRED",
    "UNABLE_TO_LOCK_ROW",
    "Soql",
    "SoqlError",
    "Token",
    "match_key",
    "parse_soql",
    "salesforce_id",
    "sf_errors",
    "to_id18",
    "tokenize_soql",
]
