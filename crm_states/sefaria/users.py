"""Who a call is about. Sefaria keeps emails and names in Django's ``auth_user`` table, not in the profile
documents, so an email becomes a user id through Django's ``User`` model (case-insensitively, as Sefaria's
``UserProfile(email=...)`` looks it up). Without Django (the CLI, tests of the library alone) the ``email``
field of the profile documents is used instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from ..store import Store
from .settings import django_settings

log = logging.getLogger("crm_states.sefaria")


def user_id_for_email(store: Store, email: str) -> int | None:
    """The id of the user with this email, or ``None``. Several users sharing it case-insensitively
    (Django does not forbid it): the exact match, else the newest (the one registering now)."""
    if not isinstance(email, str) or not email.strip():
        return None
    email = email.strip()
    if django_settings() is not None:
        from django.contrib.auth import get_user_model  # Sefaria's user table

        rows = list(get_user_model().objects.filter(email__iexact=email).order_by("-id").values_list("id", "email")[:20])
        if not rows:
            return None
        exact = [uid for uid, found in rows if found == email]
        return int((exact or [rows[0][0]])[0])
    doc = store.profiles.find_one({"email": {"$regex": f"^{re.escape(email)}$", "$options": "i"},
                                   "id": {"$gt": 0}}, {"id": 1}, sort=[("id", -1)])
    return doc["id"] if doc else None


def profile_id_of(store: Store, uid: Any = None, email: Any = None, profile: Any = None) -> int | None:
    """Sefaria's rule (``CrmInfoStore.get_crm_id``): the profile if given, else the email, else the uid;
    none of them is a ``RuntimeError``. A profile is any object with an ``id`` (Sefaria's ``UserProfile``)
    or a profile document. ``None`` when that does not name a user."""
    if profile:
        pid = profile.get("id") if isinstance(profile, Mapping) else getattr(profile, "id", None)
    elif email:
        pid = user_id_for_email(store, email)
    elif uid:
        pid = uid
    else:
        raise RuntimeError("Expected a uid, email, or profile to be provided")
    if isinstance(pid, bool) or not isinstance(pid, int):
        log.warning("no Sefaria user id for the user given (%s); nothing sent", type(pid).__name__)
        return None
    return pid

