"""Every operator command end to end, as a subprocess: SecantusDB and FakeSalesforce on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.crm import LogConnectionManager
from crm_states.journal import read_entries
from crm_states.testing import Fault, FakeSalesforce
from machines import new_user_signup as signup

APP_USER = "Sefaria_App_User__c"
ROOT = Path(__file__).resolve().parents[1]
#: The subprocess imports this checkout's code whatever its working directory.
PYTHONPATH = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def env(db, mongo_url: str, fake: FakeSalesforce, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_TYPE": "SALESFORCE",
            "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
            "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(tmp_path / "journal.jsonl"),
            "PYTHONPATH": PYTHONPATH}


def has_count(text: str, state: str, count: int) -> bool:
    return re.search(rf"^\s*{state}\s+{count}\b", text, re.M) is not None


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crm_states.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_signup_command_is_repeatable(db, env, fake: FakeSalesforce) -> None:
    db.profiles.insert_one({"id": 5, "email": "rivka@example.org", "first_name": "רבקה", "last_name": "D'Amato"})
    first = cli(env, "signup", "--user-id", "5", "--lang", "he")
    assert first.returncode == 0, first.stderr
    assert "user 5: WroteSalesforceAppUserUid (finished)" in first.stdout
    again = cli(env, "signup", "--user-id", "5")
    assert again.returncode == 0 and len(fake.records(APP_USER)) == 1
    assert fake.records(APP_USER)[0]["Hebrew_English__c"] == "Hebrew"
    missing = cli(env, "signup", "--user-id", "6")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("crm-states: no profile with id 6")


def test_validate_then_resume_after_salesforce_recovers(db, env, fake: FakeSalesforce) -> None:
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 800 + i} for i in range(1, 41)])
    fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(800 + i)} for i in range(1, 41, 2)])
    fake.inject(Fault.error(503), times=4, kind="query")  # the one lookup fails past its retry budget
    run = cli(env, "validate-nb", "--chunk-size", "100")
    assert run.returncode == 0, run.stderr
    assert has_count(run.stdout, "WroteUnexpectedResponse", 40)
    resumed = cli(env, "resume", "--machine", "nb_profile_validation", "--state", "WroteUnexpectedResponse")
    assert resumed.returncode == 0, resumed.stderr
    assert "40 profiles in WroteUnexpectedResponse re-driven" in resumed.stdout
    assert has_count(resumed.stdout, "WroteSalesforceAppUserUid", 20)
    report = json.loads(cli(env, "report", "--json").stdout)
    states = report["nb_profile_validation"]
    assert states["WroteSalesforceAppUserUid"]["count"] == 20 and states["WroteNotFound"]["count"] == 20
    assert states["WroteUnexpectedResponse"]["count"] == 0
    final = cli(env, "resume", "--machine", "nb_profile_validation", "--state", "WroteSalesforceAppUserUid")
    assert final.returncode == 2 and "final state" in final.stderr


def test_db_failure_replay_and_resume_never_create_twice(db, env, fake: FakeSalesforce, tmp_path: Path,
                                                          failpoint_mongo) -> None:
    """The database fails every write after the write-ahead commit: the created app user's id is
    journaled; replay writes it, resume finishes the run, and Salesforce holds one app user."""
    client, url = failpoint_mongo
    env = {**env, "MONGO_URL": url, "MONGO_DB": "cli"}
    client.cli.profiles.insert_one({"id": 9, "email": "journal@example.org"})
    client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1},
                          "data": {"failCommands": ["update"], "errorCode": 6}})
    run = cli(env, "signup", "--user-id", "9")
    client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert run.returncode == 1 and "LoggedDbFailure" in run.stdout
    assert "CRM_STATES_JOURNAL" in run.stderr  # the structured log line
    journal = Path(env["CRM_STATES_JOURNAL"])
    [entry] = list(read_entries(journal.read_text().splitlines()))
    [record] = fake.records(APP_USER)
    assert entry.write.set == {"sf_app_user_id": record["Id"]}

    first = cli(env, "replay", str(journal))
    second = cli(env, "replay", str(journal))
    assert "1 applied now" in first.stdout and "0 applied now, 1 already applied" in second.stdout
    assert client.cli.profiles.find_one({"id": 9})["sf_app_user_id"] == record["Id"]
    resumed = cli(env, "resume", "--machine", signup.NAME, "--state", "LoggedDbFailure")
    assert resumed.returncode == 0 and has_count(resumed.stdout, "WroteSalesforceAppUserUid", 1)
    assert len(fake.records(APP_USER)) == 1


def test_load_log_sends_each_entry_once(env, fake: FakeSalesforce, tmp_path: Path) -> None:
    log_path = tmp_path / "crm.log"
    interim = LogConnectionManager(log_path)
    interim.add_user_to_crm("a@example.org", "Avi", "O'Hara", external_id=1)
    interim.add_user_to_crm("b@example.org", "Bina", "Levi", lang="he", external_id=2)
    with log_path.open("a") as f:
        f.write("not a log entry\n")
    first = cli(env, "load-log", str(log_path))
    assert first.returncode == 1, first.stdout + first.stderr  # the invalid line is something to look at
    assert "sent 2 CRM writes" in first.stdout and "1 invalid lines" in first.stdout
    assert "line 3: not JSON" in first.stdout
    second = cli(env, "load-log", str(log_path))
    assert "sent 0 CRM writes" in second.stdout and "2 already loaded" in second.stdout
    assert len(fake.records(APP_USER)) == 2


def test_configuration_errors_are_one_line(env, tmp_path: Path) -> None:
    bad = cli({**env, "CRM_TYPE": "SALESFORCEE"}, "validate-nb")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "CRM_TYPE" in bad.stderr
    secretless = cli({**env, "SALESFORCE_CLIENT_SECRET": ""}, "validate-nb")
    assert secretless.returncode == 2 and "SALESFORCE_CLIENT_SECRET" in secretless.stderr
    no_file = cli(env, "replay", str(tmp_path / "missing.jsonl"))
    assert no_file.returncode == 2 and "no such file" in no_file.stderr
    for command in ("validate-nb", "signup", "resume", "replay", "load-log", "report", "demo"):
        helped = cli(env, command, "--help")
        assert helped.returncode == 0 and "usage: crm-states" in helped.stdout


@pytest.fixture
def failpoint_mongo(mongo_server_factory) -> Iterator[tuple]:
    """A private server of the run's backend whose fail points the test may set."""
    from pymongo import MongoClient

    server = mongo_server_factory(test_commands=True)
    client: MongoClient = MongoClient(server.url)
    yield client, server.url
    client.close()
