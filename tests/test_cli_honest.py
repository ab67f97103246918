"""The commands as a newcomer runs them (a subprocess; SecantusDB and FakeSalesforce on loopback): a CRM that
cannot answer never yields a verdict, a command asks for a CRM only where it uses one, bad input is refused
before the database starts and names what is wrong, and what is printed is what the database holds."""
# ruff: noqa: F811  (the fixtures of tests/test_cli.py are imported and then named as test parameters)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crm_states.api import MACHINES
from crm_states.api import CrmStates
from crm_states.crm.memory import InMemoryCrm
from crm_states.journal import Journal, JournalEntry
from crm_states.store import POSITIONS
from crm_states.records import ProfileWrite
from crm_states.store import Store
from crm_states.testing import FakeSalesforce, Fault
from machines import nb_profile_validation as nb
from tests.faults import FlakyDatabase, WritePlan
from tests.test_cli import cli, env, failpoint_mongo, fake, has_count  # noqa: F401

APP_USER = "Sefaria_App_User__c"
DOWN = "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300"  # a database that is never there


def without_crm(env: dict[str, str], crm_type: str | None = None) -> dict[str, str]:
    settings = {k: v for k, v in env.items() if not k.startswith(("SALESFORCE_", "CRM_TYPE"))}
    return {**settings, "CRM_TYPE": crm_type} if crm_type is not None else settings


def one_line(run) -> str:
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    return run.stderr


def nb_states(env: dict[str, str]) -> dict[str, int]:
    report = cli(env, "report", "--json", "--machine", nb.NAME)
    assert report.returncode == 0, report.stderr
    return {state: row["count"] for state, row in json.loads(report.stdout)[nb.NAME].items() if row["count"]}


def unexpected_responses(db, env: dict[str, str], fake: FakeSalesforce, n: int = 40) -> None:
    """``n`` profiles in WroteUnexpectedResponse: one real lookup that Salesforce fails past the retries."""
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 800 + i} for i in range(1, n + 1)])
    fake.insert_many(APP_USER, [{"NationBuilder_Id__c": str(800 + i)} for i in range(1, n + 1, 2)])
    fake.inject(Fault.error(503), times=4, kind="query")
    assert cli(env, "validate-nb").returncode == 0
    assert nb_states(env) == {"WroteUnexpectedResponse": n}


def db_failures(db, tmp_path: Path, *, found: bool, ids: range) -> None:
    """Profiles in DbWriteOkErrorLogged (``found``) or DbWriteNotFoundErrorLogged: the CRM answered, the
    write of the answer failed (the commit of the whole path), the DB-failure state was persisted."""
    crm = InMemoryCrm()
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 5000 + i} for i in ids])
    if found:
        for i in ids:
            crm.add_app_user(nationbuilder_id=5000 + i)
    flaky = FlakyDatabase(db, WritePlan({("profiles", "update", 1)}))
    app = CrmStates(store=Store(flaky), crm=crm, journal=Journal(tmp_path / "setup-journal.jsonl"))
    expected = "DbWriteOkErrorLogged" if found else "DbWriteNotFoundErrorLogged"
    assert {r.state for r in app.validate_profiles(list(db.profiles.find({"id": {"$in": list(ids)}})))} == {expected}


def not_found_lines(db) -> int:
    return sum(line.startswith("NbProfileNotFoundInSalesforce")
               for p in db.profiles.find({}, {"CrmLog": 1}) for line in p.get("CrmLog") or [])


# --- 1. the dummy CRM never produces a verdict ---------------------------------------------------------------

def test_crm_type_none_never_lands_a_profile_in_a_lookup_verdict(db, env, fake: FakeSalesforce, tmp_path) -> None:
    unexpected_responses(db, env, fake)
    none = without_crm(env, "NONE")
    resumed = cli(none, "resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse")
    assert resumed.returncode == 2
    assert "resume needs CRM_TYPE=SALESFORCE" in one_line(resumed) and "CRM_TYPE is NONE" in resumed.stderr
    assert nb_states(env) == {"WroteUnexpectedResponse": 40} and not_found_lines(db) == 0

    db.profiles.insert_many([{"id": i, "nationbuilder_id": 900 + i} for i in range(100, 110)])
    validated = cli(none, "validate-nb")
    assert validated.returncode == 2 and "validate-nb needs CRM_TYPE=SALESFORCE" in one_line(validated)
    assert db[POSITIONS].count_documents({"profile_id": {"$gte": 100}}) == 0

    # A DB-failure state is resumed without a CRM where its journal holds the answer; this one needs a new
    # lookup, which the dummy refuses: the batch halts and the profiles stay where they were.
    db_failures(db, tmp_path, found=False, ids=range(200, 205))
    halted = cli(none, "resume", "--machine", nb.NAME, "--state", "DbWriteNotFoundErrorLogged")
    assert halted.returncode == 2, halted.stdout + halted.stderr
    line = one_line(halted)
    assert "CRM_TYPE=NONE cannot answer reads (lookup_app_users_by_nationbuilder_ids)" in line
    assert "it needs CRM_TYPE=SALESFORCE" in line and "5 in DbWriteNotFoundErrorLogged" in line
    assert nb_states(env) == {"WroteUnexpectedResponse": 40, "DbWriteNotFoundErrorLogged": 5}
    assert not_found_lines(db) == 0

    sync = cli(none, "sync-sustainers", "--force")  # the dummy's "no sustainers" would demote everyone
    assert sync.returncode == 2 and "CRM_TYPE=SALESFORCE or NATIONBUILDER" in one_line(sync)


