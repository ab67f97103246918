"""Every call site of Sefaria's ``CrmMediator`` (Sefaria/Sefaria-Project at 4c0ecc1e), replayed by the stand-in
Sefaria with its exact argument shapes against FakeSalesforce over HTTP and the test database, checking
what the caller does with the answer."""

from __future__ import annotations

import json

import pytest
import requests
from django.db import transaction

from crm_states.sefaria import CrmMediator
from crm_states.sefaria.aftercare import AFTERCARE
from crm_states.testing import Fault, FakeSalesforce
from crm_states.testing.mongo import free_port
from tests.faults import assert_history_is_path
from machines import mailing_list_signup, mark_as_spam
from machines import new_user_signup as signup

APP_USER = "Sefaria_App_User__c"
APP_DATA = "Sefaria_App_Data__c"
LISTS = "AC_to_SF_List_Mapping__mdt"

pytestmark = pytest.mark.usefixtures("django_project")


def profile(db, uid: int) -> dict:
    return db.profiles.find_one({"id": uid}, {"_id": 0}) or {}


def patch(fake: FakeSalesforce, record_id: str, fields: dict) -> None:
    """Change an app user as the org's own users would: a REST PATCH."""
    url = f"{fake.url}/services/data/v{fake.api_version}/sobjects/{APP_USER}/{record_id}"
    answer = requests.patch(url, json=fields, headers={"Authorization": f"Bearer {fake.issue_token()}"}, timeout=10)
    assert answer.status_code == 204, answer.text


def app_user_of(fake: FakeSalesforce, email: str) -> dict:
    [record] = [r for r in fake.records(APP_USER) if r["Sefaria_App_Email__c"].lower() == email.lower()]
    return record


# --- sefaria/forms.py: the email signup, inside process_register_form's transaction --------------------

