"""``CrmMediator``: Sefaria's ``sefaria.helper.crm.crm_mediator.CrmMediator``, method for method.

The same constructor (no arguments), methods, parameters and defaults, and the answers Sefaria's callers
act on (see the README, "Moving Sefaria over", for the call sites and every deliberate deviation). Behind
each method a persisted machine runs, so a ``False`` is also a state that ``crm-states report`` lists and
``crm-states resume`` can finish.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..api import CrmStates
from ..crm import CrmConnectionManager, CrmError, CrmNotSupported
from ..engine import RunResult
from ..logs import fields
from ..records import ProfileWrite
from ..store import StoreError
from ..sustainers import SyncReport
from . import signup
from .aftercare import schedule_from
from .settings import crm_settings, shared_app
from .signup import safe_text
from .users import profile_id_of, user_id_for_email

log = logging.getLogger("crm_states.sefaria")

#: What Sefaria's dummy CRM (``CRM_TYPE`` ``NONE``) offers as newsletter lists.
DUMMY_LISTS = ["Dummy List 1", "Dummy List 2"]
#: The final state of each machine the mediator drives.
DONE = {"change_email": "WroteEmailChange", "mark_as_spam": "WroteMarkedAsSpam",
        "mailing_list_signup": "WroteMailingListSignup"}


class SalesforceNewsletterListRetrievalError(Exception):
    """The newsletter lists could not be read (Sefaria's ``sefaria.helper.crm.salesforce`` has the same
    class; its view answers 502 for it). The message never carries a secret."""


def retrieval_error(message: str) -> SalesforceNewsletterListRetrievalError:
    """The error to raise: when Sefaria's own ``sefaria.helper.crm.salesforce`` is loaded (its views import
    its class), an instance of both classes, so Sefaria's ``except`` clause catches it unchanged."""
    theirs = getattr(sys.modules.get("sefaria.helper.crm.salesforce"), "SalesforceNewsletterListRetrievalError", None)
    if not (isinstance(theirs, type) and issubclass(theirs, Exception)) or issubclass(
            SalesforceNewsletterListRetrievalError, theirs):
        return SalesforceNewsletterListRetrievalError(message)
    with _bridge_lock:
        bridged = _bridges.get(theirs)
        if bridged is None:
            bridged = type("SalesforceNewsletterListRetrievalError", (SalesforceNewsletterListRetrievalError, theirs),
                           {"__module__": __name__, "__doc__": SalesforceNewsletterListRetrievalError.__doc__})
            _bridges[theirs] = bridged
    return bridged(message)


_bridges: dict[type, type] = {}
_bridge_lock = threading.Lock()


class SustainerSyncError(RuntimeError):
    """The weekly sync changed nothing: the CRM's sustainer set could not be read whole, or it would have
    demoted more sustainers than allowed. ``report`` says which; the cron job fails visibly."""

    def __init__(self, message: str, report: SyncReport) -> None:
        super().__init__(message)
        self.report = report


