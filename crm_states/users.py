"""Where the signup sweep reads Sefaria's users from: a small pluggable function.

A user source is ``source(window) -> Iterator[User]``: every user who joined within ``window``, in id order,
with the email and names a signup sends. Two are built in:

- ``django_users``: Django's ``auth_user`` table (``email``, ``first_name``, ``last_name``, ``date_joined``),
  Sefaria's own (emails and names are not in the profile documents);
- ``profile_users``: the ``profiles`` documents' ``email``, ``first_name``, ``last_name`` and
  ``date_joined`` fields (tests, and deployments that keep them there); profiles without an email are not
  users the sweep can sign up and are left out.

``CRM_STATES_USER_SOURCE`` picks one: ``django``, ``profiles`` (the default), or ``package.module:function``
for a function of your own with the same signature (it is given the ``CrmStates`` as ``app=``).
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .protocols import States

SETTING = "CRM_STATES_USER_SOURCE"


@attrs.frozen
class Window:
    """Users who joined at or after ``joined_after`` and before ``joined_before`` (UTC; None: unbounded)."""

    joined_after: dt.datetime | None = None
    joined_before: dt.datetime | None = None


@attrs.frozen
class User:
    """What a signup needs of one user; ``lang`` None means "as the profile's settings say"."""

    id: int
    email: str | None
    first_name: str = ""
    last_name: str = ""
    joined: dt.datetime | None = None
    lang: str | None = None
    educator: bool = False


UserSource = Callable[..., Iterator[User]]


def profile_users(window: Window, *, app: States) -> Iterator[User]:
    """Users from the ``profiles`` documents that carry an email, in id order."""
    where: dict[str, Any] = {"email": {"$nin": [None, ""]}}
    joined = {k: _naive(v) for k, v in (("$gte", window.joined_after), ("$lt", window.joined_before)) if v is not None}
    if joined:
        where["date_joined"] = joined
    fields = {"_id": 0, "id": 1, "email": 1, "first_name": 1, "last_name": 1, "date_joined": 1}
    cursor = app.store.profiles.find(where, fields).sort("id", 1).batch_size(1000)
    try:
        for doc in cursor:
            pid = doc.get("id")
            if isinstance(pid, int) and not isinstance(pid, bool):
                yield User(pid, doc.get("email"), _text(doc.get("first_name")), _text(doc.get("last_name")),
                           doc.get("date_joined"))
    finally:
        cursor.close()


def django_users(window: Window, *, app: States | None = None) -> Iterator[User]:
    """Users from Django's user model (Sefaria's ``auth_user``), in id order, 2,000 rows per fetch."""
    from django.contrib.auth import get_user_model  # only where Django is configured

    users = get_user_model().objects.all()
    if window.joined_after is not None:
        users = users.filter(date_joined__gte=window.joined_after)
    if window.joined_before is not None:
        users = users.filter(date_joined__lt=window.joined_before)
    rows = users.order_by("id").values_list("id", "email", "first_name", "last_name", "date_joined")
    for pid, email, first, last, joined in rows.iterator(chunk_size=2000):
        yield User(pid, email or None, first or "", last or "", joined)


def source_from_env(env: dict[str, str] | None = None) -> UserSource:
    """The user source ``CRM_STATES_USER_SOURCE`` names; ``ValueError`` saying what it accepts."""
    name = ((os.environ if env is None else env).get(SETTING) or "profiles").strip()
    if name == "profiles":
        return profile_users
    if name == "django":
        return django_users
    module, _, function = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), function) if module and function else None
    except (ImportError, AttributeError):
        found = None
    if not callable(found):
        raise ValueError(f"{SETTING} must be profiles, django or package.module:function naming a function; "
                         f"got {name[:80]!r}")
    return found


def lang_of(profile: dict[str, Any] | None) -> str:
    """Sefaria's signup language from a profile's settings (``interface_language``), else English."""
    settings = (profile or {}).get("settings")
    return "he" if isinstance(settings, dict) and settings.get("interface_language") == "hebrew" else "en"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _naive(at: dt.datetime) -> dt.datetime:
    """MongoDB dates are UTC; pymongo compares naive ones as UTC."""
    return at.astimezone(dt.timezone.utc).replace(tzinfo=None) if at.tzinfo else at
