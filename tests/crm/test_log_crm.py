"""Log mode: one durable line per write, and a loader that sends each entry once over any number of runs."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest_nb import clock, make_nb_client, nb  # noqa: F401 (fixtures)
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_states.crm.base import CrmConnectionManager
from crm_states.crm.errors import CrmConfigError, CrmError, CrmLimitExceeded, CrmRejected
from crm_states.crm.log import PENDING_PREFIX, LogConnectionManager, load_log


class Recorder(CrmConnectionManager):
    """A target that records each call; creates are idempotent by external id or email, as real ones are."""

    name = "recorder"

    def __init__(self, fail_on: Mapping[str, CrmError] | None = None, crash_after: int | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.ids: dict[str, str] = {}
        self.fail_on = fail_on or {}
        self.crash_after = crash_after

    def _record(self, method: str, **args: Any) -> None:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise RuntimeError("process killed")
        for value in args.values():
            if isinstance(value, str) and value in self.fail_on:
                raise self.fail_on[value]
        self.calls.append((method, args))

    def get_connection(self) -> requests.Session:
        return requests.Session()

    def add_user_to_crm(self, email: str, first_name: str, last_name: str, lang: str = "en",
                        educator: bool = False, external_id: str | int | None = None) -> str:
        self._record("add_user_to_crm", email=email, first_name=first_name, last_name=last_name, lang=lang,
                     educator=educator, external_id=external_id)
        key = f"x{external_id}" if external_id is not None else email
        return self.ids.setdefault(key, f"a0X{len(self.ids):05d}")

    def change_user_email(self, crm_id: str, new_email: str) -> None:
        self._record("change_user_email", crm_id=crm_id, new_email=new_email)

    def add_email_to_mailing_lists(self, email: str, mailing_lists: Iterable[str], first_name: str | None = None,
                                   last_name: str | None = None, lang: str = "en", educator: bool = False) -> None:
        self._record("add_email_to_mailing_lists", email=email, mailing_lists=list(mailing_lists),
                     first_name=first_name, last_name=last_name, lang=lang, educator=educator)

    def mark_as_spam_in_crm(self, crm_id: str) -> None:
        self._record("mark_as_spam_in_crm", crm_id=crm_id)

    def mark_for_review_in_crm(self, crm_id: str) -> None:
        self._record("mark_for_review_in_crm", crm_id=crm_id)

    def find_crm_id(self, email: str) -> str | None:
        raise NotImplementedError

    def get_sustainers(self) -> Iterator[str]:
        raise NotImplementedError

    def find_app_users_by_nationbuilder_ids(self, ids: Iterable[int]) -> Mapping[int, str]:
        raise NotImplementedError


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- writing ---------------------------------------------------------------------------------------


def test_each_write_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)
    pending = crm.add_user_to_crm("a@example.org", "Ada", "O'Neil", lang="he", educator=True, external_id=7)
    crm.change_user_email(pending, "b@example.org")
    crm.add_email_to_mailing_lists("c@example.org", ("Daf_Yomi",))
    crm.mark_as_spam_in_crm("a0X1")
    crm.mark_for_review_in_crm("a0X2")
    entries = lines(path)
    assert [e["method"] for e in entries] == ["add_user_to_crm", "change_user_email", "add_email_to_mailing_lists",
                                             "mark_as_spam_in_crm", "mark_for_review_in_crm"]
    assert pending == PENDING_PREFIX + entries[0]["entry_id"]
    assert len({e["entry_id"] for e in entries}) == 5
    assert entries[0]["args"] == {"email": "a@example.org", "first_name": "Ada", "last_name": "O'Neil",
                                  "lang": "he", "educator": True, "external_id": 7}
    assert entries[1]["args"] == {"crm_id": pending, "new_email": "b@example.org"}
    assert entries[2]["args"]["mailing_lists"] == ["Daf_Yomi"]
    assert all(datetime.fromisoformat(e["at"]).utcoffset() == timedelta(0) for e in entries)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the log holds emails


def test_each_write_is_fsynced_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)
    crm.mark_as_spam_in_crm("a0X1")  # the file exists now: no more directory fsyncs
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(len(path.read_bytes())), real_fsync(fd)))
    for i in range(3):
        crm.mark_for_review_in_crm(f"a0X{i}")
    assert synced == [len(b) for b in _cumulative(path)][1:]


def _cumulative(path: Path) -> list[bytes]:
    raw = path.read_bytes().splitlines(keepends=True)
    return [b"".join(raw[: i + 1]) for i in range(len(raw))]


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)

    def write(n: int) -> None:
        for i in range(50):
            crm.add_email_to_mailing_lists(f"t{n}-{i}@example.org", ["L" * 500])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = lines(path)
    assert len(entries) == 400 and len({e["entry_id"] for e in entries}) == 400


def test_a_torn_last_line_does_not_swallow_the_next_entry(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    path.write_bytes(b'{"v": 1, "entry_id": "torn", "meth')
    LogConnectionManager(path).mark_as_spam_in_crm("a0X1")
    target = Recorder()
    report = load_log(path, target)
    assert report.invalid_lines == 1 and target.calls == [("mark_as_spam_in_crm", {"crm_id": "a0X1"})]


def test_arguments_the_loader_could_not_replay_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)
    with pytest.raises(CrmRejected):
        crm.add_user_to_crm("a@example.org", "A", "B", lang=None)  # type: ignore[arg-type]
    with pytest.raises(CrmRejected):
        crm.add_user_to_crm("a@example.org", "A", "B", external_id=object())  # type: ignore[arg-type]
    assert not path.exists() or path.read_bytes() == b""


def test_a_log_that_cannot_be_written_raises_a_crm_error(tmp_path: Path) -> None:
    with pytest.raises(CrmError, match="could not append"):
        LogConnectionManager(tmp_path / "missing-dir" / "crm.jsonl").mark_as_spam_in_crm("a0X1")


@pytest.mark.parametrize("read", [
    lambda crm: crm.find_crm_id("a@example.org"),
    lambda crm: crm.get_sustainers(),
    lambda crm: crm.find_app_users_by_nationbuilder_ids([1]),
])
def test_reads_are_refused_not_answered_empty(tmp_path: Path, read: Any) -> None:
    with pytest.raises(CrmError, match="cannot answer reads") as caught:
        read(LogConnectionManager(tmp_path / "crm.jsonl"))
    assert caught.value.code == "log_cannot_read"


# -- loading ---------------------------------------------------------------------------------------


def _write_sample(path: Path) -> list[str]:
    crm = LogConnectionManager(path)
    pending = crm.add_user_to_crm("a@example.org", "Ada", "L", external_id=1)
    crm.change_user_email(pending, "a2@example.org")
    crm.add_email_to_mailing_lists("b@example.org", ["Parasha"], lang="he")
    crm.mark_for_review_in_crm(pending)
    crm.mark_as_spam_in_crm("a0Xexisting")
    return [e["entry_id"] for e in lines(path)]


def test_load_sends_each_entry_and_a_second_load_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    entry_ids = _write_sample(path)
    target = Recorder()
    report = load_log(path, target)
    created = target.ids["x1"]
    assert target.calls == [
        ("add_user_to_crm", {"email": "a@example.org", "first_name": "Ada", "last_name": "L", "lang": "en",
                             "educator": False, "external_id": 1}),
        ("change_user_email", {"crm_id": created, "new_email": "a2@example.org"}),
        ("add_email_to_mailing_lists", {"email": "b@example.org", "mailing_lists": ["Parasha"], "first_name": None,
                                        "last_name": None, "lang": "he", "educator": False}),
        ("mark_for_review_in_crm", {"crm_id": created}),
        ("mark_as_spam_in_crm", {"crm_id": "a0Xexisting"}),
    ]
    assert report.sent == {"add_user_to_crm": 1, "change_user_email": 1, "add_email_to_mailing_lists": 1,
                           "mark_for_review_in_crm": 1, "mark_as_spam_in_crm": 1}
    assert report.created == {entry_ids[0]: created}
    assert (report.skipped_already_loaded, report.invalid_lines, report.failed, report.stopped) == (0, 0, [], None)
    assert Path(f"{path}.loaded").exists()

    again = load_log(path, target)
    assert len(target.calls) == 5
    assert (again.total_sent, again.skipped_already_loaded, again.created) == (0, 5, {})


def test_invalid_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    _write_sample(path)
    good = lines(path)[-1]
    junk = [
        "", "not json", "[1, 2]", json.dumps({**good, "v": 2}), json.dumps({**good, "method": "drop_database"}),
        json.dumps({**good, "entry_id": ""}), json.dumps({**good, "args": {"crm_id": 5}}),
        json.dumps({**good, "args": {"crm_id": "a", "extra": 1}}),
        json.dumps({**good, "method": "add_email_to_mailing_lists",
                    "args": {"email": "e", "mailing_lists": [1], "first_name": None, "last_name": None,
                             "lang": "en", "educator": False}}),
    ]
    with path.open("a") as f:
        f.write("\n".join(junk) + "\n")
    report = load_log(path, Recorder())
    assert report.invalid_lines == len(junk) and report.total_sent == 5 and report.failed == []


def test_one_failure_does_not_stop_the_others_and_is_retried_next_time(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    entry_ids = _write_sample(path)
    refused = CrmRejected("invalid email", status=400)
    report = load_log(path, Recorder(fail_on={"b@example.org": refused}))
    assert report.failed == [(entry_ids[2], refused)] and report.total_sent == 4

    fixed = Recorder()
    again = load_log(path, fixed)
    assert [c[0] for c in fixed.calls] == ["add_email_to_mailing_lists"]
    assert (again.total_sent, again.skipped_already_loaded, again.failed) == (1, 4, [])


def test_a_failed_create_fails_the_entries_that_use_its_id(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    entry_ids = _write_sample(path)
    report = load_log(path, Recorder(fail_on={"a@example.org": CrmRejected("duplicate")}))
    assert [entry_id for entry_id, _ in report.failed] == [entry_ids[0], entry_ids[1], entry_ids[3]]
    assert report.failed[1][1].code == "unresolved_placeholder"
    assert load_log(path, Recorder()).sent == {"add_user_to_crm": 1, "change_user_email": 1,
                                               "mark_for_review_in_crm": 1}


def test_limit_exceeded_stops_the_load_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    entry_ids = _write_sample(path)
    spent = CrmLimitExceeded("TotalRequests Limit exceeded.", status=403, code="REQUEST_LIMIT_EXCEEDED")
    target = Recorder(fail_on={"b@example.org": spent})
    report = load_log(path, target)
    assert report.stopped == str(spent) and report.failed == [(entry_ids[2], spent)]
    assert report.total_sent == 2 and len(target.calls) == 2

    rest = Recorder()
    rest.ids = dict(target.ids)
    assert load_log(path, rest).total_sent == 3 and len(rest.calls) == 3


def test_custom_state_path_and_missing_log(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    _write_sample(path)
    state = tmp_path / "state" / "loaded.jsonl"
    state.parent.mkdir()
    assert load_log(path, Recorder(), state_path=state).total_sent == 5
    assert load_log(path, Recorder(), state_path=state).total_sent == 0
    assert load_log(path, Recorder()).total_sent == 5  # a different state file knows nothing of the first
    with pytest.raises(CrmConfigError):
        load_log(tmp_path / "nope.jsonl", Recorder())


def test_a_torn_state_record_means_that_entry_is_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    _write_sample(path)
    load_log(path, Recorder())
    state = Path(f"{path}.loaded")
    records = state.read_bytes().splitlines(keepends=True)
    state.write_bytes(b"".join(records[:-1]) + records[-1][:10])  # the crash hit the last record
    target = Recorder()
    report = load_log(path, target)
    assert target.calls == [("mark_as_spam_in_crm", {"crm_id": "a0Xexisting"})] and report.skipped_already_loaded == 4
    assert load_log(path, Recorder()).total_sent == 0


def test_two_loads_at_once_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "crm.jsonl"
    LogConnectionManager(path).mark_as_spam_in_crm("a0X1")
    nested: list[BaseException] = []

    class Reentrant(Recorder):
        def mark_as_spam_in_crm(self, crm_id: str) -> None:
            with pytest.raises(CrmError, match="another load") as caught:
                load_log(path, Recorder())
            nested.append(caught.value)
            super().mark_as_spam_in_crm(crm_id)

    assert load_log(path, Reentrant()).total_sent == 1 and len(nested) == 1


def test_load_into_nationbuilder_over_http(tmp_path: Path, nb, clock) -> None:
    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)
    pending = crm.add_user_to_crm("a@example.org", "Ada", "L", lang="he")
    crm.change_user_email(pending, "a2@example.org")
    crm.add_email_to_mailing_lists("b@example.org", ["Parasha"])
    spam = crm.add_user_to_crm("spam@example.org", "S", "P")
    crm.mark_as_spam_in_crm(spam)
    target = make_nb_client(nb, clock)

    report = load_log(path, target)
    person_id = report.created[pending.removeprefix(PENDING_PREFIX)]
    assert report.failed == [] and report.total_sent == 5
    assert nb.person(int(person_id))["email"] == "a2@example.org"
    assert nb.find_email("b@example.org")["tags"] == ["Newsletter_Sign_Up", "Parasha"]
    assert nb.find_email("spam@example.org") is None
    requests_made = nb.total_requests
    assert load_log(path, target).total_sent == 0 and nb.total_requests == requests_made


def test_load_into_salesforce_over_http_stops_at_the_daily_limit_and_resumes(tmp_path: Path) -> None:
    from crm_states.crm.salesforce import SalesforceConnectionManager, TokenCache
    from crm_states.testing.salesforce import FakeSalesforce

    path = tmp_path / "crm.jsonl"
    crm = LogConnectionManager(path)
    users = [crm.add_user_to_crm(f"u{i}@example.org", "U", "L") for i in range(3)]
    crm.change_user_email(users[0], "u0-new@example.org")
    crm.mark_for_review_in_crm(users[2])
    crm.add_email_to_mailing_lists("reader@example.org", ["Parasha"])
    with FakeSalesforce(daily_limit=3) as sf:
        target = SalesforceConnectionManager(sf.url, sf.client_id, sf.client_secret, session=sf.client_session(),
                                             sleep=lambda _: None, token_cache=TokenCache())
        stopped = load_log(path, target)
        assert stopped.stopped is not None and stopped.failed[-1][1].code == "REQUEST_LIMIT_EXCEEDED"
        sf.daily_limit = 100_000
        resumed = load_log(path, target)
        assert stopped.total_sent + resumed.total_sent == 6 and resumed.failed == [] and resumed.stopped is None
        app_users = {r["Sefaria_App_Email__c"]: r for r in sf.records("Sefaria_App_User__c")}
        assert sorted(app_users) == ["u0-new@example.org", "u1@example.org", "u2@example.org"]
        assert app_users["u2@example.org"].get("Manual_Review_Required__c") is True
        assert len(sf.records("Sefaria_App_Data__c")) == 1
        usage = sf.api_usage
        assert load_log(path, target).total_sent == 0 and sf.api_usage == usage


# -- properties ------------------------------------------------------------------------------------

EMAILS = st.sampled_from(["a@example.org", "b@example.org", "c@example.org"])
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), EMAILS, st.one_of(st.none(), st.integers(1, 3))),
    st.tuples(st.just("email"), st.integers(0, 5), EMAILS),
    st.tuples(st.just("lists"), EMAILS, st.lists(st.sampled_from(["L1", "L2"]), max_size=2)),
    st.tuples(st.just("spam"), st.integers(0, 5)),
    st.tuples(st.just("review"), st.integers(0, 5)),
), max_size=12)


def _write(crm: LogConnectionManager, ops: list[tuple[Any, ...]]) -> None:
    """Apply ``ops``; ids are picked from the placeholders made so far, or a fixed real-looking id."""
    made: list[str] = []

    def pick(i: int) -> str:
        return made[i % len(made)] if made else "a0Xreal"

    for op in ops:
        if op[0] == "add":
            made.append(crm.add_user_to_crm(op[1], "F", "L", external_id=op[2]))
        elif op[0] == "email":
            crm.change_user_email(pick(op[1]), op[2])
        elif op[0] == "lists":
            crm.add_email_to_mailing_lists(op[1], op[2])
        elif op[0] == "spam":
            crm.mark_as_spam_in_crm(pick(op[1]))
        else:
            crm.mark_for_review_in_crm(pick(op[1]))


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_any_writes_then_two_loads_send_each_write_once(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crm.jsonl"
        path.touch()
        _write(LogConnectionManager(path), ops)
        target = Recorder()
        first, second = load_log(path, target), load_log(path, target)
        assert [c[0] for c in target.calls] == [e["method"] for e in lines(path)]
        assert first.total_sent == len(ops) and second.total_sent == 0
        assert second.skipped_already_loaded == len(ops)
        assert all(not c[1].get("crm_id", "").startswith(PENDING_PREFIX) for c in target.calls)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, crash_after=st.integers(0, 12))
def test_a_crash_mid_load_then_a_second_load_sends_each_entry_exactly_once(
        ops: list[tuple[Any, ...]], crash_after: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crm.jsonl"
        path.touch()
        _write(LogConnectionManager(path), ops)
        crashing = Recorder(crash_after=crash_after)
        try:
            load_log(path, crashing)
        except RuntimeError:
            pass
        resumed = Recorder()
        resumed.ids = dict(crashing.ids)  # the same CRM: creates made before the crash still exist
        load_log(path, resumed)
        methods = [c[0] for c in crashing.calls + resumed.calls]
        assert methods == [e["method"] for e in lines(path)]
        assert load_log(path, Recorder()).total_sent == 0
