"""Checks every value a CRM client hands back passes first, so a hostile answer never passes as data.

A Salesforce record id is 15 or 18 characters of ``[A-Za-z0-9]``; an 18-character one ends in the
case-safe checksum of its first 15; where the object's key prefix is known the id must start with it.
Any value returned (ids, NationBuilder ids, emails) longer than ``MAX_VALUE_CHARS`` is refused. The
details say what is wrong and never carry the value itself.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import CrmBadAnswer

#: The longest value a client hands back; anything longer is refused as hostile or broken.
MAX_VALUE_CHARS = 1_000

_ID_CHARS = re.compile(r"[A-Za-z0-9]+")
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
#: Capitals to "1", everything else an id holds to "0": a chunk's bits, lowest first.
_BITS = str.maketrans({**{chr(c): "1" for c in range(65, 91)}, **{chr(c): "0" for c in range(97, 123)},
                       **{str(d): "0" for d in range(10)}})


def id18_suffix(id15: str) -> str:
    """Salesforce's three checksum characters of a 15-character id of letters and digits (one per five
    characters: a bit per capital letter, read as an index into A-Z0-5)."""
    bits = id15.translate(_BITS)
    return (_CHECKSUM[int(bits[4::-1], 2)] + _CHECKSUM[int(bits[9:4:-1], 2)]
            + _CHECKSUM[int(bits[14:9:-1], 2)])


def record_id_problem(value: Any, prefix: str | None = None, *, what: str = "Id") -> str | None:
    """What is wrong with ``value`` as a Salesforce record id (of the object with key ``prefix``), or None."""
    if not isinstance(value, str):
        return f"{what} is not text ({type(value).__name__})"
    problem = size_problem(value, what)
    if problem:
        return problem
    if len(value) not in (15, 18) or not _ID_CHARS.fullmatch(value):
        return f"{what} is not a Salesforce record id ({len(value)} characters, wanted 15 or 18 letters and digits)"
    if len(value) == 18 and value[15:] != id18_suffix(value[:15]):
        return f"{what} has a wrong checksum suffix (a corrupted 18-character id)"
    if prefix is not None and value[:3] != prefix:
        return f"{what} is not an id of the expected object (its key prefix is not {prefix})"
    return None


def check_record_id(value: Any, prefix: str | None = None, *, what: str = "Id", where: str = "salesforce") -> str:
    """``value`` when it is a valid record id; else ``CrmBadAnswer`` with the problem."""
    problem = record_id_problem(value, prefix, what=what)
    if problem:
        raise CrmBadAnswer(f"{where}: refused an answer: {problem}", code="BAD_RECORD_ID")
    return value


def size_problem(value: Any, what: str) -> str | None:
    """Says so when ``value`` (as text) is longer than ``MAX_VALUE_CHARS``."""
    size = len(value) if isinstance(value, str) else len(str(value)) if isinstance(value, int) else 0
    if size > MAX_VALUE_CHARS:
        return f"{what} is {size:,} characters long, over the {MAX_VALUE_CHARS:,} limit"
    return None


def check_size(value: Any, what: str, *, where: str = "salesforce") -> Any:
    """``value`` unless it is oversized; then ``CrmBadAnswer``."""
    problem = size_problem(value, what)
    if problem:
        raise CrmBadAnswer(f"{where}: refused an answer: {problem}", code="OVERSIZED_VALUE")
    return value
