"""Salesforce REST client behind ``CrmConnectionManager``.

What Sefaria's manager got wrong and this one does instead: one OAuth2 client-credentials token per
process (refreshed once on INVALID_SESSION_ID) rather than one per web request; a timeout and bounded
retries on every call; errors raised as ``CrmError`` classes instead of swallowed into ``False``; every
SOQL literal built by ``soql_quote``; creates that a retry cannot duplicate; sustainers read whole or
not at all.
"""

from __future__ import annotations

import json
import logging
import operator
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import attrs
import requests

from .. import metrics
from .base import CrmConnectionManager
from .errors import (
    CrmAuthError,
    CrmConfigError,
    CrmError,
    CrmLimitExceeded,
    CrmNotFound,
    CrmOutcomeUnknown,
    CrmReadTimeout,
    CrmRejected,
    CrmTransientError,
)
from .http import RetryPolicy, redact, send, short

log = logging.getLogger("crm_states.crm")

#: Salesforce's limit on request line plus headers; beyond it the API answers 414 or 431.
MAX_REQUEST_BYTES = 16_384
#: Salesforce's limit on the length of one SOQL statement.
MAX_SOQL_CHARS = 100_000
#: Sub-requests per ``POST /composite``.
MAX_COMPOSITE = 25
#: Waits between email lookups while a timed-out create settles: the first, doubling up to the cap.
SETTLE_FIRST_WAIT = 0.25
SETTLE_MAX_WAIT = 4.0

_SOQL_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f",
                 "\b": "\\b"}
_SOQL_RESERVED = re.compile("[" + re.escape("".join(_SOQL_ESCAPES)) + "]")
_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_RECORD_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")


