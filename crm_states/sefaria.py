"""A drop-in for Sefaria's ``sefaria.helper.crm.crm_mediator.CrmMediator``.

Same methods, same signatures, same kinds of return values, so adopting the machines is a change of
one import. Behind each method a persisted machine runs: a failure is a state that the report lists and
``crm-states resume`` finishes, instead of a ``False`` that nothing records.

Sefaria keeps emails in its SQL user table, so the methods that receive only an email find the user id
through ``user_id_for_email``: by default Django's ``User`` model when Django is configured, else the
``email`` field of the profile documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .api import CrmStates
from .crm import CrmError
from .logs import fields
from .records import ProfileWrite
from .store import StoreError

log = logging.getLogger("crm_states.sefaria")

SIGNED_UP = "WroteSalesforceAppUserUid"


class CrmMediator:
    """What Sefaria's code calls. Built from the environment (``MONGO_URL``, ``MONGO_DB``, ``CRM_TYPE``
    and Sefaria's CRM settings, ``CRM_STATES_JOURNAL``) unless given ``app``."""

    def __init__(self, app: CrmStates | None = None, *,
                 user_id_for_email: Callable[[str], int | None] | None = None) -> None:
        self.app = app or CrmStates.from_env()
        self._user_id_for_email = user_id_for_email or self._default_user_id_for_email

    # --- Sefaria's methods --------------------------------------------------------------------------
    def create_crm_user(self, email: str, first_name: str, last_name: str, lang: str = "en",
                        educator: bool = False) -> bool:
        """Create the new user's app user and save its id. True when the id is saved."""
        user_id = self._user_id_for_email(email)
        if user_id is None:
            log.error("create_crm_user: no Sefaria user has the email given; nothing sent")
            return False
        return self._ran("create_crm_user", lambda: self.app.run_signup(
            user_id, email=email, first_name=first_name, last_name=last_name, lang=lang, educator=educator),
            success=SIGNED_UP)

    def subscribe_to_lists(self, email: str, first_name: str | None = None, last_name: str | None = None,
                           educator: bool = False, lang: str = "en", mailing_lists: list[str] | None = None) -> bool:
        """Subscribe an email to mailing lists (the email only, as the design document says)."""
        profile_id = self._user_id_for_email(email)
        return self._ran("subscribe_to_lists", lambda: self.app.subscribe(
            email, list(mailing_lists or []), profile_id=profile_id, first_name=first_name, last_name=last_name,
            lang=lang, educator=educator))

    def sync_sustainers(self) -> Any:
        """The weekly sustainer sync; returns its report (nothing is changed when the read fails)."""
        return self.app.sync_sustainers()

    def mark_as_spam_in_crm(self, uid: int, email: str, profile: Any) -> bool:
        return self._ran("mark_as_spam_in_crm", lambda: self.app.mark_as_spam(uid))

    def mark_for_review_in_crm(self, uid: int, email: str, profile: Any) -> bool:
        return self._ran("mark_for_review_in_crm", lambda: self.app.mark_as_spam(uid, review=True))

    def update_user_email(self, new_email: str, uid: int, email: str, profile: Any) -> bool:
        """Tell the CRM about the new email; the CRM id does not change."""
        return self._ran("update_user_email", lambda: self.app.change_email(uid, new_email))

    def get_and_save_crm_id(self, uid: int, email: str, profile: Any) -> str | None:
        """Find the user's app user by email and save its id on the profile where none is saved yet."""
        try:
            crm_id = self.app.crm.find_crm_id(email)
            if crm_id:
                self.app.store.fill_profile(uid, ProfileWrite(set={"sf_app_user_id": crm_id}))
            return crm_id
        except (CrmError, StoreError) as exc:
            log.error("get_and_save_crm_id for user %s failed: %s", uid, exc)
            return None

    def get_available_lists(self) -> list[str]:
        try:
            return self.app.crm.get_available_lists()
        except CrmError as exc:
            log.error("get_available_lists failed: %s", exc)
            return []

    # --- plumbing -------------------------------------------------------------------------------
    def _ran(self, method: str, run: Callable[[], Any], success: str | None = None) -> bool:
        """Run a machine; True when it finished in its success state. Never raises into Sefaria's
        request: what failed is persisted (and logged), which is what the report and resume use."""
        try:
            result = run()
        except (StoreError, CrmError, TypeError, ValueError) as exc:
            log.error("%s failed before its machine could record it: %s", method, exc)
            return False
        ok = result.finished and (result.state == success if success else result.state in _SUCCESS_STATES)
        if not ok:
            log.warning("%s for profile %s ended in %s (%s)", method, result.profile_id, result.state, result.outcome,
                        extra=fields(kind=method, profile_id=result.profile_id, state=result.state,
                                     outcome=result.outcome))
        return ok

    def _default_user_id_for_email(self, email: str) -> int | None:
        if _django_configured():
            from django.contrib.auth.models import User  # Sefaria's user table

            user = User.objects.filter(email__iexact=email).only("id").first()
            return user.id if user else None
        profile = self.app.store.profiles.find_one({"email": email, "id": {"$gt": 0}}, {"id": 1})
        return profile["id"] if profile else None


def _django_configured() -> bool:
    try:
        from django.conf import settings
    except ImportError:
        return False
    return bool(settings.configured)


def _success_states() -> frozenset[str]:
    """Each machine's final state: the one its diagram leads to ``[*]``."""
    from .api import MACHINES

    return frozenset(state for spec in MACHINES.values() for state in spec.diagram.finals)


_SUCCESS_STATES = _success_states()
