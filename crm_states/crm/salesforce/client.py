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
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import requests

from ..base import CrmConnectionManager
from ..checks import check_record_id
from ..errors import CrmBatchOutcomeUnknown, CrmConfigError, CrmRejected
from ..http import RetryPolicy, short
from ..results import Matches, NewAppUser, RecordResult
from . import creates, sobjects
from .answers import record_id_of
from .bulk import DEFAULT_PAGE_RECORDS, BulkJob, BulkPage, BulkQueries, app_users_soql
from .queries import Lookups, query_all, single_ids
from .schema import MAX_COLLECTION, SalesforceSchema, language, soql_quote
from .transport import TokenCache, Transport

log = logging.getLogger("crm_states.crm")

_RECORD_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


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
        self._http = Transport(base_url, client_id, client_secret, api_version=api_version,
                               session=session or requests.Session(), policy=policy, sleep=sleep, verify=verify,
                               token_cache=token_cache)
        self.schema = schema
        self.max_ids_per_query = max_ids_per_query
        self.create_settle_seconds = float(create_settle_seconds)

    # -- state -------------------------------------------------------------------------------------

    @property
    def api_usage(self) -> tuple[int, int] | None:
        """``(used, max)`` daily API calls from the last ``Sforce-Limit-Info`` header, if any."""
        return self._http.usage

    @property
    def api_requests(self) -> int:
        """Every request this client sent under ``/services/data`` (each try of a retried one, and one
        per composite however many sub-requests it carries); the OAuth token request is not one."""
        return self._http.sent.value

    @property
    def instance_url(self) -> str:
        """Where API calls go: the token response's ``instance_url``."""
        return self._http.token().instance_url

    # -- CrmConnectionManager ------------------------------------------------------------------------

    def get_connection(self) -> requests.Session:
        """A new ``requests.Session`` carrying the current bearer token and this client's TLS settings.

        Its token is not refreshed: prefer the manager's methods, which are.
        """
        token = self._http.token()
        own = self._http.session
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token.access_token}"
        session.verify = self._http.verify
        session.cert = own.cert
        session.proxies = dict(own.proxies)
        session.trust_env = own.trust_env
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
            s.language_field: language(lang),
            s.educator_field: bool(educator),
        }
        if s.external_id_field and external_id is not None:
            made = creates.upsert_user(self._http, s.app_user_object, s.external_id_field, external_id, fields)
        else:
            made = creates.create_user(self._http, s.app_user_object, email, fields, find=self.find_crm_id,
                                       settle_seconds=self.create_settle_seconds)
        return self._app_user_id(made)

    def change_user_email(self, crm_id: str, new_email: str) -> bool:
        self._patch_user(crm_id, {self.schema.email_field: new_email})
        return True

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
            s.language_field: language(lang),
            s.educator_field: bool(educator),
            s.newsletter_lists_field: list(mailing_lists),
        }
        self._http.api("POST", f"sobjects/{s.app_data_object}/", json={s.app_data_json_field: json.dumps(payload)})

    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        """Salesforce has no spam action: flag the app user for manual review, as Sefaria does."""
        return self.mark_for_review_in_crm(crm_id)

    def mark_for_review_in_crm(self, crm_id: str) -> bool:
        self._patch_user(crm_id, {self.schema.review_field: True})
        return True

    def find_crm_id(self, email: str | None = None) -> str | None:
        email = self.needs_email(email)
        s = self.schema
        soql = f"SELECT Id FROM {s.app_user_object} WHERE {s.email_field} = {soql_quote(email)} LIMIT 2"
        records = query_all(self._http, soql)
        if not records:
            return None
        if len(records) > 1:
            log.warning("salesforce: several %s records share one email; using the first", s.app_user_object)
        return self._app_user_id(record_id_of(records[0]))

    def get_available_lists(self) -> list[str]:
        """Sefaria's list catalogue: ``Subscriptions__c`` of the ``AC_to_SF_List_Mapping__mdt`` metadata."""
        s = self.schema
        records = query_all(self._http, f"SELECT {s.list_name_field} FROM {s.list_mapping_object}")
        return sorted({str(r[s.list_name_field]) for r in records if r.get(s.list_name_field)})

    def get_sustainers(self) -> Iterator[str]:
        """Every page is read (and every id checked) before anything is returned, so a failure
        part-way raises."""
        return iter([self._app_user_id(record_id_of(r)) for r in query_all(self._http, self.schema.sustainer_query)])

    def lookup_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> dict[int, Matches]:
        """Every app user holding each NationBuilder id (``schema.nationbuilder_id_field``, on the app
        user or through its Contact), packed as the ``queries`` module says: one GET while the ids fit
        one URL, else composites of five queries of up to ``max_ids_per_query`` ids."""
        return self._lookups().by_nationbuilder_ids(ids)

    def lookup_app_users_by_emails(self, emails: Iterable[str]) -> dict[str, Matches]:
        return self._lookups().by_emails(emails)

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        """``{nationbuilder_id: app_user_id}`` through ``lookup_app_users_by_nationbuilder_ids``. An id
        held by several app users, or by one whose answer was refused, raises ``CrmBadAnswer``: it
        never comes out as a single clean id."""
        return single_ids(self.lookup_app_users_by_nationbuilder_ids(ids), lambda k: f"NationBuilder id {k}")

    def find_app_users_by_nationbuilder_ids_composite(self, ids: Iterable[int]) -> Mapping[int, str]:
        """The same lookup, in ``POST /composite`` calls even when one GET would do."""
        return single_ids(self._lookups().by_nationbuilder_ids(ids, composite=True),
                          lambda k: f"NationBuilder id {k}")

    # -- sObject Collections (see sobjects.py) ---------------------------------------------------------

    def create_app_users(self, users: Sequence[NewAppUser], *, batch_size: int = MAX_COLLECTION) -> list[RecordResult]:
        """Create (or, with ``schema.external_id_field``, upsert) app users, ``batch_size`` (at most 200)
        per API request; one result per user, in input order. A lost create answer raises
        ``CrmBatchOutcomeUnknown`` (its ``completed`` holds the earlier requests' results); to keep each
        request's results as it comes, use ``iter_create_app_users``."""
        done: list[RecordResult] = []
        try:
            for batch in self.iter_create_app_users(users, batch_size=batch_size):
                done.extend(batch)
        except CrmBatchOutcomeUnknown as exc:
            exc.completed = tuple(done)
            raise
        return done

    def iter_create_app_users(self, users: Sequence[NewAppUser], *,
                              batch_size: int = MAX_COLLECTION) -> Iterator[list[RecordResult]]:
        """The same, one request's results at a time (the next request goes out when asked for)."""
        return sobjects.create_batches(self._http, self.schema, list(users), batch_size=batch_size)

    # -- Bulk API 2.0 query jobs (see bulk.py) ---------------------------------------------------------

    def start_bulk_query(self, soql: str | None = None, *, all_rows: bool = False) -> BulkJob:
        """Start a query job; by default over every app user with a NationBuilder id (``Id``, the
        NationBuilder id path, the app email). ``all_rows`` is ``queryAll`` (deleted records too)."""
        return BulkQueries(self._http).start(app_users_soql(self.schema) if soql is None else soql,
                                             all_rows=all_rows)

    def bulk_query_job(self, job_id: str) -> BulkJob:
        """The job as Salesforce describes it now (one poll); an expired job is ``CrmNotFound``."""
        return BulkQueries(self._http).status(job_id)

    def wait_for_bulk_query(self, job_id: str, *, timeout: float = 3600.0) -> BulkJob:
        """Poll with back-off until ``JobComplete``; ``CrmJobFailed`` when it failed or was aborted."""
        return BulkQueries(self._http).wait(job_id, timeout=timeout)

    def bulk_query_pages(self, job_id: str, *, locator: str | None = None, max_records: int = DEFAULT_PAGE_RECORDS,
                         app_users: bool = True) -> Iterator[BulkPage]:
        """A finished job's result pages from ``locator`` on, one request (and one page in memory) at a
        time. ``app_users`` checks each row's ``Id`` against the app user key prefix too."""
        prefix = self.schema.app_user_key_prefix if app_users else None
        return BulkQueries(self._http).pages(job_id, locator=locator, max_records=max_records, key_prefix=prefix)

    def abort_bulk_query(self, job_id: str) -> BulkJob:
        return BulkQueries(self._http).abort(job_id)

    def delete_bulk_query(self, job_id: str) -> None:
        BulkQueries(self._http).delete(job_id)

    # -- helpers -----------------------------------------------------------------------------------

    def _lookups(self) -> Lookups:
        return Lookups(self._http, self.schema, self.max_ids_per_query)

    def _app_user_id(self, value: object) -> str:
        """An app user id from an answer, checked (format, checksum, the schema's key prefix)."""
        return check_record_id(value, self.schema.app_user_key_prefix)

    def _patch_user(self, crm_id: str, fields: Mapping[str, Any]) -> None:
        if not isinstance(crm_id, str) or not _RECORD_ID.fullmatch(crm_id):
            raise CrmRejected(f"not a Salesforce record id: {short(repr(crm_id), 40)}")
        self._http.api("PATCH", f"sobjects/{self.schema.app_user_object}/{crm_id}", json=fields)
