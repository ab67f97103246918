"""Sefaria as a co-writer: while ``crm-states validate-nb`` (the runner, a separate process), registrations
through ``process_register_form`` and the weekly sustainer sync run, a thread replaces profile documents with
stale copies at random instants, exactly as ``UserProfile`` does (load, wait, save the whole field list).

Afterwards no state is lost (every position a diagram path, every count the number driven) and ONE heal
makes every profile right: ``sf_app_user_id``, ``CrmLog`` and ``is_sustainer`` as the newest finished runs
recorded, which is also what Salesforce holds. The aftercare is off here, so that the one heal does it all.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from typing import Any

import pytest

from crm_states.api import MACHINES
from crm_states.records import merge_crm_log
from crm_states.report import collect
from crm_states.sefaria import CrmMediator
from crm_states.testing import FakeSalesforce
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from machines import sync_sustainers as sync
from tests.reliability.checks import check_histories, cli, cli_env

APP_USER = "Sefaria_App_User__c"
NB_PROFILES = 300  # ids 1..300, every third one has an app user in Salesforce
SUSTAINER_PROFILES = 60  # ids 1001..1060, with app user ids since before
REGISTRATIONS = 12

pytestmark = pytest.mark.usefixtures("django_project")


def seed(sefaria, fake: FakeSalesforce) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Sefaria-shaped profile documents and the org's records; returns what Salesforce holds per profile."""
    from tests.sefaria.sefaria_site import profile_defaults

    docs, found = [], {}
    for i in range(1, NB_PROFILES + 1):
        docs.append({**profile_defaults(i), "slug": f"nb-{i}", "nationbuilder_id": 700_000 + i})
        if i % 3 == 1:
            found[i] = fake.insert(APP_USER, {"NationBuilder_Id__c": str(700_000 + i), "Sefaria_App_Email__c": f"nb{i}@x.org"})
    sustainer_ids, in_crm = {}, {}
    for n, i in enumerate(range(1001, 1001 + SUSTAINER_PROFILES)):
        was, now = n < 40, n in range(3, 50)  # 40 sustainers now; Salesforce demotes 3 (7.5%) and promotes 10
        sustainer_ids[i] = fake.insert(APP_USER, {"Sefaria_App_Email__c": f"s{i}@x.org", "Sustainer__c": now})
        in_crm[i] = now
        docs.append({**profile_defaults(i), "slug": f"s-{i}", "sf_app_user_id": sustainer_ids[i], "is_sustainer": was})
    sefaria.db.profiles.insert_many(docs)
    # Every profile is a Django user's (its id is the user id): the new users' ids come after them.
    sefaria.User.objects.bulk_create([sefaria.User(id=d["id"], username=f"seeded{d['id']}", email=f"seeded{d['id']}@x.org")
                                      for d in docs])
    return {"nb_found": found, "sustainer_ids": sustainer_ids, "sustainer_in_crm": in_crm}


class CoWriter(threading.Thread):
    """Sefaria saving stale copies: ``UserProfile(id=...)`` loaded for ``batch`` random profiles, a pause of up
    to ``hold`` seconds (a slow request, a gravatar import), each ``save()``d (replace_one of the whole field
    list); again and again, until stopped."""

    def __init__(self, sefaria, ids: list[int], rng: random.Random, *, batch: int, hold: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name="co-writer", daemon=True)
        self.sefaria, self.ids, self.rng, self.batch, self.hold = sefaria, ids, rng, batch, hold
        self.stop = threading.Event()
        self.saves = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                copies = [self.sefaria.UserProfile(id=pid) for pid in self.rng.sample(self.ids, self.batch)]
                time.sleep(self.rng.uniform(0.0, self.hold))
                for profile in copies:
                    profile.save()
                    self.saves += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def printed_counts(output: str) -> Counter[str]:
    """The per-state lines of ``validate-nb``'s summary."""
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^\s+([A-Z]\w+)\s+(\d+)$", output, re.M)})


