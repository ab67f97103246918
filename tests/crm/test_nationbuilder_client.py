"""The NationBuilder client over real HTTP against FakeNationbuilder: success paths and faults."""

from __future__ import annotations

import json
import logging

import pytest
import requests
from conftest_nb import FAST, TOKEN, clock, make_nb_client, nb, nb_client  # noqa: F401 (fixtures)

from crm_states.crm.errors import (
    CrmAuthError,
    CrmConfigError,
    CrmError,
    CrmNotFound,
    CrmRejected,
    CrmTransientError,
)
from crm_states.crm.nationbuilder import NationbuilderConnectionManager, NationbuilderTags, RateLimit
from crm_states.testing.nationbuilder import FakeNationbuilder
from crm_states.testing.server import Fault

SUSTAINER = NationbuilderTags().sustainer


# -- construction ----------------------------------------------------------------------------------


def test_slug_gives_the_nation_url_and_token_goes_in_a_header_only() -> None:
    manager = NationbuilderConnectionManager("sefaria", TOKEN)
    assert manager.base_url == "https://sefaria.nationbuilder.com/api/v1"
    assert manager.get_connection().headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in repr(manager)


@pytest.mark.parametrize("slug, token", [("sefaria", None), ("sefaria", ""), (None, TOKEN), ("a.evil.com/x", TOKEN)])
def test_missing_token_or_bad_slug_is_a_config_error(slug: str | None, token: str | None) -> None:
    with pytest.raises(CrmConfigError):
        NationbuilderConnectionManager(slug, token)


# -- writes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang, educator, tags", [
    ("en", False, ["Announcements_General", "Signed_Up_on_Sefaria"]),
    ("en", True, ["Announcements_General", "Announcements_Edu", "Signed_Up_on_Sefaria"]),
    ("he", False, ["Announcements_General_Hebrew", "Signed_Up_on_Sefaria"]),
    ("he", True, ["Announcements_General_Hebrew", "Announcements_Edu_Hebrew", "Signed_Up_on_Sefaria"]),
])
def test_add_user_pushes_the_person_with_sefaria_tags(nb_client, nb, lang: str, educator: bool, tags: list[str]) -> None:
    crm_id = nb_client.add_user_to_crm("ada@example.org", "Ada", "O'Brien-Lovelace-Byron", lang, educator, external_id=42)
    person = nb.person(int(crm_id))
    assert isinstance(crm_id, str) and crm_id.isdigit()
    assert person is not None
    assert (person["email"], person["first_name"], person["last_name"]) == (
        "ada@example.org", "Ada", "O'Brien-Lovelace-Byron")
    assert person["tags"] == tags and person["external_id"] == "42"


def test_add_user_twice_is_one_person(nb_client, nb) -> None:
    first = nb_client.add_user_to_crm("ada@example.org", "Ada", "L")
    again = nb_client.add_user_to_crm("ADA@example.org", "Ada", "L")
    assert first == again and len(nb.people()) == 1 and nb.counts["push"] == 2


def test_add_user_retried_after_a_lost_answer_is_still_one_person(nb_client, nb, clock) -> None:
    nb.inject(Fault.drop(processed=True), kind="push")
    crm_id = nb_client.add_user_to_crm("ada@example.org", "Ada", "L")
    assert [p["id"] for p in nb.people()] == [int(crm_id)]
    assert nb.counts["push"] == 2 and len(clock.sleeps) == 1


def test_change_user_email(nb_client, nb) -> None:
    pid = nb.seed_person("old@example.org")
    nb_client.change_user_email(str(pid), "new@example.org")
    assert nb.person(pid)["email"] == "new@example.org"


def test_change_email_of_a_missing_person_is_not_found(nb_client) -> None:
    with pytest.raises(CrmNotFound) as caught:
        nb_client.change_user_email("999", "new@example.org")
    assert caught.value.status == 404 and caught.value.code == "not_found"


