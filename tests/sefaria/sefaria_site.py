"""Sefaria's side of the drop-in, written from the facts of Sefaria's code (Sefaria/Sefaria-Project at 4c0ecc1e):
its ``UserProfile`` (load by id or email, whole-document saves of exactly its field list) and each call site
of ``CrmMediator`` with its exact argument shapes and what it does with the answer. Each call site imports
what Sefaria's file imports after the one import change:

    from crm_states.sefaria import CrmMediator                                 # the change
    from sefaria.helper.crm.salesforce import SalesforceNewsletterListRetrievalError   # unchanged

(``stub/sefaria/helper/crm/salesforce.py`` stands for that Sefaria module.)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from pymongo.database import Database

from crm_states.sefaria import CrmMediator
from sefaria.helper.crm.salesforce import SalesforceNewsletterListRetrievalError

#: ``UserProfile.to_mongo_dict``'s fields, exactly: a save replaces the document with these alone.
PROFILE_FIELDS = ("id", "slug", "position", "organization", "jewish_education", "bio", "website", "location",
                  "public_email", "facebook", "twitter", "linkedin", "youtube", "pinned_sheets", "settings",
                  "version_preferences_by_corpus", "attr_time_stamps", "is_sustainer", "experiments", "tag_order",
                  "last_sync_web", "profile_pic_url", "profile_pic_url_small", "gauth_token", "nationbuilder_id",
                  "sf_app_user_id", "gauth_email")


def profile_defaults(uid: Any) -> dict[str, Any]:
    """What a new ``UserProfile`` holds before it is loaded."""
    return {"id": uid, "slug": "", "position": "", "organization": "", "jewish_education": [], "bio": "",
            "website": "", "location": "", "public_email": "", "facebook": "", "twitter": "", "linkedin": "",
            "youtube": "", "pinned_sheets": [], "settings": {"email_notifications": "daily",
                                                           "interface_language": "english"},
            "version_preferences_by_corpus": {}, "attr_time_stamps": {"settings": 0}, "is_sustainer": False,
            "experiments": False, "tag_order": None, "last_sync_web": 0, "profile_pic_url": "",
            "profile_pic_url_small": "", "gauth_token": None, "nationbuilder_id": None, "sf_app_user_id": None,
            "gauth_email": None}


class Sefaria:
    """One Sefaria deployment over a database: its profile model and its call sites. ``logged`` collects
    what the call sites log (level, message), which is all some of them do with the answer."""

    User = User  # Django's user model (emails and names live there)

    def __init__(self, db: Database, *, gravatar_seconds: float = 0.2) -> None:
        self.db = db
        self.gravatar_seconds = gravatar_seconds
        self.logged: list[tuple[str, str]] = []
        self.answers: list[Any] = []  # what create_crm_user answered, per call

    def log(self, level: str, message: str) -> None:
        self.logged.append((level, message))

    # --- sefaria/model/user_profile.py ----------------------------------------------------------------
    def UserProfile(self, id: int | None = None, slug: str | None = None, email: str | None = None,  # noqa: N802
                    user_registration: bool = False) -> UserProfile:
        return UserProfile(self.db, id=id, email=email, user_registration=user_registration)

    # --- sefaria/forms.py SefariaNewUserForm.save, inside process_register_form's transaction ------------
    def _new_user_form_save(self, email: str, first_name: str, last_name: str, lang: str, educator: bool) -> User:
        user = User.objects.create_user(username=email[:150], email=email, password="pw")
        user.first_name, user.last_name = first_name, last_name
        user.save()
        try:
            crm_mediator = CrmMediator()
            self.answers.append(crm_mediator.create_crm_user(user.email, first_name=user.first_name,
                                                             last_name=user.last_name, lang=lang, educator=educator))
        except Exception as e:
            self.log("error", f"failed to add user to CRM: {e}")
        return user

    def import_gravatar(self, p: UserProfile) -> None:
        """A slow network call that only mutates ``p``."""
        time.sleep(self.gravatar_seconds)
        p.profile_pic_url = f"https://gravatar.example/{p.id}.png"

    # --- sefaria/views.py process_register_form ---------------------------------------------------------
    def process_register_form(self, email: str, first_name: str, last_name: str, *, lang: str = "en",
                              educator: bool = False, interface_lang: str = "english",
                              fail_in_transaction: Callable[[], None] | None = None) -> int:
        with transaction.atomic():
            new_user = self._new_user_form_save(email, first_name, last_name, lang, educator)
            p = self.UserProfile(id=new_user.id, user_registration=True)
            p.slug = f"user-{new_user.id}"
            p.settings["interface_language"] = interface_lang
            p.save()
            if fail_in_transaction is not None:
                fail_in_transaction()
        self.import_gravatar(p)
        p.save()  # outside the transaction: a copy loaded before the CRM id was written
        return new_user.id

    # --- sso/adapters.py save_user ----------------------------------------------------------------------
    def sso_save_user(self, email: str, first_name: str, last_name: str, language_code: str | None = "en") -> int:
        with transaction.atomic():
            user = User.objects.create_user(username=email[:150], email=email, first_name=first_name,
                                            last_name=last_name)
            p = self.UserProfile(id=user.id, user_registration=True)
            p.slug = f"user-{user.id}"
            p.save()
        self.import_gravatar(p)
        p.save()
        try:
            self.answers.append(CrmMediator().create_crm_user(user.email, first_name=user.first_name,
                                                              last_name=user.last_name,
                                                              lang=language_code or "en", educator=False))
        except Exception:
            self.log("error", "SSO: failed to create CRM user")
        return user.id

    # --- reader/views.py account_user_update ----------------------------------------------------------------
    def account_user_update(self, user: User, new_email: str) -> dict[str, Any]:
        user.email = new_email
        user.save()
        try:
            crm_mediator = CrmMediator()
            if not crm_mediator.update_user_email(new_email, uid=user.id):
                self.log("warning", "failed to add user to CRM")
        except Exception as e:
            self.log("warning", f"failed to add user to salesforce: {e}")
        return {"status": "ok"}

    # --- sefaria/utils/user.py delete_user_account (confirm=False) ----------------------------------------
    def delete_user_account(self, uid: int) -> bool:
        user = self.UserProfile(id=uid)
        try:
            crm_mediator = CrmMediator()
            if not crm_mediator.mark_for_review_in_crm(profile=user):
                self.log("error", "Failed to mark user for review in CRM")
        except Exception:
            self.log("error", "Failed to mark user for review in CRM")
        self.db.profiles.delete_one({"id": uid})
        User.objects.get(id=uid).delete()
        return True

    # --- sefaria/views.py generic_subscribe_to_newsletter_api + subscribe_sefaria_newsletter -------------------
    def subscribe_to_newsletter_api(self, email: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, JSON reply)``; an exception the view does not catch is Django's 500."""
        try:
            return 200, self._generic_subscribe(email, json.dumps(body))
        except Exception:
            return 500, {"error": "server error"}

    def _generic_subscribe(self, email: str, request_body: str) -> dict[str, Any]:
        body = json.loads(request_body)
        first_name, last_name = body.get("firstName"), body.get("lastName")
        if not first_name or not last_name:
            return {"error": "You must provide first and last name."}
        try:
            if self._subscribe_sefaria_newsletter(request_body, email, first_name, last_name):
                return {"status": "ok"}
            self.log("error", "Failed to subscribe to list")
            return {"error": "Sorry, there was an error."}
        except ValueError as e:
            self.log("error", f"Failed to subscribe to list: {e}")
            return {"error": "Sorry, there was an error."}

    def _subscribe_sefaria_newsletter(self, request_body: str, email: str, first_name: str, last_name: str) -> Any:
        body = json.loads(request_body)
        language = body.get("language", "")
        educator = body.get("educator", False)
        mailing_lists = body.get("lists", [])
        crm_mediator = CrmMediator()
        return crm_mediator.subscribe_to_lists(email, first_name, last_name, educator=educator, lang=language,
                                               mailing_lists=mailing_lists)

    # --- sefaria/views.py get_available_newsletter_mailing_lists ---------------------------------------------
    def get_available_newsletter_mailing_lists(self) -> tuple[int, dict[str, Any]]:
        try:
            return 200, {"newsletter_mailing_lists": CrmMediator().get_available_lists()}
        except SalesforceNewsletterListRetrievalError as e:
            return 502, {"error": str(e)}
        except Exception:
            return 500, {"error": "Unknown error occurred"}

    # --- sefaria/views.py purge_spammer_account_data (the CRM part) --------------------------------------------
    def purge_spammer_account_data(self, spammer_id: int, delete_from_crm: bool = True) -> None:
        profile = self.db.profiles.find_one({"id": spammer_id})
        if delete_from_crm:
            try:
                crm_connection_manager = CrmMediator().get_connection_manager()
                crm_connection_manager.mark_as_spam_in_crm(profile)
            except Exception as e:
                self.log("error", f"Failed to mark user as spam: {e}")

    # --- scripts/scheduled/nation_builder_sync.py (weekly cron; no try) ---------------------------------------
    def nation_builder_sync(self) -> None:
        crm_mediator = CrmMediator()
        crm_mediator.sync_sustainers()


class UserProfile:
    """Sefaria's ``UserProfile``: loads ``db.profiles.find_one({"id": id})`` into attributes; ``save()``
    replaces the whole document with ``to_mongo_dict()`` (``insert_one`` when new)."""

    def __init__(self, db: Database, id: int | None = None, email: str | None = None,
                 user_registration: bool = False) -> None:
        self._db = db
        if email and not id:
            try:
                id = User.objects.get(email__iexact=email).id
            except Exception:
                pass
        self._id = None
        for name, value in profile_defaults(id).items():
            setattr(self, name, value)
        doc = db.profiles.find_one({"id": id})
        if doc:
            self._id = doc["_id"]
            for name in PROFILE_FIELDS:
                if name in doc:
                    setattr(self, name, copy.deepcopy(doc[name]))
        elif not user_registration and id is not None and User.objects.filter(id=id).exists():
            self.save()

    def to_mongo_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROFILE_FIELDS}

    def save(self) -> None:
        d = self.to_mongo_dict()
        if self._id:
            self._db.profiles.replace_one({"_id": self._id}, d, upsert=True)
        else:
            self._id = self._db.profiles.insert_one(d).inserted_id
