"""``SalesforceConnectionManager`` against ``FakeSalesforce`` over real HTTP: no patched ``requests``."""

from __future__ import annotations

import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from urllib.parse import urlencode

import attrs
import pytest
import requests

from crm_states.crm.errors import (
    CrmAuthError,
    CrmError,
    CrmLimitExceeded,
    CrmNotFound,
    CrmRejected,
    CrmTransientError,
)
from crm_states.crm.salesforce import SalesforceConnectionManager, SalesforceSchema, TokenCache
from crm_states.testing.salesforce import SESSION_EXPIRED, UNABLE_TO_LOCK_ROW, FakeSalesforce, sf_errors
from crm_states.testing.server import Fault

USER = "Sefaria_App_User__c"
MakeClient = Callable[..., SalesforceConnectionManager]


def only_user(fake: FakeSalesforce) -> dict:
    users = fake.records(USER)
    assert len(users) == 1, users
    return users[0]


# -- creating app users --------------------------------------------------------------------------------

def test_create_sends_sefaria_fields_and_returns_the_new_id(fake, client):
    crm_id = client.add_user_to_crm("ruth@example.org", "Ruth", "O'Brien-Levi Abravanel Katz", lang="he",
                                    educator=True)
    assert only_user(fake) == {
        "Id": crm_id, "First_Name__c": "Ruth", "Last_Name__c": "O'Brien-Levi Abravanel Katz",
        "Sefaria_App_Email__c": "ruth@example.org", "Hebrew_English__c": "Hebrew", "Educator__c": True,
    }
    assert len(crm_id) == 18 and crm_id.startswith("a0A")
    assert client.add_user_to_crm("b@example.org", "B", "C")  # lang en
    assert fake.records(USER)[1]["Hebrew_English__c"] == "English"


def test_create_over_https_with_an_injected_verify_path(policy):
    with FakeSalesforce(tls=True) as fake:
        client = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, session=requests.Session(),
                                             verify=fake.ca_cert_path, policy=policy, sleep=lambda s: None,
                                             token_cache=TokenCache())
        crm_id = client.add_user_to_crm("tls@example.org", "T", "L")
        assert only_user(fake)["Id"] == crm_id
        assert client.instance_url == fake.url


def test_create_returns_the_existing_app_user_for_a_known_email(fake, client):
    existing = fake.insert(USER, {"Sefaria_App_Email__c": "Known@Example.org"})
    assert client.add_user_to_crm("known@example.org", "K", "N") == existing
    assert fake.counts["create"] == 0
    assert len(fake.records(USER)) == 1


def test_a_create_whose_answer_was_lost_is_not_repeated(fake, client, sleeps):
    fake.inject(Fault.drop(processed=True), kind="create")
    crm_id = client.add_user_to_crm("lost@example.org", "L", "A")
    assert only_user(fake)["Id"] == crm_id
    assert fake.counts["create"] == 1
    assert len(sleeps) == 1


def test_a_create_answered_with_broken_json_finds_the_record_it_made(fake, client):
    fake.inject(Fault.malformed_json(processed=True), kind="create")
    crm_id = client.add_user_to_crm("broken@example.org", "B", "J")
    assert only_user(fake)["Id"] == crm_id
    assert fake.counts["create"] == 1


def test_create_gives_up_after_the_policy_attempts(fake, client, policy):
    fake.inject(Fault.error(503), times=10, kind="create")
    with pytest.raises(CrmTransientError):
        client.add_user_to_crm("down@example.org", "D", "N")
    assert fake.counts["create"] == policy.attempts
    assert fake.records(USER) == []


@pytest.mark.parametrize("update_status", [204, 200])
def test_create_by_external_id_upserts(fake, make_client, update_status):
    fake.upsert_update_status = update_status
    client = make_client(schema=SalesforceSchema(external_id_field="NationBuilder_Id__c"))
    first = client.add_user_to_crm("nb@example.org", "N", "B", external_id=4242)
    again = client.add_user_to_crm("nb@example.org", "N", "B", external_id=4242)
    assert first == again == only_user(fake)["Id"]
    assert only_user(fake)["NationBuilder_Id__c"] == "4242"
    assert fake.counts["upsert"] == 2
    assert fake.counts["get_by_external_id"] == (1 if update_status == 204 else 0)
    assert fake.counts["query"] == 0  # no email lookup on this path