def test_change_email_to_one_taken_is_rejected_without_retry(nb_client, nb) -> None:
    pid = nb.seed_person("old@example.org")
    nb.seed_person("taken@example.org")
    with pytest.raises(CrmRejected) as caught:
        nb_client.change_user_email(str(pid), "taken@example.org")
    assert caught.value.status == 400 and nb.counts["update_person"] == 1


@pytest.mark.parametrize("bad_id", ["pending:abc", "dummy:0123456789abcdef", "True", "", "1/../2"])
def test_ids_that_are_not_person_ids_are_rejected_before_any_request(nb_client, nb, bad_id: str) -> None:
    with pytest.raises(CrmRejected):
        nb_client.change_user_email(bad_id, "x@example.org")
    with pytest.raises(CrmRejected):
        nb_client.mark_as_spam_in_crm(bad_id)
    assert nb.total_requests == 0


def test_mailing_list_signup_tags_a_new_email(nb_client, nb) -> None:
    nb_client.add_email_to_mailing_lists("reader@example.org", ["Daf_Yomi", "Parasha"])
    person = nb.find_email("reader@example.org")
    assert person["tags"] == ["Newsletter_Sign_Up", "Daf_Yomi", "Parasha"]
    assert person["first_name"] is None
    assert (nb.counts["push"], nb.counts["tag_person"]) == (1, 1)


def test_mailing_list_signup_adds_to_an_existing_person(nb_client, nb) -> None:
    pid = nb.seed_person("reader@example.org", first_name="Rina", tags=["Signed_Up_on_Sefaria"])
    nb_client.add_email_to_mailing_lists("reader@example.org", ["Parasha"], first_name=None, last_name="Levi")
    person = nb.person(pid)
    assert person["tags"] == ["Signed_Up_on_Sefaria", "Newsletter_Sign_Up", "Parasha"]
    assert (person["first_name"], person["last_name"]) == ("Rina", "Levi")


def test_spam_deletes_the_person(nb_client, nb) -> None:
    pid = nb.seed_person("spam@example.org")
    nb_client.mark_as_spam_in_crm(str(pid))
    assert nb.person(pid) is None and nb.counts["delete_person"] == 1


def test_spam_of_a_person_already_deleted_is_done(nb_client, nb) -> None:
    nb_client.mark_as_spam_in_crm("404")
    assert nb.counts["delete_person"] == 1


def test_spam_delete_whose_answer_was_lost_is_retried_and_succeeds(nb_client, nb, clock) -> None:
    pid = nb.seed_person("spam@example.org")
    nb.inject(Fault.drop(processed=True), kind="delete_person")
    nb_client.mark_as_spam_in_crm(str(pid))
    assert nb.person(pid) is None and nb.counts["delete_person"] == 2 and len(clock.sleeps) == 1


def test_mark_for_review_tags_the_person(nb_client, nb) -> None:
    pid = nb.seed_person("odd@example.org", tags=["Signed_Up_on_Sefaria"])
    nb_client.mark_for_review_in_crm(str(pid))
    assert nb.person(pid)["tags"] == ["Signed_Up_on_Sefaria", "Manual_Review_Required"]
    assert nb.tagged("Manual_Review_Required") == [pid]
    with pytest.raises(CrmNotFound):
        nb_client.mark_for_review_in_crm("999")


# -- reads -----------------------------------------------------------------------------------------


def test_find_crm_id(nb_client, nb) -> None:
    pid = nb.seed_person("a+tag@example.org")
    assert nb_client.find_crm_id("A+Tag@example.org") == str(pid)
    assert nb_client.find_crm_id("nobody@example.org") is None
    assert nb.counts["match"] == 2


