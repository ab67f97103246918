"""2. Database faults: the database server process is stopped (SIGSTOP), then killed (SIGKILL) and restarted
on the same data directory while the batch runner and a batch of signups are running.

Every profile caught either lands in its diagram's DB-failure state with one journal entry, or is simply
retried later; ``crm-states replay`` restores every journaled state and a second replay changes nothing;
then the runs finish and resuming the DB-failure states ends every profile where Salesforce says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pymongo import MongoClient

from crm_states.journal import read_entries
from crm_states.store import POSITIONS, Store
from crm_states.testing import Fault, FakeSalesforce, MongoServer
from tests.faults import states_by_profile
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.reliability.checks import (
    APP_USER,
    app_users_by,
    check_histories,
    cli,
    cli_command,
    cli_env,
    record,
    seed_nb_profiles,
    seed_signup_profiles,
    snapshot,
    wait_until,
)

HERE = Path(__file__).resolve().parent
PROFILES = 3000
SIGNUPS = 200
FIRST_SIGNUP = 100_001
SPECS = {nb.NAME: nb.SPEC, signup.NAME: signup.SPEC}


@pytest.fixture
def server(mongo_server_factory, tmp_path: Path) -> MongoServer:
    """A private server of the run's backend on a data directory that its restarts keep."""
    return mongo_server_factory(tmp_path / "db", log_path=tmp_path / "server.log")


