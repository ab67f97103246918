"""SOQL queries: every page of one query, and batched lookups packed into as few API requests as fit.

A batched lookup cuts its keys into chunks whose query fits (``max_ids_per_query`` keys, 100,000 SOQL
characters). One chunk that also fits a URL is one ``GET query``; otherwise the chunks ride in
``POST /composite`` calls of at most five query sub-requests each (Salesforce's limit on queries in one
composite), and each query's further pages (``nextRecordsUrl``) ride as query-more sub-requests in the
next composites. Every composite is one API request, so 1,000,000 ids in chunks of 2,000 cost 100.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from ..checks import MAX_VALUE_CHARS, record_id_problem, size_problem
from ..errors import CrmBadAnswer, CrmError
from ..http import short
from ..results import Matches, MatchesBuilder, normalise_email
from .answers import as_int, json_object, json_page, nationbuilder_ids
from .schema import (
    MAX_COMPOSITE_QUERIES,
    MAX_REQUEST_BYTES,
    MAX_SOQL_CHARS,
    SalesforceSchema,
    field_value,
    soql_quote,
)
from .transport import Transport

log = logging.getLogger("crm_states.crm")


def query_all(http: Transport, soql: str) -> list[dict[str, Any]]:
    """Every record of a query, following ``nextRecordsUrl``; any failed page raises."""
    return list(follow_pages(http, json_page(json_object(http.api("GET", "query", params={"q": soql})))))


def follow_pages(http: Transport, page: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    while True:
        yield from page["records"]
        if page.get("done", True):
            return
        page = json_page(json_object(http.api("GET", next_records_url(http, page))))


def next_records_url(http: Transport, page: Mapping[str, Any]) -> str:
    """The page's ``nextRecordsUrl``, refused unless the API minted it under our version."""
    next_url = page.get("nextRecordsUrl")
    if not isinstance(next_url, str) or not next_url.startswith(http.api_root + "/"):
        # never send our bearer token to a URL the API did not mint under our version
        raise CrmError(f"salesforce query page has an unusable nextRecordsUrl: {short(repr(next_url), 80)}")
    return next_url


