"""``FakeSalesforce`` speaks Salesforce's REST shapes: checked with raw requests and with simple-salesforce."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceMoreThanOneRecord,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from crm_states.testing.salesforce import UNABLE_TO_LOCK_ROW, FakeSalesforce, to_id18
from crm_states.testing.server import Fault, Faults

USER = "Sefaria_App_User__c"
API = "/services/data/v60.0"


class Api:
    """A bare-bones authenticated caller, so the fake is checked without our client in the way."""

    def __init__(self, fake: FakeSalesforce) -> None:
        self.fake = fake
        self.session = fake.client_session()
        self.session.headers["Authorization"] = f"Bearer {fake.issue_token()}"

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.fake.url + (path if path.startswith("/services") else API + path),
                                    timeout=5, **kwargs)


@pytest.fixture
def api(fake: FakeSalesforce) -> Api:
    return Api(fake)


def token(fake: FakeSalesforce, **kwargs) -> requests.Response:
    return fake.client_session().post(fake.url + "/services/oauth2/token", timeout=5, **kwargs)


# -- OAuth -------------------------------------------------------------------------------------------

def test_token_by_basic_auth_and_by_body(fake):
    by_basic = token(fake, data={"grant_type": "client_credentials"}, auth=(fake.client_id, fake.client_secret))
    by_body = token(fake, data={"grant_type": "client_credentials", "client_id": fake.client_id,
                                "client_secret": fake.client_secret})
    for response in (by_basic, by_body):
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"access_token", "instance_url", "id", "token_type", "issued_at", "signature"}
        assert body["instance_url"] == fake.url and body["token_type"] == "Bearer"
        assert abs(int(body["issued_at"]) - time.time() * 1000) < 60_000
    assert fake.counts["token"] == 2


def test_bad_credentials_are_invalid_grant(fake):
    response = token(fake, data={"grant_type": "client_credentials"}, auth=(fake.client_id, "wrong"))
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": "authentication failure"}


def test_api_calls_need_a_live_bearer_token(fake, api):
    unauthenticated = fake.client_session().get(fake.url + API + "/limits", timeout=5)
    assert unauthenticated.status_code == 401
    assert unauthenticated.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert api("GET", "/limits").status_code == 200
    fake.expire_tokens()
    assert api("GET", "/limits").status_code == 401


def test_tokens_expire_after_n_calls(fake):
    fake.token_call_limit = 2
    api = Api(fake)
    assert [api("GET", "/limits").status_code for _ in range(3)] == [200, 200, 401]


def test_unknown_api_versions_are_not_found(fake, api):
    assert api("GET", "/services/data/v99.0/limits").status_code == 404
    assert api("GET", "/services/data/v59.0/limits").status_code == 200


# -- sObjects ----------------------------------------------------------------------------------------

def test_create_get_update_delete(fake, api):
    created = api("POST", f"/sobjects/{USER}/", json={"Sefaria_App_Email__c": "a@x", "First_Name__c": "A"})
    assert created.status_code == 201
    body = created.json()
    assert body["success"] is True and body["errors"] == []
    record_id = body["id"]
    assert len(record_id) == 18 and record_id.startswith("a0A") and to_id18(record_id[:15]) == record_id

    got = api("GET", f"/sobjects/{USER}/{record_id}").json()
    assert got["attributes"] == {"type": USER, "url": f"{API}/sobjects/{USER}/{record_id}"}
    assert got["Id"] == record_id and got["First_Name__c"] == "A"
    assert api("GET", f"/sobjects/{USER}/{record_id[:15]}").json()["Id"] == record_id
    assert api("GET", f"/sobjects/{USER}/{record_id}", params={"fields": "First_Name__c"}).json() == {
        "attributes": got["attributes"], "First_Name__c": "A"}

    assert api("PATCH", f"/sobjects/{USER}/{record_id}", json={"First_Name__c": "B"}).status_code == 204
    assert fake.record(USER, record_id)["First_Name__c"] == "B"
    assert api("DELETE", f"/sobjects/{USER}/{record_id}").status_code == 204
    missing = api("GET", f"/sobjects/{USER}/{record_id}")
    assert missing.status_code == 404
    assert missing.json() == [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
    assert dict(fake.counts) == {"create": 1, "get": 4, "update": 1, "delete": 1}


def test_ids_use_a_per_object_prefix(fake):
    assert fake.insert("Sefaria_App_Data__c", {}).startswith("a0B")
    assert fake.insert("Contact", {}).startswith("003")
    assert fake.insert("Other__c", {}).startswith("a0C")


def test_required_field_missing(fake, api):
    response = api("POST", f"/sobjects/{USER}/", json={"First_Name__c": "A", "Sefaria_App_Email__c": ""})
    assert response.status_code == 400
    (error,) = response.json()
    assert error["errorCode"] == "REQUIRED_FIELD_MISSING" and error["fields"] == ["Sefaria_App_Email__c"]
    assert fake.records(USER) == []


def test_retrieve_and_upsert_by_external_id(fake, api):
    path = f"/sobjects/{USER}/NationBuilder_Id__c/123"
    assert api("GET", path).status_code == 404
    created = api("PATCH", path, json={"Sefaria_App_Email__c": "n@x"})
    assert created.status_code == 201
    assert created.json()["created"] is True
    record_id = created.json()["id"]
    assert api("GET", path).json()["Id"] == record_id
    assert api("PATCH", path, json={"First_Name__c": "N"}).status_code == 204
    fake.upsert_update_status = 200
    updated = api("PATCH", path, json={"First_Name__c": "M"})
    assert (updated.status_code, updated.json()) == (200, {"id": record_id, "success": True, "errors": [],
                                                           "created": False})
    fake.insert(USER, {"Sefaria_App_Email__c": "twin@x", "NationBuilder_Id__c": 123.0})
    several = api("PATCH", path, json={"First_Name__c": "X"})
    assert several.status_code == 300 and len(several.json()) == 2
    assert api("GET", f"/sobjects/{USER}/Last_Name__c/x").status_code == 404  # not an external id


# -- queries -----------------------------------------------------------------------------------------

def test_query_pages_with_next_records_url(fake, api):
    fake.page_size = 4
    ids = [fake.insert(USER, {"Sefaria_App_Email__c": f"{i}@x", "Sustainer__c": True}) for i in range(10)]
    page = api("GET", "/query", params={"q": "SELECT Id, Sefaria_App_Email__c FROM Sefaria_App_User__c"}).json()
    seen = []
    while True:
        assert page["totalSize"] == 10
        seen += page["records"]
        if page["done"]:
            assert "nextRecordsUrl" not in page
            break
        page = api("GET", page["nextRecordsUrl"]).json()
    assert [r["Id"] for r in seen] == ids
    assert seen[0] == {"attributes": {"type": USER, "url": f"{API}/sobjects/{USER}/{ids[0]}"}, "Id": ids[0],
                       "Sefaria_App_Email__c": "0@x"}
    assert fake.counts["query"] == 1 and fake.counts["query_more"] == 2
    all_rows = api("GET", "/queryAll", params={"q": "SELECT Id FROM Sefaria_App_User__c LIMIT 3"}).json()
    assert all_rows["totalSize"] == 3 and all_rows["done"]


@pytest.mark.parametrize(("where", "expected"), [
    ("WHERE Sefaria_App_Email__c = 'B@X'", ["b"]),
    ("WHERE sefaria_app_email__c IN ('a@x', 'c@x', 'nobody')", ["a", "c"]),
    ("WHERE NationBuilder_Id__c IN ('1', 3)", ["a", "c"]),
    ("WHERE Sustainer__c = true", ["b"]),
    ("WHERE Sustainer__c = null", ["a", "c"]),
    ("WHERE First_Name__c = 'it\\'s'", ["c"]),
    ("LIMIT 1", ["a"]),
])
def test_query_where_clauses(fake, api, where, expected):
    ids = {
        "a": fake.insert(USER, {"Sefaria_App_Email__c": "a@x", "NationBuilder_Id__c": 1}),
        "b": fake.insert(USER, {"Sefaria_App_Email__c": "b@x", "NationBuilder_Id__c": "2", "Sustainer__c": True}),
        "c": fake.insert(USER, {"Sefaria_App_Email__c": "c@x", "NationBuilder_Id__c": 3.0, "First_Name__c": "it's"}),
    }
    soql = f"SELECT Id FROM Sefaria_App_User__c {where}"
    records = api("GET", "/query", params={"q": soql}).json()["records"]
    assert [r["Id"] for r in records] == [ids[k] for k in expected]
    assert fake.soql_log == [soql]


@pytest.mark.parametrize(("soql", "code"), [
    ("SELECT Id FROM Sefaria_App_User__c WHERE Sefaria_App_Email__c = 'open", "MALFORMED_QUERY"),
    ("SELECT Id FROM Sefaria_App_User__c WHERE Sefaria_App_Email__c = 'a\\qb'", "MALFORMED_QUERY"),
    ("SELECT Id FROM Sefaria_App_User__c WHERE Sefaria_App_Email__c = 'a' OR 1 = 1", "MALFORMED_QUERY"),
    ("SELECT FROM Sefaria_App_User__c", "MALFORMED_QUERY"),
    ("SELECT Id FROM Nope__c", "INVALID_TYPE"),
    ("SELECT Id FROM Sefaria_App_User__c WHERE Id IN (" + ",".join(["'x'"] * 40_000) + ")", "MALFORMED_QUERY"),
], ids=["unterminated", "bad-escape", "or", "no-fields", "unknown-object", "over-100k-chars"])
def test_bad_soql_is_refused(fake, api, soql, code):
    """Through composite, since the longest of these would not fit in a GET URL."""
    response = api("POST", "/composite", json={"compositeRequest": [
        {"method": "GET", "url": f"{API}/query?q={requests.utils.quote(soql)}", "referenceId": "q"}]})
    (result,) = response.json()["compositeResponse"]
    assert result["httpStatusCode"] == 400
    assert result["body"][0]["errorCode"] == code
    assert fake.soql_log == [soql]


def test_bad_soql_in_a_get_is_malformed_query(api):
    response = api("GET", "/query", params={"q": "SELECT Id FROM Sefaria_App_User__c WHERE"})
    assert response.status_code == 400
    assert response.json()[0]["errorCode"] == "MALFORMED_QUERY"


def test_composite_runs_query_subrequests_as_one_call(fake, api):
    a = fake.insert(USER, {"Sefaria_App_Email__c": "a@x"})
    url = f"{API}/query?q=SELECT+Id+FROM+{USER}+WHERE+Sefaria_App_Email__c+%3D+%27a%40x%27"
    queries = [{"method": "GET", "url": url, "referenceId": f"r{i}"} for i in range(5)]
    others = [{"method": "GET", "url": f"{API}/sobjects/{USER}/{a}", "referenceId": f"g{i}"} for i in range(20)]
    response = api("POST", "/composite", json={"allOrNone": False, "compositeRequest": queries + others})
    assert response.status_code == 200
    results = response.json()["compositeResponse"]
    assert [r["referenceId"] for r in results] == [f"r{i}" for i in range(5)] + [f"g{i}" for i in range(20)]
    assert all(r["httpStatusCode"] == 200 for r in results)
    assert all(r["body"]["records"][0]["Id"] == a for r in results[:5]) and results[5]["body"]["Id"] == a
    assert fake.api_usage == 1 and fake.counts["composite"] == 1 and len(fake.soql_log) == 5


@pytest.mark.parametrize("extra", [
    f"{API}/query?q=SELECT+Id+FROM+{USER}",
    f"{API}/queryAll?q=SELECT+Id+FROM+{USER}",
    f"{API}/query/01g000000000001AAA-2000",
    f"{API}/composite/sobjects",
], ids=["query", "queryAll", "query-more", "collections"])
def test_composite_takes_at_most_five_queries_and_25_subrequests(fake, api, extra):
    """Salesforce's limits, refused whole with its error shape (nothing run, one API call)."""
    url = f"{API}/query?q=SELECT+Id+FROM+{USER}"
    five = [{"method": "GET", "url": url, "referenceId": f"r{i}"} for i in range(5)]
    sixth = {"method": "POST" if "sobjects" in extra else "GET", "url": extra, "referenceId": "r5"}
    response = api("POST", "/composite", json={"compositeRequest": [*five, sixth]})
    assert response.status_code == 400
    [error] = response.json()
    assert error["errorCode"] == "LIMIT_EXCEEDED" and "5 query" in error["message"]
    assert fake.soql_log == [] and fake.api_usage == 1
    filler = [{"method": "GET", "url": f"{API}/limits", "referenceId": f"l{i}"} for i in range(21)]
    too_many = api("POST", "/composite", json={"compositeRequest": [*five, *filler]})  # 26
    assert too_many.status_code == 400 and too_many.json()[0]["errorCode"] == "LIMIT_EXCEEDED"
    assert "25 subrequests" in too_many.json()[0]["message"]


