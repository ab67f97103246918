"""5. Hostile input: SOQL injection attempts, quotes, backslashes, Hebrew and RTL marks, emoji, 10,000
characters, empty, None, and wrong types in the profile document.

No crash of the batch; no injection (every SOQL the fake received parses with its ``parse_soql`` and its
literals equal the inputs); a clear error recorded on the profile in question, and the others unharmed.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import TokenCache
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import POSITIONS, Store
from crm_states.testing import FakeSalesforce
from crm_states.testing.salesforce import parse_soql
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.reliability.checks import APP_USER, check_histories, cli, cli_env, record

POLICY = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0, read_timeout=5.0)
INT64_MAX = 2**63 - 1
INJECTIONS = [
    "' OR Id != null OR Sefaria_App_Email__c = '",
    "\\' OR 1=1 --",
    "x') OR NationBuilder_Id__c IN ('1",
    "'; DELETE FROM Sefaria_App_User__c; --",
    "\\", "\\\\'", "'", "''", '"', "\\'", "%27%20OR%201%3D1", "1' LIMIT 1", "NULL", "null",
    "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd\u200e", "רבקה בת-שבע", "\u05d0'\u05d1\"\u05d2\\",
    "🙂👨‍👩‍👧‍👦", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\x00", "\n\r\t\b\f", " ", "",
    "a" * 10_000, "\u05d0" * 10_000,
]
SOQL_CHARS = "'\"\\%_*()=,;.@ \n\r\t\u200f\u202e\u05d0\u05e9😀aZ09"
hostile_text = st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=40),
                         st.text(alphabet=SOQL_CHARS, max_size=40))
wrong_types = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=INT64_MAX), st.floats(),
    st.lists(st.integers(-3, 3) | st.text(max_size=4), max_size=3),
    st.dictionaries(st.sampled_from(["a", "id", "nationbuilder_id"]), st.integers(-3, 3), max_size=2),
)
emails = st.one_of(hostile_text, st.builds("{}@{}.org".format, hostile_text, hostile_text), wrong_types)
names = st.one_of(hostile_text, wrong_types)
nationbuilder_ids = st.one_of(
    st.integers(min_value=1, max_value=INT64_MAX), st.integers(min_value=-(2**63), max_value=0),
    st.from_regex(r"\A\s?[0-9]{1,18}\s?\Z"), hostile_text, wrong_types,
)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_ids = itertools.count(1_000_000)


def _crm(fake: FakeSalesforce) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=POLICY,
                                       sleep=lambda s: None, token_cache=TokenCache())


@pytest.fixture(scope="module")
def hostile_db(mongo_client) -> Iterator[Any]:
    name = "reliability_hostile"
    mongo_client.drop_database(name)
    yield mongo_client[name]
    mongo_client.drop_database(name)


# --- oracles -------------------------------------------------------------------------------------------

def _falsy(value: Any) -> bool:
    """What the runner's pending filter (``$nin: [None, False, 0, ""]``) leaves out, as MongoDB compares."""
    if value is None or value is False or (isinstance(value, str) and value == ""):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def expected_nationbuilder_id(value: Any) -> int | str | None:
    """None: the runner does not select the profile; an int: the id looked up; "error": ScriptFailureLogged
    with an error naming nationbuilder_id."""
    if _falsy(value) or (isinstance(value, list) and any(_falsy(v) for v in value)):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else "error"
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip()):  # ASCII digits only
        number = int(value.strip())
        return number if 0 < number <= INT64_MAX else "error"
    return "error"


def assert_soql_is_ours(fake: FakeSalesforce, where_field: str, literals: set[str]) -> None:
    """Every SOQL text the fake received parses, filters on ``where_field``, and carries exactly the inputs."""
    seen: set[Any] = set()
    for text in fake.soql_log:
        query = parse_soql(text)  # raises on anything outside the grammar: an injection would
        assert query.sobject == APP_USER and query.where_field == where_field, text[:300]
        seen.update(query.values)
    assert seen == literals


# --- NationBuilder-profile validation ---------------------------------------------------------------------

