"""The migration runbook (README "The migration, step by step") played end to end: the design document's
flowchart from the NationBuilder era through the interim log to Salesforce, then validation, the handling
of every failure state, the retirement of nationbuilder_id and the reconciliation by email. Sefaria's side
(its NationBuilder-era signups, its stale profile saves) and MMG's load into Salesforce are played in
process; every operator step is the `crm-states` command, as a subprocess, against FakeNationbuilder,
FakeSalesforce and SecantusDB on loopback.

It ends with every profile holding a Salesforce App User id, or listed in a named state, and with nothing
sent twice (the fakes count every request). With ``CRM_STATES_RUNBOOK_TRANSCRIPT=FILE`` it writes the
session, commands and their output, which is where the README's transcript comes from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import requests

from crm_states.api import CrmStates
from crm_states.crm import NationbuilderConnectionManager, RetryPolicy
from crm_states.journal import Journal
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.store import Store
from crm_states.testing import FakeNationbuilder, FakeSalesforce, Fault
from machines import nb_profile_validation as nb
from machines import reconcile_by_email as reconcile
from machines import retire_nb_ids as retire
from tests.faults import FlakyDatabase, WritePlan
from tests.migration_seed import APP_USER, salesforce
from tests.reliability.checks import ROOT

NB_ERA = range(1, 13)  # signed up while Sefaria wrote to NationBuilder
SPAM = 7  # deleted from NationBuilder as spam: never migrated
MIGRATED_TWICE = 5  # MMG's load made two App Users for this person
LOST_ID = 13  # signed up in NationBuilder, but Sefaria's save of the id failed
DUPLICATE_EMAIL = 14  # no NationBuilder id either; two App Users carry the email
INTERIM = range(21, 24)  # signed up while Sefaria wrote to the log
AFTER = 31  # signed up once Sefaria wrote to Salesforce


class Session:
    """Runs ``crm-states`` as an operator would and keeps the transcript."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.lines: list[str] = []

    def run(self, *args: str, expect: int = 0, **settings: str) -> str:
        shown = " ".join(f"{k}={v}" for k, v in settings.items())
        self.lines.append(f"$ {shown + ' ' if shown else ''}crm-states {' '.join(args)}")
        done = subprocess.run([sys.executable, "-m", "crm_states.cli", *args], env={**self.env, **settings},
                              cwd=self.workdir, capture_output=True, text=True, timeout=300)
        output = done.stdout + "".join(line + "\n" for line in done.stderr.splitlines()
                                        if line.startswith("crm-states:"))
        self.lines.extend(output.rstrip("\n").splitlines())
        assert done.returncode == expect, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def save(self) -> None:
        target = os.environ.get("CRM_STATES_RUNBOOK_TRANSCRIPT")
        if target:
            Path(target).write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def delete_record(fake: FakeSalesforce, record_id: str) -> None:
    """MMG removes a duplicate in Salesforce (a REST delete, as any Salesforce user would)."""
    reply = requests.delete(f"{fake.url}/services/data/v60.0/sobjects/{APP_USER}/{record_id}",
                            headers={"Authorization": f"Bearer {fake.issue_token()}"}, timeout=10)
    assert reply.status_code == 204


def test_the_whole_migration_flowchart(db, mongo_url: str, tmp_path: Path) -> None:
    with FakeSalesforce() as fake, FakeNationbuilder() as nation:
        play(db, mongo_url, fake, nation, tmp_path)


