"""The tests' minimal Sefaria project: Django with its ``auth_user`` table in SQLite, the stub of Sefaria's
``sefaria.helper.crm.salesforce`` on the path, and Sefaria's settings pointed at a test database and CRM."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from pymongo import uri_parser

STUB = Path(__file__).resolve().parent / "stub"
_lock = threading.Lock()


def setup_django(directory: Path) -> None:
    """``django.setup()`` with ``tests.sefaria.django_settings`` and the auth tables migrated; once per
    process (Django can be configured only once)."""
    with _lock:
        if str(STUB) not in sys.path:
            sys.path.insert(0, str(STUB))
        from django.conf import settings

        if settings.configured:
            return
        os.environ["CRM_STATES_TEST_SQLITE"] = str(directory / "auth.sqlite3")
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.sefaria.django_settings"
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0, interactive=False)


def mongo_settings(mongo_url: str, db_name: str) -> dict[str, Any]:
    """Sefaria's MongoDB settings for the server at ``mongo_url`` (a replica set's host list and name when
    the URL names one) and the database ``db_name``."""
    parsed = uri_parser.parse_uri(mongo_url)
    replica_set = parsed["options"].get("replicaset")
    found: dict[str, Any] = {"SEFARIA_DB": db_name, "SEFARIA_DB_USER": parsed["username"] or "",
                             "SEFARIA_DB_PASSWORD": parsed["password"] or "", "MONGO_REPLICASET_NAME": replica_set}
    if replica_set:
        found["MONGO_HOST"] = ",".join(f"{host}:{port}" for host, port in parsed["nodelist"])
    else:
        found["MONGO_HOST"], found["MONGO_PORT"] = parsed["nodelist"][0]
    return found


def salesforce_settings(fake: Any) -> dict[str, Any]:
    return {"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
            "SALESFORCE_CLIENT_SECRET": fake.client_secret}
