"""``create_crm_user`` at Sefaria's real call point.

Sefaria calls it from ``SefariaNewUserForm.save`` inside ``transaction.atomic()`` of
``process_register_form``, right after the Django user is saved, without a user id and before the Mongo
profile exists; the SSO path calls it after its transaction, with the profile saved. So:

- inside a transaction the signup is registered with ``transaction.on_commit``: it runs once the user is
  committed, exactly once, and a rollback creates nothing in the CRM (Sefaria's own call left an orphan
  app user). The call returns ``None`` then: nothing is known yet, and Sefaria ignores the answer.
- outside one it runs at once and returns whether the app user's id is recorded.

Either way the user id is found in Django's user table by email, the signup machine runs with the
request as its inputs (the profile document need not exist), and the aftercare keeps the id on the
profile while Sefaria's registration goes on saving its stale copy (``aftercare.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..api import CrmStates
from ..crm import CrmError
from ..engine import describe
from ..logs import fields
from ..store import StoreError
from .aftercare import AFTERCARE
from .settings import django_settings
from .users import user_id_for_email

log = logging.getLogger("crm_states.sefaria")

SIGNED_UP = "WroteSalesforceAppUserUid"


def in_transaction() -> bool:
    """Whether Django's default connection is inside ``transaction.atomic()``."""
    if django_settings() is None:
        return False
    from django.db import transaction

    return bool(transaction.get_connection().in_atomic_block)


def create_user(app: CrmStates, email: str, request: dict[str, Any], schedule: Sequence[float]) -> bool | None:
    """Run the signup now, or after the current transaction commits (``None``); see the module docstring."""
    job = _signup_job(app, email, request, schedule)
    if in_transaction():
        from django.db import transaction

        transaction.on_commit(job, robust=True)
        return None
    return job()


def _signup_job(app: CrmStates, email: str, request: dict[str, Any], schedule: Sequence[float]) -> Callable[[], bool]:
    def job() -> bool:
        try:
            user_id = user_id_for_email(app.store, email)
            if user_id is None:
                log.error("create_crm_user: no Sefaria user has the email given; nothing sent",
                          extra=fields(machine="new_user_signup", outcome="not_found"))
                return False
            result = app.run_signup(user_id, email=email, **request)
        except Exception as exc:  # after commit nothing may reach Sefaria's request: it is logged here
            log.error("create_crm_user failed before its machine could record it: %s", safe_text(exc),
                      extra=fields(machine="new_user_signup", error_class=type(exc).__name__, outcome="interrupted"))
            return False
        ok = result.finished and result.state == SIGNED_UP
        if not ok:
            log.warning("create_crm_user for profile %s ended in %s (%s)", result.profile_id, result.state,
                        result.outcome, extra=fields(machine="new_user_signup", kind="create_crm_user",
                                                     profile_id=result.profile_id, state=result.state,
                                                     outcome=result.outcome))
        if result.finished:
            AFTERCARE.watch(app, user_id, schedule)
        return ok

    return job


def safe_text(exc: BaseException) -> str:
    """What a log line may say of an error: the project's own errors are written to carry no secret;
    of anything else only the class is told."""
    return describe(exc) if isinstance(exc, (CrmError, StoreError)) else type(exc).__name__
