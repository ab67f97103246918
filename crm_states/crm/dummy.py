"""``CRM_TYPE=NONE``: a CRM that does nothing, for development and tests of the app itself.

Sefaria's dummy stored ``nationbuilder_id = True`` in profiles, a value later code took for a real id.
Ours returns ``dummy:<hash>`` ids: deterministic (the same user always gets the same one) and impossible
to mistake for a CRM's (Salesforce ids are alphanumeric, NationBuilder ids are integers).

Reads raise ``CrmNotSupported``: an empty answer from a CRM that was never asked would be taken for a
verdict ("not in Salesforce", "no sustainers"), and Sefaria's sync demoted everyone on such an answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import requests

from .base import CrmConnectionManager
from .errors import CrmNotSupported
from .results import Matches

DUMMY_ID_PREFIX = "dummy:"

#: Which CRM_TYPE values can answer each read (the design document: validation is against Salesforce).
READ_NEEDS: dict[str, tuple[str, ...]] = {
    "find_app_users_by_nationbuilder_ids": ("SALESFORCE",),
    "lookup_app_users_by_nationbuilder_ids": ("SALESFORCE",),
    "lookup_app_users_by_emails": ("SALESFORCE",),
    "find_crm_id": ("SALESFORCE", "NATIONBUILDER"),
    "get_sustainers": ("SALESFORCE", "NATIONBUILDER"),
    "get_available_lists": ("SALESFORCE",),
}


def not_supported(crm_type: str, method: str, *, code: str = "cannot_read") -> CrmNotSupported:
    """The refusal of a CRM that cannot answer ``method``, naming the CRM_TYPE values that can."""
    needs = READ_NEEDS.get(method, ("SALESFORCE",))
    exc = CrmNotSupported(f"CRM_TYPE={crm_type} cannot answer reads ({method}): it needs CRM_TYPE="
                          f"{' or '.join(needs)}", needs=needs)
    exc.code = code
    return exc


def dummy_id(key: str) -> str:
    """The placeholder id for ``key`` (an external id or an email)."""
    return DUMMY_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


def is_dummy_id(crm_id: object) -> bool:
    """Whether ``crm_id`` came from the dummy, so it must never be sent to a real CRM."""
    return isinstance(crm_id, str) and crm_id.startswith(DUMMY_ID_PREFIX)


class DummyConnectionManager(CrmConnectionManager):
    """Accepts every write (``True``, as Sefaria's dummy answers) and refuses every read (``CrmNotSupported``):
    it has no honest answer to a lookup, so it never answers "nothing"."""

    name = "none"

    def get_connection(self) -> requests.Session:
        return requests.Session()

    def add_user_to_crm(
        self,
        email: str,
        first_name: str,
        last_name: str,
        lang: str = "en",
        educator: bool = False,
        external_id: str | int | None = None,
    ) -> str:
        key = f"external:{external_id}" if external_id is not None else f"email:{email.strip().lower()}"
        return dummy_id(key)

    def change_user_email(self, crm_id: str, new_email: str) -> bool:
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
        pass

    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        return True

    def mark_for_review_in_crm(self, crm_id: str) -> bool:
        return True

    def find_crm_id(self, email: str | None = None) -> str | None:
        self.needs_email(email)
        raise not_supported("NONE", "find_crm_id")

    def get_available_lists(self) -> list[str]:
        raise not_supported("NONE", "get_available_lists")

    def get_sustainers(self) -> Iterator[str]:
        raise not_supported("NONE", "get_sustainers")

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        raise not_supported("NONE", "find_app_users_by_nationbuilder_ids")

    def lookup_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> dict[int, Matches]:
        raise not_supported(self.name.upper(), "lookup_app_users_by_nationbuilder_ids")

    def lookup_app_users_by_emails(self, emails: Iterable[str]) -> dict[str, Matches]:
        raise not_supported(self.name.upper(), "lookup_app_users_by_emails")

    @property
    def api_requests(self) -> int:
        """Always 0: the dummy sends nothing."""
        return 0
