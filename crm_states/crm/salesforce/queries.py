"""SOQL queries: every page of a query, and the batched NationBuilder-id lookup (GET or composite)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus, urlencode

from ..errors import CrmError
from ..http import short
from .answers import as_int, json_object, json_page, nationbuilder_ids, record_id_of
from .schema import MAX_COMPOSITE, MAX_REQUEST_BYTES, MAX_SOQL_CHARS, SalesforceSchema, soql_quote
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


class NationbuilderLookup:
    """App users by NationBuilder id: one GET while the ids fit one URL, else queries in composites."""

    def __init__(self, http: Transport, schema: SalesforceSchema, max_ids_per_query: int) -> None:
        self.http = http
        self.schema = schema
        self.max_ids_per_query = max_ids_per_query

    def find(self, ids: Iterable[int]) -> Mapping[int, str]:
        wanted = nationbuilder_ids(ids)
        chunks = list(self.chunks(wanted))
        if len(chunks) > 1:
            return self.find_composite(wanted)
        found: dict[int, str] = {}
        for chunk in chunks:
            for record in query_all(self.http, self.soql(chunk)):
                self.collect(found, record)
        return found

    def find_composite(self, ids: Iterable[int]) -> Mapping[int, str]:
        soqls = [self.soql(c) for c in self.chunks(nationbuilder_ids(ids), by_url=False)]
        found: dict[int, str] = {}
        root = self.http.api_root
        for start in range(0, len(soqls), MAX_COMPOSITE):
            batch = soqls[start:start + MAX_COMPOSITE]
            request = {"allOrNone": False, "compositeRequest": [
                {"method": "GET", "url": f"{root}/query?{urlencode({'q': q})}", "referenceId": f"q{i}"}
                for i, q in enumerate(batch)]}
            response = json_object(self.http.api("POST", "composite", json=request))
            results = response.get("compositeResponse")
            if (not isinstance(results, list) or len(results) != len(batch)
                    or not all(isinstance(r, dict) and isinstance(r.get("httpStatusCode"), int) for r in results)):
                raise CrmError("salesforce composite: answer does not match the sub-requests")
            for result in results:
                status, body = result["httpStatusCode"], result.get("body")
                if status != 200:
                    raise self.http.error(status, body, "composite query")
                for record in follow_pages(self.http, json_page(body)):
                    self.collect(found, record)
        return found

    def literal(self, nb_id: int) -> str:
        return soql_quote(str(nb_id)) if self.schema.nationbuilder_id_is_text else str(nb_id)

    def soql(self, nb_ids: Sequence[int]) -> str:
        s = self.schema
        literals = ",".join(self.literal(i) for i in nb_ids)
        return (f"SELECT Id, {s.nationbuilder_id_field} FROM {s.app_user_object} "
                f"WHERE {s.nationbuilder_id_field} IN ({literals})")

    def chunks(self, nb_ids: Sequence[int], *, by_url: bool = True) -> Iterator[list[int]]:
        """Greedy chunks whose query fits: encoded request size (for GET), SOQL length, id count.

        Percent-encoding is per character, so a chunk's encoded size is the empty query's plus each
        literal's and separator's: exact, without re-encoding the whole query per id.
        """
        empty = self.soql([])
        base_bytes = self.http.query_request_bytes(empty) if by_url else 0
        chunk: list[int] = []
        chars, size = len(empty), base_bytes
        for nb_id in nb_ids:
            literal = self.literal(nb_id)
            literal_bytes = len(quote_plus(literal)) if by_url else 0
            comma_bytes = 3 if by_url else 0  # "," encodes as %2C
            if chunk and (len(chunk) >= self.max_ids_per_query or chars + 1 + len(literal) > MAX_SOQL_CHARS
                          or size + comma_bytes + literal_bytes > MAX_REQUEST_BYTES):
                yield chunk
                chunk, chars, size = [], len(empty), base_bytes
            if chunk:
                chars, size = chars + 1, size + comma_bytes
            chunk.append(nb_id)
            chars, size = chars + len(literal), size + literal_bytes
        if chunk:
            yield chunk

    def collect(self, found: dict[int, str], record: Mapping[str, Any]) -> None:
        raw = record.get(self.schema.nationbuilder_id_field)
        nb_id = as_int(raw)
        if nb_id is None:
            log.warning("salesforce: ignoring app user %s with unusable NationBuilder id %s",
                        record.get("Id"), short(repr(raw), 40))
            return
        found[nb_id] = record_id_of(record)