def test_composite_all_or_none_halts_after_a_failure(fake, api):
    response = api("POST", "/composite", json={"allOrNone": True, "compositeRequest": [
        {"method": "POST", "url": f"{API}/sobjects/{USER}/", "referenceId": "bad", "body": {"First_Name__c": "x"}},
        {"method": "POST", "url": f"{API}/sobjects/{USER}/", "referenceId": "good",
         "body": {"Sefaria_App_Email__c": "g@x"}},
    ]})
    bad, halted = response.json()["compositeResponse"]
    assert bad["body"][0]["errorCode"] == "REQUIRED_FIELD_MISSING"
    assert halted["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert fake.records(USER) == []


def test_an_oversized_request_is_refused(fake, api):
    long_soql = "SELECT Id FROM Sefaria_App_User__c WHERE Id = '" + "x" * 17_000 + "'"
    response = api("GET", "/query", params={"q": long_soql})
    assert response.status_code == 414
    response = api("GET", "/limits", headers={"X-Padding": "p" * 16_300})
    assert response.status_code == 431


# -- limits and faults -------------------------------------------------------------------------------

def test_limits_and_usage_header(fake, api):
    api("GET", "/limits")
    response = api("GET", "/limits")
    assert response.json() == {"DailyApiRequests": {"Max": 100_000, "Remaining": 99_998}}
    assert response.headers["Sforce-Limit-Info"] == "api-usage=2/100000"
    fake.api_usage = fake.daily_limit
    over = api("GET", "/limits")
    assert over.status_code == 403
    assert over.json() == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]


