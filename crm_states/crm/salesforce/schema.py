"""What the Salesforce client may put into a request: object and field names, SOQL literals, limits."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from ..errors import CrmRejected
from ..http import short

#: Salesforce's limit on request line plus headers; beyond it the API answers 414 or 431.
MAX_REQUEST_BYTES = 16_384
#: Salesforce's limit on the length of one SOQL statement.
MAX_SOQL_CHARS = 100_000
#: Sub-requests per ``POST /composite``, and how many of them may be queries, query-more calls or
#: sObject Collections.
MAX_COMPOSITE = 25
MAX_COMPOSITE_QUERIES = 5
#: Records per sObject Collections request.
MAX_COLLECTION = 200

_SOQL_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f",
                 "\b": "\\b"}
_SOQL_RESERVED = re.compile("[" + re.escape("".join(_SOQL_ESCAPES)) + "]")
_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def soql_quote(value: str) -> str:
    """``value`` as a SOQL string literal, quotes included; the only way literals enter our SOQL.

    Escapes what Salesforce reserves in quoted strings: backslash, both quotes, newline, carriage
    return, tab, form feed and backspace. Nothing a caller passes can end the literal early.
    """
    if not isinstance(value, str):
        raise TypeError(f"soql_quote wants a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no request could carry it
        raise CrmRejected(f"not valid Unicode text (a lone surrogate at position {exc.start}): "
                          f"{short(ascii(value), 80)}") from None
    return "'" + _SOQL_RESERVED.sub(lambda m: _SOQL_ESCAPES[m.group()], value) + "'"


def _api_name(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:  # type: ignore[type-arg]
    """Object and field names go into URLs and SOQL unquoted, so they must be plain API names."""
    if value is not None and not _API_NAME.fullmatch(value):
        raise ValueError(f"{attribute.name} is not a Salesforce API name: {value!r}")


def _name(default: str) -> Any:
    return attrs.field(default=default, validator=_api_name)


def _field_path(instance: Any, attribute: attrs.Attribute, value: str) -> None:  # type: ignore[type-arg]
    """A field, or a field reached through parent relationships (``Contact__r.NationBuilder_Id__c``)."""
    parts = value.split(".") if isinstance(value, str) else [""]
    if not 1 <= len(parts) <= 5 or not all(_API_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"{attribute.name} is not a Salesforce field path: {short(repr(value), 80)}")


def _key_prefix(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:  # type: ignore[type-arg]
    if value is not None and not re.fullmatch(r"[A-Za-z0-9]{3}", value):
        raise ValueError(f"{attribute.name} must be three letters or digits, not {short(repr(value), 40)}")


def field_value(record: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in a query record: ``Contact__r.X`` is ``record["Contact__r"]["X"]`` (a
    missing parent is ``None``). Salesforce spells keys as the org does, so case is ignored."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        if part in value:
            value = value[part]
        else:
            lowered = part.lower()
            value = next((v for k, v in value.items() if isinstance(k, str) and k.lower() == lowered), None)
    return value


@attrs.frozen
class SalesforceSchema:
    """Every object and field name the client uses; the defaults are Sefaria's org.

    ``nationbuilder_id_field`` is a field path: ``NationBuilder_Id__c`` on the app user, or through its
    Contact (``Contact__r.NationBuilder_Id__c``, where the operators' report shows it).
    ``nationbuilder_id_is_text`` says whether that field is a Text field (ids are sent as quoted
    literals) or a Number field (sent bare). ``app_user_key_prefix``, when known (the first three
    characters of every app user id), is checked on every app user id an answer carries. ``external_id_field``, when set, makes creates with
    an ``external_id`` an upsert on that field. ``sustainer_query`` must select ``Id``; its default is
    ``SELECT Id FROM Sefaria_App_User__c WHERE Sustainer__c = true``.
    """

    app_user_object: str = _name("Sefaria_App_User__c")
    first_name_field: str = _name("First_Name__c")
    last_name_field: str = _name("Last_Name__c")
    email_field: str = _name("Sefaria_App_Email__c")
    language_field: str = _name("Hebrew_English__c")
    educator_field: str = _name("Educator__c")
    review_field: str = _name("Manual_Review_Required__c")
    app_data_object: str = _name("Sefaria_App_Data__c")
    app_data_json_field: str = _name("JSON_STRING__c")
    newsletter_lists_field: str = _name("Newsletter_Names__c")
    newsletter_action: str = "Newsletter"
    nationbuilder_id_field: str = attrs.field(default="NationBuilder_Id__c", validator=_field_path)
    nationbuilder_id_is_text: bool = True
    app_user_key_prefix: str | None = attrs.field(default=None, validator=_key_prefix)
    external_id_field: str | None = attrs.field(default=None, validator=_api_name)
    sustainer_query: str = "SELECT Id FROM Sefaria_App_User__c WHERE Sustainer__c = true"
    list_mapping_object: str = _name("AC_to_SF_List_Mapping__mdt")
    list_name_field: str = _name("Subscriptions__c")


def language(lang: str) -> str:
    """Sefaria's ``Hebrew_English__c`` value for an interface language."""
    return "Hebrew" if lang == "he" else "English"