def test_email_signup_creates_the_app_user_once_after_commit_and_its_id_survives_the_stale_save(
        sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.process_register_form("Rivka@Example.org", "רבקה", "O'Connor-Ben-Yehuda", lang="he", educator=True)
    assert sefaria.answers == [None]  # inside the transaction: deferred to the commit, nothing known yet
    record = app_user_of(fake, "Rivka@Example.org")
    assert (record["First_Name__c"], record["Last_Name__c"], record["Hebrew_English__c"], record["Educator__c"]) == (
        "רבקה", "O'Connor-Ben-Yehuda", "Hebrew", True)
    assert fake.counts["create"] + fake.counts.get("upsert", 0) == 1
    assert sefaria.logged == []
    # The registration's last save wrote its stale copy (sf_app_user_id None) over the id; no manual step:
    assert AFTERCARE.wait_idle(10)
    doc = profile(db, uid)
    assert doc["sf_app_user_id"] == record["Id"]
    assert doc["profile_pic_url"].endswith(f"/{uid}.png") and doc["slug"] == f"user-{uid}"  # Sefaria's data kept
    history = CrmMediator().app.history(uid, signup.NAME)
    assert_history_is_path(signup.SPEC, history)
    assert history[-1].dest == "WroteSalesforceAppUserUid"


def test_a_rolled_back_signup_creates_nothing(sefaria, db, fake: FakeSalesforce) -> None:
    class Refused(Exception):
        pass

    def fail() -> None:
        raise Refused("the profile could not be saved")

    with pytest.raises(Refused):
        sefaria.process_register_form("gone@example.org", "Gone", "Away", fail_in_transaction=fail)
    assert not sefaria.User.objects.filter(email="gone@example.org").exists()
    assert fake.records(APP_USER) == [] and fake.counts["create"] == 0
    assert db.crm_positions.count_documents({}) == 0


def test_a_signup_the_crm_refuses_is_recorded_and_the_registration_goes_on(sefaria, db, fake: FakeSalesforce) -> None:
    fake.inject(Fault.error(400, body=json.dumps([{"errorCode": "REQUIRED_FIELD_MISSING", "message": "no"}]).encode()),
                kind="create")
    uid = sefaria.process_register_form("dov@example.org", "Dov", "Levi")
    assert sefaria.answers == [None] and sefaria.logged == []
    assert AFTERCARE.wait_idle(10)
    assert CrmMediator().app.position(uid, signup.NAME).state == "WroteSalesforceErrorToDb"
    doc = profile(db, uid)
    assert doc["sf_app_user_id"] is None
    assert [line.split("-")[0] for line in doc["CrmLog"]] == ["NewUserSalesforceWriteError"]  # healed back


def test_create_crm_user_outside_a_transaction_runs_at_once(sefaria, db, fake: FakeSalesforce) -> None:
    user = sefaria.User.objects.create_user(username="u", email="Noa@Example.org")
    assert CrmMediator().create_crm_user("noa@example.org", "Noa", "Katz") is True  # by email, case-insensitively
    assert profile(db, user.id) == {}  # Sefaria has not created the profile: nothing written into profiles
    assert CrmMediator().app.app_user_id(user.id) == app_user_of(fake, "noa@example.org")["Id"]
    sefaria.UserProfile(id=user.id, user_registration=True).save()  # Sefaria creates it now, without the id
    assert AFTERCARE.wait_idle(10)
    assert profile(db, user.id)["sf_app_user_id"] == app_user_of(fake, "noa@example.org")["Id"]
    assert CrmMediator().create_crm_user("noa@example.org", "Noa", "Katz") is True  # again: no second app user
    assert len(fake.records(APP_USER)) == 1
    with transaction.atomic():
        assert CrmMediator().create_crm_user("nobody@example.org", "No", "Body") is None
    assert len(fake.records(APP_USER)) == 1  # nobody has that email: nothing sent


# --- sso/adapters.py: the profile is saved before the call ----------------------------------------------

def test_sso_signup_runs_at_once_and_writes_the_id(sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.sso_save_user("apple@example.org", "", "", language_code=None)
    assert sefaria.answers == [True] and sefaria.logged == []
    record = app_user_of(fake, "apple@example.org")
    assert profile(db, uid)["sf_app_user_id"] == record["Id"]  # at once, no heal needed
    assert record["Hebrew_English__c"] == "English" and record["Educator__c"] is False


def test_sso_signup_when_salesforce_is_down_answers_false_and_keeps_the_user(sefaria, db, fake) -> None:
    fake.inject(Fault.error(503), times=8)
    uid = sefaria.sso_save_user("down@example.org", "Down", "Time")
    assert sefaria.answers == [False] and sefaria.logged == []
    assert sefaria.User.objects.filter(id=uid).exists() and profile(db, uid)["slug"] == f"user-{uid}"
    assert CrmMediator().app.position(uid, signup.NAME).state == "WroteSalesforceErrorToDb"


# --- reader/views.py account_user_update -------------------------------------------------------------------

def test_account_email_update(sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.sso_save_user("old@example.org", "Ada", "Lev")
    user = sefaria.User.objects.get(id=uid)
    app_user = profile(db, uid)["sf_app_user_id"]
    assert sefaria.account_user_update(user, "new@example.org") == {"status": "ok"}
    assert fake.record(APP_USER, app_user)["Sefaria_App_Email__c"] == "new@example.org"
    assert profile(db, uid)["sf_app_user_id"] == app_user and sefaria.logged == []
    # An invalid address: ValueError before anything is sent; the view logs it and still answers ok.
    updates = fake.counts["update"]
    assert sefaria.account_user_update(user, "not an email") == {"status": "ok"}
    assert fake.counts["update"] == updates
    assert sefaria.logged == [("warning", "failed to add user to salesforce: Invalid Email")]
    # A user without an app user: falsy, a warning, nothing sent.
    other = sefaria.User.objects.create_user(username="x", email="x@example.org")
    sefaria.logged.clear()
    assert sefaria.account_user_update(other, "x2@example.org") == {"status": "ok"}
    assert sefaria.logged == [("warning", "failed to add user to CRM")] and fake.counts["update"] == updates


# --- sefaria/utils/user.py delete_user_account -------------------------------------------------------------

def test_delete_user_account_flags_the_app_user_for_review(sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.sso_save_user("leaving@example.org", "Leah", "Tov")
    app_user = profile(db, uid)["sf_app_user_id"]
    assert sefaria.delete_user_account(uid) is True
    assert fake.record(APP_USER, app_user)["Manual_Review_Required__c"] is True
    assert sefaria.logged == [] and profile(db, uid) == {}
    assert CrmMediator().app.position(uid, mark_as_spam.NAME).detail["action"] == "mark_for_review"
    # No app user: falsy, the caller logs an error, and the deletion goes on.
    nobody = sefaria.User.objects.create_user(username="n", email="n@example.org")
    sefaria.db.profiles.insert_one({"id": nobody.id, "slug": "n"})
    assert sefaria.delete_user_account(nobody.id) is True
    assert sefaria.logged == [("error", "Failed to mark user for review in CRM")]
    assert not sefaria.User.objects.filter(id=nobody.id).exists()


# --- sefaria/views.py subscribe_sefaria_newsletter ---------------------------------------------------------

def test_newsletter_default_form_sends_no_lists_and_is_ok(sefaria, db, fake: FakeSalesforce) -> None:
    body = {"firstName": "Shira", "lastName": "D'Angelo-Rosenzweig-Katz", "language": "he", "educator": True}
    assert sefaria.subscribe_to_newsletter_api("shira@example.org", body) == (200, {"status": "ok"})
    [data] = fake.records(APP_DATA)
    payload = json.loads(data["JSON_STRING__c"])
    assert payload == {"Action": "Newsletter", "First_Name__c": "Shira", "Last_Name__c": "D'Angelo-Rosenzweig-Katz",
                       "Sefaria_App_Email__c": "shira@example.org", "Hebrew_English__c": "Hebrew",
                       "Educator__c": True, "Newsletter_Names__c": []}
    pid = mailing_list_signup.signup_id("shira@example.org")
    assert CrmMediator().app.position(pid, mailing_list_signup.NAME).state == "WroteMailingListSignup"
    assert db.profiles.count_documents({}) == 0  # someone without an account: nothing in Sefaria's profiles


def test_newsletter_with_lists_and_every_answer_the_view_maps(sefaria, settings_for, db, fake: FakeSalesforce) -> None:
    ok = {"firstName": "Avi", "lastName": "Ben", "lists": ["Daf Yomi", "Parashat HaShavua"]}
    assert sefaria.subscribe_to_newsletter_api("avi@example.org", ok) == (200, {"status": "ok"})
    assert json.loads(fake.records(APP_DATA)[0]["JSON_STRING__c"])["Newsletter_Names__c"] == ok["lists"]
    error = (200, {"error": "Sorry, there was an error."})
    # Invalid email: ValueError before anything is sent -> the view's error reply.
    assert sefaria.subscribe_to_newsletter_api("avi at example", ok) == error
    assert sefaria.logged[-1] == ("error", "Failed to subscribe to list: Invalid Email")
    # A name that cannot be a name: ValueError, nothing sent.
    assert sefaria.subscribe_to_newsletter_api("avi@example.org", {**ok, "firstName": "Avi\x00"}) == error
    assert sefaria.logged[-1] == ("error", "Failed to subscribe to list: Invalid Name")
    # Lists that are not list names: ValueError.
    assert sefaria.subscribe_to_newsletter_api("avi@example.org", {**ok, "lists": {"a": 1}}) == error
    assert len(fake.records(APP_DATA)) == 1
    # Salesforce refuses: falsy -> the error reply, and the refusal is a recorded state.
    fake.inject(Fault.error(400), kind="create")
    assert sefaria.subscribe_to_newsletter_api("avi@example.org", ok) == error
    assert sefaria.logged[-1] == ("error", "Failed to subscribe to list")
    pid = mailing_list_signup.signup_id("avi@example.org")
    assert CrmMediator().app.position(pid, mailing_list_signup.NAME).state == "WroteSalesforceErrorToDb"
    # The database unreachable: falsy as well (logged), never the view's 500.
    with settings_for(MONGO_HOST="127.0.0.1", MONGO_PORT=free_port(), MONGO_REPLICASET_NAME=None):
        assert sefaria.subscribe_to_newsletter_api("avi@example.org", ok) == error
    assert len(fake.records(APP_DATA)) == 1


def test_a_signed_in_users_newsletter_signup_is_theirs(sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.sso_save_user("member@example.org", "Mem", "Ber")
    body = {"firstName": "Mem", "lastName": "Ber", "lists": ["Weekly"]}
    assert sefaria.subscribe_to_newsletter_api("MEMBER@example.org", body) == (200, {"status": "ok"})
    assert CrmMediator().app.position(uid, mailing_list_signup.NAME).state == "WroteMailingListSignup"


# --- sefaria/views.py get_available_newsletter_mailing_lists -----------------------------------------------

def test_available_lists_and_the_502(sefaria, settings_for, fake: FakeSalesforce) -> None:
    for name in ("Announcements_General", "Announcements_Edu", "Announcements_General"):
        fake.insert(LISTS, {"Subscriptions__c": name})
    assert sefaria.get_available_newsletter_mailing_lists() == (
        200, {"newsletter_mailing_lists": ["Announcements_Edu", "Announcements_General"]})
    fake.inject(Fault.error(500), times=8, kind="query")
    status, reply = sefaria.get_available_newsletter_mailing_lists()
    assert status == 502 and reply["error"].startswith("Unable to retrieve newsletter mailing lists")
    with settings_for(CRM_TYPE="NONE"):  # Sefaria's dummy CRM: its two placeholders
        assert sefaria.get_available_newsletter_mailing_lists() == (
            200, {"newsletter_mailing_lists": ["Dummy List 1", "Dummy List 2"]})
    with settings_for(CRM_TYPE="SALESFORCE", SALESFORCE_CLIENT_SECRET=""):  # misconfigured: 502, names only
        status, reply = sefaria.get_available_newsletter_mailing_lists()
        assert status == 502 and "SALESFORCE_CLIENT_SECRET" in reply["error"]


# --- sefaria/views.py purge_spammer_account_data -----------------------------------------------------------

def test_purge_spammer_marks_the_spammer(sefaria, db, fake: FakeSalesforce) -> None:
    uid = sefaria.sso_save_user("spam@example.org", "Spam", "Bot")
    app_user = profile(db, uid)["sf_app_user_id"]
    sefaria.purge_spammer_account_data(uid)
    assert fake.record(APP_USER, app_user)["Manual_Review_Required__c"] is True
    assert CrmMediator().app.position(uid, mark_as_spam.NAME).state == "WroteMarkedAsSpam"
    assert sefaria.logged == []
    sefaria.purge_spammer_account_data(999_999)  # no profile document: the caller logs, nothing is sent
    assert sefaria.logged == [("error", "Failed to mark user as spam: Expected a uid, email, or profile to be provided")]


# --- scripts/scheduled/nation_builder_sync.py ---------------------------------------------------------------

def test_the_weekly_sync(sefaria, db, fake: FakeSalesforce) -> None:
    ids = [sefaria.sso_save_user(f"s{i}@example.org", "S", str(i)) for i in range(12)]
    app_users = {uid: profile(db, uid)["sf_app_user_id"] for uid in ids}
    for uid in ids[:11]:
        patch(fake, app_users[uid], {"Sustainer__c": True})
    sefaria.nation_builder_sync()
    assert [profile(db, uid)["is_sustainer"] for uid in ids] == [True] * 11 + [False]
    # A failed read changes nothing and fails the cron job visibly (it has no try).
    fake.inject(Fault.error(500), times=8, kind="query")
    from crm_states.sefaria import SustainerSyncError

    with pytest.raises(SustainerSyncError, match="changed nothing"):
        sefaria.nation_builder_sync()
    assert [profile(db, uid)["is_sustainer"] for uid in ids] == [True] * 11 + [False]