class CrmMediator:
    """What Sefaria's code calls; built from Sefaria's settings (``crm_states.sefaria.settings``)."""

    def __init__(self) -> None:
        self.app: CrmStates = shared_app()

    # --- Sefaria's methods ------------------------------------------------------------------------------
    def create_crm_user(self, email: str, first_name: str, last_name: str, lang: str = "en",
                        educator: bool = False) -> bool | None:
        """Create the new user's Salesforce app user and record its id. Inside a transaction it runs once
        the transaction commits and answers ``None``; outside, at once, answering whether the id is
        recorded. An invalid email is ``ValueError`` with nothing sent."""
        CrmConnectionManager.validate_email(email)
        request = {"first_name": first_name, "last_name": last_name, "lang": lang, "educator": bool(educator)}
        return signup.create_user(self.app, email, request, schedule_from(crm_settings()))

    def subscribe_to_lists(self, email: str, first_name: str, last_name: str, educator: bool = False,
                           lang: str = "en", mailing_lists: list[str] | None = None) -> bool:
        """Subscribe the email to ``mailing_lists`` (none: the default lists). ``True`` when the CRM took
        it; ``ValueError`` for an invalid email or name, with nothing sent."""
        CrmConnectionManager.validate_email(email)
        for name in (first_name, last_name):
            if name is not None and name != "":
                CrmConnectionManager.validate_name(name)
        lists = _lists(mailing_lists)
        return self._ran("subscribe_to_lists", "mailing_list_signup", lambda: self.app.subscribe(
            email, lists, profile_id=user_id_for_email(self.app.store, email), first_name=first_name,
            last_name=last_name, lang=lang or "en", educator=bool(educator)))

    def sync_sustainers(self) -> SyncReport:
        """The weekly sustainer sync; its report. ``SustainerSyncError`` when it changed nothing because the
        CRM's set could not be read whole or it would demote too many (``crm-states sync-sustainers --force``)."""
        report = self.app.sync_sustainers()
        problem = report.read_failed or report.refused
        if problem:
            raise SustainerSyncError(f"sustainer sync changed nothing: {problem}", report)
        return report

    def mark_as_spam_in_crm(self, uid: int | None = None, email: str | None = None, profile: Any = None) -> bool:
        """Mark the user as spam in the CRM; ``True`` when the CRM took it."""
        return self._mark("mark_as_spam_in_crm", uid, email, profile, review=False)

    def mark_for_review_in_crm(self, uid: int | None = None, email: str | None = None, profile: Any = None) -> bool:
        """Flag the user for manual review in the CRM; ``True`` when the CRM took it."""
        return self._mark("mark_for_review_in_crm", uid, email, profile, review=True)

    def update_user_email(self, new_email: str, uid: int | None = None, email: str | None = None,
                          profile: Any = None) -> bool:
        """Tell the CRM the user's new email (the CRM id does not change); ``True`` when it took it.
        An invalid new email is ``ValueError`` with nothing sent."""
        CrmConnectionManager.validate_email(new_email)
        pid = profile_id_of(self.app.store, uid, email, profile)
        if pid is None:
            return False
        return self._ran("update_user_email", "change_email", lambda: self.app.change_email(pid, new_email))

    def get_and_save_crm_id(self, email: str | None = None) -> str | bool:
        """Look the email's app user up and save its id on the user's profile where none is saved yet;
        the id found, or ``False`` (none found, or the lookup failed). ``ValueError`` for an invalid email."""
        if email is None:
            return False
        CrmConnectionManager.validate_email(email)
        try:
            crm_id = self.app.crm.find_crm_id(email)
            if not crm_id:
                return False
            user_id = user_id_for_email(self.app.store, email)
            if user_id is not None:
                self.app.store.fill_profile(user_id, ProfileWrite(set={"sf_app_user_id": crm_id}))
            return crm_id
        except (CrmError, StoreError) as exc:
            log.error("get_and_save_crm_id failed: %s", safe_text(exc),
                      extra=fields(kind="get_and_save_crm_id", error_class=type(exc).__name__))
            return False

    def get_available_lists(self) -> list[str]:
        """The newsletter lists; ``SalesforceNewsletterListRetrievalError`` when they cannot be read."""
        try:
            return self.app.crm.get_available_lists()
        except CrmNotSupported as exc:
            if self.app.crm.name == "none":  # Sefaria's dummy CRM offers two placeholders
                return list(DUMMY_LISTS)
            raise retrieval_error(f"Unable to retrieve newsletter mailing lists: {safe_text(exc)}") from exc
        except CrmError as exc:
            raise retrieval_error(f"Unable to retrieve newsletter mailing lists: {safe_text(exc)}") from exc

    def get_connection_manager(self) -> SpamMarking:
        """What ``purge_spammer_account_data`` asks for (Sefaria's mediator has no such method, so its
        spam marking never ran): an object whose ``mark_as_spam_in_crm(profile)`` takes the profile document
        it passes (or a profile object, or a user id) and runs the spam machine."""
        return SpamMarking(self)

    # --- plumbing ---------------------------------------------------------------------------------------
    def _mark(self, method: str, uid: Any, email: Any, profile: Any, *, review: bool) -> bool:
        pid = profile_id_of(self.app.store, uid, email, profile)
        if pid is None:
            return False
        return self._ran(method, "mark_as_spam", lambda: self.app.mark_as_spam(pid, review=review))

    def _ran(self, method: str, machine: str, run: Callable[[], RunResult]) -> bool:
        """Run a machine; ``True`` when it finished in its final state. What failed is recorded (and
        logged), never raised into Sefaria's request, except what was refused before anything was sent."""
        try:
            result = run()
        except (StoreError, CrmError) as exc:
            log.error("%s failed before its machine could record it: %s", method, safe_text(exc),
                      extra=fields(kind=method, error_class=type(exc).__name__, outcome="interrupted"))
            return False
        ok = result.finished and result.state == DONE[machine]
        if not ok:
            log.warning("%s for profile %s ended in %s (%s)", method, result.profile_id, result.state,
                        result.outcome, extra=fields(machine=machine, kind=method, profile_id=result.profile_id,
                                                     state=result.state, outcome=result.outcome))
        return ok


class SpamMarking:
    """``CrmMediator().get_connection_manager()``: the spam actions only, each through the mediator."""

    def __init__(self, mediator: CrmMediator) -> None:
        self._mediator = mediator

    def mark_as_spam_in_crm(self, profile: Any) -> bool:
        """``profile``: a profile document (as ``purge_spammer_account_data`` passes), object or user id."""
        return self._mediator.mark_as_spam_in_crm(**_who(profile))

    def mark_for_review_in_crm(self, profile: Any) -> bool:
        return self._mediator.mark_for_review_in_crm(**_who(profile))


def _who(profile: Any) -> dict[str, Any]:
    """The mediator's keyword for what ``SpamMarking`` was given; ``RuntimeError`` for nothing (a spammer
    without a profile document: ``find_one`` found none), as the mediator's rule says."""
    if isinstance(profile, int) and not isinstance(profile, bool):
        return {"uid": profile}
    return {"profile": profile} if profile else {}


def _lists(mailing_lists: Any) -> list[str]:
    """Sefaria's ``mailing_lists`` (the form's JSON ``lists``): ``None`` or ``[]`` for the default lists, a
    list of names, or one name; anything else is ``ValueError``, which its view answers as an error."""
    if mailing_lists is None:
        return []
    if isinstance(mailing_lists, str):
        mailing_lists = [mailing_lists]
    if not isinstance(mailing_lists, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in mailing_lists):
        raise ValueError("Invalid mailing lists")
    return list(mailing_lists)
