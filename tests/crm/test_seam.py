"""Code written against Sefaria's ``CrmConnectionManager`` works against every one of ours.

Sefaria's names, arguments and defaults, its truthy answers, and its validators (Django's email rule;
a name rule that no longer refuses real names), over real HTTP where the CRM has one.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest_nb import clock, nb, nb_client  # noqa: F401 (fixtures)
from crm_states.crm import CrmNotSupported, CrmRejected
from crm_states.crm.base import CrmConnectionManager, requests_sent
from crm_states.crm.dummy import DummyConnectionManager
from crm_states.crm.errors import CrmInvalidInput
from crm_states.crm.log import LogConnectionManager
from crm_states.crm.memory import InMemoryCrm
from crm_states.crm.nationbuilder import NationbuilderConnectionManager
from crm_states.crm.salesforce import SalesforceConnectionManager
from crm_states.crm.validation import validate_email, validate_name

MANAGERS = [SalesforceConnectionManager, NationbuilderConnectionManager, LogConnectionManager,
            DummyConnectionManager, InMemoryCrm]
E = inspect.Parameter.empty
#: Sefaria's signatures (sefaria/helper/crm/crm_connection_manager.py): (name, default) after ``self``.
SEFARIA = {
    "add_user_to_crm": [("email", E), ("first_name", E), ("last_name", E), ("lang", "en"), ("educator", False)],
    "change_user_email": [(None, E), ("new_email", E)],  # Sefaria's first parameter is "uid", ours "crm_id"
    "mark_as_spam_in_crm": [("crm_id", E)],
    "mark_for_review_in_crm": [("crm_id", E)],
    "subscribe_to_lists": [("email", E), ("first_name", None), ("last_name", None), ("educator", False),
                           ("lang", "en"), ("mailing_lists", None)],
    "find_crm_id": [("email", None)],
}


# -- signatures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("manager", MANAGERS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("method", sorted(SEFARIA))
def test_every_manager_has_sefarias_signature(manager: type, method: str) -> None:
    params = list(inspect.signature(getattr(manager, method)).parameters.values())[1:]
    got = [(p.name, p.default) for p in params]
    want = SEFARIA[method]
    assert [(n if w is not None else None, d) for (n, d), (w, _) in zip(got, want)] == want, got
    extra = got[len(want):]
    assert all(d is not E for _, d in extra), f"extra arguments must be optional: {extra}"
    if method == "add_user_to_crm":
        assert extra == [("external_id", None)]


@pytest.mark.parametrize("manager", MANAGERS, ids=lambda m: m.__name__)
def test_the_validators_are_static_with_sefarias_names(manager: type) -> None:
    for name in ("validate_email", "validate_name"):
        assert isinstance(inspect.getattr_static(manager, name), staticmethod)
        assert list(inspect.signature(getattr(manager, name)).parameters) == ["name"]
    assert manager.validate_email("a@example.org") is True and manager.validate_name("Ruth") is True


# -- validate_email: Django's EmailValidator, decision for decision -------------------------------------

django_validators = pytest.importorskip("django.core.validators")
from django.core.exceptions import ValidationError  # noqa: E402

_DJANGO = django_validators.EmailValidator()


def django_accepts(value: str) -> bool:
    try:
        _DJANGO(value)
    except ValidationError:
        return False
    return True


EMAIL_CHARS = "aZ09.-_+'\"\\@[]:() !#ßאé\u00a1\uffff\U0001f642\x00\n\x7f"
emailish = st.one_of(
    st.emails(),
    st.text(alphabet=EMAIL_CHARS, max_size=30),
    st.builds("{}@{}".format, st.text(alphabet=EMAIL_CHARS, max_size=12), st.text(alphabet=EMAIL_CHARS, max_size=12)),
    st.builds("{}@[{}]".format, st.from_regex(r"\A[a-z]{1,4}\Z"), st.ip_addresses().map(str)),
)


@settings(max_examples=400, deadline=None)
@given(value=emailish)
@example("ruth@example.org")
@example("o'hara@example.org")
@example('"quoted local"@example.org')
@example("user@localhost")
@example("x@y")
@example("a@b.c")
@example("a@xn--bcher-kva.ch")
@example("a@bücher.ch")
@example("a@münchen.de")
@example("אב@example.org")
@example("a@[127.0.0.1]")
@example("a@[::1]")
@example("a@[1:2:3:4:5:6:7:8:9]")
@example("a@[0000:0000:0000:0000:0000:0000:0000:0001]")
@example("a@-example.org")
@example("a@example-.org")
@example("a..b@example.org")
@example("a@" + "x" * 63 + ".org")
@example("a@" + "x" * 64 + ".org")
@example("a" * 310 + "@example.org")
@example("a@example.org\n")
def test_validate_email_decides_as_djangos_email_validator(value: str) -> None:
    ours = True
    try:
        validate_email(value)
    except ValueError as exc:
        assert str(exc) == "Invalid Email" and isinstance(exc, CrmInvalidInput)
        ours = False
    assert ours == django_accepts(value), value


@pytest.mark.parametrize("value", [None, 42, b"a@example.org", ["a@example.org"]], ids=repr)
def test_validate_email_refuses_what_is_not_text(value: Any) -> None:
    with pytest.raises(ValueError, match="^Invalid Email$"):
        validate_email(value)


# -- validate_name: lenient where Sefaria's rule refused real names ------------------------------------------

@pytest.mark.parametrize("name", ["O'Brien", "Levi-Abravanel", "רבקה", "בן-עמי", "Zoë", "D'Artagnan de la Vega",
                                  "Maximilian Alexander von Habsburg-Lothringen", "x" * 255, "A", " Ruth ",
                                  "\u200f\u05e9\u05dc\u05d5\u05dd", "李小龍", "🙂"])
def test_validate_name_accepts_real_names(name: str) -> None:
    assert validate_name(name) is True


@pytest.mark.parametrize("name", ["", "   ", "\t\n", "a\x00b", "line\nbreak", "bell\x07", "\x7f", "x" * 256,
                                  "a\ud800b", None, 7, ["Ruth"]], ids=repr)
def test_validate_name_refuses_what_cannot_be_a_name(name: Any) -> None:
    with pytest.raises(ValueError, match="^Invalid Name$") as caught:
        validate_name(name)
    assert isinstance(caught.value, CrmRejected)


# -- behaviour, as Sefaria's code calls it ---------------------------------------------------------------

def sefaria_style_session(crm: CrmConnectionManager) -> dict[str, Any]:
    """What Sefaria's helpers do with a manager, in Sefaria's calling style (positional, truthy checks)."""
    crm_id = crm.add_user_to_crm("ruth@example.org", "Ruth", "O'Brien-Levi", "he", True)
    assert crm_id and isinstance(crm_id, str)
    return {
        "id": crm_id,
        "email": crm.change_user_email(crm_id, "ruth.new@example.org"),
        "subscribe": crm.subscribe_to_lists("ruth.new@example.org", "Ruth", "O'Brien-Levi", mailing_lists=["Weekly"]),
        "subscribe_default": crm.subscribe_to_lists("reader@example.org"),
        "review": crm.mark_for_review_in_crm(crm_id),
        "spam": crm.mark_as_spam_in_crm(crm_id),
    }


def assert_refuses_bad_input_before_sending(crm: CrmConnectionManager, sent: Any) -> None:
    before = sent()
    for call, message in [
        (lambda: crm.subscribe_to_lists("not an email", "Ruth"), "Invalid Email"),
        (lambda: crm.subscribe_to_lists("ok@example.org", "Ru\x00th"), "Invalid Name"),
        (lambda: crm.subscribe_to_lists("ok@example.org", "Ruth", "x" * 256), "Invalid Name"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            call()
    with pytest.raises(CrmInvalidInput):
        crm.find_crm_id()
    assert sent() == before


def test_salesforce(fake, client) -> None:
    answers = sefaria_style_session(client)
    assert {k: v for k, v in answers.items() if k != "id"} == dict.fromkeys(
        ["email", "subscribe", "subscribe_default", "review", "spam"], True)
    user = fake.record("Sefaria_App_User__c", answers["id"])
    assert user["Sefaria_App_Email__c"] == "ruth.new@example.org" and user["Manual_Review_Required__c"] is True
    lists = [json.loads(r["JSON_STRING__c"])["Newsletter_Names__c"] for r in fake.records("Sefaria_App_Data__c")]
    assert lists == [["Weekly"], []]
    assert client.find_crm_id(email="ruth.new@example.org") == answers["id"]
    assert_refuses_bad_input_before_sending(client, lambda: fake.total_requests)


def test_nationbuilder(nb, nb_client) -> None:  # noqa: F811 (fixtures)
    answers = sefaria_style_session(nb_client)
    assert set(answers.values()) == {answers["id"], True}
    assert nb_client.api_requests == nb.total_requests
    assert_refuses_bad_input_before_sending(nb_client, lambda: nb.total_requests)
    for call in (lambda: nb_client.lookup_app_users_by_nationbuilder_ids([1]),
                 lambda: nb_client.lookup_app_users_by_emails(["a@example.org"])):
        with pytest.raises(CrmNotSupported, match="CRM_TYPE=SALESFORCE"):
            call()


def test_log(tmp_path: Path) -> None:
    crm = LogConnectionManager(tmp_path / "crm.log")
    answers = sefaria_style_session(crm)
    assert answers["id"].startswith("pending:") and set(answers.values()) == {answers["id"], True}
    lines = (tmp_path / "crm.log").read_text().splitlines()
    methods = [json.loads(line)["method"] for line in lines]
    assert methods == ["add_user_to_crm", "change_user_email", "add_email_to_mailing_lists",
                       "add_email_to_mailing_lists", "mark_for_review_in_crm", "mark_as_spam_in_crm"]
    assert_refuses_bad_input_before_sending(crm, lambda: (tmp_path / "crm.log").read_text())
    assert crm.api_requests == 0
    with pytest.raises(CrmNotSupported, match="the log CRM cannot answer lookup_app_users_by_emails"):
        crm.lookup_app_users_by_emails(["a@example.org"])


def test_dummy_and_memory() -> None:
    for crm in (DummyConnectionManager(), InMemoryCrm()):
        answers = sefaria_style_session(crm)
        assert set(answers.values()) == {answers["id"], True}
        calls = len(getattr(crm, "calls", []))
        assert_refuses_bad_input_before_sending(crm, lambda: len(getattr(crm, "calls", [])))
        assert crm.api_requests == calls


def test_a_subclass_that_adds_nothing_still_refuses_lookups_clearly() -> None:
    class Minimal(DummyConnectionManager):
        name = "minimal"

    with pytest.raises(CrmNotSupported) as caught:
        Minimal().lookup_app_users_by_nationbuilder_ids([1])
    assert "minimal" in str(caught.value).lower() and caught.value.needs == ("SALESFORCE",)


def test_requests_sent_reads_a_clients_count_and_never_fails_on_the_asking() -> None:
    class Uncounting(DummyConnectionManager):
        name = "uncounting"
        api_requests = CrmConnectionManager.api_requests  # the base's: raises CrmNotSupported

    class Odd:
        api_requests = "12"

    class Flag:
        api_requests = True

    crm = InMemoryCrm()
    crm.add_user_to_crm("a@example.org", "A", "B")
    assert requests_sent(crm) == crm.api_requests >= 1
    with pytest.raises(CrmNotSupported):
        Uncounting().api_requests
    assert requests_sent(Uncounting()) == 0
    assert [requests_sent(x) for x in (None, object(), Odd(), Flag())] == [0, 0, 0, 0]
