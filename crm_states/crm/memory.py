"""An in-process CRM double for fast tests and for exercising machines without HTTP.

It keeps app users in dicts and can be told to fail the next calls with any exception, so property
tests can draw CRM outcomes (found, absent, 5xx, timeout, malformed body, a bug) per call.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import requests

from .base import CrmConnectionManager
from .results import Matches, MatchesBuilder, normalise_email


class InMemoryCrm(CrmConnectionManager):
    name = "memory"

    def __init__(self) -> None:
        self.app_users: dict[str, dict[str, Any]] = {}
        self.by_nationbuilder_id: dict[int, str] = {}
        self.by_external_id: dict[str, str] = {}
        self.sustainers: set[str] = set()
        self.mailing_lists: dict[str, set[str]] = {}
        self.available_lists: set[str] = set()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._failures: deque[BaseException | None] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # Who holds each looked-up value, kept as users are added or change email, so a lookup costs what
        # Salesforce's indexed query would, not a scan of every app user (which dominated the engine benchmark).
        self._holders: dict[str, dict[Any, set[str]]] = {"nationbuilder_id": {}, "email": {}}

    # --- scripting ----------------------------------------------------------------------------
    def fail_next(self, *outcomes: BaseException | None) -> None:
        """Queue what the next calls do: an exception to raise, or ``None`` to behave normally."""
        self._failures.extend(outcomes)

    def add_app_user(self, *, nationbuilder_id: int | None = None, email: str | None = None,
                     external_id: str | int | None = None) -> str:
        with self._lock:
            app_user_id = f"a0B{next(self._ids):015d}"
            self.app_users[app_user_id] = {"email": email, "nationbuilder_id": nationbuilder_id}
            self._index(app_user_id, "nationbuilder_id", nationbuilder_id)
            self._index(app_user_id, "email", email)
            if nationbuilder_id is not None:
                self.by_nationbuilder_id[nationbuilder_id] = app_user_id
            if external_id is not None:
                self.by_external_id[str(external_id)] = app_user_id
            return app_user_id

    def _index(self, app_user_id: str, field: str, value: Any, *, drop: bool = False) -> None:
        key = _key(field, value)
        if key is None:
            return
        holders = self._holders[field].setdefault(key, set())
        (holders.discard if drop else holders.add)(app_user_id)

    def _call(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((method, args))
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            raise failure

    # --- CrmConnectionManager -----------------------------------------------------------------
    def get_connection(self) -> requests.Session:
        return requests.Session()

    def add_user_to_crm(self, email: str, first_name: str, last_name: str, lang: str = "en",
                        educator: bool = False, external_id: str | int | None = None) -> str:
        self._call("add_user_to_crm", email, first_name, last_name, lang, educator, external_id)
        if external_id is not None and str(external_id) in self.by_external_id:
            return self.by_external_id[str(external_id)]
        return self.add_app_user(email=email, external_id=external_id)

    def change_user_email(self, crm_id: str, new_email: str) -> bool:
        self._call("change_user_email", crm_id, new_email)
        with self._lock:
            self._index(crm_id, "email", self.app_users[crm_id].get("email"), drop=True)
            self.app_users[crm_id]["email"] = new_email
            self._index(crm_id, "email", new_email)
        return True

    def add_email_to_mailing_lists(self, email: str, mailing_lists: Iterable[str], first_name: str | None = None,
                                   last_name: str | None = None, lang: str = "en", educator: bool = False) -> None:
        lists = list(mailing_lists)
        self._call("add_email_to_mailing_lists", email, tuple(lists))
        for name in lists:
            self.mailing_lists.setdefault(name, set()).add(email)

    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        self._call("mark_as_spam_in_crm", crm_id)
        self.app_users[crm_id]["spam"] = True
        return True

    def get_available_lists(self) -> list[str]:
        self._call("get_available_lists")
        return sorted(self.available_lists)

    def find_crm_id(self, email: str | None = None) -> str | None:
        email = self.needs_email(email)
        self._call("find_crm_id", email)
        return next((i for i, u in self.app_users.items() if u.get("email") == email), None)

    def get_sustainers(self) -> Iterator[str]:
        self._call("get_sustainers")
        return iter(sorted(self.sustainers))

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        wanted = list(ids)
        self._call("find_app_users_by_nationbuilder_ids", tuple(wanted))
        return {i: self.by_nationbuilder_id[i] for i in wanted if i in self.by_nationbuilder_id}

    def lookup_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> dict[int, Matches]:
        """Every app user holding each id (``add_app_user`` may give one id to several)."""
        wanted = list(dict.fromkeys(ids))
        self._call("lookup_app_users_by_nationbuilder_ids", tuple(wanted))
        return self._matches(wanted, "nationbuilder_id")

    def lookup_app_users_by_emails(self, emails: Iterable[str]) -> dict[str, Matches]:
        wanted = list(dict.fromkeys(normalise_email(e) for e in emails))
        self._call("lookup_app_users_by_emails", tuple(wanted))
        return self._matches(wanted, "email")

    @property
    def api_requests(self) -> int:
        """Each call counts as one request."""
        with self._lock:
            return len(self.calls)

    def _matches(self, wanted: list[Any], field: str) -> dict[Any, Matches]:
        found: MatchesBuilder[Any] = MatchesBuilder()
        with self._lock:
            for k in wanted:
                for app_user_id in self._holders[field].get(k, ()):
                    found.add(k, app_user_id)
        return found.build(wanted)


def _key(field: str, value: Any) -> Any:
    """The value a lookup matches on: emails case- and space-insensitively, like Salesforce's."""
    if field == "email":
        return normalise_email(value) if isinstance(value, str) else None
    return value
