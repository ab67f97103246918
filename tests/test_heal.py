"""Drift and heal: Sefaria replaces whole profile documents with stale copies, erasing the data the
machines wrote; ``crm-states heal`` finds and writes it back without a CRM call, idempotently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.api import CrmStates
from crm_states.crm.memory import InMemoryCrm
from crm_states.store import Store
from machines import new_user_signup as signup
from machines import nb_profile_validation as nb
from machines import sync_sustainers as sustainers

ROOT = Path(__file__).resolve().parents[1]
#: The fields Sefaria's ``UserProfile.to_mongo_dict`` writes (the reference page), as far as they matter here.
SEFARIA_FIELDS = ("id", "slug", "nationbuilder_id", "sf_app_user_id", "is_sustainer", "settings")


def stale_save(db, profile_id: int, stale: dict) -> None:
    """Sefaria's ``UserProfile.save()``: the whole document replaced by a copy loaded earlier."""
    current = db.profiles.find_one({"id": profile_id})
    db.profiles.replace_one({"_id": current["_id"]}, {k: stale[k] for k in SEFARIA_FIELDS if k in stale})


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crm_states.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_heal_command_counts_writes_back_and_is_idempotent(db, mongo_url: str, tmp_path: Path) -> None:
    crm = InMemoryCrm()
    app = CrmStates.open(db, crm)
    db.profiles.insert_many([{"id": i, "slug": f"u{i}", "nationbuilder_id": 100 + i} for i in range(1, 7)]
                            + [{"id": 7, "slug": "new"}])
    stale = {p["id"]: p for p in db.profiles.find()}
    for i in (1, 2, 3):
        crm.add_app_user(nationbuilder_id=100 + i)
    app.validate_profiles(list(db.profiles.find({"id": {"$lte": 6}})))
    app.run_signup(7, email="new@example.org")
    app.run_signup(8, email="later@example.org")  # Sefaria has not saved this profile yet
    for pid in (1, 2, 4, 7):
        stale_save(db, pid, stale[pid])
    env = {**os.environ, "MONGO_URL": mongo_url, "MONGO_DB": db.name, "PYTHONPATH": str(ROOT)}
    env.pop("CRM_TYPE", None)  # heal needs no CRM

    dry = cli(env, "heal", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    figures = json.loads(dry.stdout)
    assert figures[nb.NAME] == {"drifted": 3, "healed": 0, "waiting": 0, "stale_inputs": 0}
    assert figures[signup.NAME] == {"drifted": 1, "healed": 0, "waiting": 1, "stale_inputs": 0}
    assert "sf_app_user_id" not in db.profiles.find_one({"id": 1})  # a dry run writes nothing
    report = cli(env, "report", "--machine", nb.NAME)
    assert "drift: 3 profiles whose data Sefaria's profile saves erased (`crm-states heal` writes it back)" \
        in report.stdout, report.stdout

    healed = cli(env, "heal")
    assert healed.returncode == 0, healed.stderr
    assert re.search(r"^8 profiles with machine data checked; 4 drifted, wrote back 4$", healed.stdout, re.M), healed.stdout
    assert re.search(rf"^  {nb.NAME}\s+3\s+3\s+0\s+0$", healed.stdout, re.M)
    assert db.profiles.find_one({"id": 1})["sf_app_user_id"] == crm.by_nationbuilder_id[101]
    assert db.profiles.find_one({"id": 4})["CrmLog"][0].startswith("NbProfileNotFoundInSalesforce-")
    assert db.profiles.find_one({"id": 7})["sf_app_user_id"] == crm.by_external_id["7"]

    again = json.loads(cli(env, "heal", "--json").stdout)
    assert all(m["drifted"] == 0 for m in again.values()) and again[signup.NAME]["waiting"] == 1
    db.profiles.insert_one({"id": 8, "slug": "later"})  # Sefaria saves it: the next heal writes its id
    assert json.loads(cli(env, "heal", "--json").stdout)[signup.NAME]["healed"] == 1
    assert db.profiles.find_one({"id": 8})["sf_app_user_id"] == crm.by_external_id["8"]
    assert "drift:" not in cli(env, "report", "--no-drift").stdout
    bad = cli(env, "heal", "--machine", "nope")
    assert bad.returncode == 2 and bad.stderr.startswith("crm-states: unknown machine 'nope'")


def test_a_changed_nationbuilder_id_is_not_healed_back(db) -> None:
    """A value computed for the old id is not asserted once the profile holds another: it is stale input."""
    crm = InMemoryCrm()
    app = CrmStates.open(db, crm)
    db.profiles.insert_one({"id": 1, "nationbuilder_id": 11})
    crm.add_app_user(nationbuilder_id=11)
    app.validate_profile(1)
    db.profiles.replace_one({"id": 1}, {"id": 1, "nationbuilder_id": 12})  # Sefaria changed it, erasing the id
    report = app.heal()
    assert report.stale_inputs[nb.NAME] == 1 and report.drifted_profiles == 0
    assert "sf_app_user_id" not in db.profiles.find_one({"id": 1})


# --- hypothesis: any interleaving of runs and stale saves, then one heal ---------------------------------

EVENTS = st.lists(st.tuples(st.sampled_from(["validate", "signup", "sustainer", "stale", "restart"]),
                            st.integers(1, 3), st.booleans()), max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(events=EVENTS)
def test_one_heal_makes_every_profile_hold_what_its_newest_runs_recorded(db, events) -> None:
    """On the real server (heal writes in bulk). Each example starts from empty collections."""
    for name in db.list_collection_names():
        db.drop_collection(name)
    crm = InMemoryCrm()
    app = CrmStates(store=Store(db), crm=crm, claim_wait=0)
    db.profiles.insert_many([{"id": i, "slug": f"s{i}", "nationbuilder_id": 10 + i} for i in (1, 2, 3)])
    app_users = {i: crm.add_app_user(nationbuilder_id=10 + i, email=f"u{i}@example.org") for i in (1, 2)}
    snapshots = {p["id"]: p for p in db.profiles.find()}
    for kind, pid, flag in events:
        if kind == "validate":
            app.validate_profile(pid)
        elif kind == "restart":
            app.validate_profile(pid, restart=True)
        elif kind == "signup":
            app.run_signup(pid, email=f"u{pid}@example.org")
        elif kind == "sustainer":
            crm.sustainers = {app_users[pid]} if flag and pid in app_users else set()
            app.sync_sustainers(max_demote_share=1.0, force=True)
        else:  # Sefaria saves a copy it loaded earlier; sometimes it loads a fresh one first
            stale_save(db, pid, snapshots[pid])
            if flag:
                snapshots[pid] = db.profiles.find_one({"id": pid})
    app.heal()
    second = app.heal()
    assert second.drifted_profiles == 0  # one heal was enough, and it is idempotent
    store = Store(db)
    for pid in (1, 2, 3):
        profile = db.profiles.find_one({"id": pid})
        records = {m: store.position(pid, m).data for m in (nb.NAME, signup.NAME, sustainers.NAME)}
        newest = {}
        for data in records.values():
            for name, value in data.fields.items():
                at = data.set_at[name]
                if name not in newest or at > newest[name][1]:
                    newest[name] = (value, at)
        for name, (value, _) in newest.items():
            assert profile.get(name) == value, (pid, name, profile, records)
        lines = profile.get("CrmLog") or []
        for data in records.values():
            for line in data.crm_log:
                assert line in lines, (pid, line, lines)
        findings = [line.split("-20", 1)[0] + (line.split(": ", 1)[1] if ": " in line else "") for line in lines]
        assert len(findings) == len(set(findings)), lines  # one line per finding
