"""Sefaria's input checks, ``validate_email`` and ``validate_name``, with the known defect fixed.

``validate_email`` accepts exactly what Django's ``EmailValidator`` accepts (Django 5.2's rule in
``django.core.validators``, reimplemented so the library does not import Django; the tests compare
the two): a dot-atom or quoted local part, and a domain of labels (Unicode letters allowed, as Django
allows them), ``localhost``, or an ``[IPv4]``/``[IPv6]`` literal; at most 320 characters.

``validate_name`` is lenient where Sefaria's rule (``[\\w\\- \\u0590-\\u05fe]``, under 20 characters)
refused real names: apostrophes, hyphens, Hebrew and long names are names. It refuses only what cannot
be one: not text, empty after stripping, control characters or lone surrogates, over 255 characters.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from .errors import CrmInvalidInput

MAX_EMAIL_CHARS = 320
MAX_NAME_CHARS = 255

# Django 5.2's patterns (django/core/validators.py: EmailValidator, DomainNameValidator), flags included.
_USER = re.compile(
    r"(^[-!#$%&'*+/=?^_`{}|~0-9A-Z]+(\.[-!#$%&'*+/=?^_`{}|~0-9A-Z]+)*\Z"
    r'|^"([\001-\010\013\014\016-\037!#-\[\]-\177]|\\[\001-\011\013\014\016-\177])*"\Z)',
    re.IGNORECASE,
)
_UL = "\u00a1-\uffff"  # Django's "Unicode letters" range
_DOMAIN = re.compile(
    r"^[a-z" + _UL + r"0-9](?:[a-z" + _UL + r"0-9-]{0,61}[a-z" + _UL + r"0-9])?"  # host
    r"(?:\.(?!-)[a-z" + _UL + r"0-9-]{1,63}(?<!-))*"  # more labels
    r"\.(?!-)(?:[a-z" + _UL + r"-]{2,63}|xn--[a-z0-9]{1,59})(?<!-)"  # top-level label
    r"\Z",
    re.IGNORECASE,
)
_LITERAL = re.compile(r"\[([A-F0-9:.]+)\]\Z", re.IGNORECASE)
_DOMAIN_ALLOWLIST = ("localhost",)
_MAX_IPV6_CHARS = 39


def validate_email(name: object) -> bool:
    """True for an address Django's ``EmailValidator`` accepts; else ``ValueError("Invalid Email")``
    (a ``CrmInvalidInput``). The parameter is called ``name`` as in Sefaria's signature."""
    if not isinstance(name, str) or not _is_email(name):
        raise CrmInvalidInput("Invalid Email")
    return True


def validate_name(name: object) -> bool:
    """True for anything that can be a person's name; else ``ValueError("Invalid Name")``."""
    if (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS
            or any(unicodedata.category(c) in ("Cc", "Cs") for c in name)):
        raise CrmInvalidInput("Invalid Name")
    return True


def _is_email(value: str) -> bool:
    if not value or "@" not in value or len(value) > MAX_EMAIL_CHARS:
        return False
    user, domain = value.rsplit("@", 1)
    if not _USER.match(user):
        return False
    if domain in _DOMAIN_ALLOWLIST or _DOMAIN.match(domain):
        return True
    literal = _LITERAL.match(domain)
    return literal is not None and _valid_ip(literal[1])


def _valid_ip(text: str) -> bool:
    """Django's ``validate_ipv46_address``: an IPv4 address, or an IPv6 one of at most 39 characters."""
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        pass
    if len(text) > _MAX_IPV6_CHARS:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
