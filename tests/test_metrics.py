"""The library's live metrics (``crm_states[metrics]``): real work against FakeSalesforce over HTTP and the
test database, then a real scrape of ``start_http_server``; every figure is checked against what the fake
counted, what was journaled and what ``report.collect`` finds."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from crm_states import metrics, report
from crm_states.testing import FakeSalesforce
from tests.operator_seed import EXPECTED, FAST, JOURNALED, NB, SIGNUP, seed
from tests.reliability.checks import ROOT

COUNTERS = ("crm_states_crm_requests", "crm_states_crm_retries", "crm_states_journal_entries",
            "crm_states_db_failure_transitions", "crm_states_runner_profiles")


def _totals(families) -> Counter:
    """``(sample name, sorted labels) -> value`` of every counter and histogram count of ours."""
    out: Counter = Counter()
    for family in families:
        for s in family.samples:
            if s.name.startswith("crm_states_") and (s.name.endswith("_total") or s.name.endswith("_count")):
                out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def _by(delta: Counter, name: str, label: str) -> Counter:
    out: Counter = Counter()
    for (sample, labels), value in delta.items():
        if sample == name:
            out[dict(labels)[label]] += value
    return out


def test_a_scrape_counts_what_the_run_did(db, tmp_path: Path) -> None:
    before = _totals(REGISTRY.collect())
    with FakeSalesforce() as fake:
        seed(db, fake, tmp_path, runner=True)
        fake_counts, api_usage, daily_limit = dict(fake.counts), fake.api_usage, fake.daily_limit
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        scraped = requests.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert scraped.status_code == 200
    families = list(text_string_to_metric_families(scraped.text))
    delta = _totals(families) - before

    # Every HTTP request the fake answered, by kind; the latency histogram saw each one.
    requests_by_kind = _by(delta, "crm_states_crm_requests_total", "kind")
    assert sum(requests_by_kind.values()) == sum(fake_counts.values())
    assert requests_by_kind == {"POST services/oauth2/token": fake_counts["token"], "GET query": fake_counts["query"],
                                "POST sobjects/Sefaria_App_User__c": fake_counts["create"]}
    assert _by(delta, "crm_states_crm_request_duration_seconds_count", "kind") == requests_by_kind
    failed = Counter({(dict(k)["kind"], dict(k)["outcome"]): v for (name, k), v in delta.items()
                      if name == "crm_states_crm_requests_total" and dict(k)["outcome"] != "ok"})
    assert failed == {("GET query", "CrmTransientError"): FAST.attempts,  # the 503s past the retry budget
                      ("POST sobjects/Sefaria_App_User__c", "CrmRejected"): 1}
    assert _by(delta, "crm_states_crm_retries_total", "kind") == {"GET query": FAST.attempts - 1}

    # Salesforce's own count of API requests, from the last Sforce-Limit-Info header.
    gauges = {s.name: s.value for f in families for s in f.samples if s.name.startswith("crm_states_salesforce")}
    assert gauges == {"crm_states_salesforce_api_requests": api_usage,
                      "crm_states_salesforce_api_requests_limit": daily_limit}

    # Journal entries and DB-failure transitions: the two signups whose id's write was refused.
    journal_lines = (tmp_path / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(journal_lines) == JOURNALED
    assert _by(delta, "crm_states_journal_entries_total", "state") == {"LoggedDbFailure": JOURNALED}
    assert _by(delta, "crm_states_db_failure_transitions_total", "machine") == {SIGNUP: JOURNALED}

    # The runner's profiles by state: the 36 it validated, as the database holds them.
    held = {r.state: r.count for r in report.collect(db, [NB])[NB] if r.count}
    runner = _by(delta, "crm_states_runner_profiles_total", "state")
    assert runner == {"WroteSalesforceAppUserUid": 12, "WroteNotFound": 24}
    assert held == {**runner, "WroteUnexpectedResponse": EXPECTED[NB]["WroteUnexpectedResponse"]}
    assert _by(delta, "crm_states_runner_profiles_total", "outcome") == {"finished": 36}


@pytest.mark.parametrize("method,url,kind", [
    ("POST", "https://x.my.salesforce.com/services/oauth2/token", "POST services/oauth2/token"),
    ("GET", "https://x.my.salesforce.com/services/data/v60.0/query?q=SELECT+Id", "GET query"),
    ("GET", "https://x/services/data/v60.0/query/01gD0000002HU6KIAW-2000", "GET query/{id}"),
    ("PATCH", "https://x/services/data/v60.0/sobjects/Sefaria_App_User__c/a0X5e00000AbCdEFGH", "PATCH sobjects/Sefaria_App_User__c/{id}"),
    ("GET", "https://x/services/data/v60.0/sobjects/Sefaria_App_User__c/Sefaria_App_Email__c/dvora%40example.org",
     "GET sobjects/Sefaria_App_User__c/Sefaria_App_Email__c/{id}"),
    ("GET", "https://slug.nationbuilder.com/api/v1/people/match?email=a@b.org&access_token=s3cr3t", "GET people/match"),
    ("DELETE", "https://slug.nationbuilder.com/api/v1/people/123456", "DELETE people/{id}"),
])
def test_request_kinds_hold_no_id_email_or_token(method: str, url: str, kind: str) -> None:
    assert metrics.request_kind(method, url) == kind


def test_without_prometheus_client_every_hook_does_nothing() -> None:
    code = """
import sys
sys.modules["prometheus_client"] = None
from crm_states import metrics
import crm_states.crm.http, crm_states.engine, crm_states.journal, crm_states.runner
assert not metrics.ENABLED
hooks = [metrics.crm_request, metrics.crm_retry, metrics.salesforce_api_usage, metrics.journal_entry,
         metrics.db_failure_transition, metrics.runner_results]
assert all(h is metrics._nothing for h in hooks)
assert metrics.crm_request("GET", "http://x/", 0.1, None) is None
print("no-op")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "no-op\n", done.stderr