@pytest.mark.parametrize("status", [200, 400, 422])
def test_no_matches_in_any_status_is_none_without_retry(nb_client, nb, status: int) -> None:
    body = json.dumps({"code": "no_matches", "message": "No people matched the given criteria."}).encode()
    nb.inject(Fault.error(status, body=body), kind="match")
    assert nb_client.find_crm_id("a@example.org") is None
    assert nb.counts["match"] == 1


def _seed_sustainers(nb: FakeNationbuilder, n: int) -> set[str]:
    ids = {str(nb.seed_person(f"s{i}@example.org", tags=[SUSTAINER])) for i in range(n)}
    nb.seed_person("other@example.org", tags=["Announcements_General"])
    return ids


def test_sustainers_follow_next_across_pages(nb_client, nb) -> None:
    expected = _seed_sustainers(nb, 250)
    assert set(nb_client.get_sustainers()) == expected
    assert nb.counts["tag_people"] == 3


def test_no_sustainers_is_empty_after_one_request(nb_client, nb) -> None:
    assert list(nb_client.get_sustainers()) == []
    assert nb.counts["tag_people"] == 1


def test_sustainer_tag_is_configurable(nb, clock) -> None:
    pid = nb.seed_person("s@example.org", tags=["sustainer 2026/active"])
    custom = make_nb_client(nb, clock, tags=NationbuilderTags(sustainer="sustainer 2026/active"))
    assert list(custom.get_sustainers()) == [str(pid)]


def _fail_tag_pages_after_the_first(nb: FakeNationbuilder, session: requests.Session, fault: Fault, times: int) -> None:
    """Once the first tag page has been answered, queue ``fault`` for the next ``times`` tag pages."""
    armed = [True]

    def hook(response: requests.Response, *args: object, **kwargs: object) -> None:
        if armed[0] and "/tags/" in response.url:
            armed[0] = False
            nb.inject(fault, times=times, kind="tag_people")

    session.hooks["response"].append(hook)


def test_a_page_failing_half_way_raises_and_returns_nothing(nb_client, nb, clock) -> None:
    _seed_sustainers(nb, 250)
    _fail_tag_pages_after_the_first(nb, nb_client.get_connection(), Fault.error(503), times=FAST.attempts)
    with pytest.raises(CrmTransientError) as caught:
        nb_client.get_sustainers()
    assert caught.value.status == 503
    assert nb.counts["tag_people"] == 1 + FAST.attempts and len(clock.sleeps) == FAST.attempts - 1


def test_a_page_refused_half_way_raises_at_once(nb_client, nb) -> None:
    _seed_sustainers(nb, 250)
    _fail_tag_pages_after_the_first(nb, nb_client.get_connection(), Fault.error(400), times=1)
    with pytest.raises(CrmRejected):
        nb_client.get_sustainers()
    assert nb.counts["tag_people"] == 2


@pytest.mark.parametrize("fault", [Fault.error(502), Fault.drop(), Fault.malformed_json()], ids=["502", "drop", "json"])
def test_a_page_blip_is_retried_with_the_same_next(nb_client, nb, fault: Fault) -> None:
    expected = _seed_sustainers(nb, 250)
    _fail_tag_pages_after_the_first(nb, nb_client.get_connection(), fault, times=1)
    assert set(nb_client.get_sustainers()) == expected  # the fake answers 400 to a next that was not verbatim
    assert nb.counts["tag_people"] == 4


def test_a_next_link_pointing_back_raises(nb_client, nb) -> None:
    loop = json.dumps({"results": [{"id": 1}], "next": f"/api/v1/tags/{SUSTAINER}/people?__nonce=a&__token=b"})
    nb.inject(Fault.error(200, body=loop.encode()), times=2, kind="tag_people")
    with pytest.raises(CrmError, match="loops"):
        nb_client.get_sustainers()
    assert nb.counts["tag_people"] == 2


