"""The CRM seam: what machines and Sefaria code may ask of any CRM.

Mirrors Sefaria's ``CrmConnectionManager`` (sefaria/helper/crm) so adopting this package is a change of
import, but every method either returns its documented value or raises a ``CrmError`` subclass.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping

import requests


class CrmConnectionManager(abc.ABC):
    """Abstract CRM. Concrete managers know their CRM's HTTP API and nothing of machines or storage."""

    #: Short name used in logs and journal entries ("salesforce", "nationbuilder", "log", "none", ...).
    name: str = "crm"

    @abc.abstractmethod
    def get_connection(self) -> requests.Session:
        """An authenticated ``requests.Session`` (the design document's contract)."""

    @abc.abstractmethod
    def add_user_to_crm(
        self,
        email: str,
        first_name: str,
        last_name: str,
        lang: str = "en",
        educator: bool = False,
        external_id: str | int | None = None,
    ) -> str:
        """Create the app user and return its CRM id.

        Must be idempotent when ``external_id`` is given (or by email otherwise): a retried signup
        returns the existing app user instead of making a second one.
        """

    @abc.abstractmethod
    def change_user_email(self, crm_id: str, new_email: str) -> None:
        """Tell the CRM the app user changed their email. The CRM id does not change."""

    @abc.abstractmethod
    def add_email_to_mailing_lists(
        self,
        email: str,
        mailing_lists: Iterable[str],
        first_name: str | None = None,
        last_name: str | None = None,
        lang: str = "en",
        educator: bool = False,
    ) -> None:
        """Subscribe an email address to mailing lists (the design document: email only)."""

    @abc.abstractmethod
    def mark_as_spam_in_crm(self, crm_id: str) -> None:
        """Mark an app user as spam (NationBuilder deletes the person; Salesforce flags for review)."""

    def mark_for_review_in_crm(self, crm_id: str) -> None:
        """Flag an app user for manual review. Defaults to the spam action."""
        self.mark_as_spam_in_crm(crm_id)

    def get_available_lists(self) -> list[str]:
        """The mailing lists a user can subscribe to. CRMs without such a catalogue refuse clearly."""
        from .errors import CrmError

        raise CrmError(f"the {self.name} CRM has no catalogue of mailing lists")

    @abc.abstractmethod
    def find_crm_id(self, email: str) -> str | None:
        """The app user id for an email, or ``None`` when there is none."""

    @abc.abstractmethod
    def get_sustainers(self) -> Iterator[str]:
        """Every current sustainer, as app user ids (or emails where the CRM keys by email).

        Raises on any failure, including part-way through paging: a partial set must never be taken
        for the whole set (Sefaria's sync demoted everyone on a failed read).
        """

    @abc.abstractmethod
    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        """``{nationbuilder_id: app_user_id}`` for the ids found; absent ids are simply missing.

        Batched: a thousand ids cost a handful of requests. Raises when the lookup itself failed.
        """
