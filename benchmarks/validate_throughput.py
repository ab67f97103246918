"""NationBuilder-profile validation at scale, on SecantusDB and a genuine mongod side by side, in one run.

For each server kind (``--servers``, default both, mongod first: a run cut short then still has the server
the targets are set on): a FakeSalesforce in this process answering every request ``--latency`` late
(default 50 ms) with an App User for the odd-numbered half of N profiles (``--profiles``, default 100,000),
N profiles seeded once into a server that is then stopped, and each step below on a fresh server process
started on a copy of that data directory (so every step starts from the same data, and a million profiles
are inserted once, not three times). Each step's figures are printed when it ends; the tables at the end.

- **floor**: the database writes the runner makes for N profiles (``benchmarks/floor.py``: the guarded
  profile write and the position upsert with its history, in bulks of ``--chunk-size``), with plain pymongo,
  no engine, no CRM, no reads. The runner's time is printed as a ratio of it: the ratio to drive down.
- **runner** per mode (``--modes``, default ``rest`` and, when the CLI has it, ``snapshot``): ``crm-states
  validate-nb`` as a subprocess (spawn to exit; with ``--runners K``, K of them started together, sharing
  the ranges over leases, timed to the last exit), its API requests as Salesforce counts them (the fake's
  api-usage counter: the OAuth token is not one), its peak RSS (the largest runner's), the server's CPU
  seconds meanwhile; then every profile is checked against the seeding.
- **naive** (sampled on ``--naive-sample`` profiles): per profile one GET by external id and one
  ``update_one``, sequentially, as the diagram literally reads; its rate is applied to N.

Targets (issues 4, 10, 14): runner <= 1.5x the floor on mongod; 1,000,000 in <= 150 s on mongod; <= 100
API requests per 1,000,000 by packed REST and <= 30 by snapshot; peak RSS <= 150 MB and flat in N
(``benchmarks/memory.py``); runner/naive >= 100. Timings are wall clock on whatever else the machine does.
Always exits 0: it is a benchmark, not a test.

    python benchmarks/validate_throughput.py [--profiles N] [--servers secantus,mongod] [--modes rest,snapshot]
        [--naive-sample S] [--latency SECONDS] [--chunk-size C] [--lookup-size L] [--concurrency K]
        [--runners R] [--mongod-cache-gb G]

``--mongod-cache-gb`` sets mongod's WiredTiger cache (default 1, as in the tests; mongod's own default on
this 24 GB machine would be 11.5).
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from bench_common import (
    APP_USER,
    KINDS,
    NB_FIELD,
    check_validated,
    cli_env,
    client_for,
    nb_id,
    run_clis,
    seed_app_users,
    seed_profiles,
    server,
    server_cpu_seconds,
    server_on_copy,
)
from floor import run_floor, run_floor_parallel

from crm_states.records import crm_log_line
from crm_states.testing.mongo import MongoServer
from crm_states.testing.salesforce import FakeSalesforce

API = "/services/data/v60.0"
BENCH_DB = "bench"


def naive(db: Any, fake: FakeSalesforce, sample: int) -> float:
    """Profiles per second of the per-profile loop over profiles 1..sample (a token fetched first, untimed)."""
    session = requests.Session()
    session.trust_env = False
    body = session.post(f"{fake.url}/services/oauth2/token", data={"grant_type": "client_credentials"},
                        auth=(fake.client_id, fake.client_secret), timeout=30).json()
    headers = {"Authorization": f"Bearer {body['access_token']}", "Accept": "application/json"}
    started = time.perf_counter()
    for doc in list(db.profiles.find({"id": {"$lte": sample}}, {"_id": 0, "id": 1, "nationbuilder_id": 1}).sort("id", 1)):
        answer = session.get(f"{body['instance_url']}{API}/sobjects/{APP_USER}/{NB_FIELD}/{doc['nationbuilder_id']}",
                             headers=headers, timeout=30)
        now = dt.datetime.now(dt.timezone.utc)
        if answer.status_code == 200:
            db.profiles.update_one({"id": doc["id"]}, {"$set": {"sf_app_user_id": answer.json()["Id"]}})
        else:
            db.profiles.update_one({"id": doc["id"]}, {"$push": {"CrmLog": crm_log_line(
                "NbProfileNotFoundInSalesforce", now)}})
    return sample / (time.perf_counter() - started)


def cli_modes() -> set[str]:
    """The lookup modes this checkout's ``validate-nb`` has."""
    helped = subprocess.run([sys.executable, "-m", "crm_states.cli", "validate-nb", "--help"], capture_output=True,
                            text=True).stdout
    return {"rest"} | ({"snapshot"} if "--snapshot" in helped else set())