def test_each_command_help_says_which_crm_type_it_needs(env) -> None:
    needs = {"validate-nb": "CRM_TYPE=SALESFORCE", "signup": "any CRM_TYPE", "resume": "CRM_TYPE=SALESFORCE for",
             "sync-sustainers": "SALESFORCE or NATIONBUILDER", "replay": "CRM: none", "report": "CRM: none",
             "load-log": "SALESFORCE or NATIONBUILDER", "demo": "CRM: none"}
    for command, text in needs.items():
        helped = cli(env, command, "--help")
        assert helped.returncode == 0 and text in " ".join(helped.stdout.split()), command


# --- 2. commands that need no CRM do not demand one ---------------------------------------------------------

def test_commands_that_use_no_crm_run_without_crm_type(db, env, fake: FakeSalesforce, tmp_path: Path) -> None:
    bare = without_crm(env)
    db_failures(db, tmp_path, found=True, ids=range(1, 4))
    db_failures(db, tmp_path, found=False, ids=range(10, 12))
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 700 + i} for i in range(20, 25)])

    dry = cli(bare, "validate-nb", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("5 profiles pending validation")
    assert cli(bare, "report").returncode == 0

    requests = dict(fake.counts)
    resumed = cli(bare, "resume", "--machine", nb.NAME, "--state", "DbWriteOkErrorLogged")
    assert resumed.returncode == 0, resumed.stderr
    assert has_count(resumed.stdout, "WroteSalesforceAppUserUid", 3) and dict(fake.counts) == requests

    # Where a CRM call is needed after all, the missing setting is the one-line exit 2, never a verdict.
    lookup = cli(bare, "resume", "--machine", nb.NAME, "--state", "DbWriteNotFoundErrorLogged")
    assert lookup.returncode == 2
    line = one_line(lookup)
    assert "resume needs a CRM: CRM_TYPE is empty" in line and "2 in DbWriteNotFoundErrorLogged" in line
    stopped = cli(bare, "resume", "--machine", nb.NAME, "--state", "WroteSalesforceAppUserUid")
    assert stopped.returncode == 2 and "final state" in stopped.stderr
    validate = cli(bare, "validate-nb")
    assert validate.returncode == 2 and "validate-nb needs CRM_TYPE=SALESFORCE: CRM_TYPE is empty" in one_line(validate)
    assert nb_states(env) == {"WroteSalesforceAppUserUid": 3, "DbWriteNotFoundErrorLogged": 2}


# --- 3. garbage does not pass silently ----------------------------------------------------------------------

def journal_line(pid: int, machine: str = "new_user_signup") -> str:
    entry = JournalEntry(pid, machine, (), ProfileWrite(set={"sf_app_user_id": f"a0B{pid:015d}"}), "DbError", False)
    return json.dumps(entry.to_json(), ensure_ascii=False)


BAD_JOURNALS = {
    "garbage": (b"hello\n{world\n", "holds no valid journal entry (2 lines: 1 unreadable, 1 other text)"),
    "binary": (bytes(range(256)) * 4, "holds no valid journal entry"),
    "empty": (b"", "is empty: no journal entry in it"),
    "truncated": (journal_line(1).encode()[:150], "line 1: torn: an entry cut short"),
    "unknown machine": (journal_line(1, "no_such_machine").encode() + b"\n",
                        "line 1: invalid entry: unknown machine 'no_such_machine'"),
}


@pytest.mark.parametrize("kind", list(BAD_JOURNALS))
def test_replay_of_a_file_without_one_valid_entry_is_refused(env, tmp_path: Path, kind: str) -> None:
    content, message = BAD_JOURNALS[kind]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    run = cli({**env, "MONGO_URL": DOWN}, "replay", str(path))  # refused before the database is asked
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "nothing done" in run.stderr


def test_replay_applies_the_valid_entries_and_names_the_torn_and_invalid_lines(db, env, tmp_path: Path) -> None:
    db.profiles.insert_many([{"id": i} for i in (1, 2, 3)])
    path = tmp_path / "journal.jsonl"
    lines = [journal_line(1), journal_line(2)[:90], journal_line(3, "no_such_machine"), "", journal_line(3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = cli(env, "replay", str(path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 journal entries" in run.stdout and "2 applied now" in run.stdout
    assert "2 lines could not be read (1 torn, 1 invalid entries)" in run.stdout
    assert "line 2: torn" in run.stdout and "line 3: invalid entry: unknown machine" in run.stdout
    assert [db.profiles.find_one({"id": i}).get("sf_app_user_id") for i in (1, 2, 3)] == \
        ["a0B000000000000001", None, "a0B000000000000003"]


def test_replay_of_a_directory_or_missing_file_says_so(env, tmp_path: Path) -> None:
    down = {**env, "MONGO_URL": DOWN}
    directory = cli(down, "replay", str(tmp_path))
    assert directory.returncode == 2 and "is a directory" in one_line(directory)
    missing = cli(down, "replay", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such file" in one_line(missing)


def test_load_log_refuses_garbage_and_names_invalid_lines(env, fake: FakeSalesforce, tmp_path: Path) -> None:
    from crm_states.crm import LogConnectionManager

    garbage = tmp_path / "garbage.log"
    garbage.write_bytes(b"not a log\n\x00\x01\x02\n")
    run = cli(env, "load-log", str(garbage))
    assert run.returncode == 2 and "holds no valid CRM log entry" in run.stderr and "line 1: not JSON" in run.stderr
    assert not Path(f"{garbage}.loaded").exists() and fake.counts["create"] == 0  # nothing started, nothing sent

    log_path = tmp_path / "crm.log"
    LogConnectionManager(log_path).add_user_to_crm("a@example.org", "Avi", "Levi", external_id=1)
    with log_path.open("ab") as f:
        f.write(b'{"v": 1, "entry_id": "torn')
    LogConnectionManager(log_path).add_user_to_crm("b@example.org", "Bina", "Levi", external_id=2)
    loaded = cli(env, "load-log", str(log_path))
    assert loaded.returncode == 1, loaded.stdout + loaded.stderr
    assert loaded.stdout.startswith("sent 2 CRM writes from") and "line 2: not JSON" in loaded.stdout
    again = cli(env, "load-log", str(log_path))
    assert "sent 0 CRM writes from" in again.stdout and ": \n" not in again.stdout and "2 already loaded" in again.stdout
    assert len(fake.records(APP_USER)) == 2
    none = cli(without_crm(env, "NONE"), "load-log", str(log_path))
    assert none.returncode == 2 and "load-log needs CRM_TYPE=SALESFORCE or NATIONBUILDER" in one_line(none)


BAD_NUMBERS = [
    ("validate-nb", "--lease-seconds", "-1"), ("validate-nb", "--lease-seconds", "0"),
    ("validate-nb", "--lease-seconds", "nan"), ("validate-nb", "--lease-seconds", "inf"),
    ("validate-nb", "--chunk-size", "0"), ("validate-nb", "--chunk-size", "10000000"),
    ("validate-nb", "--concurrency", "1000"), ("validate-nb", "--limit", "-5"), ("validate-nb", "--max-api-calls", "0"),
    ("signup", "--user-id", "-3"), ("resume", "--limit", "0"), ("demo", "--profiles", "100000000"),
    ("sync-sustainers", "--max-demote-share", "nan"), ("sync-sustainers", "--batch-size", "0"),
]


@pytest.mark.parametrize("command", BAD_NUMBERS, ids=[" ".join(c) for c in BAD_NUMBERS])
def test_numeric_flags_out_of_range_are_usage_errors(env, command: tuple[str, str, str]) -> None:
    required = {"signup": [], "resume": ["--machine", nb.NAME, "--state", "WroteNotFound"]}
    name, flag, value = command
    extra = ["--user-id", "1"] if name == "signup" and flag != "--user-id" else required.get(name, [])
    run = cli({**env, "MONGO_URL": DOWN}, name, *extra, f"{flag}={value}")
    assert run.returncode == 2 and "usage: crm-states" in run.stderr and flag in run.stderr, run.stderr


# --- 5. arguments first, then the database ------------------------------------------------------------------

USAGE_ERRORS = {
    "unknown machine": (["resume", "--machine", "nope", "--state", "X"], "unknown machine 'nope'"),
    "unknown state": (["resume", "--machine", nb.NAME, "--state", "Nope"], "has no state 'Nope'"),
    "report machine": (["report", "--machine", "nope"], "unknown machine 'nope'"),
    "report flags": (["report", "--csv", "x.csv"], "--csv needs --state"),
    "report state": (["report", "--state", "Nope", "--csv", "-"], "no machine has a state 'Nope'"),
    "missing file": (["replay", "/no/such/journal.jsonl"], "no such file"),
    "crm type": (["validate-nb"], "CRM_TYPE is 'SALESFORCEE'"),
    "crm setting": (["signup", "--user-id", "1"], "CRM_TYPE is 'SALESFORCEE'"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_come_before_the_database(env, tmp_path: Path, case: str) -> None:
    """Against a database that is not there (exit 3 if it were asked) and, without MONGO_URL, with no
    embedded database started (it would make ./.crm-states/)."""
    args, message = USAGE_ERRORS[case]
    bad_crm = {**env, "CRM_TYPE": "SALESFORCEE"} if case.startswith("crm") else env
    run = cli({**bad_crm, "MONGO_URL": DOWN}, *args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    embedded = {k: v for k, v in bad_crm.items() if k not in ("MONGO_URL", "MONGO_DB")}
    run = cli(embedded, *args, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / ".crm-states").exists()


# --- 6. output a person reads -------------------------------------------------------------------------------

def test_report_has_column_headers_and_lists_states_per_machine(db, env) -> None:
    text = cli(env, "report", "--machine", nb.NAME).stdout.splitlines()
    assert text[0] == f"{nb.NAME} (0 profiles)"
    assert text[1].split() == ["state", "count", "kind", "since", "(oldest", "..", "newest", "entry)"]
    unknown = cli(env, "report", "--state", "Nope", "--csv", "-")
    lines = unknown.stderr.splitlines()
    assert unknown.returncode == 2 and lines[0].endswith("the states of each machine:")
    assert lines[1].startswith(f"  {nb.NAME}: NotChecked,") and len(lines) == 1 + len(MACHINES)


def test_replay_says_what_it_restored_and_what_resume_is_for(db, env, fake: FakeSalesforce, failpoint_mongo) -> None:
    client, url = failpoint_mongo
    env = {**env, "MONGO_URL": url, "MONGO_DB": "cli"}
    client.cli.profiles.insert_one({"id": 9, "email": "journal@example.org"})
    client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1},
                          "data": {"failCommands": ["update"], "errorCode": 6}})
    assert cli(env, "signup", "--user-id", "9").returncode == 1
    client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    replayed = cli(env, "replay", env["CRM_STATES_JOURNAL"])
    assert replayed.returncode == 0, replayed.stderr
    assert "1 journal entries in" in replayed.stdout and "1 applied now, 0 already applied" in replayed.stdout
    assert "1 of their profiles stay in LoggedDbFailure (new_user_signup) until `crm-states resume --machine " \
           "new_user_signup --state LoggedDbFailure` moves them on" in replayed.stdout
    resumed = cli(env, "resume", "--machine", "new_user_signup", "--state", "LoggedDbFailure")
    assert resumed.returncode == 0 and has_count(resumed.stdout, "WroteSalesforceAppUserUid", 1)
    again = cli(env, "replay", env["CRM_STATES_JOURNAL"])
    assert "0 applied now, 1 already applied" in again.stdout and "stay in" not in again.stdout
    assert len(fake.records(APP_USER)) == 1


def test_resume_exits_1_when_profiles_land_in_a_failure_state_again(db, env, fake: FakeSalesforce) -> None:
    unexpected_responses(db, env, fake, n=10)
    fake.inject(Fault.error(503), times=4, kind="query")  # Salesforce still fails
    again = cli(env, "resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse")
    assert again.returncode == 1, again.stderr
    assert has_count(again.stdout, "WroteUnexpectedResponse", 10)
    assert "10 of them failed again (10 in WroteUnexpectedResponse)" in again.stdout
    fixed = cli(env, "resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse")
    assert fixed.returncode == 0 and has_count(fixed.stdout, "WroteNotFound", 5), fixed.stdout


def test_the_demo_refuses_a_foreign_database_in_one_line(db, env) -> None:
    db.profiles.insert_one({"id": 1, "email": "real@example.org"})
    refused = cli(env, "demo", "--profiles", "10")
    assert refused.returncode == 2 and "demo refused: database" in one_line(refused)
    assert db.profiles.count_documents({}) == 1


def test_resume_stopped_by_the_crm_limit_exits_4_and_leaves_the_profiles_where_they_were(db, env, fake) -> None:
    unexpected_responses(db, env, fake, n=10)
    fake.daily_limit = fake.api_usage  # the day's allocation is spent
    limited = cli(env, "resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse")
    assert limited.returncode == 4, limited.stdout + limited.stderr
    assert limited.stdout.startswith("0 profiles in WroteUnexpectedResponse re-driven:")
    assert "stopped: CRM API limit reached" in limited.stdout
    assert "10 profiles not re-driven (10 in WroteUnexpectedResponse)" in limited.stdout
    assert nb_states(env) == {"WroteUnexpectedResponse": 10}
    fake.daily_limit = 100_000
    assert cli(env, "resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse").returncode == 0
