"""Peak RSS of the ``validate-nb`` runner process as the number of profiles grows.

For each N in ``--sizes`` (default 100,000 and 1,000,000): a fresh SecantusDB process on a data directory
under a temp dir (or ``--mongo-url``, one fresh database per N), N profiles with a ``nationbuilder_id``
bulk-inserted in batches, and the odd-numbered half of their NationBuilder ids as app users in a
``FakeSalesforce`` with no latency that lives in this process. Then the runner runs as a subprocess through
a tiny wrapper that calls ``crm_states.cli.main(["validate-nb", ...])`` and afterwards prints its own
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) to stderr, so only the runner's memory is
measured: not SecantusDB's, not the fake's, not this process's. The wrapper is forked by a small ``sh``,
not by this process: Linux would otherwise carry this process's resident size into the wrapper's
``ru_maxrss`` (see ``VIA_SH``). The wrapper also prints the peak right after its imports (the floor any
run pays) and ``VmHWM`` as a cross-check.

Printed per N: peak RSS in MB, wall time (spawn to exit), profiles/s, the count per state, and the target
(<= 200 MB, and flat as N grows: the ratio of the largest size's peak to the smallest's). ``--faults`` makes
the fake inject a seeded mix of 503s, 500s, dropped connections, slow answers and malformed JSON (default
off), for reliability reports. Timings are wall clock on a shared machine. Always exits 0.

    python benchmarks/memory.py [--sizes 100000,1000000] [--chunk-size C] [--concurrency K] [--faults]
        [--seed S] [--mongo-url URL] [--socket-timeout-ms MS] [--sample-seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, MongoClient
from pymongo.database import Database

from crm_states.runner import RunnerConfig, pending_filter
from crm_states.store import state_field
from crm_states.testing.mongo import MongoServer
from crm_states.testing.salesforce import FakeSalesforce
from crm_states.testing.server import Faults
from machines import nb_profile_validation as nb

TARGET_MB = 200.0
FLAT_RATIO = 1.2  # this benchmark's reading of "flat": the largest size's peak within 20% of the smallest's
SEED_BATCH = 10_000
APP_USER = "Sefaria_App_User__c"
NB_FIELD = "NationBuilder_Id__c"

#: Runs the runner in-process and reports that process's own peak RSS, after imports and at the end; a
#: daemon thread samples VmRSS/VmHWM every BENCH_SAMPLE_SECONDS meanwhile. BENCH_SOCKET_TIMEOUT_MS, when
#: set (``--socket-timeout-ms``), replaces the 30 s socketTimeoutMS that ``crm_states.api.connect`` gives
#: the runner's MongoClient: the runner itself is not changed, only the client the CLI opens.
WRAPPER = """\
import functools, os, resource, sys, threading, time
import crm_states.cli
import crm_states.cli.common
import crm_states.runner, crm_states.crm.salesforce
from crm_states.api import connect

def status(*keys):
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return " ".join(f"{k}={fields[k].split()[0]}" for k in keys if k in fields)