def one_server(kind: str, args: argparse.Namespace, modes: list[str], work: Path) -> dict[str, Any]:
    """Seed once, then each step (every mode, then the floor) on a fresh server started on a copy of the
    seeded data; each step's figures are printed as soon as it ends, so a run cut short keeps them."""
    n, figures = args.profiles, {}
    with FakeSalesforce(latency=args.latency) as fake:
        app_users = seed_app_users(fake, n)
        with server(kind, work, cache_gb=args.mongod_cache_gb) as seed_server:
            client = client_for(seed_server.url)
            figures["seed_s"] = seed_profiles(client[BENCH_DB], n)
            naive_db = client[f"naive_{uuid.uuid4().hex[:6]}"]
            seed_profiles(naive_db, min(n, args.naive_sample))
            figures["naive_rate"] = naive(naive_db, fake, min(n, args.naive_sample))
            client.drop_database(naive_db.name)
            client.close()
        say(kind, f"seeded {n:,} profiles in {figures['seed_s']:.1f} s; naive loop {figures['naive_rate']:.2f}/s")
        seeded = work / f"db-{kind}"
        for mode in modes:
            with server_on_copy(kind, seeded, work / f"{kind}-{mode}", work, cache_gb=args.mongod_cache_gb) as on:
                figures[mode] = run_mode(mode, args, on, fake, app_users, work)
            say(kind, mode_line(mode, figures[mode], n))
        with server_on_copy(kind, seeded, work / f"{kind}-floor", work, cache_gb=args.mongod_cache_gb) as on:
            client, cpu = client_for(on.url), server_cpu_seconds(on.process)
            ids = list(range(1, n + 1))
            if args.runners > 1:  # as many writers as runners
                figures["floor_s"] = run_floor_parallel(on.url, BENCH_DB, ids, args.chunk_size, args.runners, nb_id,
                                                        app_users.get)
            else:
                figures["floor_s"] = run_floor(client[BENCH_DB], ids, args.chunk_size, nb_id, app_users.get)
            figures["floor_server_cpu_s"] = server_cpu_seconds(on.process) - cpu
            client.close()
        say(kind, f"floor {figures['floor_s']:.1f} s ({n / figures['floor_s']:,.0f}/s), server CPU "
                  f"{figures['floor_server_cpu_s']:.1f} s")
    return figures


def run_mode(mode: str, args: argparse.Namespace, on: MongoServer, fake: FakeSalesforce, app_users: dict[int, str],
             work: Path) -> dict[str, Any]:
    """``validate-nb`` in ``mode`` over the seeded database on ``on``, then every profile checked."""
    flags = ["--snapshot"] if mode == "snapshot" else []
    usage, cpu = fake.api_usage, server_cpu_seconds(on.process)
    fake.reset_counts()
    runs = run_clis(["validate-nb", "--chunk-size", str(args.chunk_size), "--lookup-size", str(args.lookup_size),
                     "--concurrency", str(args.concurrency), *flags],
                    cli_env(on.url, BENCH_DB, fake, work), args.runners)
    server_cpu = server_cpu_seconds(on.process) - cpu
    with client_for(on.url) as client:
        states, wrong = check_validated(client[BENCH_DB], args.profiles, app_users)
    failed = [r for r in runs if r.done.returncode]
    return {"s": max(r.seconds for r in runs), "exit": max(r.done.returncode for r in runs),
            "api": fake.api_usage - usage, "requests": dict(fake.counts), "rss_mb": max(r.peak_mb for r in runs),
            "runner_cpu_s": sum(r.cpu_s for r in runs), "server_cpu_s": server_cpu,
            "states": dict(states), "wrong": wrong[:3], "wrong_n": len(wrong),
            "said": [r.done.stdout.strip().splitlines()[:1] for r in runs],
            "stderr": [r.done.stderr.strip().splitlines()[-3:] for r in failed]}