def test_injected_faults(fake, api):
    fake.inject(UNABLE_TO_LOCK_ROW, kind="update")
    fake.inject(Fault.error(503), times=2)
    record_id = fake.insert(USER, {"Sefaria_App_Email__c": "a@x"})
    assert api("GET", "/limits").status_code == 503
    locked = api("PATCH", f"/sobjects/{USER}/{record_id}", json={"First_Name__c": "A"})
    assert locked.status_code == 400 and locked.json()[0]["errorCode"] == "UNABLE_TO_LOCK_ROW"
    unavailable = api("GET", "/limits")
    assert unavailable.status_code == 503 and unavailable.json()[0]["errorCode"] == "SERVER_UNAVAILABLE"
    assert "Sforce-Limit-Info" in unavailable.headers
    fake.inject(Fault.malformed_json())
    with pytest.raises(ValueError):
        api("GET", "/limits").json()
    fake.inject(Fault.drop())
    with pytest.raises(requests.ConnectionError):
        api("GET", "/limits")
    fake.inject(Fault.slow(0.5))
    with pytest.raises(requests.Timeout):
        api.session.get(fake.url + API + "/limits", timeout=0.1)
    assert api("GET", "/limits").status_code == 200
    assert dict(fake.fault_counts) == {"status": 3, "malformed_json": 1, "drop": 1, "slow": 1}


