"""The CRM seam: what machines and Sefaria code may ask of any CRM.

Mirrors Sefaria's ``CrmConnectionManager`` (sefaria/helper/crm) so adopting this package is a change of
import: the same method names, arguments and defaults (``add_user_to_crm``, ``change_user_email``,
``mark_as_spam_in_crm``, ``mark_for_review_in_crm``, ``subscribe_to_lists``, ``find_crm_id``, the static
``validate_email`` and ``validate_name``), and the same truthy answers. Two deliberate deviations:
a failure raises a ``CrmError`` subclass instead of returning ``False`` (a ``False`` cannot say whether
to retry, and Sefaria's callers mostly ignored it), and ``add_user_to_crm`` takes an ``external_id`` so
a retried signup finds the app user it already made.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import requests

from . import validation
from .errors import CrmError, CrmInvalidInput, CrmNotSupported

if TYPE_CHECKING:
    from .results import Matches


class CrmConnectionManager(abc.ABC):
    """Abstract CRM. Concrete managers know their CRM's HTTP API and nothing of machines or storage."""

    #: Short name used in logs and journal entries ("salesforce", "nationbuilder", "log", "none", ...).
    name: str = "crm"
    #: The ``CRM_TYPE`` values whose managers can answer batched app-user lookups.
    LOOKUP_CRM_TYPES: tuple[str, ...] = ("SALESFORCE",)

    # -- Sefaria's validators --------------------------------------------------------------------------

    @staticmethod
    def validate_email(name: object) -> bool:
        """``True``, or ``ValueError("Invalid Email")``: Django's ``EmailValidator`` rule (see validation.py)."""
        return validation.validate_email(name)

    @staticmethod
    def validate_name(name: object) -> bool:
        """``True``, or ``ValueError("Invalid Name")``; lenient where Sefaria's rule refused real names."""
        return validation.validate_name(name)

    # -- Sefaria's methods -------------------------------------------------------------------------------

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
    def change_user_email(self, crm_id: str, new_email: str) -> bool:
        """Tell the CRM the app user changed their email; ``True``. The CRM id does not change.

        Unlike Sefaria's, this does not refuse an address its validator dislikes: the address is the
        user's, already accepted by the application (internationalised ones included), and the CRM
        says itself when it refuses one. Callers that want Django's rule call ``validate_email``.
        """

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

    def subscribe_to_lists(
        self,
        email: str,
        first_name: str | None = None,
        last_name: str | None = None,
        educator: bool = False,
        lang: str = "en",
        mailing_lists: Iterable[str] | None = None,
    ) -> bool:
        """Sefaria's name for ``add_email_to_mailing_lists``: validates the email (and the names given),
        subscribes, and answers ``True``. No lists (Sefaria's default form sends none) is a subscription
        to the CRM's default newsletter."""
        self.validate_email(email)
        for name in (first_name, last_name):
            if name is not None and name != "":
                self.validate_name(name)
        self.add_email_to_mailing_lists(email, list(mailing_lists or []), first_name=first_name,
                                        last_name=last_name, lang=lang, educator=educator)
        return True

    @abc.abstractmethod
    def mark_as_spam_in_crm(self, crm_id: str) -> bool:
        """Mark an app user as spam (NationBuilder deletes the person; Salesforce flags for review); ``True``."""

    def mark_for_review_in_crm(self, crm_id: str) -> bool:
        """Flag an app user for manual review; ``True``. Defaults to the spam action."""
        return self.mark_as_spam_in_crm(crm_id)

    def get_available_lists(self) -> list[str]:
        """The mailing lists a user can subscribe to. CRMs without such a catalogue refuse clearly."""
        from .errors import CrmError

        raise CrmError(f"the {self.name} CRM has no catalogue of mailing lists")

    @abc.abstractmethod
    def find_crm_id(self, email: str | None = None) -> str | None:
        """The app user id for an email, or ``None`` when there is none. No email is an error
        (``CrmInvalidInput``), where Sefaria's answered ``False``."""

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

    # -- batched lookups (``Matches``: every record found, nothing taken for a single clean id) ---------

    def lookup_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> dict[int, Matches]:
        """``{nationbuilder_id: Matches}`` for the ids with at least one app user (valid or rejected);
        several app users for one id are all listed. Raises when the lookup itself failed."""
        raise self.not_supported("lookup_app_users_by_nationbuilder_ids")

    def lookup_app_users_by_emails(self, emails: Iterable[str]) -> dict[str, Matches]:
        """``{normalised email: Matches}`` (``strip().lower()``) for the emails with an app user whose
        app email equals them case-insensitively after trimming."""
        raise self.not_supported("lookup_app_users_by_emails")

    @property
    def api_requests(self) -> int:
        """The API requests this client has sent so far, as its CRM counts them (thread-safe), so a
        runner can enforce ``--max-api-calls`` and report what it spent."""
        raise self.not_supported("api_requests")

    def not_supported(self, what: str) -> CrmNotSupported:
        """The error for a question this CRM cannot answer, naming the ``CRM_TYPE`` that can."""
        can = " or ".join(f"CRM_TYPE={t}" for t in self.LOOKUP_CRM_TYPES)
        return CrmNotSupported(f"the {self.name} CRM cannot answer {what}; {can} can",
                               needs=self.LOOKUP_CRM_TYPES)

    @staticmethod
    def needs_email(email: object) -> str:
        """``email`` when it is a non-empty string; ``find_crm_id`` without one is a caller error."""
        if not isinstance(email, str) or not email:
            raise CrmInvalidInput("find_crm_id needs an email")
        return email


def requests_sent(crm: object) -> int:
    """The API requests ``crm`` has sent, as its CRM counts them; 0 for a CRM that cannot count (it raises
    ``CrmError``, or has no such count): asking what was spent must never fail the run that spent it."""
    try:
        counted = getattr(crm, "api_requests", 0)
    except CrmError:
        return 0
    return counted if isinstance(counted, int) and not isinstance(counted, bool) else 0
