"""Batched lookups over real HTTP: ``Matches`` per key, hostile answers refused, requests packed and counted.

A record with a bad id, an oversized value or two app users for one NationBuilder id never comes out
of a lookup as a single clean id.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.crm.errors import CrmBadAnswer, CrmRejected, CrmTransientError
from crm_states.crm.results import Matches
from crm_states.crm.salesforce import SalesforceSchema
from crm_states.crm.salesforce.queries import Lookups
from crm_states.testing.salesforce import FakeSalesforce, parse_soql, salesforce_id
from crm_states.testing.server import Fault

USER = "Sefaria_App_User__c"
CONTACT = "Contact"
NB = "NationBuilder_Id__c"
EMAIL = "Sefaria_App_Email__c"
ON_CONTACT = SalesforceSchema(nationbuilder_id_field="Contact__r.NationBuilder_Id__c", app_user_key_prefix="a0A")


def page(*records: dict) -> Fault:
    """An answer the fake serves instead of its own: a query page holding exactly ``records``."""
    body = {"totalSize": len(records), "done": True, "records": [{"attributes": {"type": USER}, **r} for r in records]}
    return Fault.error(200, body=json.dumps(body).encode())


GOOD, OTHER, ACCOUNT = salesforce_id("a0A", 900), salesforce_id("a0A", 901), salesforce_id("001", 1)


# -- Matches ---------------------------------------------------------------------------------------------

@pytest.fixture
def patient_client(make_client, policy):
    """For answers of thousands of records: a busy machine may take longer than the fast policy's read
    timeout to serve them, and a retried request would count twice."""
    return make_client(policy=attrs.evolve(policy, read_timeout=60.0))


def test_every_app_user_of_an_id_is_listed_and_none_passes_as_the_one(fake, client):
    first = fake.insert(USER, {NB: "5"})
    second = fake.insert(USER, {NB: 5.0})
    only = fake.insert(USER, {NB: 6})
    found = client.lookup_app_users_by_nationbuilder_ids([5, 6, 7])
    assert found == {5: Matches(5, tuple(sorted([first, second]))), 6: Matches(6, (only,))}
    assert found[5].single is None and found[6].single == only and 7 not in found
    with pytest.raises(CrmBadAnswer, match="NationBuilder id 5") as caught:
        client.find_app_users_by_nationbuilder_ids([5, 6])
    assert caught.value.code == "AMBIGUOUS"
    assert client.find_app_users_by_nationbuilder_ids([6, 7]) == {6: only}


@pytest.mark.parametrize("bad_id, detail", [
    ("a0A12", "not a Salesforce record id (5 characters"),
    ("a0A000000000900EA!", "not a Salesforce record id"),
    (GOOD[:15] + "ZZZ", "wrong checksum"),
    (ACCOUNT, "not an id of the expected object (its key prefix is not a0A)"),
    ("a" * 5000, "5,000 characters long, over the 1,000 limit"),
    (None, "not text (NoneType)"),
    (12345, "not text (int)"),
], ids=["short", "punctuation", "checksum", "other-object", "oversized", "null", "number"])
def test_a_record_with_a_bad_id_is_rejected_with_a_short_detail(fake, make_client, bad_id, detail):
    client = make_client(schema=SalesforceSchema(app_user_key_prefix="a0A"))
    fake.inject(page({"Id": GOOD, NB: "5"}, {"Id": bad_id, NB: "5"}), kind="query")
    [matches] = client.lookup_app_users_by_nationbuilder_ids([5]).values()
    assert matches.ids == (GOOD,) and matches.single is None
    [rejected] = matches.rejected
    assert detail in rejected and len(rejected) < 200 and (not isinstance(bad_id, str) or bad_id not in rejected)
    fake.inject(page({"Id": bad_id, NB: "5"}), kind="query")
    with pytest.raises(CrmBadAnswer):
        client.find_app_users_by_nationbuilder_ids([5])


def test_oversized_values_are_never_taken_for_a_key(fake, client, caplog):
    fake.inject(page({"Id": GOOD, NB: "5" + " " * 2000}, {"Id": OTHER, NB: "6"}), kind="query")
    assert client.lookup_app_users_by_nationbuilder_ids([5, 6]) == {6: Matches(6, (OTHER,))}
    assert "over the 1,000 limit" in caplog.text and " " * 100 not in caplog.text
    long_email = "x" * 1200 + "@example.org"
    fake.inject(page({"Id": GOOD, EMAIL: long_email}, {"Id": OTHER, EMAIL: "ok@example.org"}), kind="query")
    assert client.lookup_app_users_by_emails([long_email, "ok@example.org"]) == {
        "ok@example.org": Matches("ok@example.org", (OTHER,))}


def test_a_record_for_a_key_not_asked_for_is_ignored(fake, client):
    fake.inject(page({"Id": GOOD, NB: "99"}, {"Id": OTHER, NB: None}, {"Id": OTHER, NB: "5"}), kind="query")
    assert client.lookup_app_users_by_nationbuilder_ids([5]) == {5: Matches(5, (OTHER,))}


def test_every_id_the_client_returns_is_checked(fake, make_client):
    client = make_client(schema=SalesforceSchema(app_user_key_prefix="a0A"))
    fake.inject(page({"Id": ACCOUNT}), kind="query")
    with pytest.raises(CrmBadAnswer, match="key prefix"):
        client.find_crm_id("a@example.org")
    fake.inject(page({"Id": GOOD}, {"Id": "a0A" + "0" * 2000}), kind="query")
    with pytest.raises(CrmBadAnswer, match="over the 1,000 limit"):
        client.get_sustainers()  # a read with one bad id fails whole: never a partial set
    created = json.dumps({"id": GOOD[:17] + "x", "success": True, "errors": []}).encode()
    fake.inject(Fault.error(201, body=created), kind="create")
    fake.inject(page(), kind="query")  # the email lookup before the create
    with pytest.raises(CrmBadAnswer, match="checksum"):
        client.add_user_to_crm("new@example.org", "N", "U")


record_ids = st.one_of(st.sampled_from(["good", "good", "good", "bad", "oversized", "account"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(plan=st.dictionaries(st.integers(1, 40), st.lists(record_ids, min_size=1, max_size=4), max_size=12),
       absent=st.sets(st.integers(41, 60), max_size=5))
def test_lookup_invariants(policy, plan, absent):
    """Whatever the org holds, each key lists exactly its valid ids and one detail per refused record,
    and ``single`` (and the old mapping) only ever carries a key with one valid record and nothing else."""
    serial = iter(range(10_000, 20_000))
    with FakeSalesforce() as fake:
        client = _client(fake, policy, SalesforceSchema(app_user_key_prefix="a0A"))
        expected: dict[int, tuple[set[str], int]] = {}
        for nb_id, kinds in plan.items():
            good, bad = set(), 0
            for kind in kinds:
                n = next(serial)
                record_id = {"good": None, "bad": f"a0A{n}", "oversized": "a0A" + str(n) * 300,
                             "account": salesforce_id("001", n)}[kind]
                made = fake.insert(USER, {NB: str(nb_id)}, record_id=record_id)
                good, bad = (good | {made}, bad) if kind == "good" else (good, bad + 1)
            expected[nb_id] = (good, bad)
        found = client.lookup_app_users_by_nationbuilder_ids([*plan, *absent])
        assert set(found) == set(plan)
        for nb_id, (good, bad) in expected.items():
            assert found[nb_id].ids == tuple(sorted(good)) and len(found[nb_id].rejected) == bad
            assert (found[nb_id].single is not None) == (len(good) == 1 and bad == 0)
        clean = {k: m.single for k, m in found.items() if m.single}
        if len(clean) == len(plan):
            assert client.find_app_users_by_nationbuilder_ids([*plan, *absent]) == clean
        else:
            with pytest.raises(CrmBadAnswer):
                client.find_app_users_by_nationbuilder_ids([*plan, *absent])


def _client(fake, policy, schema=SalesforceSchema(), **kwargs):
    from crm_states.crm.salesforce import SalesforceConnectionManager, TokenCache

    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, session=fake.client_session(),
                                       policy=policy, sleep=lambda s: None, token_cache=TokenCache(), schema=schema,
                                       **kwargs)


# -- by email --------------------------------------------------------------------------------------------

def test_emails_match_case_insensitively_after_trimming(fake, client):
    lower = fake.insert(USER, {EMAIL: "ada@example.org"})
    upper = fake.insert(USER, {EMAIL: "ADA@Example.ORG"})
    quoted = fake.insert(USER, {EMAIL: "o'hara\\x\"y@example.org"})
    fake.insert(USER, {EMAIL: "someone@example.org"})
    found = client.lookup_app_users_by_emails([" Ada@Example.org ", "ada@example.org", "O'Hara\\X\"Y@example.org",
                                               "nobody@example.org", "", "   "])
    assert found == {"ada@example.org": Matches("ada@example.org", tuple(sorted([lower, upper]))),
                     "o'hara\\x\"y@example.org": Matches("o'hara\\x\"y@example.org", (quoted,))}
    [soql] = fake.soql_log
    parsed = parse_soql(soql)
    assert parsed.where_field == EMAIL and set(parsed.values) == {
        "ada@example.org", "o'hara\\x\"y@example.org", "nobody@example.org"}


def test_email_lookup_refuses_what_is_not_text_before_any_request(fake, client):
    with pytest.raises(TypeError):
        client.lookup_app_users_by_emails(["a@example.org", None])
    with pytest.raises(CrmRejected, match="lone surrogate"):
        client.lookup_app_users_by_emails(["a\ud800@example.org"])
    assert fake.total_requests == 0


def test_long_emails_are_chunked_by_the_soql_length_limit(fake, patient_client):
    client = patient_client
    emails = [f"{i:05d}" + "x" * 290 + "@example.org" for i in range(1000)]
    hits = {e: fake.insert(USER, {EMAIL: e.upper()}) for e in emails[::100]}
    found = client.lookup_app_users_by_emails(emails)
    assert {k: m.single for k, m in found.items()} == hits
    assert len(fake.soql_log) == 4 and all(len(q) <= 100_000 for q in fake.soql_log)
    assert fake.counts["composite"] == 1 and client.api_requests == fake.api_usage == 1


# -- packing and counting -----------------------------------------------------------------------------------

def test_a_large_lookup_packs_five_queries_of_2000_ids_per_request(fake, patient_client):
    client = patient_client
    ids = list(range(1, 100_001))
    seeded = {nb: fake.insert(USER, {NB: str(nb)}) for nb in ids[::997]}
    found = client.lookup_app_users_by_nationbuilder_ids(ids)
    assert {k: m.single for k, m in found.items()} == seeded
    assert len(fake.soql_log) == 50 and fake.counts["composite"] == 10 and fake.counts["query"] == 0
    assert all(len(parse_soql(q).values) <= 2000 for q in fake.soql_log)
    assert client.api_requests == fake.api_usage == 10


def test_a_million_ids_cost_100_requests(client):
    lookups = Lookups(client._http, client.schema, client.max_ids_per_query)
    literals = [lookups._nationbuilder_literal(i) for i in range(1, 1_000_001)]
    soqls = lookups._soqls(literals, NB)
    assert len(soqls) == 500 and -(-len(soqls) // 5) == 100  # 5 query sub-requests per composite


def test_further_pages_ride_in_the_next_composites(fake, patient_client):
    client = patient_client
    fake.page_size = 200
    ids = list(range(1, 10_001))
    for nb in ids[::5]:
        fake.insert(USER, {NB: str(nb)})
    found = client.lookup_app_users_by_nationbuilder_ids(ids)
    assert len(found) == 2000 and all(m.single for m in found.values())
    # 5 queries of 2,000 ids, 400 hits each in pages of 200: 5 query sub-requests, then 5 query-more ones
    assert fake.counts["composite"] == 2 and fake.counts["query_more"] == 0
    assert client.api_requests == fake.api_usage == 2
    # one query's pages are known one at a time: each rides in the composite after the one before
    fake.reset_counts()
    assert len(client.lookup_app_users_by_nationbuilder_ids(range(1, 2001))) == 400  # too long for a GET
    assert fake.counts["composite"] == 2 and fake.counts["query"] == fake.counts["query_more"] == 0


def test_a_failed_subrequest_fails_the_whole_lookup(fake, make_client):
    client = make_client(schema=SalesforceSchema(nationbuilder_id_field="Nope__r.NationBuilder_Id__c"))
    with pytest.raises(CrmRejected) as caught:
        client.lookup_app_users_by_nationbuilder_ids(range(1, 5000))
    assert caught.value.code == "INVALID_FIELD"


def test_api_requests_counts_every_request_under_services_data(fake, client, policy):
    crm_id = client.add_user_to_crm("a@example.org", "A", "B")  # token, lookup, create
    client.change_user_email(crm_id, "b@example.org")
    client.lookup_app_users_by_nationbuilder_ids(range(1, 3000))  # one composite
    fake.inject(Fault.error(503), times=2, kind="update")
    client.mark_for_review_in_crm(crm_id)  # three tries
    fake.expire_tokens()
    client.find_crm_id("b@example.org")  # refused (401), new token, again
    assert client.api_requests == fake.total_requests - fake.counts["token"] == 9
    assert fake.counts["token"] == 2


def test_api_requests_is_thread_safe(fake, make_client):
    client = make_client()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: client.find_crm_id(f"{i}@example.org"), range(80)))
    assert client.api_requests == fake.api_usage == 80


def test_a_lookup_that_keeps_failing_counts_each_try(fake, client, policy):
    fake.inject(Fault.error(503), times=policy.attempts, kind="query")
    with pytest.raises(CrmTransientError):
        client.lookup_app_users_by_nationbuilder_ids([1])
    assert client.api_requests == policy.attempts


# -- the NationBuilder id on the Contact ----------------------------------------------------------------------

def test_lookup_through_the_contact(fake, make_client):
    client = make_client(schema=ON_CONTACT)
    ruth = fake.insert(CONTACT, {NB: "101", "LastName": "Ruth"})
    dov = fake.insert(CONTACT, {NB: 102})
    ruth_app = fake.insert(USER, {"Contact__c": ruth, EMAIL: "ruth@example.org"})
    dov_app = fake.insert(USER, {"Contact__c": dov})
    dov_again = fake.insert(USER, {"Contact__c": dov})
    fake.insert(USER, {NB: "103"})  # an id on the app user itself is not where this org keeps it
    found = client.lookup_app_users_by_nationbuilder_ids([101, 102, 103])
    assert found == {101: Matches(101, (ruth_app,)), 102: Matches(102, tuple(sorted([dov_app, dov_again])))}
    assert parse_soql(fake.soql_log[-1]).where_field == "Contact__r.NationBuilder_Id__c"
    with pytest.raises(CrmBadAnswer, match="NationBuilder id 102"):
        client.find_app_users_by_nationbuilder_ids([101, 102])
    assert client.find_app_users_by_nationbuilder_ids([101]) == {101: ruth_app}