def composite_records(http: Transport, soqls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every record of every query in ``soqls``, five sub-requests per ``POST /composite``.

    A query's next page goes to the front of the queue, so at most five server-side cursors are open
    at once. Any failed sub-request raises: a partial answer must never pass for the whole.
    """
    pending = collections.deque(f"{http.api_root}/query?{urlencode({'q': q})}" for q in soqls)
    while pending:
        batch = [pending.popleft() for _ in range(min(MAX_COMPOSITE_QUERIES, len(pending)))]
        request = {"allOrNone": False, "compositeRequest": [
            {"method": "GET", "url": url, "referenceId": f"q{i}"} for i, url in enumerate(batch)]}
        results = json_object(http.api("POST", "composite", json=request)).get("compositeResponse")
        by_reference = {r.get("referenceId"): r for r in results if isinstance(r, dict)} \
            if isinstance(results, list) else {}
        if len(by_reference) != len(batch) or set(by_reference) != {f"q{i}" for i in range(len(batch))}:
            raise CrmError("salesforce composite: answer does not match the sub-requests")
        follow_ups = []
        for i in range(len(batch)):
            result = by_reference[f"q{i}"]
            status, body = result.get("httpStatusCode"), result.get("body")
            if status != 200:
                raise http.error(status if isinstance(status, int) else 0, body, "composite query")
            page = json_page(body)
            yield from page["records"]
            if not page.get("done", True):
                follow_ups.append(next_records_url(http, page))
        pending.extendleft(reversed(follow_ups))


class Lookups:
    """Batched app-user lookups by NationBuilder id or by email, answered as ``Matches`` per key."""

    def __init__(self, http: Transport, schema: SalesforceSchema, max_ids_per_query: int) -> None:
        self.http = http
        self.schema = schema
        self.max_ids_per_query = max_ids_per_query

    # -- by NationBuilder id ---------------------------------------------------------------------------

    def by_nationbuilder_ids(self, ids: Iterable[int], *, composite: bool = False) -> dict[int, Matches]:
        wanted = nationbuilder_ids(ids)
        path = self.schema.nationbuilder_id_field
        soqls = self._soqls([self._nationbuilder_literal(i) for i in wanted], path, composite=composite)
        keys = set(wanted)
        found: MatchesBuilder[int] = MatchesBuilder()
        for record in self._records(soqls, composite=composite):
            raw = field_value(record, path)
            nb_id = None if size_problem(raw, path) else as_int(raw)
            self._collect(found, record, nb_id if nb_id in keys else None, path, raw)
        return found.build()

    def _nationbuilder_literal(self, nb_id: int) -> str:
        return soql_quote(str(nb_id)) if self.schema.nationbuilder_id_is_text else str(nb_id)

    # -- by email ----------------------------------------------------------------------------------------

    def by_emails(self, emails: Iterable[str]) -> dict[str, Matches]:
        """Emails are trimmed and lower-cased; Salesforce compares them case-insensitively. An empty or
        oversized email can match no app user a lookup would accept, so it is not sent."""
        wanted: dict[str, None] = {}
        for email in emails:
            if not isinstance(email, str):
                raise TypeError(f"emails are str, not {type(email).__name__}")
            key = normalise_email(email)
            if key and len(key) <= MAX_VALUE_CHARS:
                wanted[key] = None
        field = self.schema.email_field
        soqls = self._soqls([soql_quote(e) for e in sorted(wanted)], field)
        found: MatchesBuilder[str] = MatchesBuilder()
        for record in self._records(soqls):
            raw = record.get(field)
            key = normalise_email(raw) if isinstance(raw, str) and not size_problem(raw, field) else None
            self._collect(found, record, key if key in wanted else None, field, raw)
        return found.build()

    # -- shared ------------------------------------------------------------------------------------------

    def _collect(self, found: MatchesBuilder[Any], record: Mapping[str, Any], key: Any, field: str,
                 raw: Any) -> None:
        """File ``record`` under ``key``: its id when valid, a short detail when not."""
        if key is None:  # an answer for a key we did not ask: nothing to file it under
            log.warning("salesforce: ignoring an app user whose %s matches no key asked for (%s)", field,
                        size_problem(raw, field) or short(repr(raw), 40))
            return
        problem = record_id_problem(record.get("Id"), self.schema.app_user_key_prefix)
        if problem:
            found.reject(key, problem)
        else:
            found.add(key, record["Id"])

    def _records(self, soqls: list[str], *, composite: bool = False) -> Iterator[dict[str, Any]]:
        if len(soqls) == 1 and not composite and self._fits_url(soqls[0]):
            return iter(query_all(self.http, soqls[0]))
        return composite_records(self.http, soqls)

    def _fits_url(self, soql: str) -> bool:
        return self.http.query_request_bytes(soql) <= MAX_REQUEST_BYTES

    def _soqls(self, literals: Sequence[str], field: str, *, composite: bool = False) -> list[str]:
        """Queries of at most ``max_ids_per_query`` literals and 100,000 characters each. When every
        literal fits one GET the whole lookup is that one query (unless ``composite``)."""
        s = self.schema
        head = f"SELECT Id, {field} FROM {s.app_user_object} WHERE {field} IN ("
        if not literals:
            return []
        if not composite and len(literals) <= self.max_ids_per_query:
            whole = head + ",".join(literals) + ")"
            if len(whole) <= MAX_SOQL_CHARS and self._fits_url(whole):
                return [whole]
        return [head + ",".join(chunk) + ")" for chunk in _chunks(literals, self.max_ids_per_query,
                                                                  MAX_SOQL_CHARS - len(head) - 1)]


def _chunks(literals: Sequence[str], most: int, room: int) -> Iterator[list[str]]:
    """Greedy runs of at most ``most`` literals whose comma-joined length fits ``room``."""
    chunk: list[str] = []
    size = 0
    for literal in literals:
        if len(literal) > room:
            raise CrmError(f"salesforce: a lookup value of {len(literal):,} characters cannot fit one query")
        if chunk and (len(chunk) >= most or size + 1 + len(literal) > room):
            yield chunk
            chunk, size = [], 0
        size += len(literal) + (1 if chunk else 0)
        chunk.append(literal)
    if chunk:
        yield chunk


def single_ids(matches: Mapping[int, Matches], describe: Callable[[int], str]) -> dict[int, str]:
    """``{key: id}`` when every key has one clean id; ``CrmBadAnswer`` naming the keys that do not."""
    unclear = [key for key, m in matches.items() if m.single is None]
    if unclear:
        shown = ", ".join(describe(k) for k in unclear[:5]) + (f" and {len(unclear) - 5} more" if len(unclear) > 5
                                                              else "")
        raise CrmBadAnswer(f"salesforce: no single clean app user for {shown}: several records or refused ones "
                           "(use lookup_app_users_by_nationbuilder_ids to see them)", code="AMBIGUOUS")
    return {key: m.ids[0] for key, m in matches.items()}
