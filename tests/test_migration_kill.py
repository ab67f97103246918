"""A SIGKILL at any instant of ``retire-nb-ids`` or ``reconcile-by-email``, followed by a rerun, leaves the
same database as one uninterrupted run: two databases seeded alike, one run straight through, the other
killed again and again at random points of its progress (measured in the database: a profile counts 1
when its write-ahead state is committed, 2 when its run is finished), then run to the end. Whole
collections are compared, without times and run tokens."""

from __future__ import annotations

import random
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from crm_states.store import POSITIONS
from crm_states.testing import FakeSalesforce
from machines import reconcile_by_email as reconcile
from machines import retire_nb_ids as retire
from tests.migration_seed import (
    database_view,
    nb_value,
    seed_nb_app_users,
    seed_nb_profiles,
    seed_orphan_app_users,
    seed_orphans,
    validate_all,
)
from tests.reliability.checks import (
    check_histories,
    cli,
    cli_command,
    cli_env,
    wait_until,
)

PROFILES = 800
KILLS = 8


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def twin(mongo_client: MongoClient):
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


def environments(mongo_url: str, fake: FakeSalesforce, tmp_path: Path) -> Callable[[str], dict[str, str]]:
    """The commands' settings for one database of the pair (each with its own journal)."""
    return lambda name: cli_env(mongo_url, name, fake, tmp_path / f"{name}.jsonl")


def progress(db, machine: str, write_ahead: str) -> Callable[[], int]:
    spec = retire.SPEC if machine == retire.NAME else reconcile.SPEC

    def measure() -> int:
        done = db[POSITIONS].count_documents({"machine": machine, "state": {"$in": sorted(spec.terminal)}})
        return 2 * done + db[POSITIONS].count_documents({"machine": machine, "state": write_ahead})

    return measure


def kill_at_random_progress(command: list[str], env: dict[str, str], measure: Callable[[], int], total: int,
                            rng: random.Random, log: Path, write_ahead_left: Callable[[], int]) -> dict[str, int]:
    """Start ``command``, SIGKILL it once the progress passes a random target, ``KILLS`` times."""
    kills = held = 0
    for _ in range(KILLS):
        start = measure()
        if start >= total - 2:
            break
        target = start + rng.randint(1, max(1, (total - start) // 4))  # kills spread over the whole run
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        wait_until(lambda: measure() >= target or process.poll() is not None, 120, interval=0.002)
        if process.poll() is not None:
            break
        process.kill()
        process.wait(30)
        kills += 1
        held += write_ahead_left() > 0
    return {"kills": kills, "kills_with_write_ahead_states_left": held}


def run_both(db, twin, env_of: Callable[[str], dict[str, str]], args: list[str], machine: str, write_ahead: str,
             total: int, tmp_path: Path, seed: int) -> dict[str, int]:
    straight = cli(env_of(db.name), *args)
    assert straight.returncode in (0, 1), straight.stdout + straight.stderr
    env = env_of(twin.name)
    figures = kill_at_random_progress(cli_command(*args), env, progress(twin, machine, write_ahead), total,
                                      random.Random(seed), tmp_path / "killed.log",
                                      lambda: twin[POSITIONS].count_documents({"machine": machine, "state": write_ahead}))
    final = cli(env, *args)
    assert final.returncode in (0, 1), final.stdout + final.stderr  # 0 when the kills left nothing to do
    assert figures["kills"] >= KILLS // 2, figures
    killed, straight_through = database_view(twin), database_view(db)
    for name, docs in straight_through.items():
        differ = [(a, b) for a, b in zip(killed[name], docs) if a != b]
        assert len(killed[name]) == len(docs) and not differ, (name, len(killed[name]), len(docs), differ[:3])
    return figures


def test_retire_nb_ids_killed_at_random_instants_leaves_what_one_run_leaves(db, twin, mongo_url, fake,
                                                                            tmp_path: Path) -> None:
    ids = range(1, PROFILES + 1)
    seed_nb_app_users(fake, ids)
    for database in (db, twin):
        seed_nb_profiles(database, ids)
        validate_all(database, fake)
        database.profiles.update_many({"id": {"$in": list(range(3, PROFILES, 51))}}, {"$unset": {"sf_app_user_id": ""}})
        database.profiles.insert_one({"id": PROFILES + 1, "email": "never-nb@example.org"})

    env_of = environments(mongo_url, fake, tmp_path)
    args = ["retire-nb-ids", "--allow-state", "WroteNotFound", "--chunk-size", "40"]
    figures = run_both(db, twin, env_of, args, retire.NAME, "NbIdRecorded", 2 * PROFILES, tmp_path, 20261124)
    assert figures["kills_with_write_ahead_states_left"] >= 1, figures
    states = Counter(d["state"] for d in twin[POSITIONS].find({"machine": retire.NAME}))
    erased = len(range(3, PROFILES, 51))  # found in Salesforce, then their sf_app_user_id vanished: kept
    assert states == {"WroteNbIdRemoved": PROFILES - erased, "ValidationNoLongerHolds": erased}
    check = check_histories(twin, retire.SPEC)
    check.assert_clean()
    assert set(check.runs_per_profile.values()) == {1}
    # Undo after the kills restores every id as it was, type included.
    undo = cli(env_of(twin.name), "retire-nb-ids", "--undo")
    assert undo.returncode == 0, undo.stdout + undo.stderr
    held = {p["id"]: p.get("nationbuilder_id") for p in twin.profiles.find({}, {"id": 1, "nationbuilder_id": 1})}
    assert all(retire.same_value(held[i], nb_value(i)) for i in ids), [i for i in ids if held[i] != nb_value(i)][:5]


def test_reconcile_by_email_killed_at_random_instants_leaves_what_one_run_leaves(db, twin, mongo_url, fake,
                                                                                tmp_path: Path) -> None:
    ids = range(1, PROFILES + 1)
    seed_orphan_app_users(fake, ids)
    for database in (db, twin):
        seed_orphans(database, ids)

    env_of = environments(mongo_url, fake, tmp_path)
    args = ["reconcile-by-email", "--chunk-size", "40"]
    run_both(db, twin, env_of, args, reconcile.NAME, "RequestedAppUser", 2 * PROFILES, tmp_path, 5771)
    check = check_histories(twin, reconcile.SPEC)
    check.assert_clean()
    assert set(check.runs_per_profile.values()) == {1}
    assert fake.counts["create"] == fake.counts["upsert"] == fake.counts["collection_create"] == 0