def test_an_upsert_whose_answer_was_lost_is_safely_resent(fake, make_client):
    client = make_client(schema=SalesforceSchema(external_id_field="NationBuilder_Id__c"))
    fake.inject(Fault.drop(processed=True), kind="upsert")
    crm_id = client.add_user_to_crm("nb@example.org", "N", "B", external_id="77")
    assert only_user(fake)["Id"] == crm_id
    assert fake.counts["upsert"] == 2


def test_an_external_id_matching_several_records_is_rejected(fake, make_client):
    client = make_client(schema=SalesforceSchema(external_id_field="NationBuilder_Id__c"))
    fake.insert(USER, {"Sefaria_App_Email__c": "a@x", "NationBuilder_Id__c": 5})
    fake.insert(USER, {"Sefaria_App_Email__c": "b@x", "NationBuilder_Id__c": "5"})
    with pytest.raises(CrmRejected) as caught:
        client.add_user_to_crm("c@x", "C", "X", external_id=5)
    assert caught.value.status == 300
    assert fake.counts["upsert"] == 1


# -- updates -----------------------------------------------------------------------------------------

def test_change_user_email(fake, client):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "old@example.org"})
    client.change_user_email(crm_id, "new@example.org")
    assert fake.record(USER, crm_id)["Sefaria_App_Email__c"] == "new@example.org"
    assert client.find_crm_id("new@example.org") == crm_id
    assert client.find_crm_id("old@example.org") is None


@pytest.mark.parametrize("action", ["mark_as_spam_in_crm", "mark_for_review_in_crm"])
def test_spam_and_review_flag_the_app_user_for_manual_review(fake, client, action):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "spam@example.org"})
    getattr(client, action)(crm_id)
    assert fake.record(USER, crm_id)["Manual_Review_Required__c"] is True
    assert fake.counts["update"] == 1


def test_a_bad_record_id_is_refused_before_any_request(fake, client):
    with pytest.raises(CrmRejected):
        client.change_user_email("../../limits", "x@example.org")
    assert fake.total_requests == 0


def test_updating_a_missing_record_is_not_found(fake, client):
    with pytest.raises(CrmNotFound) as caught:
        client.mark_as_spam_in_crm("a0A000000000999AAA")
    assert caught.value.code == "NOT_FOUND"


def test_newsletter_posts_sefaria_app_data_json(fake, client):
    client.add_email_to_mailing_lists("news@example.org", ["Announcements_General", "Weekly"], "Ana", "Bel",
                                      lang="he", educator=True)
    (data,) = fake.records("Sefaria_App_Data__c")
    assert set(data) == {"Id", "JSON_STRING__c"}
    assert json.loads(data["JSON_STRING__c"]) == {
        "Action": "Newsletter", "First_Name__c": "Ana", "Last_Name__c": "Bel",
        "Sefaria_App_Email__c": "news@example.org", "Hebrew_English__c": "Hebrew", "Educator__c": True,
        "Newsletter_Names__c": ["Announcements_General", "Weekly"],
    }


# -- lookups -----------------------------------------------------------------------------------------

def test_find_crm_id_found_and_absent(fake, client):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "here@example.org"})
    assert client.find_crm_id("here@example.org") == crm_id
    assert client.find_crm_id("gone@example.org") is None


@pytest.mark.parametrize("email", [
    "o'hara@example.org",
    "a\\'b@example.org",
    "x' OR Sefaria_App_Email__c != '@example.org",
    'quote"double@example.org',
    "new\nline\r\ttab\f\b@example.org",
    "trailing-backslash@example.org\\",
    "\\'; DELETE",
])
def test_find_crm_id_matches_awkward_emails_exactly(fake, client, email):
    target = fake.insert(USER, {"Sefaria_App_Email__c": email})
    fake.insert(USER, {"Sefaria_App_Email__c": email.replace("\\", "")})
    fake.insert(USER, {"Sefaria_App_Email__c": "@example.org"})
    assert client.find_crm_id(email) == target


def test_get_sustainers_reads_every_page(fake, client):
    fake.page_size = 7
    expected = [fake.insert(USER, {"Sefaria_App_Email__c": f"s{i}@x", "Sustainer__c": i % 3 == 0})
                for i in range(60)]
    assert sorted(client.get_sustainers()) == sorted(expected[::3])
    assert fake.counts["query"] == 1
    assert fake.counts["query_more"] == 2  # 20 sustainers in pages of 7
    assert fake.soql_log == ["SELECT Id FROM Sefaria_App_User__c WHERE Sustainer__c = true"]


