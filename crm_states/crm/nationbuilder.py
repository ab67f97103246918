"""NationBuilder API v1 client: the CRM Sefaria leaves, still needed to read ids and sustainers.

The token travels only in the ``Authorization: Bearer`` header, never in a URL, so no log line or
error message can carry it (messages are redacted all the same). Every call goes through ``send``:
timeouts, bounded retries of 5xx/timeouts/drops/malformed JSON, and a 429's ``Retry-After`` as the wait.
Every call made here is idempotent (push is keyed by email), so retrying any of them is safe.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, urljoin

import attrs
import requests

from .base import CrmConnectionManager
from .checks import size_problem
from .errors import (
    CrmAuthError,
    CrmBadAnswer,
    CrmConfigError,
    CrmError,
    CrmNotFound,
    CrmRejected,
    CrmTransientError,
)
from .http import RequestCounter, RetryPolicy, redact, redact_url, send, short

log = logging.getLogger("crm_states.crm.nationbuilder")

_SLUG = re.compile(r"[a-z0-9][a-z0-9-]*", re.IGNORECASE)
_PAGE_LIMIT = 100


@attrs.frozen
class NationbuilderTags:
    """Sefaria's tag names (sefaria/helper/crm/nationbuilder.py); a nation may rename them."""

    general: str = "Announcements_General"
    general_hebrew: str = "Announcements_General_Hebrew"
    educator: str = "Announcements_Edu"
    educator_hebrew: str = "Announcements_Edu_Hebrew"
    signed_up: str = "Signed_Up_on_Sefaria"
    newsletter: str = "Newsletter_Sign_Up"
    review: str = "Manual_Review_Required"
    sustainer: str = "sustainer_current_engineering"

    def signup(self, lang: str, educator: bool) -> list[str]:
        """The tags of a new app user: announcements by language (and for educators), signed up."""
        hebrew = lang == "he"
        tags = [self.general_hebrew if hebrew else self.general]
        if educator:
            tags.append(self.educator_hebrew if hebrew else self.educator)
        tags.append(self.signed_up)
        return tags


@attrs.frozen
class RateLimit:
    """The rate-limit headers of the last response (``X-RateLimit-*``, or the older ``Nation-Ratelimit-*``)."""

    limit: int | None
    remaining: int | None
    reset: int | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        def read(name: str) -> int | None:
            for prefix in ("X-RateLimit-", "Nation-Ratelimit-"):
                value = headers.get(prefix + name)
                if value is not None and value.strip().isdigit():
                    return int(value)
            return None

        found = cls(read("Limit"), read("Remaining"), read("Reset"))
        return None if found == cls(None, None, None) else found


