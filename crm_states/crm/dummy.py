"""``CRM_TYPE=NONE``: a CRM that does nothing, for development and tests of the app itself.

Sefaria's dummy stored ``nationbuilder_id = True`` in profiles, a value later code took for a real id.
Ours returns ``dummy:<hash>`` ids: deterministic (the same user always gets the same one) and impossible
to mistake for a CRM's (Salesforce ids are alphanumeric, NationBuilder ids are integers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import requests

from .base import CrmConnectionManager

DUMMY_ID_PREFIX = "dummy:"


def dummy_id(key: str) -> str:
    """The placeholder id for ``key`` (an external id or an email)."""
    return DUMMY_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


def is_dummy_id(crm_id: object) -> bool:
    """Whether ``crm_id`` came from the dummy, so it must never be sent to a real CRM."""
    return isinstance(crm_id, str) and crm_id.startswith(DUMMY_ID_PREFIX)


class DummyConnectionManager(CrmConnectionManager):
    """Accepts every write (``True``, as Sefaria's dummy answers), answers every read with "nothing";
    the batched lookups, which have no honest "nothing", raise ``CrmNotSupported``."""

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
        return None

    def get_available_lists(self) -> list[str]:
        return []

    def get_sustainers(self) -> Iterator[str]:
        return iter(())

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        return {}

    @property
    def api_requests(self) -> int:
        """Always 0: the dummy sends nothing. Its batched lookups raise ``CrmNotSupported``."""
        return 0
