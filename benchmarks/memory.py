"""Peak RSS of the ``validate-nb`` runner process as the number of profiles grows, on SecantusDB and a genuine
mongod side by side.

For each server kind (``--servers``, default both) and each N in ``--sizes`` (default 100,000 and 1,000,000):
a fresh database seeded with N profiles with a ``nationbuilder_id``, the odd-numbered half of their
NationBuilder ids as App Users in a FakeSalesforce with no latency that lives in this process, then the runner
as a subprocess through a wrapper that prints its own ``ru_maxrss`` (the wrapper is forked by ``sh``, so
this process's pages are not counted: see ``bench_common.VIA_SH``); only the runner's memory is measured,
not the server's, not the fake's. ``--faults`` makes the fake inject a seeded mix of 503s, 500s, dropped
connections, late answers and malformed JSON. ``--modes`` picks the lookup modes (default: all the CLI has).

Printed per kind, mode and N: peak RSS, wall time, profiles/s, and whether every profile ended as seeded;
then the target (<= 150 MB and flat: the largest size's peak within 20 % of the smallest's). Always exits 0.

    python benchmarks/memory.py [--sizes 100000,1000000] [--servers secantus,mongod] [--modes rest,snapshot]
        [--faults] [--seed S] [--chunk-size C] [--concurrency K]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench_common import (
    KINDS,
    check_validated,
    cli_env,
    client_for,
    run_cli,
    seed_app_users,
    seed_profiles,
    server,
)
from validate_throughput import cli_modes

from crm_states.testing.salesforce import FakeSalesforce
from crm_states.testing.server import Faults

TARGET_MB = 150.0
FLAT_RATIO = 1.2


def realistic_faults(seed: int) -> Faults:
    """A bad day at Salesforce, per request: 5 % 503, 1 % 500, 0.5 % drops, 0.5 % malformed, 1 % 2 s late."""
    return Faults(seed=seed, error_rates={503: 0.05, 500: 0.01}, drop_rate=0.005, malformed_json_rate=0.005,
                  slow_rate=0.01, slow_seconds=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--modes", default=None)
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = [int(s) for s in args.sizes.split(",")]
    available = cli_modes()
    modes = [m for m in (args.modes.split(",") if args.modes else ["rest", "snapshot"]) if m in available]
    peaks: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        for kind in args.servers.split(","):
            with server(kind, work) as db_server:
                client = client_for(db_server.url)
                for n in sizes:
                    with FakeSalesforce(faults=realistic_faults(args.seed) if args.faults else None) as fake:
                        app_users = seed_app_users(fake, n)
                        for mode in modes:
                            db = client[f"memory_{mode}_{n}_{uuid.uuid4().hex[:6]}"]
                            seed_profiles(db, n)
                            flags = ["--snapshot"] if mode == "snapshot" else []
                            run = run_cli(["validate-nb", "--chunk-size", str(args.chunk_size), "--concurrency",
                                           str(args.concurrency), *flags], cli_env(db_server.url, db.name, fake, work))
                            states, wrong = check_validated(db, n, app_users)
                            ok = not wrong and run.done.returncode == 0
                            print(f"{kind:<9} {mode:<9} {n:>9,} profiles: peak RSS {run.peak_mb:6.1f} MB, "
                                  f"{run.seconds:7.1f} s ({n / run.seconds:,.0f}/s), "
                                  f"{'every profile as seeded' if ok else f'NOT as seeded: {wrong[:2]}'}"
                                  + (f"; faults injected {dict(fake.fault_counts)}" if args.faults else ""), flush=True)
                            peaks.setdefault((kind, mode), []).append(run.peak_mb)
                            client.drop_database(db.name)
                client.close()
    for (kind, mode), values in peaks.items():
        ratio = max(values) / min(values)
        verdict = "PASS" if max(values) <= TARGET_MB and ratio <= FLAT_RATIO else "MISSED"
        print(f"{kind} {mode}: largest peak {max(values):.1f} MB, ratio largest/smallest size {ratio:.2f}: "
              f"target <= {TARGET_MB:.0f} MB and flat (<= {FLAT_RATIO}): {verdict}")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it does not fail the caller
        print(f"benchmark error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(0)