def _validate_batch(db: Any, values: list[Any], extras: list[dict[str, Any]]) -> None:
    first = next(_ids)
    for _ in values[1:]:
        next(_ids)
    docs = [{"id": first + i, "nationbuilder_id": v, **extra} for i, (v, extra) in enumerate(zip(values, extras))]
    good = [{"id": next(_ids), "nationbuilder_id": 424_242}, {"id": next(_ids), "nationbuilder_id": 434_343}]
    db.profiles.insert_many(docs + good)
    ids = [d["id"] for d in docs + good]
    expected = {d["id"]: expected_nationbuilder_id(d["nationbuilder_id"]) for d in docs + good}
    with FakeSalesforce() as fake:
        app_users = {n: fake.insert(APP_USER, {"NationBuilder_Id__c": str(n)})
                     for n in {v for v in expected.values() if isinstance(v, int) and v % 2 == 0}}
        report = ValidationRunner(CrmStates.open(db, _crm(fake)), RunnerConfig(chunk_size=10_000)).run()  # no crash
        assert report.stopped is None
        looked_up = {str(v) for v in expected.values() if isinstance(v, int)}
        assert_soql_is_ours(fake, "NationBuilder_Id__c", looked_up)
    profiles = {p["id"]: p for p in db.profiles.find({"id": {"$in": ids}})}
    positions = Store(db).positions_of(nb.NAME, ids)
    for pid, want in expected.items():
        profile = profiles[pid]
        state = positions.get(pid)
        if want is None:
            assert state is None, (profile["nationbuilder_id"], state)
        elif want in ("error", "unclear error"):
            assert state.state == "ScriptFailureLogged", (f"{profile['nationbuilder_id']!r:.80}", state)
            error = state.detail["error"]
            assert want != "error" or "nationbuilder_id" in error, f"{profile['nationbuilder_id']!r:.80}: {error}"
        else:
            assert state.state == ("WroteSalesforceAppUserUid" if want in app_users else "WroteNotFound")
            assert state.detail["nationbuilder_id"] == want
            assert profile.get("sf_app_user_id") == app_users.get(want)
    check_histories(db, nb.SPEC, {"id": {"$in": ids}}).assert_clean()


@SETTINGS
@given(values=st.lists(nationbuilder_ids, min_size=1, max_size=8),
       extras=st.lists(st.fixed_dictionaries({"email": emails, "first_name": names, "last_name": names}),
                       min_size=8, max_size=8))
@example(values=["12' OR NationBuilder_Id__c != '", " 77 ", "0", "-5", "5.0", "1" * 10_000, "١٢٣", "a" * 10_000],
         extras=[{"email": None, "first_name": [], "last_name": {}}] * 8)
@example(values=[True, False, [], [0], [1, 2], {}, {"a": 1}, float("nan")],
         extras=[{"email": "\u202e@x", "first_name": "🙂", "last_name": "x" * 10_000}] * 8)
def test_hostile_profile_documents_in_one_validation_batch(hostile_db, values: list[Any],
                                                          extras: list[dict[str, Any]]) -> None:
    _validate_batch(hostile_db, values, extras)


def test_a_nationbuilder_id_too_large_for_mongodb_is_an_error_not_a_crash(db, mongo_url: str, tmp_path) -> None:
    """A digit string beyond a 64-bit int (what ``int()`` gives cannot be stored in BSON): the runner
    must record an error on that profile and validate the rest of its batch, run after run."""
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 600 + i} for i in range(1, 6)]
                            + [{"id": 6, "nationbuilder_id": "99999999999999999999"}])
    with FakeSalesforce() as fake:
        env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
        run = cli(env, "validate-nb")
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert run.returncode in (0, 1), run.stdout + run.stderr
    states = Store(db).positions_of(nb.NAME, range(1, 7))
    assert {pid: s.state for pid, s in states.items() if pid != 6} == {i: "WroteNotFound" for i in range(1, 6)}
    assert states[6].state == "ScriptFailureLogged" and "nationbuilder_id" in states[6].detail["error"]


def test_a_superscript_digit_gets_an_error_naming_the_field(db) -> None:
    """"²" is a digit to ``str.isdigit`` but not to ``int()``: the profile lands in ScriptFailureLogged, and
    the error recorded should say which field is wrong, as it does for every other bad value."""
    db.profiles.insert_many([{"id": 1, "nationbuilder_id": "²"}, {"id": 2, "nationbuilder_id": "-5"}])
    with FakeSalesforce() as fake:
        ValidationRunner(CrmStates.open(db, _crm(fake)), RunnerConfig(chunk_size=100)).run()
    positions = Store(db).positions_of(nb.NAME, [1, 2])
    errors = {pid: p.detail["error"] for pid, p in positions.items()}
    assert {p.state for p in positions.values()} == {"ScriptFailureLogged"}
    assert "nationbuilder_id" in errors[2]
    assert "nationbuilder_id" in errors[1], errors[1]


