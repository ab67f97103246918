"""Kills during the scale modes: ``validate-nb --snapshot`` SIGKILLed while its job is polled, its pages
loaded and its ranges joined, and ``signup --pending`` SIGKILLed around its collections creates, at random
points of their progress as the database shows it; then a last run. Nothing is lost, nothing is done
twice: one job for every history, one App User per user, every history a diagram path, and the last run's
figures are the database's."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from crm_states.store import POSITIONS
from crm_states.store.snapshots import SNAPSHOTS
from crm_states.testing import Fault, FakeSalesforce
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.faults import states_by_profile
from tests.reliability.checks import (APP_USER, app_users_by, check_histories, cli_command, cli_env, record, settled,
                                      wait_until)
from tests.snapshot_world import EXPECTED, SCHEMA_ENV, kind_of, seed_org, seed_profiles

PROFILES = 3000
USERS = 1000
KILLS = 10


def _printed(out: str) -> Counter[str]:
    return Counter({m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\w+)\s+(\d+)$", out, re.M)})


def _kill_at_random_progress(command: list[str], env: dict[str, str], progress, rng: random.Random, log: Path,
                             *, steps: tuple[int, int], after_kill: float = 0.0) -> tuple[int, list[int]]:
    """Start ``command`` again and again, killing it once ``progress()`` has moved a random number of steps
    (and a random moment more); returns the kills and the progress seen at each."""
    kills, seen = 0, []
    while kills < KILLS:
        target = progress() + rng.randint(*steps)
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        wait_until(lambda: progress() >= target or process.poll() is not None, 60, interval=0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is not None:
            break
        process.kill()
        process.wait(30)
        kills += 1
        time.sleep(after_kill)
        seen.append(progress())
    return kills, seen


def test_snapshot_runs_killed_at_random_points_lose_nothing(db, mongo_url: str, fake: FakeSalesforce,
                                                            tmp_path: Path) -> None:
    seed_org(fake, range(1, PROFILES + 1))
    seed_profiles(db, range(1, PROFILES + 1))
    fake.bulk_polls = 3
    fake.inject(Fault.slow(0.05), times=10_000, kind="bulk_results")
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl", **SCHEMA_ENV)
    command = cli_command("validate-nb", "--snapshot", "--page-records", "100", "--chunk-size", "100")
    validated = {"machine": nb.NAME, "state": {"$in": sorted(nb.SPEC.terminal)}}

    def progress() -> int:  # polls, pages recorded, profiles validated: every step the database shows
        loaded = sum(r.get("pages", 0) + (r.get("state") != "started") for r in db[SNAPSHOTS].find({}, {"pages": 1,
                                                                                                         "state": 1}))
        return loaded + db[POSITIONS].count_documents(validated) // 100

    # About 26 steps load the snapshot (polls, 25 pages) and 30 validate (ranges of 100): kills land in both.
    kills, seen = _kill_at_random_progress(command, env, progress, random.Random(20_261_201), tmp_path / "runs.log",
                                           steps=(2, 8))
    assert kills == KILLS, f"the run finished after {kills} kills"
    before = settled(lambda: Counter(states_by_profile(db, nb.NAME).values()))
    assert 0 < sum(before.values()) < PROFILES, before  # killed while loading and while joining
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr

    states = states_by_profile(db, nb.NAME)
    wrong = {pid: s for pid, s in states.items() if s != EXPECTED[kind_of(pid)]}
    assert len(states) == PROFILES and not wrong, list(wrong.items())[:5]
    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    assert set(check.per_profile.values()) == {4} and set(check.runs_per_profile.values()) == {1}
    jobs = {doc["detail"].get("bulk_job") for doc in db[POSITIONS].find({"machine": nb.NAME}, {"detail": 1})}
    assert len(jobs) == 1 and None not in jobs  # one job answered every profile: a killed run reused it
    assert fake.counts["bulk_create"] == 1 and fake.counts["query"] == 0
    assert [c for c in db.list_collection_names() if c.startswith("crm_snapshot_")] == []
    # The last run's figures are what the database gained.
    after = Counter(states.values())
    assert _printed(final.stdout) == after - before, final.stdout
    assert f"{PROFILES - sum(before.values())} of {PROFILES - sum(before.values())} pending" in final.stdout
    record("scale: validate-nb --snapshot SIGKILL", profiles=PROFILES, kills=kills, progress_at_kills=seen,
           validated_before_last_run=sum(before.values()), jobs=fake.counts["bulk_create"],
           result_pages=fake.counts["bulk_results"], polls=fake.counts["bulk_poll"], bad_histories=len(check.violations))


def test_signup_sweeps_killed_at_random_points_create_each_app_user_once(db, mongo_url: str, fake: FakeSalesforce,
                                                                         tmp_path: Path) -> None:
    db.profiles.insert_many([{"id": i, "email": f"sweep{i}@example.org", "first_name": "Dov", "last_name": "O'Hara"}
                             for i in range(1, USERS + 1)])
    migrated = fake.insert_many(APP_USER, [{"Sefaria_App_Email__c": f"sweep{i}@example.org"}
                                           for i in range(1, USERS + 1, 10)])
    fake.inject(Fault.slow(0.2), times=10_000, kind="collection_create")  # a window between create and commit
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    command = cli_command("signup", "--pending", "--batch-size", "40")

    def progress() -> int:  # runs committed at the write-ahead state or beyond, in steps of a batch
        return db[POSITIONS].count_documents({"machine": signup.NAME}) // 20 + fake.counts["collection_create"]

    kills, seen = _kill_at_random_progress(command, env, progress, random.Random(1_201), tmp_path / "sweeps.log",
                                           steps=(1, 4), after_kill=0.35)  # a create the kill cut still lands
    assert kills == KILLS, f"the sweep finished after {kills} kills"
    before = settled(lambda: Counter(states_by_profile(db, signup.NAME).values()))
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr

    per_email = app_users_by(fake, "Sefaria_App_Email__c")
    assert len(fake.records(APP_USER)) == USERS and set(per_email.values()) == {1}
    assert set(per_email) == {f"sweep{i}@example.org" for i in range(1, USERS + 1)}
    ids = {r["Sefaria_App_Email__c"]: r["Id"] for r in fake.records(APP_USER)}
    wrong = [p["id"] for p in db.profiles.find({}, {"id": 1, "email": 1, "sf_app_user_id": 1})
             if p.get("sf_app_user_id") != ids[p["email"]]]
    assert not wrong, wrong[:10]
    check = check_histories(db, signup.SPEC)
    check.assert_clean()
    assert check.states == {"WroteSalesforceAppUserUid": USERS}
    assert set(check.per_profile.values()) == {4} and set(check.runs_per_profile.values()) == {1}
    after = Counter(states_by_profile(db, signup.NAME).values())
    assert _printed(final.stdout) == after - before, final.stdout  # it drove the rest, stuck runs included
    adopted = sum(1 for d in db[POSITIONS].find({"machine": signup.NAME}, {"detail": 1})
                  if d["detail"].get("source") == "adopted by email")
    assert adopted >= len(migrated)
    record("scale: signup --pending SIGKILL", users=USERS, kills=kills, progress_at_kills=seen,
           collection_creates=fake.counts["collection_create"], email_lookups=fake.counts["query"],
           adopted_by_email=adopted, migrated_app_users=len(migrated), app_users=len(fake.records(APP_USER)),
           duplicate_app_users=0, bad_histories=len(check.violations))