def statuses(seed: int) -> list[int]:
    with FakeSalesforce(faults=Faults(seed=seed, error_rates={503: 0.3, 500: 0.1}, drop_rate=0.1)) as fake:
        api = Api(fake)
        out = []
        for _ in range(40):
            try:
                out.append(api("GET", "/limits").status_code)
            except requests.ConnectionError:
                out.append(0)
        return out


def test_random_faults_are_reproducible_from_the_seed():
    first = statuses(7)
    assert first == statuses(7)
    assert {0, 200, 500, 503} <= set(first)


def test_relationship_paths_in_select_and_where(fake, api):
    """App users link to their Contact (``Contact__c``); ``Contact__r.X`` nests as Salesforce nests it."""
    contact = fake.insert("Contact", {"NationBuilder_Id__c": "77", "LastName": "Levi"})
    linked = fake.insert(USER, {"Contact__c": contact, "Sefaria_App_Email__c": "l@x"})
    alone = fake.insert(USER, {"Sefaria_App_Email__c": "a@x"})
    soql = ("SELECT Id, Contact__r.NationBuilder_Id__c, contact__r.LastName FROM Sefaria_App_User__c "
            "WHERE Contact__r.NationBuilder_Id__c IN ('77', '78')")
    [record] = api("GET", "/query", params={"q": soql}).json()["records"]
    assert record["Id"] == linked
    assert record["Contact__r"] == {"attributes": {"type": "Contact", "url": f"{API}/sobjects/Contact/{contact}"},
                                    "NationBuilder_Id__c": "77", "LastName": "Levi"}
    both = api("GET", "/query", params={"q": "SELECT Id, Contact__r.NationBuilder_Id__c FROM Sefaria_App_User__c"})
    by_id = {r["Id"]: r["Contact__r"] for r in both.json()["records"]}
    assert set(by_id) == {linked, alone} and by_id[alone] is None  # no Contact: null, as Salesforce answers
    assert by_id[linked]["NationBuilder_Id__c"] == "77" and "LastName" not in by_id[linked]
    not_null = api("GET", "/query", params={
        "q": "SELECT Id FROM Sefaria_App_User__c WHERE Contact__r.NationBuilder_Id__c != null"}).json()
    assert [r["Id"] for r in not_null["records"]] == [linked]
    unknown = api("GET", "/query", params={"q": "SELECT Id FROM Sefaria_App_User__c WHERE Nope__r.X = 1"})
    assert unknown.status_code == 400 and unknown.json()[0]["errorCode"] == "INVALID_FIELD"
    deep = api("GET", "/query", params={"q": "SELECT Contact__r.Account.Name FROM Sefaria_App_User__c"})
    assert deep.status_code == 400 and deep.json()[0]["errorCode"] == "INVALID_FIELD"


