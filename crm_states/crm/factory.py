"""Pick the CRM from settings, with Sefaria's setting names.

Sefaria's ``crm_factory`` silently gives a dummy for an empty, unknown or misspelt ``CRM_TYPE``, so a
typo in production quietly drops every signup. Here that, and any missing setting, is a
``CrmConfigError`` naming the settings (never their values: some are secrets).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .base import CrmConnectionManager, requests_sent
from .dummy import DummyConnectionManager
from .errors import CrmConfigError
from .log import LogConnectionManager
from .nationbuilder import NationbuilderConnectionManager

CRM_TYPES = ("SALESFORCE", "NATIONBUILDER", "LOG", "NONE")


def crm_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> CrmConnectionManager:
    """The manager ``CRM_TYPE`` names, built from ``env`` (default ``os.environ``).

    ``overrides`` are extra keyword arguments for the manager's constructor (``session``, ``policy``,
    ``sleep``...); they win over keywords read from ``env`` (``base_url``, ``api_version``).
    Values are stripped; an empty value counts as missing.
    """
    settings = os.environ if env is None else env

    def get(name: str) -> str:
        return (settings.get(name) or "").strip()

    def require(crm_type: str, *names: str) -> list[str]:
        missing = [name for name in names if not get(name)]
        if missing:
            raise CrmConfigError(f"CRM_TYPE={crm_type} needs {', '.join(missing)} (missing or empty)")
        return [get(name) for name in names]

    given = get("CRM_TYPE")
    crm_type = given.upper()
    if crm_type == "SALESFORCE":
        base_url, client_id, client_secret = require(
            crm_type, "SALESFORCE_BASE_URL", "SALESFORCE_CLIENT_ID", "SALESFORCE_CLIENT_SECRET")
        from .salesforce import (
            SalesforceConnectionManager,  # lazy: the other types must not need it
        )

        keywords: dict[str, Any] = {}
        if get("SALESFORCE_API_VERSION"):
            keywords["api_version"] = get("SALESFORCE_API_VERSION").removeprefix("v")
        keywords = {**keywords, **overrides}
        keywords["schema"] = _salesforce_schema(keywords.get("schema"), get)
        return SalesforceConnectionManager(base_url, client_id, client_secret, **keywords)
    if crm_type == "NATIONBUILDER":
        (token,) = require(crm_type, "NATIONBUILDER_TOKEN")
        keywords = {"base_url": get("NATIONBUILDER_BASE_URL") or None, **overrides}
        if not get("NATIONBUILDER_SLUG") and not keywords["base_url"]:
            raise CrmConfigError(
                f"CRM_TYPE={crm_type} needs NATIONBUILDER_SLUG (or NATIONBUILDER_BASE_URL) (missing or empty)")
        return NationbuilderConnectionManager(get("NATIONBUILDER_SLUG") or None, token, **keywords)
    if crm_type == "LOG":
        (path,) = require(crm_type, "CRM_LOG_PATH")
        return LogConnectionManager(path, **overrides)
    if crm_type == "NONE":
        return DummyConnectionManager(**overrides)
    shown = repr(given[:40]) if given else "empty"
    raise CrmConfigError(f"CRM_TYPE is {shown}: set it to one of {', '.join(CRM_TYPES)}")


class LazyCrm:
    """The CRM of ``CRM_TYPE``, built on first use: a command that asks the CRM nothing (a replay, a resume
    that writes journaled results) then never needs one configured.

    ``refusal`` keeps the first ``CrmConfigError`` (which includes ``CrmNotSupported``) that building the
    CRM or calling it raised, so a caller that let a machine halt on it can say why in one line. Any
    attribute is the built CRM's; methods are wrapped only to note that refusal.
    """

    def __init__(self, build: Callable[[], CrmConnectionManager] = crm_from_env) -> None:
        self._build = build
        self._crm: CrmConnectionManager | None = None
        self._lock = threading.Lock()
        self.refusal: CrmConfigError | None = None

    def resolve(self) -> CrmConnectionManager:
        """The CRM, built now if not yet; ``CrmConfigError`` when the settings do not make one."""
        with self._lock:
            if self._crm is None:
                try:
                    self._crm = self._build()
                except CrmConfigError as exc:
                    self._note(exc)
                    raise
            return self._crm

    @property
    def api_requests(self) -> int:
        """The requests the CRM has sent: none while it was never built (a command that asked it nothing
        must not need one configured just to count)."""
        return requests_sent(self._crm)  # None, never built: 0

    def _note(self, exc: CrmConfigError) -> None:
        if self.refusal is None:
            self.refusal = exc

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self.resolve(), name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except CrmConfigError as exc:
                self._note(exc)
                raise

        return call

    def __repr__(self) -> str:
        return f"LazyCrm({self._crm!r})" if self._crm is not None else "LazyCrm(not built yet)"


CrmConnectionManager.register(LazyCrm)  # isinstance holds: it stands for the CRM it builds


#: Schema settings read from the environment: variable -> ``SalesforceSchema`` field.
SALESFORCE_SCHEMA_SETTINGS = {
    "SALESFORCE_NATIONBUILDER_ID_FIELD": "nationbuilder_id_field",  # e.g. Contact__r.NationBuilder_Id__c
    "SALESFORCE_APP_USER_KEY_PREFIX": "app_user_key_prefix",  # the first 3 characters of app user ids
    "SALESFORCE_EXTERNAL_ID_FIELD": "external_id_field",  # creates upsert on it (the Sefaria user id)
}


def _salesforce_schema(given: Any, get: Callable[[str], str]) -> Any:
    """The schema an override gave (or the default), refined by the schema settings that are set."""
    from .salesforce import SalesforceSchema

    schema = given if given is not None else SalesforceSchema()
    changes = {field: get(name) for name, field in SALESFORCE_SCHEMA_SETTINGS.items() if get(name)}
    try:
        return attrs.evolve(schema, **changes)
    except ValueError:
        names = ", ".join(name for name, field in SALESFORCE_SCHEMA_SETTINGS.items() if field in changes)
        raise CrmConfigError(f"{names}: not a Salesforce field path or key prefix (see SalesforceSchema)") from None