def test_get_sustainers_raises_when_a_later_page_fails(fake, client, policy):
    fake.page_size = 5
    for i in range(20):
        fake.insert(USER, {"Sefaria_App_Email__c": f"s{i}@x", "Sustainer__c": True})
    fake.inject(Fault.error(500), times=policy.attempts, kind="query_more")
    with pytest.raises(CrmTransientError):
        client.get_sustainers()
    assert fake.counts["query_more"] == policy.attempts


def test_a_configured_sustainer_query_is_used(fake, make_client):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "s@x", "Is_Sustainer__c": "yes"})
    schema = SalesforceSchema(sustainer_query="SELECT Id FROM Sefaria_App_User__c WHERE Is_Sustainer__c = 'yes'")
    assert list(make_client(schema=schema).get_sustainers()) == [crm_id]


def seed_nationbuilder(fake: FakeSalesforce, count: int, start: int = 5_000_000) -> dict[int, str]:
    """App users whose NationBuilder ids are stored as ints, floats and strings in turn."""
    shapes = (int, float, str)
    return {nb: fake.insert(USER, {"Sefaria_App_Email__c": f"{nb}@x", "NationBuilder_Id__c": shapes[nb % 3](nb)})
            for nb in range(start, start + count)}


def request_bytes(fake: FakeSalesforce, soql: str, token: str) -> int:
    """What a GET query costs against Salesforce's 16,384-byte limit, with the headers requests sends."""
    target = f"/services/data/v60.0/query?{urlencode({'q': soql})}"
    headers = {**requests.Session().headers, "Accept": "application/json", "Authorization": f"Bearer {token}",
               "Host": fake.url.split("//")[1]}
    return len(f"GET {target} HTTP/1.1\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


def test_nationbuilder_lookup_of_1000_ids_costs_a_handful_of_queries(fake, client):
    seeded = seed_nationbuilder(fake, 1000)
    absent = range(9_000_000, 9_000_200)
    found = client.find_app_users_by_nationbuilder_ids([*seeded, *absent, *list(seeded)[:10]])
    assert found == seeded
    assert all(type(k) is int for k in found)
    # Too many ids for one GET: the queries ride in one composite call instead of several GETs.
    assert fake.counts["composite"] == 1 and fake.counts["query"] == 0
    assert fake.counts["query_more"] == 0


def test_nationbuilder_lookup_that_fits_one_url_is_one_get(fake, client):
    seeded = seed_nationbuilder(fake, 1000)
    wanted = dict(list(seeded.items())[:500])
    assert client.find_app_users_by_nationbuilder_ids(wanted) == wanted
    assert fake.counts["query"] == 1 and fake.counts["composite"] == 0
    (token,) = fake.issued_tokens
    assert all(request_bytes(fake, soql, token) <= 16_384 for soql in fake.soql_log)


def test_nationbuilder_lookup_honours_max_ids_per_query(fake, make_client):
    seeded = seed_nationbuilder(fake, 250)
    client = make_client(max_ids_per_query=100)
    assert client.find_app_users_by_nationbuilder_ids(seeded) == seeded
    assert fake.counts["composite"] == 1 and fake.counts["query"] == 0
    assert len(fake.soql_log) == 3  # three queries of at most 100 ids, in one API call


def test_nationbuilder_lookup_with_a_number_field_sends_bare_literals(fake, make_client):
    seeded = seed_nationbuilder(fake, 10)
    client = make_client(schema=SalesforceSchema(nationbuilder_id_is_text=False))
    assert client.find_app_users_by_nationbuilder_ids(seeded) == seeded
    assert "IN (5000000,5000001," in fake.soql_log[0]


def test_nationbuilder_lookup_through_composite(fake, make_client):
    seeded = seed_nationbuilder(fake, 3000)
    client = make_client(max_ids_per_query=100)
    assert client.find_app_users_by_nationbuilder_ids_composite(seeded) == seeded
    assert fake.counts["composite"] == 6  # 30 queries, at most 5 in one composite (Salesforce's limit)
    assert fake.counts["query"] == 0
    assert len(fake.soql_log) == 30
    assert client.api_requests == fake.api_usage == 6


def test_nationbuilder_lookup_through_composite_follows_pages(fake, client):
    fake.page_size = 400
    seeded = seed_nationbuilder(fake, 1000)
    assert client.find_app_users_by_nationbuilder_ids_composite(seeded) == seeded
    # one query; its two further pages ride as query-more sub-requests of the next composites
    assert fake.counts["composite"] == 3 and fake.counts["query_more"] == 0
    assert client.find_app_users_by_nationbuilder_ids_composite([]) == {}
    assert fake.counts["composite"] == 3


def test_nationbuilder_lookup_through_composite_raises_on_a_failed_subrequest(fake, make_client):
    client = make_client(schema=SalesforceSchema(app_user_object="No_Such_Object__c"))
    with pytest.raises(CrmRejected) as caught:
        client.find_app_users_by_nationbuilder_ids_composite([1, 2, 3])
    assert caught.value.code == "INVALID_TYPE"


@pytest.mark.parametrize("bad", [[True], ["12"], [1.5]])
def test_nationbuilder_ids_must_be_ints(fake, client, bad):
    with pytest.raises(TypeError):
        client.find_app_users_by_nationbuilder_ids(bad)
    assert fake.total_requests == 0


# -- tokens ------------------------------------------------------------------------------------------

def test_one_token_serves_many_calls_and_managers(fake, make_client):
    first, second = make_client(), make_client()
    for i in range(5):
        first.find_crm_id(f"{i}@x")
        second.find_crm_id(f"{i}@y")
    assert fake.counts["token"] == 1
    assert fake.counts["query"] == 10


def test_threads_share_one_token_fetch_and_one_refresh(fake, make_client):
    clients = [make_client() for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda c: c.find_crm_id("a@x"), clients)) == [None] * 8
        assert fake.counts["token"] == 1
        fake.expire_tokens()
        assert list(pool.map(lambda c: c.find_crm_id("b@x"), clients)) == [None] * 8
    assert fake.counts["token"] == 2


