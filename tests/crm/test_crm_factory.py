"""crm_from_env: each CRM_TYPE built from Sefaria's setting names; anything missing or unknown is loud."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import requests

from crm_states.crm.dummy import DummyConnectionManager
from crm_states.crm.errors import CrmConfigError
from crm_states.crm.factory import crm_from_env
from crm_states.crm.http import RetryPolicy
from crm_states.crm.log import LogConnectionManager
from crm_states.crm.nationbuilder import NationbuilderConnectionManager

SECRET = "SENTINEL-secret-value-3f9a"
SALESFORCE = {"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": "https://sefaria.my.salesforce.com",
              "SALESFORCE_CLIENT_ID": "client-id", "SALESFORCE_CLIENT_SECRET": SECRET}
NATIONBUILDER = {"CRM_TYPE": "NATIONBUILDER", "NATIONBUILDER_SLUG": "sefaria", "NATIONBUILDER_TOKEN": SECRET}


@pytest.mark.parametrize("crm_type", ["NONE", "none", " None "])
def test_none_is_the_dummy(crm_type: str) -> None:
    assert isinstance(crm_from_env({"CRM_TYPE": crm_type}), DummyConnectionManager)


def test_log(tmp_path: Path) -> None:
    crm = crm_from_env({"CRM_TYPE": "log", "CRM_LOG_PATH": str(tmp_path / "crm.jsonl")})
    assert isinstance(crm, LogConnectionManager) and crm.path == tmp_path / "crm.jsonl"


def test_nationbuilder_by_slug_and_by_base_url() -> None:
    by_slug = crm_from_env(NATIONBUILDER)
    assert isinstance(by_slug, NationbuilderConnectionManager)
    assert by_slug.base_url == "https://sefaria.nationbuilder.com/api/v1"
    by_url = crm_from_env({"CRM_TYPE": "NationBuilder", "NATIONBUILDER_TOKEN": SECRET,
                           "NATIONBUILDER_BASE_URL": "http://127.0.0.1:9/api/v1"})
    assert isinstance(by_url, NationbuilderConnectionManager) and by_url.base_url == "http://127.0.0.1:9/api/v1"


def test_overrides_reach_the_constructor() -> None:
    session, policy = requests.Session(), RetryPolicy(attempts=1)
    crm = crm_from_env(NATIONBUILDER, session=session, policy=policy, base_url="http://127.0.0.1:9/api/v1")
    assert isinstance(crm, NationbuilderConnectionManager)
    assert crm.get_connection() is session and crm.policy is policy and crm.base_url == "http://127.0.0.1:9/api/v1"


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TYPE", "none")
    assert isinstance(crm_from_env(), DummyConnectionManager)


@pytest.mark.skipif(importlib.util.find_spec("crm_states.crm.salesforce") is None,
                    reason="the Salesforce client is written in parallel")
def test_salesforce() -> None:
    from crm_states.crm.salesforce import SalesforceConnectionManager

    assert isinstance(crm_from_env(SALESFORCE), SalesforceConnectionManager)
    assert isinstance(crm_from_env({**SALESFORCE, "SALESFORCE_API_VERSION": "v61.0"}), SalesforceConnectionManager)


def test_salesforce_schema_settings() -> None:
    from crm_states.crm.salesforce import SalesforceSchema

    assert crm_from_env(SALESFORCE).schema == SalesforceSchema()
    on_contact = crm_from_env({**SALESFORCE, "SALESFORCE_NATIONBUILDER_ID_FIELD": " Contact__r.NationBuilder_Id__c ",
                               "SALESFORCE_APP_USER_KEY_PREFIX": "a0A"})
    assert on_contact.schema == SalesforceSchema(nationbuilder_id_field="Contact__r.NationBuilder_Id__c",
                                                 app_user_key_prefix="a0A")
    given = SalesforceSchema(external_id_field="Sefaria_User_Id__c")  # an override is refined, not replaced
    refined = crm_from_env({**SALESFORCE, "SALESFORCE_NATIONBUILDER_ID_FIELD": "Contact__r.NationBuilder_Id__c"},
                           schema=given)
    assert refined.schema.external_id_field == "Sefaria_User_Id__c"
    assert refined.schema.nationbuilder_id_field == "Contact__r.NationBuilder_Id__c"
    for name, bad in [("SALESFORCE_NATIONBUILDER_ID_FIELD", "Contact__r.NB Id' OR x"),
                      ("SALESFORCE_NATIONBUILDER_ID_FIELD", "a..b"), ("SALESFORCE_APP_USER_KEY_PREFIX", "a0")]:
        with pytest.raises(CrmConfigError, match=name) as caught:
            crm_from_env({**SALESFORCE, name: bad})
        assert bad not in str(caught.value)


@pytest.mark.parametrize("env, missing", [
    *[({**SALESFORCE, name: ""}, name) for name in SALESFORCE if name != "CRM_TYPE"],
    *[({k: v for k, v in SALESFORCE.items() if k != name}, name) for name in SALESFORCE if name != "CRM_TYPE"],
    ({**NATIONBUILDER, "NATIONBUILDER_TOKEN": "  "}, "NATIONBUILDER_TOKEN"),
    ({k: v for k, v in NATIONBUILDER.items() if k != "NATIONBUILDER_SLUG"}, "NATIONBUILDER_SLUG"),
    ({"CRM_TYPE": "LOG"}, "CRM_LOG_PATH"),
])
def test_each_missing_setting_is_named_without_secrets(env: dict[str, str], missing: str) -> None:
    with pytest.raises(CrmConfigError, match=missing) as caught:
        crm_from_env(env)
    assert SECRET not in str(caught.value)


def test_every_missing_setting_is_named_at_once() -> None:
    with pytest.raises(CrmConfigError) as caught:
        crm_from_env({"CRM_TYPE": "salesforce"})
    assert all(name in str(caught.value) for name in SALESFORCE if name != "CRM_TYPE")


@pytest.mark.parametrize("env", [{}, {"CRM_TYPE": ""}, {"CRM_TYPE": "SALESFORCE_SANDBOX"}, {"CRM_TYPE": "dummy"}])
def test_unknown_or_empty_type_is_refused_not_a_silent_dummy(env: dict[str, str]) -> None:
    with pytest.raises(CrmConfigError, match="CRM_TYPE"):
        crm_from_env(env)


def test_a_bad_slug_is_a_config_error_without_the_token() -> None:
    with pytest.raises(CrmConfigError) as caught:
        crm_from_env({**NATIONBUILDER, "NATIONBUILDER_SLUG": "evil.example/"})
    assert SECRET not in str(caught.value)