def test_fake_refuses_an_edited_next(nb) -> None:
    _seed_sustainers(nb, 30)
    session = nb.client_session()
    session.headers.update({"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"})
    first = session.get(f"{nb.api_url}/tags/{SUSTAINER}/people", params={"limit": 10}).json()
    nxt = first["next"]
    assert "__nonce=" in nxt and "__token=" in nxt
    path, _, query = nxt.partition("?")
    edits = [
        nxt.replace("limit=10", "limit=100"),
        nxt.replace("__token=", "__token=0"),
        path + "?" + "&".join(reversed(query.split("&"))),
        nxt + "&limit=10",
    ]
    for edited in edits:
        assert session.get(nb.url + edited).status_code == 400, edited
    assert session.get(nb.url + nxt).status_code == 200
    assert session.get(nb.url + nxt).status_code == 200  # a retried page is answered again


def test_find_app_users_by_nationbuilder_ids(nb_client, nb) -> None:
    a, b = nb.seed_person("a@example.org"), nb.seed_person("b@example.org")
    found = nb_client.find_app_users_by_nationbuilder_ids([a, 999, b, a, True])
    assert found == {a: str(a), b: str(b)}
    assert nb.counts["get_person"] == 3  # one per distinct id; True (Sefaria's dummy id) is never sent


def test_find_app_users_raises_when_a_lookup_fails(nb_client, nb) -> None:
    a = nb.seed_person("a@example.org")
    nb.inject(Fault.error(500), times=FAST.attempts, kind="get_person")
    with pytest.raises(CrmTransientError):
        nb_client.find_app_users_by_nationbuilder_ids([a])


# -- faults ----------------------------------------------------------------------------------------


def test_429_waits_exactly_retry_after(nb_client, nb, clock) -> None:
    nb.inject(Fault.error(429, headers={"Retry-After": "3"}), kind="match")
    assert nb_client.find_crm_id("a@example.org") is None
    assert clock.sleeps == [3.0] and nb.counts["match"] == 2


def test_rate_limit_window_is_waited_out(clock) -> None:
    with FakeNationbuilder(token=TOKEN, clock=clock, rate_limit=2, rate_window=10.0) as server:
        limited = make_nb_client(server, clock)
        for _ in range(3):
            limited.find_crm_id("a@example.org")
        assert clock.sleeps == [10.0]  # the window started at 1_000_000: ten seconds to its end
        assert server.counts["match"] == 4
        assert limited.rate_limit == RateLimit(limit=2, remaining=1, reset=1_000_020)


def test_legacy_rate_limit_headers_are_read(clock) -> None:
    with FakeNationbuilder(token=TOKEN, clock=clock, rate_limit=5, legacy_rate_headers=True) as server:
        legacy = make_nb_client(server, clock)
        assert legacy.rate_limit is None
        legacy.find_crm_id("a@example.org")
        assert legacy.rate_limit is not None and (legacy.rate_limit.limit, legacy.rate_limit.remaining) == (5, 4)


def test_retries_are_bounded(nb_client, nb, clock) -> None:
    nb.inject(Fault.error(503), times=10)
    with pytest.raises(CrmTransientError):
        nb_client.find_crm_id("a@example.org")
    assert nb.total_requests == FAST.attempts and len(clock.sleeps) == FAST.attempts - 1
    assert all(0 <= s <= FAST.max_delay for s in clock.sleeps)


@pytest.mark.parametrize("fault", [Fault.error(500), Fault.drop(), Fault.slow(1.5), Fault.malformed_json()],
                         ids=["500", "drop", "timeout", "json"])
def test_transient_failures_are_retried(nb_client, nb, fault: Fault) -> None:
    pid = nb.seed_person("a@example.org")
    nb.inject(fault)
    assert nb_client.find_crm_id("a@example.org") == str(pid)
    assert nb.counts["match"] == 2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise_at_once(nb_client, nb, status: int) -> None:
    nb.inject(Fault.error(status))
    with pytest.raises(CrmAuthError):
        nb_client.add_user_to_crm("a@example.org", "A", "B")
    assert nb.total_requests == 1


