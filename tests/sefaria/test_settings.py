"""Sefaria's settings where Sefaria keeps them: Django's settings when Django is configured (the environment
for names Django does not define), Sefaria's MongoDB settings and URI; and the library without Django."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crm_states.api import CrmStates
from crm_states.sefaria import CrmMediator
from crm_states.sefaria.settings import crm_settings, sefaria_database, shared_app
from crm_states.testing import FakeSalesforce

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("django_project")


def test_django_settings_win_and_the_environment_fills_in(settings_for, fake: FakeSalesforce, monkeypatch) -> None:
    monkeypatch.setenv("CRM_TYPE", "NONE")
    monkeypatch.setenv("CRM_STATES_CLAIM_WAIT", "0.5")
    monkeypatch.setenv("UNRELATED_SECRET", "never read")
    with settings_for(CRM_TYPE="SALESFORCE", SALESFORCE_BASE_URL=fake.url, SALESFORCE_CLIENT_ID="id",
                      SALESFORCE_CLIENT_SECRET="s", SALESFORCE_API_VERSION=60.0):
        found = crm_settings()
        assert found["CRM_TYPE"] == "SALESFORCE" and found["SALESFORCE_BASE_URL"] == fake.url
        assert found["SALESFORCE_API_VERSION"] == "60.0"  # a number in local_settings.py is read as text
        assert found["CRM_STATES_CLAIM_WAIT"] == "0.5" and "UNRELATED_SECRET" not in found
        assert found["NATIONBUILDER_TOKEN"] == ""  # Django's empty value wins over nothing
        app = shared_app()
        assert app.claim_wait == 0.5 and shared_app() is app  # one per process and settings
    with settings_for(CRM_TYPE="NONE"):
        assert shared_app() is not app and shared_app().crm.name == "none"


def test_sefarias_standalone_mongodb_settings_reach_the_test_database(sefaria, db, mongo_url: str) -> None:
    app = CrmMediator().app
    assert app.store.db.name == db.name
    db.profiles.insert_one({"id": 5, "slug": "five"})
    assert app.store.get_profile(5)["slug"] == "five"


def test_a_replica_set_is_reached_by_sefarias_uri() -> None:
    db = sefaria_database({"MONGO_HOST": "db1.internal:27017,db2.internal:27018", "MONGO_PORT": 27017,
                           "SEFARIA_DB": "sefaria", "SEFARIA_DB_USER": "app user", "SEFARIA_DB_PASSWORD": "p@ss:w/rd",
                           "MONGO_REPLICASET_NAME": "rs0"})
    client = db.client
    try:
        assert db.name == "sefaria"
        assert client.options.replica_set_name == "rs0"
        assert client.read_preference.mongos_mode == "primaryPreferred"
        assert set(client.topology_description.server_descriptions()) == {("db1.internal", 27017),
                                                                          ("db2.internal", 27018)}
        credentials = client.options.pool_options._credentials
        assert (credentials.username, credentials.password) == ("app user", "p@ss:w/rd")  # quoted, then decoded
        assert "p@ss" not in repr(client) and "p@ss" not in repr(db)
    finally:
        client.close()


@pytest.mark.parametrize("mongo, message", [
    ({"MONGO_HOST": "", "SEFARIA_DB": "x"}, "MONGO_HOST"),
    ({"MONGO_HOST": "localhost", "MONGO_PORT": "27o17"}, "MONGO_PORT"),
    ({"MONGO_HOST": "localhost", "MONGO_PORT": 70000}, "MONGO_PORT"),
    ({"MONGO_HOST": "localhost", "SEFARIA_DB": 7}, "SEFARIA_DB"),
    ({"MONGO_HOST": "db1:27017,db2:x", "MONGO_REPLICASET_NAME": "rs0"}, "do not name a MongoDB"),
    ({"MONGO_HOST": "mongodb://db1", "MONGO_REPLICASET_NAME": "rs0"}, "do not name a MongoDB"),
])
def test_bad_mongodb_settings_are_named_not_shown(mongo: dict, message: str) -> None:
    secret = "SENTINEL-pw-1f2e3d"
    with pytest.raises(ValueError, match=message) as caught:
        sefaria_database({**mongo, "SEFARIA_DB_USER": "u", "SEFARIA_DB_PASSWORD": secret})
    assert secret not in str(caught.value)


def test_without_django_the_library_reads_the_environment(db, mongo_url: str, fake: FakeSalesforce) -> None:
    """A process that never configured Django (the CLI, a worker): Django is not even imported, and the
    mediator runs on MONGO_URL/MONGO_DB and CRM_TYPE from the environment."""
    db.profiles.insert_one({"id": 77, "email": "cli@example.org"})
    script = """
import json, sys
from crm_states.sefaria import CrmMediator
from crm_states.sefaria.settings import django_settings
m = CrmMediator()
print(json.dumps({"django_settings": django_settings() is None, "created": m.create_crm_user("cli@example.org", "C", "L"),
                  "lists": m.subscribe_to_lists("cli@example.org", "C", "L"), "db": m.app.store.db.name,
                  "django_imported": any(name == "django" or name.startswith("django.") for name in sys.modules)}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO")}
    env.update({"MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url,
                "SALESFORCE_CLIENT_ID": fake.client_id, "SALESFORCE_CLIENT_SECRET": fake.client_secret,
                "CRM_STATES_AFTERCARE_SECONDS": "off", "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"django_settings": True, "created": True, "lists": True, "db": db.name,
                                       "django_imported": False}
    assert db.profiles.find_one({"id": 77})["sf_app_user_id"] == fake.records("Sefaria_App_User__c")[0]["Id"]
    assert CrmStates.open(db, None).position(77, "new_user_signup").state == "WroteSalesforceAppUserUid"  # type: ignore[arg-type]