def play(db, mongo_url: str, fake: FakeSalesforce, nation: FakeNationbuilder, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "SALESFORCE_", "NATIONBUILDER_"))},
           "MONGO_URL": mongo_url, "MONGO_DB": db.name, "CRM_STATES_JOURNAL": str(journal),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret}
    shell = Session(env, tmp_path)
    salesforce_crm = {"CRM_TYPE": "SALESFORCE"}

    # --- A1: Sefaria is connected to NationBuilder ---------------------------------------------------------
    # Sefaria's signup pushed each person and saved the id NationBuilder answered (CrmInfoStore.save_crm_id).
    nb_crm = NationbuilderConnectionManager(token=nation.token, base_url=nation.api_url,
                                            session=nation.client_session(), policy=RetryPolicy(attempts=1))
    for uid in [*NB_ERA, LOST_ID]:
        person = nb_crm.add_user_to_crm(f"reader{uid}@example.org", "Reader", f"N{uid}")
        db.profiles.insert_one({"id": uid, "email": f"reader{uid}@example.org",
                                **({} if uid == LOST_ID else {"nationbuilder_id": int(person)})})
    nb_crm.mark_as_spam_in_crm(str(db.profiles.find_one({"id": SPAM})["nationbuilder_id"]))  # deletes the person
    db.profiles.insert_one({"id": DUPLICATE_EMAIL, "email": "twice@example.org"})
    pushed = nation.counts["push"]

    # --- A3.2: Sefaria writes to the log (the interim writing solution) -------------------------------------
    log = tmp_path / "crm.jsonl"
    shell.note("A3.2 interim: Sefaria writes every CRM write to the log")
    for uid in INTERIM:
        db.profiles.insert_one({"id": uid, "email": f"new{uid}@example.org"})  # Sefaria creates the profile
        shell.run("signup", "--user-id", str(uid), "--email", f"new{uid}@example.org", "--first-name", "New",
                  "--last-name", f"Reader {uid}", CRM_TYPE="LOG", CRM_LOG_PATH=log.name)
    assert all(p["sf_app_user_id"].startswith("pending:") for p in db.profiles.find({"id": {"$in": list(INTERIM)}}))

    # --- B3/B4: MMG loads the final data into Salesforce production -----------------------------------------
    for person in nation.people():
        contact = fake.insert("Contact", {"Email": person["email"], "NationBuilder_Id__c": str(person["id"])})
        copies = 2 if person["email"] == f"reader{MIGRATED_TWICE}@example.org" else 1
        for _ in range(copies):
            fake.insert(APP_USER, {"Sefaria_App_Email__c": person["email"], "Contact__c": contact,
                                   "NationBuilder_Id__c": str(person["id"])})
    [twice_a, twice_b] = [fake.insert(APP_USER, {"Sefaria_App_Email__c": "twice@example.org"}) for _ in range(2)]

    # --- A5 Log -> A3.3: Sefaria writes to Salesforce; Load: the log goes to Salesforce, once ---------------
    db.profiles.insert_one({"id": AFTER, "email": f"new{AFTER}@example.org"})
    shell.note("A3.3 Sefaria now writes to Salesforce")
    shell.run("signup", "--user-id", str(AFTER), **salesforce_crm)
    shell.note("Load: the interim log to Salesforce (a second load sends nothing)")
    shell.run("load-log", log.name, **salesforce_crm)
    again = shell.run("load-log", log.name, **salesforce_crm)
    assert "sent 0 CRM writes" in again and "3 already loaded" in again
    creates = fake.counts["create"] + fake.counts["upsert"] + fake.counts["collection_create"]
    assert creates == len(INTERIM) + 1

    # --- Validation of the NationBuilder-era profiles -------------------------------------------------------
    # MongoDB refuses the write of one profile's result (in process: the fault needs a test double).
    flaky = FlakyDatabase(db, WritePlan({("profiles", "update", 1)}))
    ValidationRunner(CrmStates(store=Store(flaky), crm=salesforce(fake), journal=Journal(journal)),
                     RunnerConfig(chunk_size=1, limit=1)).run()
    fake.inject(Fault.error(503), times=4, kind="query")  # and Salesforce is down for one lookup
    shell.note("validation: MongoDB refused one write; Salesforce failed one lookup past its retries")
    shell.run("validate-nb", "--chunk-size", "4", "--concurrency", "1", **salesforce_crm)
    shell.run("report", "--machine", nb.NAME, "--no-drift")

    # --- Handling the failure states ------------------------------------------------------------------------
    shell.note("ErrorLogged: pull the journaled result and write it, then move the profile on")
    shell.run("replay", journal.name)
    shell.run("resume", "--machine", nb.NAME, "--state", "DbWriteOkErrorLogged")
    shell.note("WroteUnexpectedResponse: the outage is over; ask again")
    shell.run("resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse", expect=1, **salesforce_crm)
    stuck = CrmStates.open(db, salesforce(fake)).position(MIGRATED_TWICE, nb.NAME)
    shell.note(f"still unexpected: {stuck.detail['error']}; MMG deletes the duplicate App User")
    delete_record(fake, stuck.detail["candidates"][1])
    shell.run("resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse", **salesforce_crm)

    # --- Retirement of nationbuilder_id ---------------------------------------------------------------------
    shell.note("retirement is refused while a failure state is not handled")
    shell.run("retire-nb-ids", expect=1)
    exported = shell.run("report", "--machine", nb.NAME, "--state", "WroteNotFound", "--csv", "-")
    assert [row["id"] for row in csv.DictReader(io.StringIO(exported))] == [str(SPAM)]
    shell.note("MarComs decided about WroteNotFound: retire those ids too")
    shell.run("retire-nb-ids", "--allow-state", "WroteNotFound")
    assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 0
    stale = {"id": 3, "email": "reader3@example.org", "nationbuilder_id": retired_value(db, 3),
             "sf_app_user_id": db.profiles.find_one({"id": 3})["sf_app_user_id"]}
    db.profiles.replace_one({"id": 3}, stale)  # Sefaria saves a copy it loaded before the retirement
    shell.note("a stale profile save brought a retired id back: the next run finds it and retires it again")
    reappeared = shell.run("retire-nb-ids", "--allow-state", "WroteNotFound")
    assert "1 of them hold the very id this machine retired before" in reappeared
    shell.note("every retired id can be put back exactly (a dry run here: nothing restored)")
    assert f"{len(NB_ERA)} retired nationbuilder_ids to restore" in shell.run("retire-nb-ids", "--undo", "--dry-run")

    # --- Reconciliation of migrated users without a nationbuilder_id ----------------------------------------
    shell.note("reconcile: profiles with neither a nationbuilder_id nor an App User id")
    shell.run("reconcile-by-email", expect=1, **salesforce_crm)
    listed = shell.run("report", "--machine", reconcile.NAME, "--state", "WroteEmailNotFound", "--csv", "-")
    assert [row["id"] for row in csv.DictReader(io.StringIO(listed))] == [str(SPAM)]
    shell.note("the stale save also erased profile 3's CrmLog line: heal writes it back (no CRM call)")
    healed = shell.run("heal")
    assert "1 drifted, wrote back 1" in healed
    shell.run("report", "--no-drift")
    report = json.loads(subprocess.run([sys.executable, "-m", "crm_states.cli", "report", "--json"], env=env,
                                       capture_output=True, text=True, timeout=300).stdout)
    shell.save()

    # --- The end: every profile holds an App User id, or is listed in a named state; nothing sent twice ------
    app_users = {r["Id"]: r for r in fake.records(APP_USER)}
    listed_states = {}
    for profile in db.profiles.find():
        held = profile.get("sf_app_user_id")
        if held in app_users:
            continue
        position = CrmStates.open(db, salesforce(fake)).position(profile["id"], reconcile.NAME)
        listed_states[profile["id"]] = position.state if position else None
    assert listed_states == {SPAM: "WroteEmailNotFound", DUPLICATE_EMAIL: "WroteAmbiguousResponse"}
    assert report[reconcile.NAME]["WroteAmbiguousResponse"]["count"] == 1
    assert sorted(CrmStates.open(db, salesforce(fake)).position(DUPLICATE_EMAIL, reconcile.NAME).detail["candidates"]) \
        == sorted([twice_a, twice_b])
    assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 0
    assert fake.counts["create"] + fake.counts["upsert"] + fake.counts["collection_create"] == creates  # no creates after
    by_email = Counter(str(r["Sefaria_App_Email__c"]).lower() for r in fake.records(APP_USER))
    assert all(by_email[f"new{uid}@example.org"] == 1 for uid in [*INTERIM, AFTER])
    assert nation.counts["push"] == pushed  # nothing went to NationBuilder after its era
    assert report[retire.NAME]["WroteNbIdRemoved"]["count"] == len(NB_ERA)
    assert {state: row["count"] for state, row in report[nb.NAME].items() if row["count"]} == {
        "WroteSalesforceAppUserUid": len(NB_ERA) - 1, "WroteNotFound": 1}
    drift = subprocess.run([sys.executable, "-m", "crm_states.cli", "heal", "--dry-run", "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
    # No drift, and no record counted stale: the validation's records still stand on the retired ids.
    assert {m: f for m, f in json.loads(drift.stdout).items() if f["drifted"] or f["stale_inputs"]} == {}


def retired_value(db, pid: int) -> object:
    return retire.restored(Store(db).position(pid, retire.NAME).detail)