def test_an_expired_token_is_refreshed_once(fake, client):
    client.find_crm_id("a@x")
    fake.expire_tokens()
    assert client.find_crm_id("b@x") is None
    assert fake.counts["token"] == 2
    assert fake.counts["query"] == 3  # a@x, b@x refused, b@x again


def test_tokens_expiring_after_n_calls(fake, client):
    fake.token_call_limit = 3
    for i in range(10):
        client.find_crm_id(f"{i}@x")
    assert fake.counts["token"] == 4  # ceil(10 / 3)


def test_a_refused_refresh_is_an_auth_error(fake, client):
    client.find_crm_id("a@x")
    fake.expire_tokens()
    fake.client_secret = "rotated"
    with pytest.raises(CrmAuthError) as caught:
        client.find_crm_id("b@x")
    assert caught.value.code == "invalid_grant"
    assert fake.counts["token"] == 2


def test_a_second_invalid_session_after_a_refresh_is_an_auth_error(fake, client):
    client.find_crm_id("a@x")
    fake.inject(SESSION_EXPIRED, times=2, kind="query")
    with pytest.raises(CrmAuthError) as caught:
        client.find_crm_id("b@x")
    assert caught.value.status == 401
    assert fake.counts["token"] == 2
    assert fake.counts["query"] == 3


def test_bad_credentials_are_not_retried(fake, make_client):
    client = make_client(client_secret="not the secret")
    with pytest.raises(CrmAuthError):
        client.find_crm_id("a@x")
    assert fake.counts["token"] == 1
    assert fake.counts["query"] == 0


def test_get_connection_is_an_authenticated_session(fake, client):
    session = client.get_connection()
    response = session.get(f"{fake.url}/services/data/v60.0/limits", timeout=5)
    assert response.status_code == 200
    assert response.json()["DailyApiRequests"]["Max"] == fake.daily_limit


# -- failures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Fault.error(503), Fault.error(500), UNABLE_TO_LOCK_ROW, Fault.drop(), Fault.slow(0.6)
], ids=["503", "500", "lock-row", "drop", "timeout"])
def test_transient_failures_are_retried_within_budget(fake, make_client, sleeps, fault, policy):
    policy = attrs.evolve(policy, read_timeout=0.2)
    client = make_client(policy=policy)
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "t@x"})
    client.find_crm_id("warm@x")
    fake.inject(fault, times=policy.attempts - 1, kind="update")
    client.change_user_email(crm_id, "ok@example.org")
    assert fake.counts["update"] == policy.attempts
    assert len(sleeps) == policy.attempts - 1
    assert all(0 <= s <= policy.max_delay for s in sleeps)

    fake.inject(fault, times=policy.attempts, kind="update")
    with pytest.raises(CrmTransientError):
        client.mark_as_spam_in_crm(crm_id)
    assert fake.counts["update"] == 2 * policy.attempts