def test_records_can_be_seeded_under_hostile_ids(fake, api):
    odd = fake.insert(USER, {"NationBuilder_Id__c": "5"}, record_id="a0A!!")
    assert odd == "a0A!!" and fake.record(USER, "a0A!!") == {"Id": "a0A!!", "NationBuilder_Id__c": "5"}
    body = api("GET", "/query", params={"q": "SELECT Id FROM Sefaria_App_User__c WHERE NationBuilder_Id__c = '5'"})
    assert [r["Id"] for r in body.json()["records"]] == ["a0A!!"]
    with pytest.raises(ValueError):
        fake.insert(USER, {}, record_id="a0A!!")


def test_a_large_org_answers_by_index():
    with FakeSalesforce() as fake:
        started = time.perf_counter()
        fake.insert_many(USER, ({"Sefaria_App_Email__c": f"user{i}@example.org", "NationBuilder_Id__c": i}
                                for i in range(100_000)))
        seeded = time.perf_counter() - started
        api = Api(fake)
        soql = ("SELECT Id, NationBuilder_Id__c FROM Sefaria_App_User__c WHERE NationBuilder_Id__c IN ("
                + ",".join(f"'{i}'" for i in range(0, 100_000, 100)) + ")")
        started = time.perf_counter()
        for _ in range(20):
            body = api("POST", "/composite", json={"compositeRequest": [
                {"method": "GET", "url": f"{API}/query?q={requests.utils.quote(soql)}", "referenceId": "q"}]}).json()
        queried = (time.perf_counter() - started) / 20
        assert body["compositeResponse"][0]["body"]["totalSize"] == 1000
        assert seeded < 10 and queried < 0.5  # a scan of 100k rows per query would be far slower


