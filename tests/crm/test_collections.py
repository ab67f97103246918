"""sObject Collections over real HTTP: 200 app users a request, per-record results, lost answers never re-sent."""

from __future__ import annotations

import json

import attrs
import pytest
from simple_salesforce import Salesforce

from crm_states.crm.errors import CrmBatchOutcomeUnknown, CrmInvalidInput, CrmRejected
from crm_states.crm.results import NewAppUser, RecordError, RecordResult
from crm_states.crm.salesforce import SalesforceSchema
from crm_states.testing.salesforce import FakeSalesforce, salesforce_id
from crm_states.testing.server import Fault

USER, EMAIL, EXT = "Sefaria_App_User__c", "Sefaria_App_Email__c", "Sefaria_User_Id__c"
API = "/services/data/v60.0"


def users(n: int, start: int = 0, **kwargs) -> list[NewAppUser]:
    return [NewAppUser(f"u{i}@example.org", "Ruth", f"O'Brien {i}", lang="he" if i % 2 else "en",
                       educator=i % 3 == 0, external_id=1000 + i, **kwargs) for i in range(start, start + n)]


@pytest.fixture
def upserting(make_client):
    return make_client(schema=SalesforceSchema(external_id_field=EXT, app_user_key_prefix="a0A"))


@pytest.fixture
def fake():
    with FakeSalesforce(external_ids={USER: ("NationBuilder_Id__c", EMAIL, EXT)}) as server:
        yield server


def test_450_app_users_in_three_requests_in_input_order(fake, client):
    results = client.create_app_users(users(450))
    assert [r.index for r in results] == list(range(450)) and all(r.ok and r.created for r in results)
    records = {r["Id"]: r for r in fake.records(USER)}
    assert [records[r.id][EMAIL] for r in results] == [f"u{i}@example.org" for i in range(450)]
    assert records[results[1].id]["Hebrew_English__c"] == "Hebrew" and records[results[3].id]["Educator__c"] is True
    assert fake.counts["collection_create"] == 3 and client.api_requests == fake.api_usage == 3
    assert fake.counts["query"] == 0  # no email lookups: a batch create is not a create by email


def test_per_record_errors_come_back_in_place(fake, client):
    fake.unique_fields = {USER: (EMAIL,)}
    taken = fake.insert(USER, {EMAIL: "taken@example.org"})
    batch = [*users(2), NewAppUser("", "No", "Email"), NewAppUser("TAKEN@example.org", "T", "K"),
             NewAppUser("twice@example.org", "A", "B"), NewAppUser("twice@example.org", "C", "D")]
    results = client.create_app_users(batch)
    assert [r.ok for r in results] == [True, True, False, False, True, False]
    assert results[2].error == RecordError("REQUIRED_FIELD_MISSING", "Required fields are missing: "
                                           "[Sefaria_App_Email__c]", (EMAIL,))
    assert results[3].error.status_code == "DUPLICATE_VALUE" and taken in results[3].error.message
    assert results[5].error.status_code == "DUPLICATE_VALUE" and results[5].id is None
    assert len(fake.records(USER)) == 1 + 3


def test_upsert_by_external_id_creates_then_updates(fake, upserting):
    first = upserting.create_app_users(users(250))
    assert all(r.ok and r.created for r in first) and fake.counts["collection_upsert"] == 2
    again = upserting.create_app_users(users(250))
    assert [r.id for r in again] == [r.id for r in first] and not any(r.created for r in again)
    assert len(fake.records(USER)) == 250
    twice = upserting.create_app_users([*users(1, 900), *users(1, 900)])
    assert [r.error.status_code for r in twice] == ["DUPLICATE_VALUE", "DUPLICATE_VALUE"]


def test_bad_input_changes_nothing(fake, upserting, client):
    with pytest.raises(CrmInvalidInput, match="user 1 has no external_id"):
        upserting.create_app_users([*users(1), attrs.evolve(users(1)[0], external_id=None)])
    with pytest.raises(TypeError, match="user 0 is a dict"):
        client.create_app_users([{"email": "a@example.org"}])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        client.create_app_users(users(3), batch_size=201)
    assert fake.total_requests == 0


@pytest.mark.parametrize("fault", [Fault.drop(processed=True), Fault.slow(1.0), Fault.error(503, processed=True),
                                   Fault.malformed_json(processed=True)],
                         ids=["dropped", "timed-out", "5xx", "broken-json"])
def test_a_create_whose_answer_is_lost_is_never_resent(fake, client, fault):
    client.create_app_users(users(10))  # the token is fetched here, not in what is counted below
    before = fake.total_requests
    fake.inject(fault, kind="collection_create")
    with pytest.raises(CrmBatchOutcomeUnknown) as caught:
        client.create_app_users(users(450, start=100))
    unknown = caught.value
    assert unknown.in_doubt == tuple(range(200)) and unknown.not_sent == tuple(range(200, 450))
    assert unknown.completed == () and "look these records up" in str(unknown)
    assert fake.total_requests - before == 1  # sent once, never again


