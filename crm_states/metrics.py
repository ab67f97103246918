"""The library's live Prometheus metrics: every metric object lives here, and the rest of the library
calls one hook line at each place worth counting.

With ``prometheus_client`` installed (the ``crm_states[metrics]`` extra) the metrics are registered on its
default registry, so the process's existing ``/metrics`` endpoint (Sefaria's, or ``start_http_server``)
serves them. Without it every hook is a function that does nothing, and nothing here is imported.

============================================== ========= ==============================================
metric                                         type      labels
============================================== ========= ==============================================
``crm_states_crm_requests_total``              counter   ``kind`` (method and path shape), ``outcome``
``crm_states_crm_request_duration_seconds``    histogram ``kind``
``crm_states_crm_retries_total``               counter   ``kind``
``crm_states_salesforce_api_requests``         gauge     (daily API requests used, ``Sforce-Limit-Info``)
``crm_states_salesforce_api_requests_limit``   gauge     (the org's daily allocation)
``crm_states_journal_entries_total``           counter   ``machine``, ``state``
``crm_states_db_failure_transitions_total``    counter   ``machine``, ``state`` (the DB-failure state)
``crm_states_runner_profiles_total``           counter   ``machine``, ``state``, ``outcome``
============================================== ========= ==============================================

``kind`` is the request's method and the shape of its path with ids blanked (``GET query``,
``PATCH sobjects/Sefaria_App_User__c/{id}``, ``POST services/oauth2/token``): a handful of values, never an
id or an email. ``outcome`` is ``ok`` or the class of the error (``CrmTransientError``, ``CrmReadTimeout``...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

try:
    import prometheus_client as _prom
except ImportError:  # the extra is not installed: every hook below is a no-op
    _prom = None

ENABLED = _prom is not None
#: Latency buckets in seconds: loopback answers in milliseconds, Salesforce in tens to hundreds of them,
#: a timed-out request after the client's read timeout (20 s by default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)

_VERSION = re.compile(r"v\d+(\.\d+)?")
_WORD = re.compile(r"[A-Za-z_]+\d?")  # endpoint and object names (query, sobjects, Sefaria_App_User__c, oauth2)


def request_kind(method: str, url: str) -> str:
    """``METHOD path-shape``: the path after its API version segment (``v60.0``, ``v1``) when it has one,
    words kept and anything else (ids, emails, locators) as ``{id}``, at most four segments."""
    segments = [s for s in urlsplit(url).path.split("/") if s]
    for index, segment in enumerate(segments):
        if _VERSION.fullmatch(segment):
            segments = segments[index + 1:]
            break
    shape = [s if _WORD.fullmatch(s) and len(s) <= 64 else "{id}" for s in segments[:4]]
    return f"{method.upper()} {'/'.join(shape)}"


def _outcome(error: BaseException | None) -> str:
    return "ok" if error is None else type(error).__name__


if _prom is not None:
    CRM_REQUESTS = _prom.Counter("crm_states_crm_requests", "CRM HTTP requests sent, by kind and outcome.",
                                 ["kind", "outcome"])
    CRM_LATENCY = _prom.Histogram("crm_states_crm_request_duration_seconds",
                                  "Time from sending a CRM request to its answer (or its failure).", ["kind"],
                                  buckets=LATENCY_BUCKETS)
    CRM_RETRIES = _prom.Counter("crm_states_crm_retries", "CRM requests sent again after a transient failure.",
                                ["kind"])
    SF_USED = _prom.Gauge("crm_states_salesforce_api_requests",
                          "Salesforce daily API requests used, from the last Sforce-Limit-Info header.")
    SF_LIMIT = _prom.Gauge("crm_states_salesforce_api_requests_limit",
                           "Salesforce daily API request allocation, from the last Sforce-Limit-Info header.")
    JOURNAL = _prom.Counter("crm_states_journal_entries", "DB writes journaled because MongoDB refused them.",
                            ["machine", "state"])
    DB_FAILURES = _prom.Counter("crm_states_db_failure_transitions",
                                "Transitions taken along a diagram's DB-failure edge.", ["machine", "state"])
    RUNNER = _prom.Counter("crm_states_runner_profiles", "Profiles the validate-nb runner drove, by the state "
                           "they reached and the run's outcome.", ["machine", "state", "outcome"])

    def crm_request(method: str, url: str, seconds: float, error: BaseException | None) -> None:
        """One CRM HTTP request sent (``http.send``): its outcome and latency."""
        kind = request_kind(method, url)
        CRM_REQUESTS.labels(kind, _outcome(error)).inc()
        CRM_LATENCY.labels(kind).observe(seconds)

    def crm_retry(method: str, url: str) -> None:
        CRM_RETRIES.labels(request_kind(method, url)).inc()

    def salesforce_api_usage(used: int, limit: int) -> None:
        SF_USED.set(used)
        SF_LIMIT.set(limit)

    def journal_entry(machine: str, state: str) -> None:
        JOURNAL.labels(machine, state).inc()

    def db_failure_transition(machine: str, state: str) -> None:
        DB_FAILURES.labels(machine, state).inc()

    def runner_results(machine: str, results: Iterable[Any]) -> None:
        """The runner's results of one range (``RunResult``: ``state`` and ``outcome``)."""
        for result in results:
            RUNNER.labels(machine, result.state or "", result.outcome).inc()

else:
    def _nothing(*args: Any, **kwargs: Any) -> None:
        """A hook without prometheus_client: does nothing."""

    crm_request = crm_retry = salesforce_api_usage = journal_entry = db_failure_transition = runner_results = _nothing
