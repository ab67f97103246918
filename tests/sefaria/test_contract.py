"""The drop-in's contract with Sefaria's source: every public method with Sefaria's exact signature and
defaults, ``ValueError`` for an invalid email before anything is sent, the user resolved from profile, else
email, else uid, the lenient names, ``get_and_save_crm_id``, and the list-retrieval error class."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import pytest
from django.core.exceptions import ValidationError
from django.core.validators import validate_email as django_validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.sefaria import CrmMediator, SalesforceNewsletterListRetrievalError
from crm_states.sefaria.mediator import retrieval_error
from crm_states.testing import FakeSalesforce
from machines import change_email, mark_as_spam

APP_USER = "Sefaria_App_User__c"

pytestmark = pytest.mark.usefixtures("django_project")

#: Sefaria's CrmMediator (sefaria/helper/crm/crm_mediator.py at 4c0ecc1e), with its defaults.
SEFARIA_SIGNATURES = {
    "create_crm_user": "(email, first_name, last_name, lang='en', educator=False)",
    "subscribe_to_lists": "(email, first_name, last_name, educator=False, lang='en', mailing_lists=None)",
    "sync_sustainers": "()",
    "mark_as_spam_in_crm": "(uid=None, email=None, profile=None)",
    "mark_for_review_in_crm": "(uid=None, email=None, profile=None)",
    "update_user_email": "(new_email, uid=None, email=None, profile=None)",
    "get_and_save_crm_id": "(email=None)",
    "get_available_lists": "()",
}


def bare(signature: inspect.Signature) -> str:
    """The signature as Sefaria's untyped source spells it: names, kinds and defaults only."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=inspect.Signature.empty))


def test_every_method_has_sefarias_exact_signature() -> None:
    assert bare(inspect.signature(CrmMediator)) == "()"
    for name, expected in SEFARIA_SIGNATURES.items():
        method = getattr(CrmMediator, name)
        assert bare(inspect.signature(method)).replace("(self, ", "(").replace("(self)", "()") == expected, name
    assert issubclass(SalesforceNewsletterListRetrievalError, Exception)


def not_an_email(text: str) -> bool:
    try:
        django_validate_email(text)
    except ValidationError:
        return True
    return False


INVALID = st.one_of(st.sampled_from(["", " ", "a", "a@", "@example.org", "a b@example.org", "a@b", "a@@b.org",
                                     "a@example.org\n", "<a@example.org>", "a@-example.org"]),
                    st.text(max_size=30).filter(not_an_email))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(email=INVALID)
def test_an_invalid_email_is_a_value_error_before_anything_is_sent(sefaria, fake: FakeSalesforce, email: str) -> None:
    mediator = CrmMediator()
    before = fake.total_requests
    calls = [lambda: mediator.create_crm_user(email, "A", "B"),
             lambda: mediator.subscribe_to_lists(email, "A", "B"),
             lambda: mediator.subscribe_to_lists(email, "A", "B", mailing_lists=[]),
             lambda: mediator.update_user_email(email, uid=1),
             lambda: mediator.get_and_save_crm_id(email)]
    for call in calls:
        with pytest.raises(ValueError, match="Invalid Email"):
            call()
    assert fake.total_requests == before
    assert mediator.app.store.positions.count_documents({}) == 0


def test_names_sefaria_refused_are_accepted(sefaria, fake: FakeSalesforce) -> None:
    """Sefaria's validate_name refuses apostrophes and names of 20 characters or more: a known defect."""
    mediator = CrmMediator()
    for first, last in [("Ya'akov", "O'Sullivan"), ("Maximiliana-Josephine", "Wolfeschlegelsteinhausen"),
                        ("יעקב", "בן-דוד"), ("Zoë", "Nuñez y Ortega")]:
        assert mediator.subscribe_to_lists("reader@example.org", first, last) is True
    for first in ("", None):  # Sefaria's view refuses these itself; the mediator lets them through
        assert mediator.subscribe_to_lists("reader@example.org", first, "Levi") is True
    with pytest.raises(ValueError, match="Invalid Name"):
        mediator.subscribe_to_lists("reader@example.org", "Tab\there", "Levi")