@pytest.mark.parametrize("bad_id", [None, "abc", "2", 2.5], ids=repr)
def test_a_profile_whose_id_is_not_an_int_does_not_stop_the_batch(db, caplog, bad_id: Any) -> None:
    """The runner means to skip such a profile with a warning (runner.py, ``_ranges``) and go on."""
    caplog.set_level(logging.WARNING, logger="crm_states.runner")
    db.profiles.insert_many([{"id": 1, "nationbuilder_id": 601}, {"id": bad_id, "nationbuilder_id": 602},
                             {"id": 4, "nationbuilder_id": 604}])
    with FakeSalesforce() as fake:
        report = ValidationRunner(CrmStates.open(db, _crm(fake)), RunnerConfig(chunk_size=100)).run()
    assert report.states == {"WroteNotFound": 2}
    assert db[POSITIONS].count_documents({}) == 2
    assert f"skipping a profile whose id is not an int: {bad_id!r}" in caplog.text


# --- signup ---------------------------------------------------------------------------------------------

def _signup(db: Any, email: Any, first_name: Any, last_name: Any) -> str:
    pid = next(_ids)
    db.profiles.insert_one({"id": pid, "email": email, "first_name": first_name, "last_name": last_name})
    with FakeSalesforce() as fake:
        result = CrmStates.open(db, _crm(fake)).run_signup(pid)  # no crash
        records = fake.records(APP_USER)
        requests = sum(fake.counts[k] for k in ("query", "create"))
        soql = list(fake.soql_log)
        if soql:
            assert_soql_is_ours(fake, "Sefaria_App_Email__c", {email})
    profile = db.profiles.find_one({"id": pid})
    position = Store(db).position(pid, signup.NAME)
    assert result.outcome == "finished" and position.state == result.state
    bad_email = not isinstance(email, str) or email == ""
    bad_name = next((f for f, v in (("first_name", first_name), ("last_name", last_name))
                     if v is not None and v != "" and not isinstance(v, str)), None)
    if bad_email or bad_name:
        assert result.state == "WroteSalesforceErrorToDb" and requests == 0 and not records
        [line] = profile["CrmLog"]
        assert line.startswith("NewUserSalesforceWriteError-") and "invalid input, nothing sent" in line
        assert ("email" if bad_email else bad_name) in line
    elif result.state == "WroteSalesforceErrorToDb":  # only a lookup too long for one request
        [line] = profile["CrmLog"]
        assert re.search(r"HTTP 4(14|31)", line), line
        assert len(email) > 2000 and not records
    else:
        assert result.state == "WroteSalesforceAppUserUid" and len(soql) == 1
        [made] = records
        assert profile["sf_app_user_id"] == made["Id"]
        assert made["Sefaria_App_Email__c"] == email
        assert (made["First_Name__c"], made["Last_Name__c"]) == (first_name or "", last_name or "")
    check_histories(db, signup.SPEC, {"id": pid}).assert_clean()
    return result.state


@SETTINGS
@given(email=emails, first_name=names, last_name=names)
@example(email="x' OR Sefaria_App_Email__c != 'y", first_name="O'Hara", last_name="בן-עמי")
@example(email="\\' OR 1=1 --@example.org", first_name="\u202eevil", last_name="🙂")
@example(email="a" * 10_000 + "@example.org", first_name="a" * 10_000, last_name="")
@example(email="", first_name=None, last_name=None)
@example(email=None, first_name="Dov", last_name="Levi")
@example(email=["a@b.org"], first_name="Dov", last_name="Levi")
@example(email="ok@example.org", first_name={"$ne": 1}, last_name="Levi")
@example(email="ok2@example.org", first_name="Dov", last_name=42)
def test_hostile_signup_inputs(hostile_db, email: Any, first_name: Any, last_name: Any) -> None:
    _signup(hostile_db, email, first_name, last_name)


def test_figures() -> None:
    record("5 hostile input", hypothesis_examples_per_test=SETTINGS.max_examples, injection_strings=len(INJECTIONS))