@pytest.mark.parametrize("downtime", [0.0, 15.0], ids=["restart-at-once", "down-longer-than-server-selection"])
def test_database_stopped_and_killed_mid_run(server: MongoServer, fake: FakeSalesforce, tmp_path: Path,
                                             downtime: float) -> None:
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=30_000)
    db = client.reliability
    found = seed_nb_profiles(db, fake, PROFILES)
    seed_signup_profiles(db, SIGNUPS, first_id=FIRST_SIGNUP)
    journal = tmp_path / "journal.jsonl"
    env = cli_env(server.url, db.name, fake, journal)
    runner_cmd = cli_command("validate-nb", "--chunk-size", "50", "--concurrency", "2")
    driver_cmd = [sys.executable, str(HERE / "signup_driver.py"), str(FIRST_SIGNUP), str(FIRST_SIGNUP + SIGNUPS - 1)]
    logs = {name: tmp_path / f"{name}.log" for name in ("runner", "driver")}
    with open(logs["runner"], "wb") as runner_log, open(logs["driver"], "wb") as driver_log:
        runner = subprocess.Popen(runner_cmd, env=env, stdout=runner_log, stderr=runner_log)
        driver = subprocess.Popen(driver_cmd, env=env, stdout=driver_log, stderr=driver_log)
        assert wait_until(lambda: fake.counts["query"] >= 12 and fake.counts["create"] >= 30, 120), fake.counts
        # One signup's create is slow: Salesforce makes the app user while the database goes away, so the
        # write of its id meets the outage (the dangerous case: the id must not stay only in Salesforce).
        # The outage starts 0.5 s after that create went out, once the database has flushed the run's
        # write-ahead record: a crash right after it loses it (test_the_write_ahead_record_survives_...).
        fake.inject(Fault.slow(4.0), times=1, kind="create")
        creates = fake.counts["create"]
        assert wait_until(lambda: fake.counts["create"] > creates, 30)
        time.sleep(0.5)
        done_before = db[POSITIONS].count_documents({"machine": nb.NAME, "state": {"$in": sorted(nb.SPEC.terminal)}})
        server.pause()  # SIGSTOP: requests hang
        time.sleep(2.0)
        server.kill()  # SIGKILL: connections reset, unflushed writes gone
        time.sleep(downtime)
        server.start()  # same port, same data directory
        runner_code = runner.wait(240)
        driver_code = driver.wait(240)
    runner_out, driver_out = logs["runner"].read_text(), logs["driver"].read_text()
    # No traceback through our code. (pymongo's background thread may print one when it cannot kill the
    # runner's abandoned cursor on the dead server: its own noise, not a crash.)
    ours = re.findall(r'File "[^"]*/(?:crm_states|machines)/[^"]*"', runner_out + driver_out)
    assert not ours, runner_out[-3000:] + driver_out[-3000:]
    # The runner outlives the outage: its lost cursor over pending ids is opened again after the last id.
    assert runner_code in (0, 1), runner_out[-2000:]  # done, or done with profiles in failure states
    driver_raised = [int(m) for m in re.findall(r"^user (\d+): \w+", driver_out, re.M)]

    # The journal: one entry per profile caught in a DB-failure state, also in the processes' logs.
    entries = list(read_entries(journal.read_text().splitlines())) if journal.exists() else []
    if downtime > 5:  # longer than the clients' server selection (5 s): pymongo's one retry fails too
        assert entries, "the outage caught no write: nothing was tested"
    per_profile = Counter((e.machine, e.profile_id) for e in entries)
    assert set(per_profile.values()) <= {1}, [k for k, n in per_profile.items() if n > 1]
    for entry in entries:
        assert entry.transitions[-1].dest in SPECS[entry.machine].db_failure_states, entry
    logged = {e.entry_id for e in read_entries((runner_out + driver_out).splitlines())}
    assert logged == {e.entry_id for e in entries}
    after_ok = [e for e in entries if e.machine == signup.NAME and e.transitions[-2].dest == "OK"]
    for entry in after_ok:  # the id of an app user Salesforce made is never only in Salesforce
        assert entry.write is not None and entry.write.set["sf_app_user_id"].startswith("a0A")
    if downtime > 5:
        assert after_ok, "the slow create's id write did not meet the outage"

    # crm-states replay restores every journaled DB-failure state; a second replay changes nothing.
    if not entries:  # a quick restart: pymongo's retryable writes carried every write over it
        journal.touch()
    first = cli(env, "replay", str(journal))
    if entries:
        assert first.returncode == 0, first.stdout + first.stderr
        applied = int(re.search(r"(\d+) applied now", first.stdout).group(1))
        assert f"{len(entries)} journal entries" in first.stdout and "failed" not in first.stdout
    else:  # an empty journal is refused as holding nothing to replay, and changes nothing
        assert first.returncode == 2 and "is empty: no journal entry" in first.stderr, first.stderr
        applied = 0
    in_failure_states = {(name, pid): state for name, spec in SPECS.items()
                         for pid, state in states_by_profile(db, name).items() if state in spec.db_failure_states}
    # Each journaled profile is in its DB-failure state, unless the write the journal calls failed did land
    # and only its acknowledgement was lost to the outage: then the same run (same token) holds the
    # success state it was writing, and the entry changes nothing.
    store = Store(db)
    landed = {}
    for e in entries:
        if (e.machine, e.profile_id) in in_failure_states:
            continue
        history = store.history(e.profile_id, e.machine)
        failed = e.transitions[-1]
        last = history[-1]
        assert (last.seq, last.run_id, last.by, last.source) == (failed.seq, failed.run_id, failed.by, failed.source), (
            e.profile_id, failed, last)
        assert last.dest in SPECS[e.machine].diagram.finals or last.dest.startswith("Wrote"), last
        landed[(e.machine, e.profile_id)] = last.dest
    assert set(in_failure_states) | set(landed) == {(e.machine, e.profile_id) for e in entries}
    assert all(in_failure_states[k] == e.transitions[-1].dest for e in entries
               if (k := (e.machine, e.profile_id)) in in_failure_states)
    profiles = {p["id"]: p for p in db.profiles.find({"id": {"$in": [e.profile_id for e in entries]}})}
    for entry in entries:
        if entry.write and entry.write.set:
            assert {k: profiles[entry.profile_id].get(k) for k in entry.write.set} == dict(entry.write.set)
        if entry.write and entry.write.crm_log:
            assert entry.write.crm_log in profiles[entry.profile_id]["CrmLog"]
    before = snapshot(db)
    second = cli(env, "replay", str(journal))
    assert second.returncode == (0 if entries else 2), second.stdout + second.stderr
    assert not entries or f"0 applied now, {len(entries)} already applied" in second.stdout, second.stdout
    assert snapshot(db) == before

    # Then the interrupted runs are retried: the same commands again finish every profile.
    rerun = cli(env, *runner_cmd[3:])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    again = subprocess.run(driver_cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["raised"] == [], again.stdout
    for name, spec in SPECS.items():
        check = check_histories(db, spec)
        check.assert_clean()
        stuck = {s: n for s, n in check.states.items() if s not in spec.terminal}
        assert not stuck, stuck
    nb_states = states_by_profile(db, nb.NAME)
    assert len(nb_states) == PROFILES
    journaled_nb = {e.profile_id: landed.get((e.machine, e.profile_id), e.transitions[-1].dest)
                    for e in entries if e.machine == nb.NAME}
    for pid, state in nb_states.items():
        expected = journaled_nb.get(pid) or ("WroteSalesforceAppUserUid" if pid in found else "WroteNotFound")
        assert state == expected, (pid, state, expected)

    # Resuming the DB-failure states ends them where Salesforce says, without a second app user.
    creates = fake.counts["create"]
    resumed = Counter()
    for name, spec in SPECS.items():
        for state in sorted(spec.db_failure_states):
            out = cli(env, "resume", "--machine", name, "--state", state)
            assert out.returncode == 0, out.stdout + out.stderr
            resumed[f"{name}.{state}"] = int(out.stdout.split()[0])
    assert fake.counts["create"] == creates  # LoggedDbFailure after OK: the journaled id, no CRM call
    final_nb = Counter(states_by_profile(db, nb.NAME).values())
    assert final_nb == {"WroteSalesforceAppUserUid": len(found), "WroteNotFound": PROFILES - len(found)}
    final_signup = Counter(state for pid, state in states_by_profile(db, signup.NAME).items() if pid >= FIRST_SIGNUP)
    assert final_signup == {"WroteSalesforceAppUserUid": SIGNUPS}
    by_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert all(by_email[f"new{i}@example.org"] == 1 for i in range(FIRST_SIGNUP, FIRST_SIGNUP + SIGNUPS))
    for name, spec in SPECS.items():
        check_histories(db, spec).assert_clean()
    client.close()

    record(f"2 database faults: SIGSTOP 2 s, SIGKILL, restart after {downtime:g} s",
           nb_profiles=PROFILES, signups=SIGNUPS, validated_before_the_outage=done_before,
           runner_exit=runner_code, runner_said=runner_out.strip().splitlines()[-1][:80], driver_exit=driver_code,
           signup_calls_that_raised=len(driver_raised),
           journal_entries=len(entries),
           entries_by_state=dict(Counter(e.transitions[-1].dest for e in entries)),
           entries_not_persisted=sum(not e.persisted for e in entries), replay_applied=applied,
           writes_that_landed_with_their_answer_lost=len(landed),
           signup_ids_journaled_after_ok=len(after_ok),
           second_replay_applied=0, resumed=dict(resumed), app_users=len(fake.records(APP_USER)),
           duplicate_app_users=sum(n - 1 for n in by_email.values() if n > 1))


def test_the_write_ahead_record_survives_a_database_crash(server: MongoServer, fake: FakeSalesforce,
                                                           tmp_path: Path) -> None:
    """The signup's transitions up to RequestAddToSalesforce are committed (acknowledged) before the create
    goes out; the database then crashes (SIGKILL) while the create is in flight and restarts at once.
    README: "a crash never leaves an unrecorded CRM side effect". So the run must end with the app user's
    id on the profile, or in a DB-failure state with the id journaled, never with a success reported and
    the id nowhere in MongoDB."""
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=30_000)
    db = client.reliability
    seed_signup_profiles(db, 1, first_id=7)
    env = cli_env(server.url, db.name, fake, tmp_path / "journal.jsonl")
    fake.inject(Fault.slow(2.0), times=1, kind="create")
    driver = subprocess.Popen([sys.executable, str(HERE / "signup_driver.py"), "7", "7"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_until(lambda: fake.counts["create"] > 0, 60, interval=0.001)  # write-ahead acknowledged
    server.kill()
    server.start()
    out = driver.communicate(timeout=120)[0]
    summary = json.loads(out.strip().splitlines()[-1])
    [app_user] = fake.records(APP_USER)
    profile = db.profiles.find_one({"id": 7})
    state = Store(db).position(7, signup.NAME).state
    journaled = [e for e in read_entries(Path(env["CRM_STATES_JOURNAL"]).read_text().splitlines())] \
        if Path(env["CRM_STATES_JOURNAL"]).exists() else []
    record("2 database faults: SIGKILL while a create is in flight", driver_said=summary["states"],
           profile_state=state, profile_app_user_id=profile.get("sf_app_user_id"), journal_entries=len(journaled),
           transitions=len(Store(db).history(7, signup.NAME)))
    assert (state, profile.get("sf_app_user_id")) == ("WroteSalesforceAppUserUid", app_user["Id"]) or (
        state == "LoggedDbFailure" and journaled), (summary, state, profile)
    check_histories(db, signup.SPEC).assert_clean()
    client.close()
