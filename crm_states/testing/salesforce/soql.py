"""The SOQL the fake understands: a tokenizer with Salesforce's string escapes and a small parser."""

from __future__ import annotations

import re
from typing import Any

import attrs


class SoqlError(ValueError):
    """The SOQL text is outside the grammar (the fake answers 400 MALFORMED_QUERY)."""


class InvalidField(SoqlError):
    """A field path the org does not have (the fake answers 400 INVALID_FIELD)."""


@attrs.frozen
class Token:
    kind: str  # "ident", "string", "number" or "punct"
    value: Any


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\"}
_TOKEN = re.compile(r"""\s*(?:
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*) | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<punct>!=|[(),=]) | (?P<quote>')
)""", re.VERBOSE)


def tokenize_soql(text: str) -> list[Token]:
    """Split SOQL into tokens, decoding string literals' escapes as Salesforce does.

    Escapes: ``\\n \\r \\t \\b \\f`` (either case), ``\\" \\' \\\\``; any other backslash or an
    unterminated string is an error.
    """
    tokens: list[Token] = []
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise SoqlError(f"unexpected character at {pos}: {text[pos:pos + 10]!r}")
            return tokens
        pos = m.end()
        if m["ident"]:
            tokens.append(Token("ident", m["ident"]))
        elif m["number"]:
            tokens.append(Token("number", float(m["number"]) if "." in m["number"] else int(m["number"])))
        elif m["punct"]:
            tokens.append(Token("punct", m["punct"]))
        else:
            value, pos = _read_string(text, pos)
            tokens.append(Token("string", value))


def _read_string(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if c == "'":
            return "".join(out), pos + 1
        if c == "\\":
            nxt = text[pos + 1:pos + 2]
            decoded = _ESCAPES.get(nxt.lower() if nxt.isalpha() else nxt)
            if decoded is None:
                raise SoqlError(f"invalid escape sequence \\{nxt} at {pos}")
            out.append(decoded)
            pos += 2
        else:
            out.append(c)
            pos += 1
    raise SoqlError("unterminated string literal")


@attrs.frozen
class Soql:
    """A parsed query: ``values`` is the literal list of ``WHERE field = lit`` / ``!= lit`` / ``IN (...)``,
    ``op`` which of the three. A field may be a relationship path (``Contact__r.NationBuilder_Id__c``)."""

    fields: tuple[str, ...]
    sobject: str
    where_field: str | None = None
    values: tuple[Any, ...] = ()
    limit: int | None = None
    op: str = "="


NULL = object()


def parse_soql(text: str) -> Soql:
    tokens = tokenize_soql(text)
    pos = 0

    def peek_word() -> str | None:
        return tokens[pos].value.upper() if pos < len(tokens) and tokens[pos].kind == "ident" else None

    def take(kind: str, value: str | None = None) -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise SoqlError(f"unexpected end of query, wanted {value or kind}")
        token = tokens[pos]
        if token.kind != kind or (value is not None and str(token.value).upper() != value):
            raise SoqlError(f"unexpected {token.value!r}, wanted {value or kind}")
        pos += 1
        return token.value

    def literal() -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise SoqlError("unexpected end of query, wanted a literal")
        token = tokens[pos]
        pos += 1
        if token.kind in ("string", "number"):
            return token.value
        word = str(token.value).lower()
        if token.kind == "ident" and word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": NULL}[word]
        raise SoqlError(f"unexpected {token.value!r}, wanted a literal")

    take("ident", "SELECT")
    fields = [take("ident")]
    while pos < len(tokens) and tokens[pos] == Token("punct", ","):
        pos += 1
        fields.append(take("ident"))
    take("ident", "FROM")
    sobject = take("ident")
    where_field, values, limit, op = None, (), None, "="
    if peek_word() == "WHERE":
        pos += 1
        where_field = take("ident")
        if peek_word() == "IN":
            pos += 1
            take("punct", "(")
            found = [literal()]
            while pos < len(tokens) and tokens[pos] == Token("punct", ","):
                pos += 1
                found.append(literal())
            take("punct", ")")
            values, op = tuple(found), "IN"
        else:
            op = "!=" if pos < len(tokens) and tokens[pos] == Token("punct", "!=") else "="
            take("punct", op)
            values = (literal(),)
    if peek_word() == "LIMIT":
        pos += 1
        limit = take("number")
        if not isinstance(limit, int) or limit < 0:
            raise SoqlError("LIMIT wants a non-negative integer")
    if pos != len(tokens):
        raise SoqlError(f"unexpected {tokens[pos].value!r} after the query")
    if "." in sobject:
        raise SoqlError(f"unexpected {sobject!r}, wanted an sObject name")
    return Soql(tuple(fields), sobject, where_field, values, limit, op)


def match_key(value: Any) -> str | None:
    """What Salesforce-like comparison compares: strings case-insensitively, numbers by their text."""
    if value is None or value is NULL:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and float(value).is_integer():
        return str(int(value))
    return str(value).lower()

