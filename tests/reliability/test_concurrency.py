"""4. Concurrency: four ``crm-states validate-nb`` processes on one database at once. No profile is worked
on twice (exactly 4 transitions per validated profile, one run, one writer), and the totals the four
processes print add up exactly to what the database holds."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

from crm_states.testing import FakeSalesforce
from machines import nb_profile_validation as nb
from tests.reliability.checks import APP_USER, check_histories, cli_command, cli_env, record, seed_nb_profiles

PROFILES = 6000
RUNNERS = 4


def test_four_runner_processes_on_one_database(db, mongo_url: str, fake: FakeSalesforce, tmp_path: Path) -> None:
    found = seed_nb_profiles(db, fake, PROFILES)
    env = cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")
    command = cli_command("validate-nb", "--chunk-size", "100", "--lookup-size", "100", "--concurrency", "2")
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(RUNNERS)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, out + err
        assert "not finished" not in out and "Traceback" not in err

    processed, lookups, skipped, printed = [], [], [], Counter()
    for out, _ in outputs:
        head = re.match(r"(\d+) of (\d+) pending profiles validated .*, (\d+) batched lookups\)", out)
        assert head, out
        processed.append(int(head.group(1)))
        lookups.append(int(head.group(3)))
        printed.update({m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\w+)\s+(\d+)$", out, re.M)})
        leased = re.search(r"(\d+) id ranges were leased by another runner", out)
        skipped.append(int(leased.group(1)) if leased else 0)

    expected = Counter({"WroteSalesforceAppUserUid": len(found), "WroteNotFound": PROFILES - len(found)})
    assert sum(processed) == PROFILES  # totals exact: every profile counted once, by one runner
    assert printed == expected
    assert sum(n > 0 for n in processed) >= 2, processed  # they really shared the work
    assert sum(lookups) == fake.counts["query"] == 60  # one lookup per range, none twice
    check = check_histories(db, nb.SPEC)
    check.assert_clean()
    assert check.states == expected
    assert set(check.per_profile.values()) == {4}  # no transition twice
    assert set(check.runs_per_profile.values()) == {1} and set(check.writers_per_profile.values()) == {1}
    assert len(fake.records(APP_USER)) == len(found)
    record("4 concurrency: 4 validate-nb processes", profiles=PROFILES, processed_by_runner=processed,
           lookups_by_runner=lookups, ranges_skipped_as_leased=skipped, lookup_requests=fake.counts["query"],
           transitions=check.transitions, profiles_worked_twice=0)