@pytest.fixture
def three(sefaria, db):  # type: ignore[no-untyped-def]
    """Three users with app users: (ids, {id: app user id})."""
    ids = [sefaria.sso_save_user(f"u{i}@example.org", "U", str(i)) for i in range(3)]
    return ids, {uid: db.profiles.find_one({"id": uid})["sf_app_user_id"] for uid in ids}


@pytest.mark.parametrize("method", ["mark_as_spam_in_crm", "mark_for_review_in_crm", "update_user_email"])
def test_the_user_is_the_profile_else_the_email_else_the_uid(three, fake: FakeSalesforce, method: str) -> None:
    (a, b, c), app_users = three
    mediator = CrmMediator()
    call = getattr(mediator, method)
    args = ("changed@example.org",) if method == "update_user_email" else ()
    field = "Sefaria_App_Email__c" if method == "update_user_email" else "Manual_Review_Required__c"
    changed = "changed@example.org" if method == "update_user_email" else True

    def touched() -> set[int]:
        return {uid for uid in (a, b, c) if fake.record(APP_USER, app_users[uid]).get(field) == changed}

    assert call(*args, uid=a, email="u1@example.org", profile=SimpleNamespace(id=c, email="x")) is True
    assert touched() == {c}
    assert call(*args, uid=a, email="U1@Example.org") is True
    assert touched() == {b, c}
    assert call(*args, uid=a) is True
    assert touched() == {a, b, c}
    before = fake.total_requests
    with pytest.raises(RuntimeError, match="Expected a uid, email, or profile"):
        call(*args)
    assert call(*args, profile=SimpleNamespace(id=None)) is False  # a UserProfile of nobody
    assert call(*args, email="nobody@example.org") is False
    assert fake.total_requests == before
    machine = change_email.NAME if method == "update_user_email" else mark_as_spam.NAME
    assert mediator.app.position(a, machine).state.startswith("Wrote")


def test_get_and_save_crm_id(sefaria, db, fake: FakeSalesforce) -> None:
    mediator = CrmMediator()
    user = sefaria.User.objects.create_user(username="m", email="miriam@example.org")
    db.profiles.insert_one({"id": user.id})
    existing = fake.insert(APP_USER, {"Sefaria_App_Email__c": "miriam@example.org"})
    assert mediator.get_and_save_crm_id("miriam@example.org") == existing
    assert db.profiles.find_one({"id": user.id})["sf_app_user_id"] == existing
    assert mediator.get_and_save_crm_id("absent@example.org") is False
    assert mediator.get_and_save_crm_id() is False
    db.profiles.update_one({"id": user.id}, {"$set": {"sf_app_user_id": "a0B000000000001AAA"}})
    assert mediator.get_and_save_crm_id("miriam@example.org") == existing  # found, but never written over another
    assert db.profiles.find_one({"id": user.id})["sf_app_user_id"] == "a0B000000000001AAA"


def test_the_retrieval_error_is_sefarias_class_too_when_sefaria_has_loaded_it() -> None:
    from sefaria.helper.crm import salesforce as theirs

    error = retrieval_error("Unable to retrieve newsletter mailing lists")
    assert isinstance(error, SalesforceNewsletterListRetrievalError)
    assert isinstance(error, theirs.SalesforceNewsletterListRetrievalError)
    assert type(retrieval_error("again")) is type(error)
    saved = sys.modules.pop("sefaria.helper.crm.salesforce")
    try:
        assert type(retrieval_error("no Sefaria")) is SalesforceNewsletterListRetrievalError
    finally:
        sys.modules["sefaria.helper.crm.salesforce"] = saved
