"""CRM_TYPE=NONE: accepts every write, refuses every read, and its ids can never pass for real ones."""

from __future__ import annotations

import pytest
import requests

from crm_states.crm.dummy import (
    DUMMY_ID_PREFIX,
    DummyConnectionManager,
    dummy_id,
    is_dummy_id,
)
from crm_states.crm.errors import CrmNotSupported


def test_ids_are_deterministic_placeholders() -> None:
    crm = DummyConnectionManager()
    first = crm.add_user_to_crm("Ada@Example.org", "Ada", "L")
    assert first == crm.add_user_to_crm(" ada@example.org", "Other", "Name", lang="he", educator=True)
    assert first != crm.add_user_to_crm("bob@example.org", "Bob", "L")
    assert first.startswith(DUMMY_ID_PREFIX) and is_dummy_id(first)


def test_external_id_wins_over_email() -> None:
    crm = DummyConnectionManager()
    by_external = crm.add_user_to_crm("a@example.org", "A", "L", external_id=7)
    assert by_external == crm.add_user_to_crm("b@example.org", "B", "L", external_id="7")
    assert by_external == dummy_id("external:7") and by_external != crm.add_user_to_crm("a@example.org", "A", "L")


def test_real_ids_and_sefarias_true_are_not_dummy_ids() -> None:
    assert not any(is_dummy_id(v) for v in (True, 1, "12345", "a0X5e000001AbCdEAF", None, "pending:abc"))


def test_writes_do_nothing() -> None:
    crm = DummyConnectionManager()
    crm_id = crm.add_user_to_crm("a@example.org", "A", "L")
    assert crm.change_user_email(crm_id, "b@example.org") is True  # Sefaria's truthy answers
    assert crm.add_email_to_mailing_lists("a@example.org", ["L1"]) is None
    assert crm.subscribe_to_lists("a@example.org", mailing_lists=["L1"]) is True
    assert crm.mark_as_spam_in_crm(crm_id) is True and crm.mark_for_review_in_crm(crm_id) is True
    assert isinstance(crm.get_connection(), requests.Session) and crm.name == "none"
    assert crm.api_requests == 0


READS = {
    "find_app_users_by_nationbuilder_ids": (lambda crm: crm.find_app_users_by_nationbuilder_ids([1, 2]), ("SALESFORCE",)),
    "find_crm_id": (lambda crm: crm.find_crm_id("a@example.org"), ("SALESFORCE", "NATIONBUILDER")),
    "get_sustainers": (lambda crm: crm.get_sustainers(), ("SALESFORCE", "NATIONBUILDER")),
    "get_available_lists": (lambda crm: crm.get_available_lists(), ("SALESFORCE",)),
}


@pytest.mark.parametrize("method", list(READS))
def test_reads_are_refused_never_answered_empty(method: str) -> None:
    """An empty answer would be a verdict ("not in Salesforce", "no sustainers") from a CRM never asked."""
    read, needs = READS[method]
    with pytest.raises(CrmNotSupported) as caught:
        read(DummyConnectionManager())
    assert caught.value.needs == needs and method in str(caught.value)
    assert str(caught.value).startswith("CRM_TYPE=NONE cannot answer reads")


def test_the_batched_lookups_have_no_honest_nothing() -> None:
    crm = DummyConnectionManager()
    for call in (lambda: crm.lookup_app_users_by_nationbuilder_ids([1]),
                 lambda: crm.lookup_app_users_by_emails(["a@example.org"])):
        with pytest.raises(CrmNotSupported, match="CRM_TYPE=SALESFORCE") as caught:
            call()
        assert caught.value.needs == ("SALESFORCE",)