def test_validation_failures_are_rejected_without_retry(fake, client):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "v@x"})
    fake.inject(Fault.error(400, body=json.dumps(sf_errors(
        "REQUIRED_FIELD_MISSING", "Required fields are missing: [Sefaria_App_Email__c]")).encode()), kind="update")
    with pytest.raises(CrmRejected) as caught:
        client.change_user_email(crm_id, "valid@example.org")
    assert caught.value.code == "REQUIRED_FIELD_MISSING"
    assert "REQUIRED_FIELD_MISSING" in str(caught.value)
    assert fake.counts["update"] == 1


def test_a_spent_daily_allocation_stops_at_once(fake, client):
    fake.api_usage = fake.daily_limit
    with pytest.raises(CrmLimitExceeded) as caught:
        client.find_crm_id("a@x")
    assert caught.value.code == "REQUEST_LIMIT_EXCEEDED"
    assert fake.counts["query"] == 1
    assert client.api_usage == (fake.daily_limit, fake.daily_limit)


def test_malformed_json_is_retried(fake, client):
    crm_id = fake.insert(USER, {"Sefaria_App_Email__c": "m@x"})
    client.find_crm_id("warm@x")
    fake.inject(Fault.malformed_json(), kind="query")
    assert client.find_crm_id("m@x") == crm_id
    assert fake.counts["query"] == 3


def test_malformed_json_that_persists_is_a_crm_error(fake, client, policy):
    client.find_crm_id("warm@x")
    fake.inject(Fault.malformed_json(), times=policy.attempts, kind="query")
    with pytest.raises(CrmError) as caught:
        client.find_crm_id("m@x")
    assert not isinstance(caught.value, CrmTransientError)
    assert caught.value.code == "MALFORMED_JSON"
    assert fake.counts["query"] == 1 + policy.attempts


def test_api_usage_comes_from_sforce_limit_info(fake, client):
    assert client.api_usage is None
    fake.api_usage = 10_017
    client.find_crm_id("a@x")
    assert client.api_usage == (10_018, 100_000)


# -- secrets -----------------------------------------------------------------------------------------

SENTINEL = "SENTINEL-client-secret-7f3a9c"


def test_no_secret_or_token_reaches_logs_or_errors(caplog, policy):
    caplog.set_level(logging.DEBUG)
    errors: list[Exception] = []
    with FakeSalesforce(client_secret=SENTINEL) as fake:
        def client(secret: str = SENTINEL) -> SalesforceConnectionManager:
            return SalesforceConnectionManager(fake.url, fake.client_id, secret, session=fake.client_session(),
                                               policy=policy, sleep=lambda s: None, token_cache=TokenCache())

        def expect_error(call: Callable[[], object]) -> None:
            with pytest.raises(CrmError) as caught:
                call()
            errors.append(caught.value)

        good = client()
        crm_id = good.add_user_to_crm("s@x", "S", "X")
        fake.expire_tokens()
        good.find_crm_id("s@x")  # refreshed
        fake.inject(Fault.error(503), times=policy.attempts, kind="update")
        expect_error(lambda: good.change_user_email(crm_id, "t@example.org"))
        fake.inject(Fault.error(400), kind="update")
        expect_error(lambda: good.change_user_email(crm_id, "v@example.org"))
        fake.inject(SESSION_EXPIRED, times=2, kind="update")
        expect_error(lambda: good.change_user_email(crm_id, "u@example.org"))
        expect_error(lambda: client(SENTINEL + "-wrong").find_crm_id("s@x"))
        fake.expire_tokens()
        fake.client_secret = "rotated"
        expect_error(lambda: good.find_crm_id("s@x"))
        tokens = list(fake.issued_tokens)

    assert len(tokens) >= 3 and len(errors) == 5
    basic = base64.b64encode(f"{fake.client_id}:{SENTINEL}".encode()).decode()
    texts = [caplog.text, *map(str, errors), *map(repr, errors)]
    for text in texts:
        for secret in (SENTINEL, basic, *tokens, *(t.split("!")[1] for t in tokens)):
            assert secret not in text
