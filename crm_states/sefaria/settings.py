"""Sefaria's settings, where Sefaria keeps them: ``django.conf.settings`` (its ``local_settings.py``).

When Django is configured, the CRM settings (``CRM_TYPE``, ``SALESFORCE_*``, ``NATIONBUILDER_*``, ``CRM_*``)
are read from Django's settings, and a name Django does not define from the environment; Sefaria's MongoDB
is the one its ``sefaria/system/database.py`` connects to (``MONGO_HOST``, ``MONGO_PORT``, ``SEFARIA_DB``,
``SEFARIA_DB_USER``, ``SEFARIA_DB_PASSWORD``, ``MONGO_REPLICASET_NAME``). Without Django (the CLI, workers
started without it) everything comes from the environment (``MONGO_URL``, ``MONGO_DB``...), as
``CrmStates.from_env`` reads it. Django is imported only when it is already configured.

``shared_app()`` is the one ``CrmStates`` of the process for those settings: Sefaria builds a
``CrmMediator()`` per web request, and a MongoDB client and a Salesforce token per request would be
wasteful. Nothing is sent anywhere while it is built: the CRM is built on first use (``LazyCrm``), and the
indexes with the first commit. Values of these settings never reach a log line or an error message.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..api import DEFAULT_DB, CrmStates, connect
from ..crm.factory import LazyCrm, crm_from_env

#: Prefixes of the CRM settings read from Django's settings (all of Sefaria's, and the project's own).
CRM_PREFIXES = ("CRM_", "SALESFORCE_", "NATIONBUILDER_")
#: Sefaria's MongoDB settings (sefaria/system/database.py).
MONGO_SETTINGS = ("MONGO_HOST", "MONGO_PORT", "SEFARIA_DB", "SEFARIA_DB_USER", "SEFARIA_DB_PASSWORD",
                  "MONGO_REPLICASET_NAME")
#: The client options ``crm_states.api.connect`` uses: fail fast rather than hang a web request.
CLIENT_OPTIONS = {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000, "socketTimeoutMS": 30000}


def django_settings() -> Any | None:
    """``django.conf.settings`` when Django is configured, else ``None``. Django is never imported here: a
    process whose settings are configured has imported ``django.conf`` already, and one without Django
    (the CLI, a worker) pays nothing."""
    conf = sys.modules.get("django.conf")
    settings = getattr(conf, "settings", None)
    return settings if settings is not None and settings.configured else None


def crm_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings ``crm_from_env`` and ``CrmStates.from_env`` read, as one mapping: the environment's,
    overridden by every ``CRM_*``/``SALESFORCE_*``/``NATIONBUILDER_*`` setting Django defines (an empty one
    too: Django's word wins). ``None`` values count as unset."""
    merged = {k: v for k, v in (os.environ if environ is None else environ).items()
              if k.startswith(CRM_PREFIXES) or k in ("MONGO_URL", "MONGO_DB")}
    settings = django_settings()
    if settings is not None:
        for name in dir(settings):
            if name.isupper() and name.startswith(CRM_PREFIXES):
                value = getattr(settings, name)
                if value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = value if isinstance(value, str) else str(value)
    return merged


def mongo_settings() -> dict[str, Any] | None:
    """Sefaria's MongoDB settings from Django (those it defines), or ``None`` when Django is not configured
    or defines no ``MONGO_HOST`` (then ``MONGO_URL``/``MONGO_DB`` are used)."""
    settings = django_settings()
    if settings is None or getattr(settings, "MONGO_HOST", None) in (None, ""):
        return None
    return {name: getattr(settings, name, None) for name in MONGO_SETTINGS}


def sefaria_database(mongo: Mapping[str, Any]) -> Database:
    """The database Sefaria's ``sefaria/system/database.py`` connects to for these settings. With
    ``MONGO_REPLICASET_NAME`` the URI is ``mongodb://[user:pw@]MONGO_HOST/?replicaSet=NAME&readPreference=
    primaryPreferred`` (``MONGO_HOST`` a comma-separated list of host:port; user and password quoted);
    without, ``MONGO_HOST`` and ``MONGO_PORT``, with the user and password when both are set."""
    host = mongo.get("MONGO_HOST")
    if isinstance(host, (list, tuple)):
        host = ",".join(str(h) for h in host)
    if not isinstance(host, str) or not host.strip():
        raise ValueError("MONGO_HOST must name the MongoDB host (or a comma-separated list of host:port)")
    name = mongo.get("SEFARIA_DB") or DEFAULT_DB
    if not isinstance(name, str):
        raise ValueError(f"SEFARIA_DB must be a database name, got a {type(name).__name__}")
    user, password = mongo.get("SEFARIA_DB_USER") or "", mongo.get("SEFARIA_DB_PASSWORD") or ""
    replica_set = mongo.get("MONGO_REPLICASET_NAME")
    port = _port(mongo.get("MONGO_PORT"))
    try:
        if replica_set:
            auth = (f"{urllib.parse.quote_plus(str(user))}:{urllib.parse.quote_plus(str(password))}@"
                    if user and password else "")
            query = urllib.parse.urlencode({"replicaSet": str(replica_set), "readPreference": "primaryPreferred"})
            client: MongoClient = MongoClient(f"mongodb://{auth}{host.strip()}/?{query}", **CLIENT_OPTIONS)
        else:
            credentials = {"username": str(user), "password": str(password)} if user and password else {}
            client = MongoClient(host.strip(), port, **credentials, **CLIENT_OPTIONS)
    except (PyMongoError, TypeError, ValueError) as exc:  # its message may quote the URI and password: not shown
        raise ValueError(f"MONGO_HOST, MONGO_PORT and MONGO_REPLICASET_NAME do not name a MongoDB "
                         f"({type(exc).__name__})") from None
    return client[name]


def _port(value: Any) -> int:
    if value in (None, ""):
        return 27017
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if isinstance(value, bool) or not 0 < port < 65536:
        raise ValueError(f"MONGO_PORT must be a port number, got {str(value)[:20]!r}")
    return port


_lock = threading.Lock()
_shared: tuple[Any, CrmStates] | None = None


def shared_app() -> CrmStates:
    """The process's ``CrmStates`` for the current settings: built on first use, again after a fork (a
    MongoDB client must not cross one) or when the settings changed (tests override them)."""
    global _shared
    crm = crm_settings()
    mongo = mongo_settings()
    key = (os.getpid(), tuple(sorted(crm.items())), None if mongo is None else tuple(sorted(mongo.items(), key=str)))
    with _lock:
        if _shared is not None and _shared[0] == key:
            return _shared[1]
        db = sefaria_database(mongo) if mongo is not None else connect(crm.get("MONGO_URL"), crm.get("MONGO_DB"))
        app = CrmStates.from_env(db, crm=LazyCrm(lambda: crm_from_env(crm)), env=crm, ensure_indexes=False)
        _shared = (key, app)
        return app