def test_a_lost_answer_after_earlier_requests_keeps_their_results(fake, client):
    batch = users(450, start=100)
    pages = client.iter_create_app_users(batch)
    first = next(pages)  # the caller has these before the next request goes out
    fake.inject(Fault.drop(processed=True), kind="collection_create")
    with pytest.raises(CrmBatchOutcomeUnknown) as caught:
        next(pages)
    assert caught.value.in_doubt == tuple(range(200, 400)) and caught.value.not_sent == tuple(range(400, 450))
    assert [r.index for r in first] == list(range(200))
    assert len(fake.records(USER)) == 400  # Salesforce did process the request whose answer was lost
    fake.inject(Fault.slow(0.0), kind="collection_create")  # the next request is answered ...
    fake.inject(Fault.drop(processed=True), kind="collection_create")  # ... the one after is not
    with pytest.raises(CrmBatchOutcomeUnknown) as caught:
        client.create_app_users(users(450, start=1000))
    assert [r.index for r in caught.value.completed] == list(range(200)) and all(r.ok for r in caught.value.completed)
    assert caught.value.in_doubt == tuple(range(200, 400))


def test_an_upsert_whose_answer_is_lost_is_safely_resent(fake, upserting):
    fake.inject(Fault.drop(processed=True), kind="collection_upsert")
    results = upserting.create_app_users(users(5))
    assert all(r.ok for r in results) and fake.counts["collection_upsert"] == 2
    assert len(fake.records(USER)) == 5 and sum(r.created for r in results) == 0  # the retry found them made


def test_a_request_refused_whole_is_raised_as_itself(fake, client):
    fake.inject(Fault.error(400), kind="collection_create")
    with pytest.raises(CrmRejected) as caught:
        client.create_app_users(users(3))
    assert not isinstance(caught.value, CrmBatchOutcomeUnknown) and fake.records(USER) == []


def test_hostile_answers(fake, make_client):
    client = make_client(schema=SalesforceSchema(app_user_key_prefix="a0A"))
    good = salesforce_id("a0A", 7)
    answer = [{"id": good, "success": True, "errors": []}, {"id": salesforce_id("003", 1), "success": True},
              {"id": "x" * 5000, "success": True}, {"success": False, "errors": [{"statusCode": "E" * 500}]}]
    fake.inject(Fault.error(200, body=json.dumps(answer).encode()), kind="collection_create")
    results = client.create_app_users(users(4))
    assert results[0] == RecordResult(0, good, created=True)
    assert [r.error.status_code for r in results[1:]] == ["INVALID_ANSWER", "INVALID_ANSWER", "E" * 100]
    assert "the record may exist" in results[1].error.message and "x" * 50 not in results[2].error.message
    fake.inject(Fault.error(200, body=json.dumps(answer[:2]).encode()), kind="collection_create")
    with pytest.raises(CrmBatchOutcomeUnknown, match="does not match its 4 records"):
        client.create_app_users(users(4))


def test_the_fake_refuses_what_salesforce_refuses(fake, client):
    session = client.get_connection()
    url = fake.url + API + "/composite/sobjects"
    record = {"attributes": {"type": USER}, EMAIL: "a@example.org"}
    too_many = session.post(url, json={"records": [record] * 201}, timeout=5)
    assert too_many.status_code == 400 and too_many.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    rolled = session.post(url, json={"allOrNone": True, "records": [record, {"attributes": {"type": USER}}]},
                          timeout=5).json()
    assert [r["errors"][0]["statusCode"] for r in rolled] == ["ALL_OR_NONE_OPERATION_ROLLED_BACK",
                                                             "REQUIRED_FIELD_MISSING"]
    assert fake.records(USER) == []
    untyped = session.post(url, json={"records": [{EMAIL: "b@example.org"}, {**record, "Id": "x"}]},
                           timeout=5).json()
    assert [r["errors"][0]["statusCode"] for r in untyped] == ["INVALID_TYPE", "INVALID_FIELD_FOR_INSERT_UPDATE"]
    not_external = session.patch(f"{url}/{USER}/First_Name__c", json={"records": [record]}, timeout=5)
    assert not_external.status_code == 400 and not_external.json()[0]["errorCode"] == "INVALID_FIELD"
    fake.insert(USER, {EXT: "5"})
    fake.insert(USER, {EXT: "5"})
    [several] = session.patch(f"{url}/{USER}/{EXT}", json={"records": [{**record, EXT: "5"}]}, timeout=5).json()
    assert several["errors"][0]["statusCode"] == "DUPLICATE_EXTERNAL_ID"
    six = [{"method": "POST", "url": f"{API}/composite/sobjects", "referenceId": f"c{i}",
            "body": {"records": [record]}} for i in range(6)]
    limited = session.post(fake.url + API + "/composite", json={"compositeRequest": six}, timeout=5)
    assert limited.status_code == 400 and limited.json()[0]["errorCode"] == "LIMIT_EXCEEDED"


def test_simple_salesforce_creates_a_collection_on_the_fake():
    with FakeSalesforce(tls=True) as fake:
        sf = Salesforce(instance_url=fake.url, session_id=fake.issue_token(), session=fake.client_session(),
                        version="60.0")
        answer = sf.restful("composite/sobjects", method="POST", json={"allOrNone": False, "records": [
            {"attributes": {"type": USER}, EMAIL: "s@example.org"}, {"attributes": {"type": USER}}]})
        assert answer[0]["success"] and not answer[1]["success"]
        assert [r[EMAIL] for r in fake.records(USER)] == ["s@example.org"]
