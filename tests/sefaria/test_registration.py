"""The signup at Sefaria's real call point: ``create_crm_user`` inside ``process_register_form``'s transaction,
before the profile exists, then Sefaria's stale saves. The app user is created once, after the commit, and
its id reaches the profile with no manual step (the aftercare), or at the latest with the periodic heal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import transaction

from crm_states.sefaria import CrmMediator
from crm_states.sefaria.aftercare import AFTERCARE, DEFAULT_SCHEDULE, schedule_from
from crm_states.testing import FakeSalesforce
from tests.faults import assert_history_is_path
from machines import new_user_signup as signup

APP_USER = "Sefaria_App_User__c"

pytestmark = pytest.mark.usefixtures("django_project")


def test_the_id_survives_a_gravatar_import_slower_than_the_first_checks(sefaria, db, fake: FakeSalesforce) -> None:
    sefaria.gravatar_seconds = 1.0  # the stale save lands after the 0.3 s and 0.8 s checks, before the 1.5 s one
    uid = sefaria.process_register_form("slow@example.org", "Slow", "Gravatar")
    [record] = fake.records(APP_USER)
    assert AFTERCARE.wait_idle(10)
    assert db.profiles.find_one({"id": uid})["sf_app_user_id"] == record["Id"]


def test_concurrent_registrations_each_get_one_app_user(sefaria, db, fake: FakeSalesforce) -> None:
    errors: list[BaseException] = []
    ids: list[int] = []

    def register(n: int) -> None:
        try:
            ids.append(sefaria.process_register_form(f"r{n}@example.org", "R", str(n), lang="he" if n % 2 else "en"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert AFTERCARE.wait_idle(20)
    records = {r["Sefaria_App_Email__c"]: r for r in fake.records(APP_USER)}
    assert len(records) == 8 and fake.counts["create"] + fake.counts.get("upsert", 0) == 8
    app = CrmMediator().app
    for uid in ids:
        email = sefaria.User.objects.get(id=uid).email
        assert db.profiles.find_one({"id": uid})["sf_app_user_id"] == records[email]["Id"]
        assert_history_is_path(signup.SPEC, app.history(uid, signup.NAME))


def test_a_transaction_that_calls_twice_sends_once_and_a_nested_rollback_sends_nothing(sefaria, db,
                                                                                        fake: FakeSalesforce) -> None:
    mediator = CrmMediator()
    with transaction.atomic():
        user = sefaria.User.objects.create_user(username="twice", email="twice@example.org")
        assert mediator.create_crm_user("twice@example.org", "T", "W") is None
        assert mediator.create_crm_user("twice@example.org", "T", "W") is None
        assert fake.total_requests == 0  # nothing before the commit
        try:
            with transaction.atomic():  # a savepoint rolled back: its signup is dropped with it
                sefaria.User.objects.create_user(username="inner", email="inner@example.org")
                mediator.create_crm_user("inner@example.org", "I", "N")
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
    assert [r["Sefaria_App_Email__c"] for r in fake.records(APP_USER)] == ["twice@example.org"]
    assert [t.dest for t in mediator.app.history(user.id, signup.NAME)].count("WroteSalesforceAppUserUid") == 1


def test_without_the_aftercare_the_periodic_heal_writes_the_id(sefaria, settings_for, db, fake: FakeSalesforce,
                                                               mongo_url: str) -> None:
    with settings_for(CRM_STATES_AFTERCARE_SECONDS="off"):
        uid = sefaria.process_register_form("late@example.org", "Late", "Heal")
    [record] = fake.records(APP_USER)
    assert db.profiles.find_one({"id": uid})["sf_app_user_id"] is None  # the stale save won, for now
    healed = subprocess.run([sys.executable, "-m", "crm_states.cli", "heal", "--json"], capture_output=True,
                            text=True, timeout=120, env={**_env(), "MONGO_URL": mongo_url, "MONGO_DB": db.name})
    assert healed.returncode == 0, healed.stderr
    assert json.loads(healed.stdout)["new_user_signup"] == {"drifted": 1, "healed": 1, "waiting": 0, "stale_inputs": 0}
    assert db.profiles.find_one({"id": uid})["sf_app_user_id"] == record["Id"]


def test_the_aftercare_schedule_setting() -> None:
    assert schedule_from({}) == DEFAULT_SCHEDULE and max(DEFAULT_SCHEDULE) >= 60
    assert schedule_from({"CRM_STATES_AFTERCARE_SECONDS": "5, 1"}) == (1.0, 5.0)
    assert schedule_from({"CRM_STATES_AFTERCARE_SECONDS": "off"}) == ()
    for bad in ("soon", "-1", "1,,2"):
        with pytest.raises(ValueError, match="CRM_STATES_AFTERCARE_SECONDS"):
            schedule_from({"CRM_STATES_AFTERCARE_SECONDS": bad})


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[2]
    return {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "CRM_TYPE"))} | {"PYTHONPATH": str(root)}
