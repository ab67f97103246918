"""Where the email reconciliation reads each user's email and join date by id (``crm-states
reconcile-by-email``), one batch of ids at a time. (The signup sweep walks every user instead:
``crm_states.users``.)

Sefaria keeps both in Django's ``auth_user`` table (SQL), not in the profile documents. A source is any
function ``ids -> {id: User}``, called once per batch of ids:

- ``django_users()``: Django's ``User`` model, one query per batch (``id__in``): what Sefaria uses;
- ``profile_users(store)``: the profile documents' ``email`` and ``date_joined`` fields (tests, the demo,
  a Mongo-only copy);
- ``default_users(store)``: the one ``CRM_STATES_USER_SOURCE`` names (``django`` or ``profiles``, as for the
  signup sweep); unset, Django's when Django is configured, else the profile documents'.

Pass another to ``CrmStates.reconcile_by_email(users=...)`` to read them elsewhere.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from .users import SETTING


@attrs.frozen
class User:
    """What the reconciliation needs of a user: the email to look up, and when the user joined."""

    email: str | None
    date_joined: dt.datetime | None


UserSource = Callable[[Sequence[int]], Mapping[int, User]]


def aware(value: Any) -> dt.datetime | None:
    """A datetime in UTC (a naive one is taken as UTC, as BSON and Django without time zones store them)."""
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _user(email: Any, joined: Any) -> User:
    return User(email if isinstance(email, str) and email.strip() else None, aware(joined))


def profile_users(store: Any) -> UserSource:
    """Emails and join dates from the profile documents' ``email`` and ``date_joined`` fields."""

    def read(ids: Sequence[int]) -> Mapping[int, User]:
        found = store.profiles.find({"id": {"$in": list(ids)}}, {"_id": 0, "id": 1, "email": 1, "date_joined": 1})
        return {doc["id"]: _user(doc.get("email"), doc.get("date_joined")) for doc in found}

    return read


def django_users() -> UserSource:
    """Emails and join dates from Django's ``auth_user`` (Sefaria's user table), one query per batch."""
    from django.contrib.auth.models import User as DjangoUser

    def read(ids: Sequence[int]) -> Mapping[int, User]:
        rows = DjangoUser.objects.filter(id__in=list(ids)).values_list("id", "email", "date_joined")
        return {uid: _user(email, joined) for uid, email, joined in rows}

    return read


def django_configured() -> bool:
    try:
        from django.conf import settings
    except ImportError:
        return False
    return bool(settings.configured)


def source_name() -> str:
    """``django`` or ``profiles``, as ``CRM_STATES_USER_SOURCE`` says or by default; ``ValueError`` for a
    setting this reader cannot follow (a function of your own is passed as ``users=`` instead: it reads by
    id, where the sweep's walks every user)."""
    name = (os.environ.get(SETTING) or "").strip()
    if not name:
        return "django" if django_configured() else "profiles"
    if name not in ("django", "profiles"):
        raise ValueError(f"{SETTING}={name[:80]!r}: reconcile-by-email reads users by id from django or profiles; "
                         "pass a reader of your own as CrmStates.reconcile_by_email(users=...)")
    return name


def default_users(store: Any) -> UserSource:
    return django_users() if source_name() == "django" else profile_users(store)