def expected_crm_log(app, pid: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Every CrmLog line the profile's recorded transitions wrote, one per finding (the newest)."""
    lines = [t.write.crm_log for name in MACHINES for t in app.history(pid, name) if t.write and t.write.crm_log]
    return sorted(merge_crm_log([], lines))


def last_written(app, pid: int, machine: str, field: str) -> Any:  # type: ignore[no-untyped-def]
    values = [t.write.set[field] for t in app.history(pid, machine) if t.write and field in t.write.set]
    return values[-1] if values else None


def test_stale_saves_during_validation_signups_and_the_sync(sefaria, settings_for, db, fake: FakeSalesforce,
                                                           mongo_url: str, tmp_path) -> None:
    truth = seed(sefaria, fake)
    errors: list[BaseException] = []
    registered: list[int] = []
    reports: list[Any] = []

    def guarded(work: Any) -> Any:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    def register(first: int) -> None:
        for n in range(first, REGISTRATIONS, 3):
            registered.append(sefaria.process_register_form(f"new{n}@example.org", "חנה" if n % 2 else "Dov",
                                                            "O'Hara", lang="he" if n % 2 else "en"))

    with settings_for(CRM_STATES_AFTERCARE_SECONDS="off"):
        ids = list(range(1, NB_PROFILES + 1)) + list(truth["sustainer_ids"])
        writers = [CoWriter(sefaria, ids, random.Random(1), batch=5, hold=0.05),
                   CoWriter(sefaria, list(truth["sustainer_ids"]), random.Random(2), batch=20, hold=0.4)]
        for writer in writers:
            writer.start()
        time.sleep(0.2)
        env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
        runner = threading.Thread(target=guarded(lambda: reports.append(
            cli(env, "validate-nb", "--chunk-size", "40", timeout=300))))
        workers = [threading.Thread(target=guarded(lambda f=f: register(f))) for f in range(3)]
        syncer = threading.Thread(target=guarded(lambda: reports.append(CrmMediator().sync_sustainers())))
        for t in [runner, *workers, syncer]:
            t.start()
        for t in workers:
            t.join(300)
        writers[0].ids = ids + registered  # the new users' profiles get stale saves too
        for t in [runner, syncer]:
            t.join(300)
        time.sleep(0.3)
        for writer in writers:
            writer.stop.set()
            writer.join(30)
    assert not errors and not any(w.errors for w in writers), (errors, [w.errors for w in writers])
    run = next(r for r in reports if hasattr(r, "returncode"))
    sync_report = next(r for r in reports if not hasattr(r, "returncode"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(writer.saves >= 50 for writer in writers)

    # No state lost: every position a diagram path, every count what was driven.
    app = CrmMediator().app
    for spec in (nb.SPEC, signup.SPEC, sync.SPEC):
        check_histories(db, spec).assert_clean()
    counts = {name: {row.state: row.count for row in rows if row.count}
              for name, rows in collect(db, [nb.NAME, signup.NAME, sync.NAME]).items()}
    found = len(truth["nb_found"])
    assert counts[nb.NAME] == {"WroteSalesforceAppUserUid": found, "WroteNotFound": NB_PROFILES - found}
    assert printed_counts(run.stdout) == counts[nb.NAME]
    assert counts[signup.NAME] == {"WroteSalesforceAppUserUid": REGISTRATIONS}
    assert sync_report.changed == 13 and counts[sync.NAME] == {"WroteSustainerStatus": 13}
    assert len(fake.records(APP_USER)) == found + SUSTAINER_PROFILES + REGISTRATIONS  # no duplicate app users

    # What every profile must hold, from the recorded histories and from Salesforce.
    by_email = {r["Sefaria_App_Email__c"].lower(): r["Id"] for r in fake.records(APP_USER)}
    expected: dict[int, dict[str, Any]] = {}
    for pid in range(1, NB_PROFILES + 1):
        expected[pid] = {"sf_app_user_id": truth["nb_found"].get(pid), "is_sustainer": False}
        assert last_written(app, pid, nb.NAME, "sf_app_user_id") == truth["nb_found"].get(pid)
    for pid, crm_id in truth["sustainer_ids"].items():
        status = truth["sustainer_in_crm"][pid]
        assert last_written(app, pid, sync.NAME, "is_sustainer") in (None, status)
        expected[pid] = {"sf_app_user_id": crm_id, "is_sustainer": status}
    for pid in registered:
        email = sefaria.User.objects.get(id=pid).email.lower()
        expected[pid] = {"sf_app_user_id": by_email[email], "is_sustainer": False}
        assert last_written(app, pid, signup.NAME, "sf_app_user_id") == by_email[email]
    for pid, want in expected.items():
        want["CrmLog"] = expected_crm_log(app, pid)
    assert sum(1 for w in expected.values() if w["CrmLog"]) == NB_PROFILES - found  # the not-found ones

    def wrong() -> list[int]:
        docs = {d["id"]: d for d in db.profiles.find({}, {"_id": 0})}
        return [pid for pid, want in expected.items() if want != {
            "sf_app_user_id": docs[pid].get("sf_app_user_id"), "is_sustainer": docs[pid].get("is_sustainer"),
            "CrmLog": sorted(docs[pid].get("CrmLog") or [])}]

    drifted = wrong()
    assert drifted, "the co-writer erased nothing: the test proves nothing"
    assert set(registered) <= set(drifted)  # each registration's own last save erased its new id
    report = app.heal()
    assert report.healed_profiles == len(drifted)
    assert wrong() == []
    assert app.heal().drifted_profiles == 0
