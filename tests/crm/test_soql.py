"""``soql_quote`` against the fake's tokenizer: no text can end a literal early or change the query."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.crm.errors import CrmInvalidInput, CrmRejected
from crm_states.crm.http import RetryPolicy
from crm_states.crm.salesforce import SalesforceConnectionManager, TokenCache, soql_quote
from crm_states.testing.salesforce import FakeSalesforce, SoqlError, Token, parse_soql, tokenize_soql

USER = "Sefaria_App_User__c"
EMAIL = "Sefaria_App_Email__c"

#: Text heavy in the characters SOQL reserves, mixed with everything else.
# Any text a request can carry: lone surrogates cannot be encoded, and are refused (test below).
evil_text = st.text(st.one_of(st.sampled_from("\\'\"\n\r\t\f\b %_()=,"),
                              st.characters(blacklist_categories=("Cs",))), max_size=40)


@pytest.mark.parametrize(("text", "literal"), [
    ("plain", "'plain'"),
    ("o'hara", r"'o\'hara'"),
    ('say "hi"', r"""'say \"hi\"'"""),
    ("back\\slash", r"'back\\slash'"),
    ("\n\r\t\f\b", r"'\n\r\t\f\b'"),
    ("100%_", "'100%_'"),
    ("", "''"),
    ("\\'", r"'\\\''"),
])
def test_soql_quote_escapes_reserved_characters(text, literal):
    assert soql_quote(text) == literal


@pytest.mark.parametrize("value", [1, None, b"bytes", 1.5])
def test_soql_quote_only_takes_text(value):
    with pytest.raises(TypeError):
        soql_quote(value)


@pytest.mark.parametrize("soql", ["'open", "'bad \\x escape'", "'ends in backslash\\", "#"])
def test_the_tokenizer_refuses_what_salesforce_refuses(soql):
    with pytest.raises(SoqlError):
        tokenize_soql(soql)


def test_the_tokenizer_knows_upper_case_escapes():
    assert tokenize_soql(r"'\N\R\T\B\F'") == [Token("string", "\n\r\t\b\f")]


@given(evil_text)
def test_a_quoted_text_is_exactly_one_literal(text):
    assert tokenize_soql(soql_quote(text)) == [Token("string", text)]


@given(evil_text, evil_text)
def test_quoted_texts_cannot_change_the_query_around_them(first, second):
    soql = f"SELECT Id FROM {USER} WHERE {EMAIL} IN ({soql_quote(first)}, {soql_quote(second)}) LIMIT 2"
    parsed = parse_soql(soql)
    assert (parsed.where_field, parsed.values, parsed.limit) == (EMAIL, (first, second), 2)


@pytest.fixture(scope="module")
def org() -> Iterator[tuple[FakeSalesforce, SalesforceConnectionManager]]:
    """One fake for every hypothesis example (function fixtures are not reset between examples)."""
    with FakeSalesforce() as fake:
        client = SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret,
                                             session=fake.client_session(), policy=RetryPolicy(attempts=1),
                                             sleep=lambda s: None, token_cache=TokenCache())
        yield fake, client


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evil=evil_text)
def test_find_crm_id_sends_exactly_the_email_it_was_given(org, evil):
    fake, client = org
    target = fake.insert(USER, {EMAIL: evil})
    before = len(fake.soql_log)
    if evil == "":  # no email names nobody: refused, as Sefaria's find_crm_id(email=None) is
        with pytest.raises(CrmInvalidInput):
            client.find_crm_id(evil)
        assert len(fake.soql_log) == before
        return
    found = client.find_crm_id(evil)
    (soql,) = fake.soql_log[before:]
    parsed = parse_soql(soql)
    assert (parsed.sobject, parsed.where_field, parsed.values) == (USER, EMAIL, (evil,))
    # earlier examples may hold the same email in another case (Salesforce compares case-insensitively)
    assert found == target or fake.record(USER, found)[EMAIL].lower() == evil.lower()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.text(max_size=10), surrogate=st.characters(whitelist_categories=("Cs",)))
def test_text_with_a_lone_surrogate_is_refused_before_any_request(org, before, surrogate):
    fake, client = org
    sent = len(fake.soql_log)
    with pytest.raises(CrmRejected, match="lone surrogate"):
        client.find_crm_id(before + surrogate + "@example.org")
    assert len(fake.soql_log) == sent