# -- fidelity: an independent client -----------------------------------------------------------------

@pytest.fixture
def sf() -> Iterator[tuple[FakeSalesforce, Salesforce]]:
    with FakeSalesforce(tls=True, page_size=3) as fake:
        yield fake, Salesforce(instance_url=fake.url, session_id=fake.issue_token(),
                               session=fake.client_session(), version="60.0")


def test_simple_salesforce_crud_and_query_all(sf):
    fake, client = sf
    created = client.Sefaria_App_User__c.create({"Sefaria_App_Email__c": "s@x", "NationBuilder_Id__c": "9"})
    record_id = created["id"]
    assert created["success"]
    assert client.Sefaria_App_User__c.get(record_id)["Sefaria_App_Email__c"] == "s@x"
    assert client.Sefaria_App_User__c.get_by_custom_id("NationBuilder_Id__c", "9")["Id"] == record_id
    assert client.Sefaria_App_User__c.update(record_id, {"First_Name__c": "S"}) == 204
    assert client.Sefaria_App_User__c.upsert("NationBuilder_Id__c/10", {"Sefaria_App_Email__c": "t@x"}) == 201
    for i in range(5):
        fake.insert(USER, {"Sefaria_App_Email__c": f"{i}@x"})
    everything = client.query_all("SELECT Id, Sefaria_App_Email__c FROM Sefaria_App_User__c")
    assert everything["totalSize"] == 7 and len(everything["records"]) == 7
    assert client.Sefaria_App_User__c.delete(record_id) == 204
    assert len(fake.records(USER)) == 6
    contact = fake.insert("Contact", {"NationBuilder_Id__c": "31"})
    linked = fake.insert(USER, {"Contact__c": contact})
    through = client.query_all("SELECT Id, Contact__r.NationBuilder_Id__c FROM Sefaria_App_User__c "
                               "WHERE Contact__r.NationBuilder_Id__c = '31'")
    assert [(r["Id"], r["Contact__r"]["NationBuilder_Id__c"]) for r in through["records"]] == [(linked, "31")]


def test_simple_salesforce_maps_the_fake_errors(sf):
    fake, client = sf
    with pytest.raises(SalesforceResourceNotFound):
        client.Sefaria_App_User__c.get("a0A000000000999AAA")
    with pytest.raises(SalesforceMalformedRequest):
        client.Sefaria_App_User__c.create({"First_Name__c": "no email"})
    fake.insert(USER, {"Sefaria_App_Email__c": "1@x", "NationBuilder_Id__c": 1})
    fake.insert(USER, {"Sefaria_App_Email__c": "2@x", "NationBuilder_Id__c": "1"})
    with pytest.raises(SalesforceMoreThanOneRecord):
        client.Sefaria_App_User__c.get_by_custom_id("NationBuilder_Id__c", "1")
    fake.api_usage = fake.daily_limit
    with pytest.raises(SalesforceRefusedRequest):
        client.query("SELECT Id FROM Sefaria_App_User__c")
    fake.expire_tokens()
    with pytest.raises(SalesforceExpiredSession):
        client.query("SELECT Id FROM Sefaria_App_User__c")
