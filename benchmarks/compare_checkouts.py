"""The same ``validate-nb`` run from two (or more) checkouts of this project, on the same seeded data, on
SecantusDB and a genuine mongod side by side: how a change moved the runner's time.

For each server kind (``--servers``, default both) one server process and one FakeSalesforce (``--latency``
late, default 50 ms, App Users for the odd-numbered half of N profiles). For each checkout (``--checkout
PATH``, repeatable; the first is the baseline, default: this one) a fresh database seeded with the same N
profiles, then that checkout's ``crm-states validate-nb`` as a subprocess with ``PYTHONPATH`` set to it
(spawn to exit, its peak RSS, the server's CPU seconds meanwhile). Each checkout's end states are counted
from wherever it keeps them (``crm_positions``, or the older ``profiles.crm_state``) and checked against the
seeding. A checkout is code only: its modules are imported from PATH; the dependencies are this
environment's. Always exits 0: it is a benchmark, not a test.

    python benchmarks/compare_checkouts.py --checkout OLD [--checkout NEW] [--profiles N] [--servers ...]
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench_common import (
    KINDS,
    cli_env,
    client_for,
    found,
    run_cli,
    seed_app_users,
    seed_profiles,
    server,
    server_cpu_seconds,
)
from pymongo.database import Database

from crm_states.store import POSITIONS
from crm_states.testing.salesforce import FakeSalesforce

HERE = Path(__file__).resolve().parent.parent
MACHINE = "nb_profile_validation"


def end_states(db: Database, n: int, app_users: dict[int, str]) -> tuple[Counter[str], int]:
    """Per state, from the positions or (an older layout) the profiles; and how many profiles are wrong."""
    positions = {d["profile_id"]: d["state"] for d in db[POSITIONS].find({"machine": MACHINE},
                                                                         {"_id": 0, "profile_id": 1, "state": 1})}
    states: Counter[str] = Counter()
    wrong = 0
    for doc in db.profiles.find({}, {"_id": 0, "id": 1, "sf_app_user_id": 1, f"crm_state.{MACHINE}.state": 1}):
        pid = doc["id"]
        state = positions.get(pid) or ((doc.get("crm_state") or {}).get(MACHINE) or {}).get("state", "(none)")
        states[state] += 1
        expected = ("WroteSalesforceAppUserUid", app_users[pid]) if found(pid) else ("WroteNotFound", None)
        wrong += (state, doc.get("sf_app_user_id")) != expected
    return states, wrong + abs(n - sum(states.values()))


def one_server(kind: str, checkouts: list[Path], args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {}
    with server(kind, work) as db_server, FakeSalesforce(latency=args.latency) as fake:
        client = client_for(db_server.url)
        app_users = seed_app_users(fake, args.profiles)
        for checkout in checkouts:
            db = client[f"cmp_{uuid.uuid4().hex[:8]}"]
            seed_profiles(db, args.profiles)
            env = {**cli_env(db_server.url, db.name, fake, work), "PYTHONPATH": str(checkout)}
            cpu = server_cpu_seconds(db_server.process)
            run = run_cli(["validate-nb", "--chunk-size", str(args.chunk_size), "--concurrency",
                           str(args.concurrency)], env)
            states, wrong = end_states(db, args.profiles, app_users)
            figures[str(checkout)] = {"s": run.seconds, "exit": run.done.returncode, "rss_mb": run.peak_mb,
                                      "server_cpu_s": server_cpu_seconds(db_server.process) - cpu,
                                      "states": dict(states), "wrong": wrong}
            client.drop_database(db.name)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path, help="a checkout of this project (repeatable)")
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    checkouts = [p.resolve() for p in (args.checkout or [])] or [HERE]
    if HERE not in checkouts and len(checkouts) == 1:
        checkouts.append(HERE)
    kinds = [k for k in args.servers.split(",") if k]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="crm-compare-") as tmp:
        for kind in kinds:
            results[kind] = one_server(kind, checkouts, args, Path(tmp) / kind)
            print(f"{kind}: {results[kind]}", flush=True)
    print(f"\nvalidate-nb, {args.profiles:,} profiles, chunks of {args.chunk_size}, concurrency {args.concurrency}, "
          f"fake at {args.latency * 1000:.0f} ms")
    print(f"| checkout | {' | '.join(kinds)} |")
    print(f"| --- |{' --- |' * len(kinds)}")
    for checkout in checkouts:
        cells = []
        for kind in kinds:
            f = results[kind][str(checkout)]
            cells.append(f"{f['s']:.1f} s ({args.profiles / f['s']:,.0f}/s), server CPU {f['server_cpu_s']:.1f} s, "
                         f"{f['rss_mb']:.0f} MB, exit {f['exit']}, {f['wrong']} wrong")
        print(f"| {checkout} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