def mode_line(mode: str, r: dict[str, Any], n: int) -> str:
    check = "every profile as seeded" if not r["wrong_n"] and r["exit"] == 0 else \
        f"NOT as seeded ({r['wrong_n']}, exit {r['exit']})"
    return (f"{mode} {r['s']:.1f} s ({n / r['s']:,.0f}/s), {r['api']} API requests, peak RSS {r['rss_mb']:.1f} MB, "
            f"CPU server {r['server_cpu_s']:.1f} s / runners {r['runner_cpu_s']:.1f} s, {check}")


def say(kind: str, what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {kind}: {what}", flush=True)


def report(args: argparse.Namespace, modes: list[str], results: dict[str, dict[str, Any]]) -> None:
    n, kinds = args.profiles, list(results)
    width = 22

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<44}" + "".join(f"{c:>{width}}" for c in cells))

    print()
    runners = f", {args.runners} runners" if args.runners > 1 else ""
    row(f"{n:,} profiles, chunks of {args.chunk_size}, ranges of {max(args.chunk_size, args.lookup_size)}, "
        f"concurrency {args.concurrency}{runners}", kinds)
    row("seeding the profiles (insert_many)", [f"{results[k]['seed_s']:.1f} s" for k in kinds])
    row("floor: the runner's writes, plain pymongo" + (f", {args.runners} writers" if args.runners > 1 else ""),
        [f"{results[k]['floor_s']:.1f} s ({n / results[k]['floor_s']:,.0f}/s)" for k in kinds])
    row("  server CPU during the floor", [f"{results[k]['floor_server_cpu_s']:.1f} s" for k in kinds])
    for mode in modes:
        runs = {k: results[k][mode] for k in kinds}
        row(f"runner, {mode}: crm-states validate-nb", [f"{r['s']:.1f} s ({n / r['s']:,.0f}/s)" for r in runs.values()])
        row("  ratio to the floor (target <= 1.5 on mongod)", [f"{r['s'] / results[k]['floor_s']:.2f}"
                                                                for k, r in runs.items()])
        row("  API requests (per 1,000,000)", [f"{r['api']} ({r['api'] * 1_000_000 / n:,.0f})" for r in runs.values()])
        row("  peak RSS of the runner (largest)", [f"{r['rss_mb']:.1f} MB" for r in runs.values()])
        row("  CPU: the server / the runners", [f"{r['server_cpu_s']:.1f} s / {r['runner_cpu_s']:.1f} s"
                                                  for r in runs.values()])
        row("  check: every profile as seeded", ["yes" if not r["wrong_n"] and r["exit"] == 0 else
                                                  f"NO ({r['wrong_n']}, exit {r['exit']})" for r in runs.values()])
        row("  ratio to the naive loop (target >= 100)", [f"{n / r['s'] / results[k]['naive_rate']:.0f}"
                                                          for k, r in runs.items()])
    row(f"naive loop, timed on {min(n, args.naive_sample)} profiles", [f"{results[k]['naive_rate']:.2f}/s" for k in kinds])
    for k in kinds:
        for mode in modes:
            r = results[k][mode]
            if r["wrong_n"] or r["exit"]:
                print(f"{k} {mode}: said {r['said']}, stderr {r['stderr']}, e.g. {r['wrong']}")
    print(f"\n(latency of the fake: {args.latency * 1000:.0f} ms per request; mongod's cache {args.mongod_cache_gb:g} GB; "
          "wall clock on a shared 2-core machine)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--servers", default=",".join(reversed(KINDS)), help="comma-separated: mongod, secantus")
    parser.add_argument("--modes", default=None, help="comma-separated: rest, snapshot (default: all the CLI has)")
    parser.add_argument("--naive-sample", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--lookup-size", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--runners", type=int, default=1, help="validate-nb processes at once (over leases)")
    parser.add_argument("--mongod-cache-gb", type=float, default=1.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # through the finally blocks
    available = cli_modes()
    modes = [m for m in (args.modes.split(",") if args.modes else ["rest", "snapshot"]) if m in available]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        for kind in args.servers.split(","):
            say(kind, f"seeding {args.profiles:,} profiles, then {', '.join(modes)} and the floor ...")
            results[kind] = one_server(kind.strip(), args, modes, Path(tmp))
            if len(results) == 1 and "," in args.servers:
                report(args, modes, results)  # the first server's table now: the run may be cut short
    report(args, modes, results)
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it does not fail the caller
        print(f"benchmark error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(0)
