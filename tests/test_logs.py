"""Logs Sefaria can ship: the library's records carry structured fields (``extra=``) that Sefaria's
structlog setup (``ProcessorFormatter`` with ``ExtraAdder``) renders as JSON keys; the journal's entries
stay replayable from such a JSON log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.journal import read_entries
from crm_states.logs import FIELDS, fields
from crm_states.store import Store
from crm_states.testing import FakeSalesforce
from tests.operator_seed import FAST, JOURNALED, SIGNUP, json_logs, seed


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with json_logs() as stream:
        yield stream


def test_retries_and_journal_entries_are_json_with_their_fields(db, tmp_path: Path, json_log: io.StringIO) -> None:
    with FakeSalesforce() as fake:
        seed(db, fake, tmp_path)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert lines and all({"event", "level", "logger", "timestamp"} <= set(line) for line in lines)

    retries = [line for line in lines if line.get("outcome") == "retried"]
    assert len(retries) == FAST.attempts - 1  # the lookup's 503s past the retry budget
    assert retries[0] | {"event": None, "timestamp": None} == {
        "event": None, "timestamp": None, "level": "info", "logger": "crm_states.crm", "kind": "GET query",
        "outcome": "retried", "error_class": "CrmTransientError", "attempt": 1, "wait_seconds": 0.0}

    journaled = [line for line in lines if line.get("outcome") == "journaled"]
    signups = sorted(row["id"] for row in Store(db).in_state(SIGNUP, "LoggedDbFailure"))
    assert len(journaled) == JOURNALED and sorted(line["profile_id"] for line in journaled) == signups
    assert {(line["machine"], line["state"], line["level"], line["kind"]) for line in journaled} == \
        {(SIGNUP, "LoggedDbFailure", "error", "journal")}

    # "Pull these from the logs": the JSON log replays like the journal file.
    file_ids = [e.entry_id for e in read_entries((tmp_path / "journal.jsonl").read_text(encoding="utf-8").splitlines())]
    log_entries = list(read_entries(json_log.getvalue().splitlines()))
    assert [e.entry_id for e in log_entries] == [line["entry_id"] for line in journaled] == file_ids
    assert {e.profile_id for e in log_entries} == set(signups)


def test_fields_refuse_an_unknown_name_and_drop_empty_values() -> None:
    assert fields(machine="m", state=None, profile_id=0) == {"machine": "m", "profile_id": 0}
    with pytest.raises(ValueError, match="not a structured log field: password"):
        fields(password="x")
    reserved = set(logging.LogRecord("n", logging.INFO, "p", 1, "m", (), None).__dict__) | {"message", "asctime"}
    assert not FIELDS.keys() & reserved  # logging refuses an extra that overwrites a record attribute
