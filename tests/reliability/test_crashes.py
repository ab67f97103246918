"""1. Crashes: SIGKILL the batch runner and a batch of signups at random instants, again and again, then
let them finish. Nothing is lost, every history is a path of its diagram, Salesforce gets no duplicate."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from crm_states.store import POSITIONS, position_key
from crm_states.testing import Fault, FakeSalesforce
from tests.faults import states_by_profile
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.reliability.checks import (
    APP_USER,
    app_users_by,
    check_histories,
    cli_command,
    cli_env,
    record,
    seed_nb_profiles,
    seed_signup_profiles,
    wait_until,
)

HERE = Path(__file__).resolve().parent
PROFILES = 10_000
MORE_PROFILES = 2_000
MID_RUN_KILLS = 20
SIGNUPS = 300
SIGNUP_KILLS = 12


def _finished(db, machine) -> int:
    spec = nb.SPEC if machine == nb.NAME else signup.SPEC
    return db[POSITIONS].count_documents({"machine": machine, "state": {"$in": sorted(spec.terminal)}})


def _pending_ids(db, total: int) -> list[int]:  # type: ignore[no-untyped-def]
    terminal = {"machine": nb.NAME, "state": {"$in": sorted(nb.SPEC.terminal)}}
    done = {d["profile_id"] for d in db[POSITIONS].find(terminal, {"_id": 0, "profile_id": 1})}
    return [pid for pid in range(1, total + 1) if pid not in done]


def test_validate_nb_killed_at_random_instants_loses_nothing(db, mongo_url: str, fake: FakeSalesforce,
                                                              tmp_path: Path) -> None:
    """Each kill lands at a random point of progress measured in the database (once the k-th pending
    profile, k random, has its profile written or its position moved: the runner's next write may be
    that position, a lease or another chunk's lookup), whatever the server's speed; when the work runs
    out before the kills have landed, more profiles are added."""
    found = seed_nb_profiles(db, fake, PROFILES)
    total = PROFILES
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    command = cli_command("validate-nb", "--chunk-size", "50", "--concurrency", "2")
    rng = random.Random(20_261_124)
    started = time.monotonic()
    kills = mid_run = early = lives_that_finished = 0
    dangling_after_kill: list[int] = []
    finished_after_kill: list[int] = []
    while mid_run < MID_RUN_KILLS or kills < MID_RUN_KILLS + 4:
        pending = _pending_ids(db, total)
        if len(pending) < 200:  # the work ran out before the kills landed: add more
            found.update(seed_nb_profiles(db, fake, MORE_PROFILES, first_id=total + 1))
            pending += range(total + 1, total + MORE_PROFILES + 1)
            total += MORE_PROFILES
        queries = fake.counts["query"]
        # The profile whose progress triggers the kill, and what to watch: its profile write (the kill may
        # fall before its position moves) or its position. Point queries: cheap on every server, so the
        # watching does not slow the runner down.
        to_go = max(1, MID_RUN_KILLS - mid_run)
        # (never one of the last 100: the kill must leave the final run work to finish)
        target = pending[rng.randint(1, max(1, min(2 * len(pending) // (to_go + 1), len(pending) - 100))) - 1]
        watch = (db.profiles, {"id": target, "$or": [{"sf_app_user_id": {"$exists": True}},
                                                     {"CrmLog": {"$exists": True}}]})
        if rng.random() < 0.5 or db.profiles.find_one(watch[1], {"_id": 1}):  # (a write left by a kill)
            watch = (db[POSITIONS], {"_id": position_key(nb.NAME, target),
                                     "state": {"$in": sorted(nb.SPEC.terminal)}})
        with open(tmp_path / "runner.log", "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        spawned = time.monotonic()
        if rng.random() < 0.2:  # anywhere in start-up: connecting, agreeing ranges, claiming leases
            wait_until(lambda: fake.counts["query"] > queries or process.poll() is not None, rng.uniform(0.05, 1.0))
        else:  # once a random share of what is left is done: about 1/(kills to go) of it on average
            collection, query = watch
            wait_until(lambda: collection.find_one(query, {"_id": 1}) is not None or process.poll() is not None,
                       60, interval=0.005)
        if process.poll() is not None:
            lives_that_finished += 1
            assert lives_that_finished < 10, "the runs keep finishing before a kill lands"
            continue  # finished on its own: more work comes next time round
        worked = fake.counts["query"] > queries
        process.kill()
        process.wait(30)
        kills += 1
        mid_run += worked
        early += not worked
        finished = _finished(db, nb.NAME)
        finished_after_kill.append(finished)
        # A lookup writes the profile, then its position: profiles written beyond the finished positions
        # were killed between the two writes (the next run looks them up again).
        written = db.profiles.count_documents({"$or": [{"sf_app_user_id": {"$exists": True}},
                                                       {"CrmLog": {"$exists": True}}]})
        dangling_after_kill.append(written - finished)
        assert time.monotonic() - spawned < 60
    assert mid_run >= MID_RUN_KILLS, f"only {mid_run} kills landed mid-run ({kills} in all)"
    assert finished_after_kill[-1] < total, "the runs finished before the kills were done"

    killing = time.monotonic() - started
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    finishing = time.monotonic() - started - killing

    # 0 profiles lost: each in exactly one state, the one its Salesforce answer gives.
    states = {p["id"]: None for p in db.profiles.find({}, {"_id": 0, "id": 1})} | states_by_profile(db, nb.NAME)
    expected = {pid: "WroteSalesforceAppUserUid" if pid in found else "WroteNotFound" for pid in states}
    lost = {pid: state for pid, state in states.items() if state != expected[pid]}
    assert len(states) == total and not lost, f"{len(lost)} profiles lost, e.g. {list(lost.items())[:5]}"
    wrong_ids = [p["id"] for p in db.profiles.find({"sf_app_user_id": {"$exists": True}}, {"id": 1, "sf_app_user_id": 1})
                 if found.get(p["id"]) != p["sf_app_user_id"]]
    assert not wrong_ids and db.profiles.count_documents({"sf_app_user_id": {"$exists": True}}) == len(found)
    # 0 histories that are not diagram paths; no transition twice, one run per profile.
    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    assert check.profiles == total and check.transitions == 4 * total
    assert set(check.per_profile.values()) == {4} and set(check.runs_per_profile.values()) == {1}
    # 0 duplicate app users: validation only reads; nothing was created, nothing doubled.
    assert len(fake.records(APP_USER)) == len(found)
    assert set(app_users_by(fake, "NationBuilder_Id__c").values()) == {1}
    assert fake.counts["create"] == fake.counts["upsert"] == 0
    # A killed runner cannot release its leases; any runner takes them over at once (leases.py), and the
    # final run removed those left when it started: none is left at the end.
    stale = [lease["owner"] for lease in db.crm_leases.find({"owner": {"$exists": True}})]
    assert stale == [], stale

    record("1a crashes: validate-nb SIGKILL", profiles=total, kills=kills, kills_mid_run=mid_run,
           lives_that_finished=lives_that_finished,
           kills_during_startup=early, kills_between_the_two_writes=sum(d > 0 for d in dangling_after_kill),
           max_profiles_written_ahead_of_their_position=max(dangling_after_kill), finished_before_final_run=finished_after_kill[-1],
           lookups=fake.counts["query"], transitions=check.transitions, lost=len(lost),
           bad_histories=len(check.violations), duplicate_app_users=0,
           stale_leases_of_dead_runners=len(stale), final_run=final.stdout.splitlines()[0],
           seconds_killing=round(killing, 1), seconds_final_run=round(finishing, 1))


def test_signups_killed_at_random_instants_never_create_twice(db, mongo_url: str, fake: FakeSalesforce,
                                                               tmp_path: Path) -> None:
    first = 100_001
    ids = seed_signup_profiles(db, SIGNUPS, first_id=first)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    driver = [sys.executable, str(HERE / "signup_driver.py"), str(first), str(first + SIGNUPS - 1)]
    rng = random.Random(6)
    kills = 0
    created_not_written: list[int] = []
    in_flight_creates: list[int] = []
    while kills < SIGNUP_KILLS:
        creates = fake.counts["create"]
        fake.clear_faults()
        # Two slow creates per life widen the window between Salesforce's create and the id's write.
        fake.inject(Fault.slow(0.3), times=2, kind="create")
        with open(tmp_path / "driver.log", "ab") as log:
            process = subprocess.Popen(driver, env=env, stdout=log, stderr=log)
        wait_until(lambda: fake.counts["create"] > creates or process.poll() is not None, 30)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is not None:
            break
        in_flight = fake.counts["create"]
        process.kill()
        process.wait(30)
        kills += 1
        time.sleep(0.35)  # a create the kill interrupted still completes in Salesforce
        written = db.profiles.count_documents({"id": {"$gte": first}, "sf_app_user_id": {"$exists": True}})
        created_not_written.append(len(fake.records(APP_USER)) - written)
        in_flight_creates.append(in_flight)
    assert kills == SIGNUP_KILLS, f"the signups finished after {kills} kills"
    assert db.profiles.count_documents({"id": {"$gte": first}, "sf_app_user_id": {"$exists": True}}) < SIGNUPS

    fake.clear_faults()
    final = subprocess.run(driver, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["raised"] == [] and summary["states"] == {"WroteSalesforceAppUserUid": SIGNUPS}

    # Each new user has exactly one app user, and its profile holds that app user's id.
    by_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert len(fake.records(APP_USER)) == SIGNUPS
    assert {e: n for e, n in by_email.items() if n != 1} == {}
    assert set(by_email) == {f"new{i}@example.org" for i in ids}
    record_of = {r["Sefaria_App_Email__c"].lower(): r["Id"] for r in fake.records(APP_USER)}
    mismatched = [p["id"] for p in db.profiles.find({"id": {"$gte": first}}, {"id": 1, "email": 1, "sf_app_user_id": 1})
                  if p.get("sf_app_user_id") != record_of[p["email"]]]
    assert not mismatched, mismatched[:10]
    check = check_histories(db, signup.SPEC)
    check.assert_clean()
    assert check.profiles == SIGNUPS and check.states == Counter({"WroteSalesforceAppUserUid": SIGNUPS})
    assert set(check.per_profile.values()) == {4} and set(check.runs_per_profile.values()) == {1}

    record("1b crashes: signup driver SIGKILL", users=SIGNUPS, kills=kills,
           kills_leaving_app_user_created_but_id_unwritten=sum(n > 0 for n in created_not_written),
           app_users_adopted_after_a_kill=sum(created_not_written), create_requests=fake.counts["create"],
           app_users=len(fake.records(APP_USER)), duplicate_app_users=0, bad_histories=len(check.violations))
