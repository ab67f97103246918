"""Bulk API 2.0 query jobs, client and fake, over real HTTP: every request counted as Salesforce counts it."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import time

import attrs
import pytest
import requests
from simple_salesforce import Salesforce

from crm_states.crm.errors import CrmError, CrmJobFailed, CrmNotFound, CrmRejected, CrmTransientError
from crm_states.crm.salesforce import SalesforceSchema
from crm_states.testing.salesforce import FakeSalesforce, salesforce_id
from crm_states.testing.server import Fault

USER, CONTACT, NB, EMAIL = "Sefaria_App_User__c", "Contact", "NationBuilder_Id__c", "Sefaria_App_Email__c"
ON_CONTACT = SalesforceSchema(nationbuilder_id_field="Contact__r.NationBuilder_Id__c", app_user_key_prefix="a0A")
API = "/services/data/v60.0"


def seed_on_contacts(fake: FakeSalesforce, count: int) -> dict[str, tuple[str, str]]:
    """``count`` app users linked to Contacts holding NationBuilder ids, and two without one."""
    expected = {}
    for i in range(count):
        contact = fake.insert(CONTACT, {NB: str(1000 + i)})
        app_user = fake.insert(USER, {"Contact__c": contact, EMAIL: f"u{i}@example.org"})
        expected[app_user] = (str(1000 + i), f"u{i}@example.org")
    fake.insert(USER, {EMAIL: "no-contact@example.org"})
    fake.insert(USER, {"Contact__c": fake.insert(CONTACT, {"LastName": "No NB id"}), EMAIL: "no-nb@example.org"})
    return expected


def test_a_job_of_every_app_user_with_a_nationbuilder_id(fake, make_client, sleeps):
    expected = seed_on_contacts(fake, 7)
    client = make_client(schema=ON_CONTACT)
    job = client.start_bulk_query()
    assert job.state == "UploadComplete" and job.id.startswith("750")
    fake.bulk_jobs[job.id].polls_to_complete = 4
    done = client.wait_for_bulk_query(job.id)
    assert done.state == "JobComplete" and done.records_processed == 7
    assert sleeps == [0.5, 1.0, 2.0]  # back-off between the four polls
    pages = list(client.bulk_query_pages(job.id, max_records=3))
    assert [len(p.rows) for p in pages] == [3, 3, 1]
    assert [p.locator for p in pages][0] is None and pages[-1].next_locator is None
    assert all(later.locator == earlier.next_locator for earlier, later in itertools.pairwise(pages))
    rows = [row for page in pages for row in page.rows]
    assert set(rows[0]) == {"Id", "Contact__r.NationBuilder_Id__c", EMAIL}
    assert {r["Id"]: (r["Contact__r.NationBuilder_Id__c"], r[EMAIL]) for r in rows} == expected
    assert fake.soql_log == []  # a bulk query is not a REST query
    # one create, four polls, three pages: each an API request, counted alike by both sides
    assert client.api_requests == fake.api_usage == 8
    assert fake.counts["bulk_results"] == 3 and fake.bulk_gzipped == 3


def test_a_failed_job_raises_naming_it_and_its_message(fake, client, sleeps):
    fake.bulk_polls, fake.bulk_fail_at = 5, 3  # fails part-way, on its third poll
    job = client.start_bulk_query("SELECT Id FROM Sefaria_App_User__c")
    with pytest.raises(CrmJobFailed) as caught:
        client.wait_for_bulk_query(job.id)
    assert caught.value.job_id == job.id and caught.value.state == caught.value.code == "Failed"
    assert job.id in str(caught.value) and "QUERY_TIMEOUT" in str(caught.value)
    assert fake.counts["bulk_poll"] == 3 and client.api_requests == 4
    with pytest.raises(CrmRejected, match="INVALIDJOBSTATE"):
        next(client.bulk_query_pages(job.id))


def test_an_aborted_job_raises_and_a_finished_one_cannot_be_aborted(fake, client):
    job = client.start_bulk_query()
    assert client.abort_bulk_query(job.id).state == "Aborted"
    with pytest.raises(CrmJobFailed, match="Aborted"):
        client.wait_for_bulk_query(job.id)
    other = client.start_bulk_query()
    client.wait_for_bulk_query(other.id)
    with pytest.raises(CrmRejected, match="INVALIDJOBSTATE"):
        client.abort_bulk_query(other.id)
    client.delete_bulk_query(other.id)
    with pytest.raises(CrmNotFound, match="7 days"):
        client.bulk_query_job(other.id)


def test_a_killed_run_resumes_from_its_last_locator_with_another_client(fake, make_client):
    for i in range(25):
        fake.insert(USER, {NB: str(i), EMAIL: f"{i}@example.org"})
    first = make_client()
    job = first.start_bulk_query()
    first.wait_for_bulk_query(job.id)
    pages = first.bulk_query_pages(job.id, max_records=10)
    done = next(pages)  # ... and the runner is killed here, with this page's next locator saved
    pages.close()
    again = make_client()
    assert again.bulk_query_job(job.id).state == "JobComplete"  # reused by id: no second job
    rest = list(again.bulk_query_pages(job.id, locator=done.next_locator, max_records=10))
    ids = [r["Id"] for p in [done, *rest] for r in p.rows]
    assert len(ids) == len(set(ids)) == 25 and fake.counts["bulk_create"] == 1


def test_an_expired_job_is_a_clear_error(fake, client):
    job = client.start_bulk_query()
    client.wait_for_bulk_query(job.id)
    fake.age_bulk_jobs(8 * 86_400)
    for call in (lambda: client.bulk_query_job(job.id), lambda: next(client.bulk_query_pages(job.id))):
        with pytest.raises(CrmNotFound, match=r"keeps a job and its results 7 days.*start a new job"):
            call()


def test_waiting_is_bounded(fake, client, sleeps):
    fake.bulk_polls = 1_000
    job = client.start_bulk_query()
    with pytest.raises(CrmTransientError, match="still InProgress after 10s"):
        client.wait_for_bulk_query(job.id, timeout=10)
    assert sum(sleeps) == pytest.approx(10) and fake.counts["bulk_poll"] == len(sleeps) + 1 < 10


def csv_page(text: str, locator: str = "null") -> Fault:
    return Fault.error(200, body=text.encode(), headers={"Content-Type": "text/csv", "Sforce-Locator": locator})


def test_hostile_rows_are_refused_with_their_row_numbers(fake, make_client):
    client = make_client(schema=SalesforceSchema(app_user_key_prefix="a0A"))
    job = client.start_bulk_query()
    client.wait_for_bulk_query(job.id)
    good, other = salesforce_id("a0A", 5), salesforce_id("001", 6)
    fake.inject(csv_page(f'"Id","{NB}","{EMAIL}"\n"{good}","5","a@x"\n"{other}","6","b@x"\n"a0A1","7","c@x"\n'
                         f'"{good}","{"8" * 1500}","d@x"\n"{good}","9"\n'), kind="bulk_results")
    [page] = client.bulk_query_pages(job.id)
    assert page.rows == [{"Id": good, NB: "5", EMAIL: "a@x"}]
    assert [n for n, _ in page.rejected] == [2, 3, 4, 5]
    details = [d for _, d in page.rejected]
    assert "key prefix is not a0A" in details[0] and "not a Salesforce record id" in details[1]
    assert "1,500 characters" in details[2] and "8" * 20 not in details[2] and "2 values for 3" in details[3]
    # What is kept of each refused row: the columns that pass the checks, its Id only when that is valid.
    assert page.rejected_values == ({NB: "6", EMAIL: "b@x"}, {NB: "7", EMAIL: "c@x"}, {"Id": good, EMAIL: "d@x"}, {})
    fake.inject(csv_page('"Id"\n"' + "x" * 200_000 + '"\n'), kind="bulk_results")
    with pytest.raises(CrmError, match="not valid CSV"):
        next(client.bulk_query_pages(job.id))
    fake.inject(csv_page('"Id"\n', locator="L" * 2000), kind="bulk_results")
    with pytest.raises(CrmError, match="locator"):
        next(client.bulk_query_pages(job.id))


def test_bad_job_requests_are_refused_with_salesforces_shapes(fake, client):
    api = client.get_connection()
    url = fake.url + API + "/jobs/query"
    for body, code in [({"operation": "upsert", "query": "SELECT Id FROM Contact"}, "INVALIDJOB"),
                       ({"operation": "query", "query": "SELECT FROM"}, "INVALIDJOB"),
                       ({"operation": "query", "query": "SELECT Id FROM Contact", "columnDelimiter": "TAB"},
                        "INVALIDJOB"),
                       ({"operation": "query", "query": "SELECT Nope__r.X FROM Sefaria_App_User__c"}, "INVALIDJOB")]:
        answer = api.post(url, json=body, timeout=5)
        assert answer.status_code == 400 and answer.json()[0]["errorCode"] == code, body
    job = api.post(url, json={"operation": "queryAll", "query": "SELECT Id FROM Contact", "lineEnding": "CRLF"},
                   timeout=5).json()
    early = api.get(f"{url}/{job['id']}/results", timeout=5)
    assert early.status_code == 400 and early.json()[0]["errorCode"] == "INVALIDJOBSTATE"
    fake.insert(CONTACT, {"LastName": "x"})
    while api.get(f"{url}/{job['id']}", timeout=5).json()["state"] != "JobComplete":
        pass
    bad = api.get(f"{url}/{job['id']}/results", params={"locator": "!!"}, timeout=5)
    assert bad.status_code == 400 and bad.json()[0]["errorCode"] == "INVALIDLOCATOR"
    assert api.get(f"{url}/{job['id']}/results", params={"maxRecords": "0"}, timeout=5).status_code == 400
    plain = requests.get(f"{url}/{job['id']}/results", headers={**api.headers, "Accept-Encoding": "identity"},
                         timeout=5)
    assert plain.headers.get("Content-Encoding") is None and plain.content.endswith(b"\r\n")
    assert plain.headers["Sforce-NumberOfRecords"] == "1" and plain.headers["Sforce-Locator"] == "null"
    zipped = requests.get(f"{url}/{job['id']}/results", headers={**api.headers, "Accept-Encoding": "gzip"},
                          timeout=5, stream=True)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.raw.read()) == plain.content


def test_simple_salesforce_bulk2_reads_the_fake():
    with FakeSalesforce(tls=True) as fake:  # simple-salesforce's bulk2 URLs are always https
        for i in range(5):
            fake.insert(USER, {NB: str(i), EMAIL: f"{i}@x"})
        fake.insert(USER, {EMAIL: "no-nb@x"})
        sf = Salesforce(instance_url=fake.url, session_id=fake.issue_token(), session=fake.client_session(),
                        version="60.0")
        pages = list(sf.bulk2.Sefaria_App_User__c.query(f"SELECT Id, {EMAIL} FROM {USER} WHERE {NB} != null",
                                                        max_records=2, wait=0.01))
    rows = [r for text in pages for r in csv.DictReader(io.StringIO(text))]
    assert len(pages) == 3 and sorted(r[EMAIL] for r in rows) == [f"{i}@x" for i in range(5)]


@pytest.mark.reliability
def test_a_million_app_users_in_pages_of_100000(policy):
    """The fake serves 1,000,000 rows and the client reads them one page at a time, in ~a dozen requests."""
    policy = attrs.evolve(policy, read_timeout=60.0)
    with FakeSalesforce() as fake:
        fake.insert_many(USER, ({NB: i, EMAIL: f"user{i}@example.org"} for i in range(1_000_000)))
        from crm_states.crm.salesforce import SalesforceConnectionManager, TokenCache

        client = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=policy,
                                             session=fake.client_session(), sleep=lambda s: None,
                                             token_cache=TokenCache())
        started = time.perf_counter()
        job = client.start_bulk_query()
        client.wait_for_bulk_query(job.id)
        count, largest = 0, 0
        for page in client.bulk_query_pages(job.id, max_records=100_000):
            assert not page.rejected
            count += len(page.rows)
            largest = max(largest, len(page.rows))
        elapsed = time.perf_counter() - started
        assert count == 1_000_000 and largest == 100_000
        assert client.api_requests == fake.api_usage == 1 + 2 + 10
        assert elapsed < 120, elapsed