def soql_quote(value: str) -> str:
    """``value`` as a SOQL string literal, quotes included; the only way literals enter our SOQL.

    Escapes what Salesforce reserves in quoted strings: backslash, both quotes, newline, carriage
    return, tab, form feed and backspace. Nothing a caller passes can end the literal early.
    """
    if not isinstance(value, str):
        raise TypeError(f"soql_quote wants a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no request could carry it
        raise CrmRejected(f"not valid Unicode text (a lone surrogate at position {exc.start}): "
                          f"{short(ascii(value), 80)}") from None
    return "'" + _SOQL_RESERVED.sub(lambda m: _SOQL_ESCAPES[m.group()], value) + "'"


def _api_name(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:  # type: ignore[type-arg]
    """Object and field names go into URLs and SOQL unquoted, so they must be plain API names."""
    if value is not None and not _API_NAME.fullmatch(value):
        raise ValueError(f"{attribute.name} is not a Salesforce API name: {value!r}")


def _name(default: str) -> Any:
    return attrs.field(default=default, validator=_api_name)


@attrs.frozen
class SalesforceSchema:
    """Every object and field name the client uses; the defaults are Sefaria's org.

    ``nationbuilder_id_is_text`` says whether ``NationBuilder_Id__c`` is a Text field (ids are sent as
    quoted literals) or a Number field (sent bare). ``external_id_field``, when set, makes creates with
    an ``external_id`` an upsert on that field. ``sustainer_query`` must select ``Id``; its default is
    ``SELECT Id FROM Sefaria_App_User__c WHERE Sustainer__c = true``.
    """

    app_user_object: str = _name("Sefaria_App_User__c")
    first_name_field: str = _name("First_Name__c")
    last_name_field: str = _name("Last_Name__c")
    email_field: str = _name("Sefaria_App_Email__c")
    language_field: str = _name("Hebrew_English__c")
    educator_field: str = _name("Educator__c")
    review_field: str = _name("Manual_Review_Required__c")
    app_data_object: str = _name("Sefaria_App_Data__c")
    app_data_json_field: str = _name("JSON_STRING__c")
    newsletter_lists_field: str = _name("Newsletter_Names__c")
    newsletter_action: str = "Newsletter"
    nationbuilder_id_field: str = _name("NationBuilder_Id__c")
    nationbuilder_id_is_text: bool = True
    external_id_field: str | None = attrs.field(default=None, validator=_api_name)
    sustainer_query: str = "SELECT Id FROM Sefaria_App_User__c WHERE Sustainer__c = true"
    list_mapping_object: str = _name("AC_to_SF_List_Mapping__mdt")
    list_name_field: str = _name("Subscriptions__c")


@attrs.frozen
class _Token:
    access_token: str = attrs.field(repr=False)
    instance_url: str


class TokenCache:
    """Access tokens keyed by (base_url, client_id), shared by every manager in the process.

    One fetch at a time per key, and ``invalidate`` only drops the token that actually failed, so
    threads that all see the same expiry fetch one new token between them.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], fetch: Callable[[], _Token]) -> _Token:
        with self._lock:
            key_lock = self._locks.setdefault(key, threading.Lock())
        with key_lock:
            token = self._tokens.get(key)
            if token is None:
                token = self._tokens[key] = fetch()
            return token

    def peek(self, key: tuple[str, str]) -> _Token | None:
        return self._tokens.get(key)

    def invalidate(self, key: tuple[str, str], token: _Token) -> None:
        with self._lock:
            if self._tokens.get(key) is token:
                del self._tokens[key]


_PROCESS_TOKENS = TokenCache()


class _SessionExpired(CrmAuthError):
    """401 INVALID_SESSION_ID: worth one new token, not more."""


class SalesforceConnectionManager(CrmConnectionManager):
    """Sefaria's Salesforce org over REST. See the module docstring for what it guarantees.

    ``create_settle_seconds`` bounds how long a create by email (no ``external_id_field``) whose POST
    got no answer within the read timeout keeps looking the email up, waiting for Salesforce to commit
    the record it may still be making; that POST is never sent again in the same call. ``None`` (the
    default) means ``2 * policy.read_timeout + 5`` seconds. If the record does not show up in time the
    create raises ``CrmOutcomeUnknown``; a later call looks the email up before creating again.
    """

    name = "salesforce"

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        api_version: str = "60.0",
        session: requests.Session | None = None,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        verify: bool | str | None = None,
        schema: SalesforceSchema = SalesforceSchema(),
        token_cache: TokenCache | None = None,
        max_ids_per_query: int = 2000,
        create_settle_seconds: float | None = None,
    ) -> None:
        if not re.fullmatch(r"https?://[^/\s]+/?", base_url or ""):
            raise CrmConfigError("SALESFORCE_BASE_URL must be an http(s) origin such as https://x.my.salesforce.com")
        if not client_id or not client_secret:
            raise CrmConfigError("SALESFORCE_CLIENT_ID and SALESFORCE_CLIENT_SECRET are required")
        if not re.fullmatch(r"\d+\.\d", api_version):
            raise CrmConfigError(f"api_version must look like 60.0, not {api_version!r}")
        if max_ids_per_query < 1:
            raise CrmConfigError("max_ids_per_query must be at least 1")
        if create_settle_seconds is None:
            create_settle_seconds = 2 * policy.read_timeout + 5.0
        if not create_settle_seconds >= 0:  # also refuses NaN
            raise CrmConfigError("create_settle_seconds must be 0 or more")
        self._base_url = base_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._api_root = f"/services/data/v{api_version}"
        self._session = session or requests.Session()
        self._policy = policy
        self._sleep = sleep
        self._verify = self._session.verify if verify is None else verify
        self.schema = schema
        self._tokens = token_cache or _PROCESS_TOKENS
        self._key = (self._base_url, client_id)
        self.max_ids_per_query = max_ids_per_query
        self.create_settle_seconds = float(create_settle_seconds)
        self._usage: tuple[int, int] | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def api_usage(self) -> tuple[int, int] | None:
        """``(used, max)`` daily API calls from the last ``Sforce-Limit-Info`` header, if any."""
        return self._usage

    @property
    def instance_url(self) -> str:
        """Where API calls go: the token response's ``instance_url``."""
        return self._token().instance_url

    # -- CrmConnectionManager ------------------------------------------------------------------------

    def get_connection(self) -> requests.Session:
        """A new ``requests.Session`` carrying the current bearer token and this client's TLS settings.

        Its token is not refreshed: prefer the manager's methods, which are.
        """
        token = self._token()
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token.access_token}"
        session.verify = self._verify
        session.cert = self._session.cert
        session.proxies = dict(self._session.proxies)
        session.trust_env = self._session.trust_env
        return session

    def add_user_to_crm(
        self,
        email: str,
        first_name: str,
        last_name: str,
        lang: str = "en",
        educator: bool = False,
        external_id: str | int | None = None,
    ) -> str:
        s = self.schema
        fields = {
            s.first_name_field: first_name,
            s.last_name_field: last_name,
            s.email_field: email,
            s.language_field: _language(lang),
            s.educator_field: bool(educator),
        }
        if s.external_id_field and external_id is not None:
            return self._upsert_user(s.external_id_field, external_id, fields)
        return self._create_user(email, fields)

    def change_user_email(self, crm_id: str, new_email: str) -> None:
        self._patch_user(crm_id, {self.schema.email_field: new_email})

    def add_email_to_mailing_lists(
        self,
        email: str,
        mailing_lists: Iterable[str],
        first_name: str | None = None,
        last_name: str | None = None,
        lang: str = "en",
        educator: bool = False,
    ) -> None:
        """One ``Sefaria_App_Data__c`` record whose JSON the org's flow turns into subscriptions.

        A retried POST may leave a second identical record; subscribing twice is harmless.
        """
        s = self.schema
        payload = {
            "Action": s.newsletter_action,
            s.first_name_field: first_name,
            s.last_name_field: last_name,
            s.email_field: email,
            s.language_field: _language(lang),
            s.educator_field: bool(educator),
            s.newsletter_lists_field: list(mailing_lists),
        }
        self._api("POST", f"sobjects/{s.app_data_object}/", json={s.app_data_json_field: json.dumps(payload)})

    def mark_as_spam_in_crm(self, crm_id: str) -> None:
        """Salesforce has no spam action: flag the app user for manual review, as Sefaria does."""
        self.mark_for_review_in_crm(crm_id)

    def mark_for_review_in_crm(self, crm_id: str) -> None:
        self._patch_user(crm_id, {self.schema.review_field: True})

    def find_crm_id(self, email: str) -> str | None:
        s = self.schema
        soql = f"SELECT Id FROM {s.app_user_object} WHERE {s.email_field} = {soql_quote(email)} LIMIT 2"
        records = self._query_all(soql)
        if not records:
            return None
        if len(records) > 1:
            log.warning("salesforce: several %s records share one email; using %s", s.app_user_object,
                        records[0].get("Id"))
        return _record_id_of(records[0])

    def get_available_lists(self) -> list[str]:
        """Sefaria's list catalogue: ``Subscriptions__c`` of the ``AC_to_SF_List_Mapping__mdt`` metadata."""
        s = self.schema
        records = self._query_all(f"SELECT {s.list_name_field} FROM {s.list_mapping_object}")
        return sorted({str(r[s.list_name_field]) for r in records if r.get(s.list_name_field)})

    def get_sustainers(self) -> Iterator[str]:
        """Every page is read before anything is returned, so a failure part-way raises."""
        return iter([_record_id_of(r) for r in self._query_all(self.schema.sustainer_query)])

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        """One GET query while the ids fit Salesforce's request-size limit; beyond it, the queries ride
        in ``POST /composite`` (one API call for up to 25 of them) rather than as several GETs."""
        wanted = _nationbuilder_ids(ids)
        chunks = list(self._nationbuilder_chunks(wanted))
        if len(chunks) > 1:
            return self.find_app_users_by_nationbuilder_ids_composite(wanted)
        found: dict[int, str] = {}
        for chunk in chunks:
            for record in self._query_all(self._nationbuilder_soql(chunk)):
                self._collect_nationbuilder(found, record)
        return found

    def find_app_users_by_nationbuilder_ids_composite(self, ids: Iterable[int]) -> Mapping[int, str]:
        """The same lookup as ``find_app_users_by_nationbuilder_ids`` with queries in ``POST /composite``.

        Sub-request queries ride in the body, so only the SOQL length (100,000 chars) and
        ``max_ids_per_query`` bound them: 25 chunks per API call instead of one.
        """
        soqls = [self._nationbuilder_soql(c) for c in self._nationbuilder_chunks(_nationbuilder_ids(ids),
                                                                                 by_url=False)]
        found: dict[int, str] = {}
        for start in range(0, len(soqls), MAX_COMPOSITE):
            batch = soqls[start:start + MAX_COMPOSITE]
            request = {"allOrNone": False, "compositeRequest": [
                {"method": "GET", "url": f"{self._api_root}/query?{urlencode({'q': q})}", "referenceId": f"q{i}"}
                for i, q in enumerate(batch)]}
            response = _json_object(self._api("POST", "composite", json=request))
            results = response.get("compositeResponse")
            if (not isinstance(results, list) or len(results) != len(batch)
                    or not all(isinstance(r, dict) and isinstance(r.get("httpStatusCode"), int) for r in results)):
                raise CrmError("salesforce composite: answer does not match the sub-requests")
            for result in results:
                status, body = result["httpStatusCode"], result.get("body")
                if status != 200:
                    raise self._error(status, body, "composite query")
                for record in self._follow_pages(_json_page(body)):
                    self._collect_nationbuilder(found, record)
        return found

    # -- app users ---------------------------------------------------------------------------------

    def _upsert_user(self, field: str, external_id: str | int, fields: Mapping[str, Any]) -> str:
        """Upsert by external id: a retry just updates the record the first try made."""
        value = str(external_id)
        if isinstance(external_id, bool) or not value:
            raise CrmRejected(f"invalid external id for {field}")
        path = f"sobjects/{self.schema.app_user_object}/{field}/{quote(value, safe='')}"
        response = self._api("PATCH", path, json=fields)
        body = _json_object(response) if response.content else {}
        if isinstance(body.get("id"), str):
            return body["id"]
        return _record_id_of(_json_object(self._api("GET", path, params={"fields": "Id"})))

    def _create_user(self, email: str, fields: Mapping[str, Any]) -> str:
        """Create unless the email already has an app user, re-checking before every retry.

        The POST itself is never resent blindly: after a dropped connection, a 5xx or a malformed
        answer the record may exist, and only the email lookup can tell. After a read timeout the
        lookup cannot tell yet (Salesforce may still be processing the request and commit it later),
        so that POST is never resent: ``_settle_create`` waits for the record instead.
        """
        path = f"sobjects/{self.schema.app_user_object}/"
        once = attrs.evolve(self._policy, attempts=1)
        last: CrmError | None = None
        for attempt in range(self._policy.attempts):
            if attempt:
                self._sleep(self._policy.delay(attempt - 1))
            existing = self.find_crm_id(email)
            if existing is not None:
                return existing
            try:
                response = self._api("POST", path, json=fields, policy=once)
            except CrmReadTimeout as exc:
                if exc.method == "POST" and urlsplit(exc.url or "").path.endswith(f"/{path}"):
                    return self._settle_create(email, exc)
                last = exc  # the token request timed out, not the create: nothing was created
                continue
            except CrmError as exc:
                if not isinstance(exc, CrmTransientError) and exc.code != "MALFORMED_JSON":
                    raise
                log.info("salesforce create failed (%s); checking by email before retrying", exc)
                last = exc
                continue
            return _record_id_of(_json_object(response), key="id")
        assert last is not None
        raise last

    def _settle_create(self, email: str, timeout: CrmReadTimeout) -> str:
        """After a create POST timed out: look the email up, with backoff, for ``create_settle_seconds``.

        The id as soon as the record shows up; ``CrmOutcomeUnknown`` if it does not (the POST is not
        re-sent). A lookup failing for good (auth, say) ends the wait with ``CrmOutcomeUnknown`` too;
        the daily API limit is raised as itself. Time counts on the wall clock or as the sum of the
        waits asked of ``sleep``, whichever is more, so an injected no-op ``sleep`` bounds the number
        of lookups instead of spinning.
        """
        window = self.create_settle_seconds
        log.warning("salesforce create timed out (%s); not re-sending it, looking the email up for up to "
                    "%.1fs while Salesforce may still be making the record", timeout, window)
        started, slept, wait, lookups = time.monotonic(), 0.0, SETTLE_FIRST_WAIT, 0
        trouble = ""
        while True:
            lookups += 1
            try:
                found = self.find_crm_id(email)
            except CrmLimitExceeded:
                raise
            except CrmError as exc:
                if not isinstance(exc, CrmTransientError) and exc.code != "MALFORMED_JSON":
                    trouble = f"; the lookup failed: {exc}"
                    break
                log.info("salesforce: lookup while a create settles failed (%s); trying again", exc)
                trouble, found = f"; the last lookup failed: {exc}", None
            else:
                trouble = ""
            if found is not None:
                log.info("salesforce: the timed-out create committed late; app user %s found by email", found)
                return found
            remaining = window - max(time.monotonic() - started, slept)
            if remaining <= 0:
                break
            pause = min(wait, remaining)
            self._sleep(pause)
            slept += pause
            wait = min(wait * 2, SETTLE_MAX_WAIT)
        raise CrmOutcomeUnknown(
            f"salesforce create (POST sobjects/{self.schema.app_user_object}/): outcome unknown: no answer "
            f"within the {self._policy.read_timeout:g}s read timeout, not re-sent; no app user with this email "
            f"showed up in the {window:g}s settle window ({lookups} lookups); resuming looks the email up "
            f"before creating{short(trouble, 160) if trouble else ''}") from timeout

    def _patch_user(self, crm_id: str, fields: Mapping[str, Any]) -> None:
        if not isinstance(crm_id, str) or not _RECORD_ID.fullmatch(crm_id):
            raise CrmRejected(f"not a Salesforce record id: {short(repr(crm_id), 40)}")
        self._api("PATCH", f"sobjects/{self.schema.app_user_object}/{crm_id}", json=fields)

    # -- NationBuilder id lookups --------------------------------------------------------------------

    def _nationbuilder_literal(self, nb_id: int) -> str:
        return soql_quote(str(nb_id)) if self.schema.nationbuilder_id_is_text else str(nb_id)

    def _nationbuilder_soql(self, nb_ids: Sequence[int]) -> str:
        s = self.schema
        literals = ",".join(self._nationbuilder_literal(i) for i in nb_ids)
        return (f"SELECT Id, {s.nationbuilder_id_field} FROM {s.app_user_object} "
                f"WHERE {s.nationbuilder_id_field} IN ({literals})")

    def _nationbuilder_chunks(self, nb_ids: Sequence[int], *, by_url: bool = True) -> Iterator[list[int]]:
        """Greedy chunks whose query fits: encoded request size (for GET), SOQL length, id count.

        Percent-encoding is per character, so a chunk's encoded size is the empty query's plus each
        literal's and separator's: exact, without re-encoding the whole query per id.
        """
        empty = self._nationbuilder_soql([])
        base_bytes = self._query_request_bytes(empty) if by_url else 0
        chunk: list[int] = []
        chars, size = len(empty), base_bytes
        for nb_id in nb_ids:
            literal = self._nationbuilder_literal(nb_id)
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

    def _query_request_bytes(self, soql: str) -> int:
        """Request line plus headers of ``GET query?q=soql`` as this client sends it."""
        token = self._token()
        origin = urlsplit(token.instance_url)
        target = f"{origin.path}{self._api_root}/query?{urlencode({'q': soql})}"
        headers = {**self._session.headers, "Host": origin.netloc, **self._headers(token)}
        return len(f"GET {target} HTTP/1.1\r\n") + sum(len(k) + len(str(v)) + 4 for k, v in headers.items()) + 2

    def _collect_nationbuilder(self, found: dict[int, str], record: Mapping[str, Any]) -> None:
        """Salesforce may hold the id as a number (``123.0``) or text (``"123"``): both become ``123``."""
        raw = record.get(self.schema.nationbuilder_id_field)
        nb_id = _as_int(raw)
        if nb_id is None:
            log.warning("salesforce: ignoring app user %s with unusable NationBuilder id %s",
                        record.get("Id"), short(repr(raw), 40))
            return
        found[nb_id] = _record_id_of(record)

    # -- transport -----------------------------------------------------------------------------------

    def _token(self) -> _Token:
        return self._tokens.get(self._key, self._fetch_token)

    def _fetch_token(self) -> _Token:
        log.info("salesforce: fetching an access token for client %s", self._client_id)
        response = self._finish(lambda: send(
            self._session, "POST", f"{self._base_url}/services/oauth2/token",
            classify=self._classify_token, policy=self._policy, sleep=self._sleep, verify=self._verify,
            data={"grant_type": "client_credentials"}, auth=(self._client_id, self._client_secret)))
        body = response.json()
        return _Token(body["access_token"], body["instance_url"].rstrip("/"))

    def _api(self, method: str, path: str, *, policy: RetryPolicy | None = None, **kwargs: Any) -> requests.Response:
        """One REST call: ``path`` is under ``/services/data/vNN.N/`` or absolute (``nextRecordsUrl``).

        A 401 INVALID_SESSION_ID costs one new token and one more try; a second one is ``CrmAuthError``.
        """
        token = self._token()
        try:
            return self._send(method, path, token, policy or self._policy, kwargs)
        except _SessionExpired:
            self._tokens.invalidate(self._key, token)
            log.info("salesforce: session expired; fetching a new token")
        token = self._token()
        try:
            return self._send(method, path, token, policy or self._policy, kwargs)
        except _SessionExpired as exc:
            self._tokens.invalidate(self._key, token)
            raise CrmAuthError(f"salesforce refused a freshly issued token: {exc}", status=401,
                               code=exc.code) from None

    def _send(self, method: str, path: str, token: _Token, policy: RetryPolicy,
              kwargs: Mapping[str, Any]) -> requests.Response:
        url = token.instance_url + (path if path.startswith("/") else f"{self._api_root}/{path}")
        return self._finish(lambda: send(
            self._session, method, url, classify=self._classify, policy=policy, sleep=self._sleep,
            verify=self._verify, headers=self._headers(token), **kwargs))

    @staticmethod
    def _headers(token: _Token) -> dict[str, str]:
        return {"Authorization": f"Bearer {token.access_token}", "Accept": "application/json"}

    @staticmethod
    def _finish(call: Callable[[], requests.Response]) -> requests.Response:
        """Malformed JSON is retried as transient; once retries run out it is a plain ``CrmError``."""
        try:
            return call()
        except CrmTransientError as exc:
            if exc.code != "MALFORMED_JSON":
                raise
            raise CrmError(str(exc), status=exc.status, code=exc.code) from None

    def _query_all(self, soql: str) -> list[dict[str, Any]]:
        """Every record of a query, following ``nextRecordsUrl``; any failed page raises."""
        return list(self._follow_pages(_json_page(_json_object(self._api("GET", "query", params={"q": soql})))))

    def _follow_pages(self, page: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        while True:
            yield from page["records"]
            if page.get("done", True):
                return
            next_url = page.get("nextRecordsUrl")
            if not isinstance(next_url, str) or not next_url.startswith(self._api_root + "/"):
                # never send our bearer token to a URL the API did not mint under our version
                raise CrmError(f"salesforce query page has an unusable nextRecordsUrl: {short(repr(next_url), 80)}")
            page = _json_page(_json_object(self._api("GET", next_url)))

    # -- classification --------------------------------------------------------------------------------

    def _note_usage(self, response: requests.Response) -> None:
        m = _USAGE.search(response.headers.get("Sforce-Limit-Info", ""))
        if m:
            self._usage = (int(m.group(1)), int(m.group(2)))
            metrics.salesforce_api_usage(*self._usage)
        log.debug("salesforce %s %s -> %s (api usage %s)", response.request.method,
                  urlsplit(response.request.url or "").path, response.status_code, self._usage)

    def _classify(self, response: requests.Response) -> CrmError | None:
        self._note_usage(response)
        where = f"{response.request.method} {urlsplit(response.request.url or '').path}"
        status = response.status_code
        if 200 <= status < 300:
            if response.content and status != 204:
                try:
                    response.json()
                except ValueError:
                    return CrmTransientError(f"salesforce {where}: malformed JSON in a {status} answer",
                                             status=status, code="MALFORMED_JSON")
            return None
        return self._error(status, _payload(response), where, retry_after=response.headers.get("Retry-After"))

    def _classify_token(self, response: requests.Response) -> CrmError | None:
        self._note_usage(response)
        status = response.status_code
        if 200 <= status < 300:
            try:
                body = response.json()
            except ValueError:
                return CrmTransientError(f"salesforce token: malformed JSON in a {status} answer", status=status,
                                         code="MALFORMED_JSON")
            if not (isinstance(body, dict) and isinstance(body.get("access_token"), str)
                    and re.match(r"https?://", str(body.get("instance_url")))):
                return CrmAuthError("salesforce token: answer lacks access_token or instance_url", status=status)
            return None
        if status >= 500 or status == 429:
            return self._error(status, _payload(response), "token", retry_after=response.headers.get("Retry-After"))
        payload = _payload(response)
        code = payload.get("error") if isinstance(payload, dict) else None
        detail = payload.get("error_description") if isinstance(payload, dict) else payload
        # Redact before shortening: a secret cut in half by the limit would no longer be recognised.
        message = f"salesforce refused the client credentials: HTTP {status} {code or ''}: " \
                  f"{short(self._redact(str(detail)), 200)}"
        return CrmAuthError(message, status=status, code=code)

    def _error(self, status: int, payload: Any, where: str, *, retry_after: str | None = None) -> CrmError:
        """The ``CrmError`` for a failed answer (also used for composite sub-responses)."""
        codes, message = _codes(payload)
        code = codes[0] if codes else None
        text = self._redact(f"salesforce {where}: HTTP {status}{' ' + code if code else ''}"
                            f"{': ' + short(self._redact(message), 200) if message else ''}")
        if status == 401:
            cls = _SessionExpired if code == "INVALID_SESSION_ID" else CrmAuthError
            return cls(text, status=status, code=code)
        if status == 403 and "REQUEST_LIMIT_EXCEEDED" in codes:
            return CrmLimitExceeded(text, status=status, code=code)
        if status == 404:
            return CrmNotFound(text, status=status, code=code)
        if status >= 500 or status == 429 or "UNABLE_TO_LOCK_ROW" in codes:
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            return CrmTransientError(text, status=status, code=code, retry_after=wait)
        if 300 <= status < 500:
            return CrmRejected(text, status=status, code=code or ("MULTIPLE_CHOICES" if status == 300 else None))
        return CrmError(text, status=status, code=code)

    def _redact(self, text: str) -> str:
        token = self._tokens.peek(self._key)
        return redact(text, self._client_secret, token.access_token if token else None)


# -- helpers -----------------------------------------------------------------------------------------

def _language(lang: str) -> str:
    return "Hebrew" if lang == "he" else "English"


def _nationbuilder_ids(ids: Iterable[int]) -> list[int]:
    """Sorted distinct ids; anything but an int is a caller bug, refused before any SOQL is built."""
    out = set()
    for i in ids:
        if isinstance(i, bool):
            raise TypeError("NationBuilder ids are ints, not bools")
        out.add(operator.index(i))
    return sorted(out)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"-?\d+\.0*", text):
            return int(text.split(".")[0])
    return None


def _payload(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _codes(payload: Any) -> tuple[list[str], str]:
    """Error codes and the first message of a Salesforce error body (list of errors, or OAuth dict)."""
    if isinstance(payload, list):
        errors = [e for e in payload if isinstance(e, dict)]
        codes = [str(e["errorCode"]) for e in errors if e.get("errorCode")]
        return codes, str(errors[0].get("message", "")) if errors else short(json.dumps(payload), 200)
    if isinstance(payload, dict):
        code = payload.get("errorCode") or payload.get("error")
        return ([str(code)] if code else []), str(payload.get("message") or payload.get("error_description") or "")
    return [], short(str(payload or ""), 200)


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise CrmError("salesforce: expected a JSON object, got no JSON", status=response.status_code) from None
    if not isinstance(body, dict):
        raise CrmError(f"salesforce: expected a JSON object, got {type(body).__name__}", status=response.status_code)
    return body


def _json_page(body: Any) -> Mapping[str, Any]:
    records = body.get("records") if isinstance(body, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CrmError("salesforce: query answer has no list of records")
    return body


def _record_id_of(record: Any, key: str = "Id") -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise CrmError(f"salesforce: record without an {key}")
    return value
