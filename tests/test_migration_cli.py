"""``crm-states retire-nb-ids`` and ``crm-states reconcile-by-email`` as an operator runs them (a subprocess;
SecantusDB and FakeSalesforce on loopback): bad flags are one-line errors before the database starts, each
asks for a CRM only where it uses one, and what they print is what the database holds."""
# ruff: noqa: F811  (the fixtures of tests/test_cli.py are imported and then named as test parameters)

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from crm_states.store import POSITIONS
from machines import reconcile_by_email as reconcile
from machines import retire_nb_ids as retire
from tests.migration_seed import (
    APP_USER,
    seed_nb_app_users,
    seed_nb_profiles,
    validate_all,
)
from tests.test_cli import cli, env, fake, has_count  # noqa: F401
from tests.test_cli_honest import DOWN, one_line, without_crm

BAD_FLAGS = {
    "unknown state": (["retire-nb-ids", "--allow-state", "Nope"], "'Nope' is not a failure state of nb_profile_validation"),
    "final state": (["retire-nb-ids", "--allow-state", "WroteSalesforceAppUserUid"], "is not a failure state"),
    "undo and allow": (["retire-nb-ids", "--undo", "--allow-state", "WroteNotFound"], "--allow-state is for retiring"),
    "date": (["reconcile-by-email", "--joined-before", "last tuesday"], "--joined-before expects a date"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_errors_before_the_database_starts(env, tmp_path: Path, case: str) -> None:
    args, message = BAD_FLAGS[case]
    run = cli({**env, "MONGO_URL": DOWN}, *args)
    assert run.returncode == 2 and message in one_line(run)
    embedded = {k: v for k, v in env.items() if k not in ("MONGO_URL", "MONGO_DB")}
    run = cli(embedded, *args, cwd=tmp_path)
    assert run.returncode == 2 and message in one_line(run) and not (tmp_path / ".crm-states").exists()


@pytest.mark.parametrize("args", [["retire-nb-ids", "--chunk-size", "0"], ["retire-nb-ids", "--limit", "-1"],
                                  ["reconcile-by-email", "--concurrency", "1000"],
                                  ["reconcile-by-email", "--max-api-calls", "0"],
                                  ["reconcile-by-email", "--lease-seconds", "nan"]])
def test_numbers_out_of_range_are_usage_errors(env, args: list[str]) -> None:
    run = cli({**env, "MONGO_URL": DOWN}, *args)
    assert run.returncode == 2 and "usage: crm-states" in run.stderr and args[1] in run.stderr


def test_reconcile_needs_salesforce_before_the_database_starts(env) -> None:
    for crm_type in ("NONE", "LOG"):
        run = cli({**without_crm(env, crm_type), "MONGO_URL": DOWN, "CRM_LOG_PATH": "/tmp/x.jsonl"}, "reconcile-by-email")
        assert run.returncode == 2 and "reconcile-by-email needs CRM_TYPE=SALESFORCE" in one_line(run)
    dry = cli(without_crm(env), "reconcile-by-email", "--dry-run")
    assert dry.returncode == 0 and "0 profiles without a nationbuilder_id" in dry.stdout


def test_retirement_from_the_shell_needs_no_crm_and_prints_what_the_database_holds(db, env, fake) -> None:
    ids = range(1, 31)
    seed_nb_app_users(fake, ids)
    seed_nb_profiles(db, ids)
    validate_all(db, fake)
    shell = without_crm(env)  # no CRM_TYPE at all: the retirement makes no CRM call

    refused = cli(shell, "retire-nb-ids")
    assert refused.returncode == 1, refused.stderr
    assert "refused: 20 profiles holding a nationbuilder_id are not ready" in refused.stdout
    assert has_count(refused.stdout, "WroteNotFound", 20)
    assert "crm-states report --machine nb_profile_validation --state WroteNotFound --csv FILE" in refused.stdout
    assert db[POSITIONS].count_documents({"machine": retire.NAME}) == 0

    exported = cli(shell, "report", "--machine", "nb_profile_validation", "--state", "WroteNotFound", "--csv", "-")
    assert len(list(csv.reader(io.StringIO(exported.stdout)))) == 21
    dry = cli(shell, "retire-nb-ids", "--allow-state", "WroteNotFound", "--dry-run")
    assert dry.returncode == 0 and "30 ready to retire" in dry.stdout and "dry run" in dry.stdout
    done = cli(shell, "retire-nb-ids", "--allow-state", "WroteNotFound")
    assert done.returncode == 0, done.stdout + done.stderr
    assert has_count(done.stdout, "WroteNbIdRemoved", 30)
    counts = json.loads(cli(shell, "report", "--json", "--machine", retire.NAME).stdout)[retire.NAME]
    assert counts["WroteNbIdRemoved"]["count"] == 30 == db.profiles.count_documents({"nationbuilder_id": {"$exists": False}})
    assert counts["ValidationNoLongerHolds"]["kind"] == "stopped" and counts["ValidationNoLongerHolds"]["note"]
    undo = cli(shell, "retire-nb-ids", "--undo")
    assert undo.returncode == 0 and has_count(undo.stdout, "WroteNbIdRestored", 30)
    assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 30


def test_reconciliation_from_the_shell(db, env, fake) -> None:
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "found@example.org"})
    db.profiles.insert_many([{"id": 1, "email": "found@example.org"}, {"id": 2, "email": "lost@example.org"}])
    run = cli(env, "reconcile-by-email")
    assert run.returncode == 1, run.stdout + run.stderr  # one not found: something to look at
    assert has_count(run.stdout, "WroteSalesforceAppUserUid", 1) and has_count(run.stdout, "WroteEmailNotFound", 1)
    assert f"--machine {reconcile.NAME} --state WroteEmailNotFound --csv FILE" in run.stdout
    exported = list(csv.DictReader(io.StringIO(cli(env, "report", "--machine", reconcile.NAME, "--state",
                                                   "WroteEmailNotFound", "--csv", "-").stdout)))
    assert [(r["id"], r["email"]) for r in exported] == [("2", "lost@example.org")]
    assert exported[0]["last_crm_log"].startswith("EmailReconcileNotFoundInSalesforce-")
    fake.insert(APP_USER, {"Sefaria_App_Email__c": "lost@example.org"})
    none = cli(without_crm(env, "NONE"), "resume", "--machine", reconcile.NAME, "--state", "WroteEmailNotFound")
    assert none.returncode == 2 and "resume needs CRM_TYPE=SALESFORCE" in one_line(none)
    resumed = cli(env, "resume", "--machine", reconcile.NAME, "--state", "WroteEmailNotFound")
    assert resumed.returncode == 0 and has_count(resumed.stdout, "WroteSalesforceAppUserUid", 1)
    assert db.profiles.find_one({"id": 2})["sf_app_user_id"].startswith("a0A")
