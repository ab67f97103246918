"""crm_states.sefaria.CrmMediator: every method Sefaria calls, against SecantusDB and FakeSalesforce."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import TokenCache
from crm_states.sefaria import CrmMediator
from crm_states.testing import Fault, FakeSalesforce
from machines import change_email, mark_as_spam, mailing_list_signup
from machines import new_user_signup as signup

APP_USER = "Sefaria_App_User__c"


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def mediator(db, fake: FakeSalesforce) -> CrmMediator:
    crm = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, token_cache=TokenCache(),
                                      policy=RetryPolicy(attempts=2, base_delay=0.0), sleep=lambda s: None)
    db.profiles.insert_many([{"id": 1, "email": "miriam@example.org"}, {"id": 2, "email": "yael@example.org"}])
    return CrmMediator(CrmStates.open(db, crm))


def test_create_crm_user_runs_the_signup_machine(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    assert mediator.create_crm_user("miriam@example.org", "מרים", "O'Connor", lang="he", educator=True) is True
    [record] = fake.records(APP_USER)
    assert record["Hebrew_English__c"] == "Hebrew" and record["First_Name__c"] == "מרים"
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == record["Id"]
    assert mediator.app.store.history(1, signup.NAME)[-1].dest == "WroteSalesforceAppUserUid"
    assert mediator.create_crm_user("miriam@example.org", "מרים", "O'Connor") is True  # again: no second user
    assert len(fake.records(APP_USER)) == 1
    assert mediator.create_crm_user("nobody@example.org", "No", "Body") is False
    assert len(fake.records(APP_USER)) == 1


def test_a_failed_signup_returns_false_and_is_recorded(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    fake.inject(Fault.error(503), times=2)
    assert mediator.create_crm_user("yael@example.org", "Yael", "Levi") is False
    profile = db.profiles.find_one({"id": 2})
    assert mediator.app.position(2, signup.NAME).state == "WroteSalesforceErrorToDb"
    assert profile["CrmLog"][0].startswith("NewUserSalesforceWriteError-")


def test_update_email_spam_and_review(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    assert mediator.create_crm_user("miriam@example.org", "Miriam", "Katz")
    app_user = db.profiles.find_one({"id": 1})["sf_app_user_id"]
    assert mediator.update_user_email("miriam.k@example.org", 1, "miriam@example.org", None) is True
    assert fake.record(APP_USER, app_user)["Sefaria_App_Email__c"] == "miriam.k@example.org"
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == app_user  # the CRM id does not change
    assert mediator.mark_for_review_in_crm(1, "miriam.k@example.org", None) is True
    assert fake.record(APP_USER, app_user)["Manual_Review_Required__c"] is True
    assert mediator.mark_as_spam_in_crm(1, "miriam.k@example.org", None) is True
    assert mediator.app.store.history(1, mark_as_spam.NAME)[-1].dest.startswith("Wrote")
    assert mediator.app.store.history(1, change_email.NAME)[-1].dest.startswith("Wrote")
    # A profile with no app user: recorded as an error, nothing sent, False returned.
    assert mediator.update_user_email("new@example.org", 2, "yael@example.org", None) is False


def test_subscribe_to_lists_sends_the_email_only(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    assert mediator.subscribe_to_lists("guest@example.org", mailing_lists=["Announcements_General"]) is True
    [data] = fake.records("Sefaria_App_Data__c")
    body = json.loads(data["JSON_STRING__c"])
    assert body["Action"] == "Newsletter" and body["Sefaria_App_Email__c"] == "guest@example.org"
    assert body["Newsletter_Names__c"] == ["Announcements_General"]
    position = mediator.app.position(mailing_list_signup.signup_id("guest@example.org"), mailing_list_signup.NAME)
    assert position.state == "WroteMailingListSignup"
    assert db.profiles.count_documents({"id": {"$lt": 0}}) == 0  # nothing written into Sefaria's collection


def test_get_and_save_crm_id_never_overwrites(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    existing = fake.insert(APP_USER, {"Sefaria_App_Email__c": "yael@example.org"})
    assert mediator.get_and_save_crm_id(2, "yael@example.org", None) == existing
    assert db.profiles.find_one({"id": 2})["sf_app_user_id"] == existing
    assert mediator.get_and_save_crm_id(1, "absent@example.org", None) is None
    db.profiles.update_one({"id": 1}, {"$set": {"sf_app_user_id": "a0Bkeepme"}})
    other = fake.insert(APP_USER, {"Sefaria_App_Email__c": "miriam@example.org"})
    assert mediator.get_and_save_crm_id(1, "miriam@example.org", None) == other
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == "a0Bkeepme"


def test_available_lists_and_sustainer_sync(mediator: CrmMediator, db, fake: FakeSalesforce) -> None:
    for name in ("Announcements_General", "Announcements_Edu", "Announcements_General"):
        fake.insert("AC_to_SF_List_Mapping__mdt", {"Subscriptions__c": name})
    assert mediator.get_available_lists() == ["Announcements_Edu", "Announcements_General"]
    sustainer = fake.insert(APP_USER, {"Sefaria_App_Email__c": "miriam@example.org", "Sustainer__c": True})
    db.profiles.update_one({"id": 1}, {"$set": {"sf_app_user_id": sustainer}})
    mediator.sync_sustainers()
    assert db.profiles.find_one({"id": 1})["is_sustainer"] is True
    fake.inject(Fault.error(500), times=2, kind="query")
    assert mediator.get_available_lists() == []  # a failed read is logged, not raised into Sefaria