print(f"RUNNER_IMPORTED_MAXRSS_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr, flush=True)
timeout = os.environ.get("BENCH_SOCKET_TIMEOUT_MS")
if timeout:
    crm_states.cli.common.connect = functools.partial(connect, socketTimeoutMS=int(timeout))
started = time.monotonic()

def sample():
    every = float(os.environ.get("BENCH_SAMPLE_SECONDS") or 60)
    while True:
        time.sleep(every)
        print(f"RUNNER_SAMPLE t={time.monotonic() - started:.0f}s {status('VmRSS', 'VmHWM')} (KiB)",
              file=sys.stderr, flush=True)

threading.Thread(target=sample, daemon=True).start()
code = crm_states.cli.main(sys.argv[1:])
sys.stdout.flush()
print(f"RUNNER_MAXRSS_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr, flush=True)
print(f"RUNNER_VMHWM_KIB={status('VmHWM').partition('=')[2]}", file=sys.stderr, flush=True)
sys.exit(code)
"""

#: Linux carries the RSS high-water mark of the memory image an exec replaces into the new program's
#: ``ru_maxrss``, and a child forked (or vforked) straight from this process starts with this process's
#: pages (the fake's half a million app users, pymongo...). So the wrapper is started by a small ``sh``
#: that forks it: its ``ru_maxrss`` is then its own. ``VmHWM`` (the image's own high-water mark) is
#: printed beside it as a cross-check.
VIA_SH = ["/bin/sh", "-c", '"$0" "$@"; exit $?']


def realistic_faults(seed: int) -> Faults:
    """What a bad day at Salesforce looks like, per request: 5% 503, 1% 500, 0.5% dropped connections,
    0.5% malformed JSON, 1% answered 2 s late."""
    return Faults(seed=seed, error_rates={503: 0.05, 500: 0.01}, drop_rate=0.005, malformed_json_rate=0.005,
                  slow_rate=0.01, slow_seconds=2.0)


def nb_id(pid: int) -> int:
    return 700_000 + pid


def profile_batches(n: int, size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(1, n + 1, size):
        yield [{"id": pid, "slug": f"user-{pid}", "first_name": "Aviva", "last_name": "Ben-David",
                "email": f"user{pid}@example.org", "nationbuilder_id": nb_id(pid)}
               for pid in range(start, min(n, start + size - 1) + 1)]


def seed(db: Database, fake: FakeSalesforce, n: int) -> None:
    db.profiles.create_index([("id", ASCENDING)])
    for batch in profile_batches(n, SEED_BATCH):
        db.profiles.insert_many(batch, ordered=False)
    fake.insert_many(APP_USER, ({NB_FIELD: str(nb_id(pid)), "Sefaria_App_Email__c": f"user{pid}@example.org"}
                                for pid in range(1, n + 1, 2)))


def run_group(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in a process group of its own, ended as a whole if this benchmark is stopped
    (killing only ``sh`` would leave the runner going). The wrapper's RSS samples are echoed as they
    come, each with the runner's latest progress line, so a long run can be followed in the output."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    err_lines: list[str] = []

    def follow() -> None:
        progress = ""
        assert process.stderr is not None
        for line in process.stderr:
            err_lines.append(line)
            if "validated " in line and "profiles," in line:
                progress = line.strip().split(" WARNING crm_states.runner ")[-1]
            elif line.startswith("RUNNER_SAMPLE"):
                print(f"    {line.strip()}  {progress}", flush=True)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        assert process.stdout is not None
        out = process.stdout.read()
        process.wait()
        reader.join(timeout=30)
        err = "".join(err_lines)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def state_counts(db: Database) -> Counter[str]:
    counts: Counter[str] = Counter()
    for doc in db.profiles.find({}, {"_id": 0, f"{state_field(nb.NAME)}.state": 1}).batch_size(10_000):
        counts[((doc.get("crm_state") or {}).get(nb.NAME) or {}).get("state") or "(not started)"] += 1
    return counts


def measure(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = None
    if args.mongo_url:
        url = args.mongo_url
    else:
        server = MongoServer(work / f"db-{n}", log_path=work / f"secantusd-{n}.log").start()
        url = server.url
    client: MongoClient = MongoClient(url)
    name = f"bench_memory_{n}_{uuid.uuid4().hex[:8]}"
    db = client[name]
    fake = FakeSalesforce(faults=realistic_faults(args.seed) if args.faults else None).start()
    try:
        t0 = time.perf_counter()
        seed(db, fake, n)
        seeded = time.perf_counter() - t0
        print(f"N={n}: seeded {n} profiles and {(n + 1) // 2} app users in {seeded:.0f}s; running the runner ...",
              flush=True)
        env = {**os.environ, "MONGO_URL": url, "MONGO_DB": name, "CRM_TYPE": "SALESFORCE",
               "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
               "SALESFORCE_CLIENT_SECRET": fake.client_secret, "CRM_STATES_JOURNAL": str(work / f"journal-{n}.jsonl")}
        env.pop("SALESFORCE_API_VERSION", None)
        env["BENCH_SAMPLE_SECONDS"] = str(args.sample_seconds)
        if args.socket_timeout_ms:
            env["BENCH_SOCKET_TIMEOUT_MS"] = str(args.socket_timeout_ms)
        command = [*VIA_SH, sys.executable, "-c", WRAPPER, "validate-nb", "--chunk-size", str(args.chunk_size),
                   "--concurrency", str(args.concurrency), "--data-dir", str(work / f"cli-{n}")]
        fake.reset_counts()
        started = time.perf_counter()
        done = run_group(command, env)
        wall = time.perf_counter() - started
        peak = re.search(r"RUNNER_MAXRSS_KIB=(\d+)", done.stderr)
        floor = re.search(r"RUNNER_IMPORTED_MAXRSS_KIB=(\d+)", done.stderr)
        hwm = re.search(r"RUNNER_VMHWM_KIB=(\d+)", done.stderr)
        states = state_counts(db)
        return {"n": n, "seeded": seeded, "wall": wall, "exit": done.returncode, "stdout": done.stdout,
                "stderr": done.stderr, "peak_mb": int(peak.group(1)) / 1024 if peak else None,
                "floor_mb": int(floor.group(1)) / 1024 if floor else None,
                "hwm_mb": int(hwm.group(1)) / 1024 if hwm else None, "states": states,
                "pending": db.profiles.count_documents(pending_filter()), "requests": dict(fake.counts),
                "faults": dict(fake.fault_counts)}
    finally:
        fake.stop()
        client.drop_database(name)
        client.close()
        if server is not None:
            server.stop()


def report(result: dict[str, Any]) -> None:
    n, wall = result["n"], result["wall"]
    peak, floor, hwm = result["peak_mb"], result["floor_mb"], result["hwm_mb"]
    print(f"N={n}: runner exit {result['exit']}")
    for line in result["stdout"].rstrip().splitlines():
        print(f"    | {line}")
    if result["exit"] != 0 or peak is None:
        for line in result["stderr"].rstrip().splitlines()[-15:]:
            print(f"    stderr| {line}")
    peak_text = f"{peak:.1f} MB" if peak is not None else "not reported"
    complete = result["exit"] == 0 and result["pending"] == 0 and peak is not None
    verdict = (f"   target <= {TARGET_MB:.0f} MB: {'PASS' if peak <= TARGET_MB else 'FAIL'}" if complete
               else "   INCOMPLETE run: no verdict")
    print(f"  peak RSS of the runner process: {peak_text}{verdict}"
          + (f"  (after imports alone: {floor:.1f} MB" if floor is not None else "  (")
          + (f"; VmHWM cross-check: {hwm:.1f} MB)" if hwm is not None else ")"))
    print(f"  wall time (spawn to exit): {wall:.1f}s = {n / wall:.0f} profiles/s")
    print(f"  states: " + ", ".join(f"{s} {c}" for s, c in sorted(result["states"].items()))
          + f"; still pending: {result['pending']}")
    print(f"  CRM requests: " + ", ".join(f"{k} {v}" for k, v in sorted(result["requests"].items()))
          + (f"; faults injected: {result['faults']}" if result["faults"] else ""))
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated N (default 100000,1000000)")
    parser.add_argument("--chunk-size", type=int, default=RunnerConfig().chunk_size,
                        help=f"passed to validate-nb (default {RunnerConfig().chunk_size}, the runner's)")
    parser.add_argument("--concurrency", type=int, default=RunnerConfig().concurrency,
                        help=f"passed to validate-nb (default {RunnerConfig().concurrency}, the runner's)")
    parser.add_argument("--faults", action="store_true", help="the fake injects a seeded realistic fault mix")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault mix (with --faults)")
    parser.add_argument("--mongo-url", help="use this MongoDB instead of starting SecantusDB per size")
    parser.add_argument("--socket-timeout-ms", type=int,
                        help="socketTimeoutMS of the runner's MongoClient instead of crm_states.api.connect's 30000 "
                             "(SecantusDB needs more than 30 s for the runner's first queries on 1M profiles)")
    parser.add_argument("--sample-seconds", type=float, default=60.0,
                        help="how often the runner's RSS is sampled and echoed (default 60)")
    args = parser.parse_args(argv)
    # A SIGTERM (or SIGINT, which a shell's background job ignores) ends the run through the finally
    # blocks: the runner subprocess, the fake and SecantusDB stop, the temp dir goes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    print(f"runner: validate-nb --chunk-size {args.chunk_size} --concurrency {args.concurrency}; fake Salesforce "
          f"with no latency; faults: {realistic_faults(args.seed) if args.faults else 'off'}")
    print("runner's MongoDB socketTimeoutMS: " + (f"{args.socket_timeout_ms} (--socket-timeout-ms; overrides "
                                                   "crm_states.api.connect's 30000)" if args.socket_timeout_ms
                                                   else "30000 (crm_states.api.connect's default)"))
    print(f"database: {args.mongo_url or 'a fresh SecantusDB per size, data under a temp dir'}; "
          f"timings are wall clock on a shared 2-core machine")
    print(flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for n in sizes:
            result = measure(n, args, Path(tmp))
            results.append(result)
            report(result)

    for r in results:
        r["complete"] = r["exit"] == 0 and r["pending"] == 0 and r["peak_mb"] is not None
    print("summary (a run that did not validate every profile is INCOMPLETE: its figures measure nothing)")
    print(f"  {'N':>10} {'peak RSS MB':>12} {'wall s':>8} {'profiles/s':>11}   target <= {TARGET_MB:.0f} MB")
    for r in results:
        peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "n/a"
        ok = ("INCOMPLETE: runner exit {}, {} profiles still pending".format(r["exit"], r["pending"])
              if not r["complete"] else "PASS" if r["peak_mb"] <= TARGET_MB else "FAIL")
        print(f"  {r['n']:>10} {peak:>12} {r['wall']:>8.1f} {r['n'] / r['wall']:>11.0f}   {ok}")
    measured = [r for r in results if r["complete"]]
    if len(measured) >= 2:
        small, large = min(measured, key=lambda r: r["n"]), max(measured, key=lambda r: r["n"])
        ratio = large["peak_mb"] / small["peak_mb"]
        print(f"  peak RSS at N={large['n']} / at N={small['n']}: {ratio:.2f}   target flat "
              f"(<= {FLAT_RATIO}): {'PASS' if ratio <= FLAT_RATIO else 'FAIL'}")
    elif len(results) >= 2:
        print(f"  flatness: not measured, fewer than two sizes validated every profile")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it does not fail the caller
        print(f"benchmark error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(0)