class NationbuilderConnectionManager(CrmConnectionManager):
    """NationBuilder people, tags and taggings. The app user id is the person id, as a string.

    ``session`` (a new one by default) gets the Bearer and JSON headers; tests pass one aimed at the fake.
    """

    name = "nationbuilder"

    def __init__(
        self,
        slug: str | None = None,
        token: str | None = None,
        *,
        base_url: str | None = None,
        session: requests.Session | None = None,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        tags: NationbuilderTags = NationbuilderTags(),
    ) -> None:
        if not token:
            raise CrmConfigError("NationBuilder needs an API token")
        if base_url is None:
            if not slug or not _SLUG.fullmatch(slug):
                raise CrmConfigError("NationBuilder needs a nation slug (letters, digits, hyphens) or a base_url")
            base_url = f"https://{slug}.nationbuilder.com/api/v1"
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.tags = tags
        #: The rate-limit headers last seen, or None before any response carried them.
        self.rate_limit: RateLimit | None = None
        self._token = token
        self._sleep = sleep
        self._sent = RequestCounter()
        self._session = session if session is not None else requests.Session()
        self._session.headers.update({
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        })

    def __repr__(self) -> str:
        return f"NationbuilderConnectionManager(base_url={self.base_url!r})"

    def get_connection(self) -> requests.Session:
        return self._session

    def add_user_to_crm(
        self,
        email: str,
        first_name: str,
        last_name: str,
        lang: str = "en",
        educator: bool = False,
        external_id: str | int | None = None,
    ) -> str:
        """Push the person with Sefaria's signup tags; push matches by email, so a retry updates."""
        person: dict[str, Any] = {
            "email": email, "first_name": first_name, "last_name": last_name,
            "tags": self.tags.signup(lang, educator),
        }
        if external_id is not None:
            person["external_id"] = str(external_id)
        return self._push(person)

    @property
    def api_requests(self) -> int:
        """Every request sent to the nation, each retry included (NationBuilder rate-limits them all)."""
        return self._sent.value

    def change_user_email(self, crm_id: str, new_email: str) -> bool:
        self._call("PUT", self._person_url(crm_id), json={"person": {"email": new_email}})
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
        """Push the email (names when given), then tag it ``Newsletter_Sign_Up`` and each list.

        In NationBuilder a mailing list is a tag, so ``lang``/``educator`` are carried by the list names.
        """
        person: dict[str, Any] = {"email": email}
        if first_name:
            person["first_name"] = first_name
        if last_name:
            person["last_name"] = last_name
        person_id = self._push(person)
        tags = list(dict.fromkeys([self.tags.newsletter, *mailing_lists]))
        self._tag(person_id, tags)

    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        """Delete the person (the design document). Already gone counts as done: a DELETE whose
        answer was lost and was retried gets a 404 for a deletion that happened."""
        try:
            self._call("DELETE", self._person_url(crm_id))
        except CrmNotFound:
            log.info("nationbuilder person %s already deleted", crm_id)
        return True

    def mark_for_review_in_crm(self, crm_id: str) -> bool:
        self._tag(crm_id, [self.tags.review])
        return True

    def find_crm_id(self, email: str | None = None) -> str | None:
        email = self.needs_email(email)
        try:
            response = self._call("GET", f"{self.base_url}/people/match", params={"email": email})
        except CrmNotFound:
            return None
        return _person_id(response)

    def get_sustainers(self) -> Iterator[str]:
        """Every person tagged with the sustainer tag, all pages read before anything is returned.

        Follows each page's ``next`` verbatim (NationBuilder signs it); any failed page raises.
        """
        url: str | None = f"{self.base_url}/tags/{quote(self.tags.sustainer, safe='')}/people"
        params: dict[str, Any] | None = {"limit": _PAGE_LIMIT}
        seen: set[str] = set()
        ids: dict[str, None] = {}
        while url:
            page = _json(self._call("GET", url, params=params))
            results = page.get("results")
            if not isinstance(results, list):
                raise CrmError(f"nationbuilder tag page without results: {redact_url(url)}")
            for person in results:
                ids[_id_of(person)] = None
            nxt = page.get("next")
            url, params = (urljoin(self.base_url + "/", nxt), None) if nxt else (None, None)
            if url is not None:
                if url in seen:
                    raise CrmError(f"nationbuilder pagination loops back to {redact_url(url)}")
                seen.add(url)
        return iter(list(ids))

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        """One ``GET /people/:id`` per id (v1 has no batch read); a 404 means absent.

        Booleans are skipped as absent: Sefaria's dummy stored ``nationbuilder_id = True``, and
        ``True`` would otherwise be looked up as person 1.
        """
        found: dict[int, str] = {}
        for nb_id in dict.fromkeys(ids):
            if isinstance(nb_id, bool):
                continue
            try:
                response = self._call("GET", self._person_url(nb_id))
            except CrmNotFound:
                continue
            found[nb_id] = _person_id(response)
        return found

    def _push(self, person: dict[str, Any]) -> str:
        return _person_id(self._call("PUT", f"{self.base_url}/people/push", json={"person": person}))

    def _tag(self, person_id: str, tags: list[str]) -> None:
        self._call("PUT", f"{self._person_url(person_id)}/taggings", json={"tagging": {"tag": tags}})

    def _person_url(self, person_id: str | int) -> str:
        if not str(person_id).isdigit():
            raise CrmRejected(f"not a NationBuilder person id: {short(repr(person_id), 60)}")
        return f"{self.base_url}/people/{person_id}"

    def _call(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        return send(self._session, method, url, classify=self._classify, policy=self.policy,
                    sleep=self._sleep, on_send=self._sent, **kwargs)

    def _classify(self, response: requests.Response) -> CrmError | None:
        """What a response means, noting its rate-limit headers on the way."""
        self.rate_limit = RateLimit.from_headers(response.headers) or self.rate_limit
        status = response.status_code
        method = response.request.method if response.request is not None else "?"
        where = f"{method} {redact_url(response.url)}"
        log.debug("nationbuilder %s -> %s (rate limit %s)", where, status, self.rate_limit)
        try:
            body = response.json() if response.content else None
        except ValueError:
            if 200 <= status < 300:
                return CrmTransientError(f"nationbuilder {where}: malformed JSON in a {status}", status=status)
            body = None
        code = body.get("code") if isinstance(body, dict) and isinstance(body.get("code"), str) else None
        detail = f"nationbuilder {where} -> {status}: {redact(short(response.text), self._token)}"
        if code == "no_matches":
            return CrmNotFound(detail, status=status, code=code)
        if 200 <= status < 300:
            return None
        if status == 429:
            return CrmTransientError(detail, status=status, code=code,
                                     retry_after=_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            return CrmTransientError(detail, status=status, code=code)
        if status in (401, 403):
            return CrmAuthError(detail, status=status, code=code)
        if status == 404:
            return CrmNotFound(detail, status=status, code=code)
        if 400 <= status < 500:
            return CrmRejected(detail, status=status, code=code)
        return CrmError(detail, status=status, code=code)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; None (so ``send`` backs off by itself) when absent or an HTTP date."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise CrmError(f"nationbuilder {redact_url(response.url)}: expected a JSON object")
    return body


def _person_id(response: requests.Response) -> str:
    return _id_of(_json(response).get("person"))


def _id_of(person: object) -> str:
    """The person's id, checked: ASCII digits of a sane length (a hostile answer never passes as an id)."""
    person_id = person.get("id") if isinstance(person, dict) else None
    if isinstance(person_id, bool) or not isinstance(person_id, (int, str)):
        raise CrmError(f"nationbuilder answer without a person id (got {type(person).__name__})")
    problem = size_problem(person_id, "person id")
    if problem:
        raise CrmBadAnswer(f"nationbuilder: refused an answer: {problem}", code="OVERSIZED_VALUE")
    if not re.fullmatch(r"[0-9]+", str(person_id)):
        raise CrmError(f"nationbuilder answer without a person id (got {type(person).__name__})")
    return str(person_id)