def test_a_wrong_token_is_refused(nb, clock) -> None:
    wrong = make_nb_client(nb, clock, token="not-the-token")
    with pytest.raises(CrmAuthError) as caught:
        wrong.find_crm_id("a@example.org")
    assert caught.value.status == 401


@pytest.mark.parametrize("status", [409, 422])
def test_other_client_errors_are_rejected_at_once(nb_client, nb, status: int) -> None:
    nb.inject(Fault.error(status))
    with pytest.raises(CrmRejected):
        nb_client.add_email_to_mailing_lists("a@example.org", ["L"])
    assert nb.total_requests == 1


def test_fake_wants_json_and_accepts_an_access_token_parameter(nb) -> None:
    plain = nb.client_session()
    assert plain.get(f"{nb.api_url}/people/1", params={"access_token": "wrong"}).status_code == 401
    assert plain.get(f"{nb.api_url}/people/1", params={"access_token": TOKEN}).status_code == 406
    pid = nb.seed_person("a@example.org")
    answer = plain.get(f"{nb.api_url}/people/{pid}", params={"access_token": TOKEN},
                       headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.json()["person"]["email"] == "a@example.org"


def test_https(clock) -> None:
    with FakeNationbuilder(token=TOKEN, tls=True, clock=clock) as server:
        secure = make_nb_client(server, clock)
        crm_id = secure.add_user_to_crm("a@example.org", "A", "B")
        assert server.url.startswith("https://") and secure.find_crm_id("a@example.org") == crm_id


def test_the_token_never_reaches_a_log_line_or_an_error(nb_client, nb, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = json.dumps({"code": "unauthorized", "message": f"bad token Bearer {TOKEN} / {TOKEN}"}).encode()
    errors: list[CrmError] = []
    nb.inject(Fault.error(401, body=echo))
    nb.inject(Fault.error(503, body=echo), times=FAST.attempts)
    nb.inject(Fault.error(429, body=echo, headers={"Retry-After": "1"}))
    for call in (lambda: nb_client.find_crm_id("a@example.org"),
                 lambda: nb_client.add_user_to_crm("a@example.org", "A", "B"),
                 lambda: nb_client.change_user_email("999", "b@example.org")):
        with pytest.raises(CrmError) as caught:
            call()
        errors.append(caught.value)
    assert nb_client.mark_for_review_in_crm(nb_client.add_user_to_crm("a@example.org", "A", "B")) is True
    assert caplog.records and TOKEN not in caplog.text
    for error in errors:
        assert TOKEN not in str(error) and TOKEN not in repr(error)


def test_fake_people_and_taggings_shapes(nb) -> None:
    session = nb.client_session()
    session.headers.update({"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"})
    people = f"{nb.api_url}/people"
    created = session.post(people, json={"person": {"email": "a@example.org", "tags": "t1"}})
    assert created.status_code == 201 and created.json()["person"]["tags"] == ["t1"]
    duplicate = session.post(people, json={"person": {"email": "A@example.org"}})
    assert duplicate.status_code == 400 and duplicate.json()["code"] == "validation_failed"
    assert session.put(f"{people}/push", json={"person": {"first_name": "x"}}).status_code == 400
    pid = created.json()["person"]["id"]
    assert session.put(f"{people}/{pid}/taggings", json={"tagging": {"tag": "t 2"}}).status_code == 200
    assert session.delete(f"{people}/{pid}/taggings/t1").status_code == 204
    assert nb.person(pid)["tags"] == ["t 2"]
    missing = session.get(f"{people}/999")
    assert (missing.status_code, missing.json()) == (404, {"code": "not_found", "message": "Record not found"})
    no_match = session.get(f"{people}/match", params={"email": "nobody@example.org"})
    assert (no_match.status_code, no_match.json()["code"]) == (404, "no_matches")
    assert int(missing.headers["X-RateLimit-Remaining"]) == 250 - 6
