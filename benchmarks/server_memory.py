"""How much memory a database server takes for one full pass over the pending profiles, per server kind.

Every ``validate-nb`` run makes that pass (the survey before the first range: the merge of ``profiles`` with
the machine's positions, ``crm_states.runner.pending_ids``), and ``--snapshot`` makes it once more at the end,
to learn whether the snapshot can be dropped. On a fresh database the positions are empty; after a run
there is one position document per profile, with its history. This benchmark seeds N profiles (``--profiles``,
comma-separated sizes), validates them once with ``crm-states validate-nb`` (packed REST against a
FakeSalesforce without latency), then makes one such pass in this process while sampling the server's
resident memory (its process tree, ``/proc``) every 0.2 s. It prints the server's RSS before the pass, its peak
during it, and the growth per position document, so a size that does not fit a machine can be foreseen.
Always exits 0: it is a benchmark, not a test.

    python benchmarks/server_memory.py [--profiles 30000,60000] [--servers secantus,mongod]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_common import (
    KINDS,
    cli_env,
    client_for,
    run_clis,
    seed_app_users,
    seed_profiles,
    server,
)

from crm_states.api import CrmStates
from crm_states.runner import ValidationRunner
from crm_states.testing.salesforce import FakeSalesforce

BENCH_DB = "bench"


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB (a server may run as several processes)."""
    total_kib, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status", encoding="ascii") as status:
                total_kib += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as children:
                todo += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return total_kib / 1024


def peak_while(pid: int, work: Callable[[], int]) -> tuple[int, float, float, float]:
    """``(work's result, seconds, RSS before, peak RSS during)`` of the server ``pid``."""
    before = tree_rss_mb(pid)
    samples, done = [before], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            samples.append(tree_rss_mb(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        result = work()
    finally:
        done.set()
        watcher.join()
    samples.append(tree_rss_mb(pid))
    return result, time.perf_counter() - started, before, max(samples)


def one(kind: str, n: int, work: Path) -> str:
    with FakeSalesforce(latency=0.0) as fake, server(kind, work / f"{kind}-{n}") as on:
        seed_app_users(fake, n)
        client = client_for(on.url)
        seed_profiles(client[BENCH_DB], n)
        [run] = run_clis(["validate-nb", "--chunk-size", "1000", "--lookup-size", "10000"],
                         cli_env(on.url, BENCH_DB, fake, work), 1)
        if run.done.returncode:
            return f"{kind} {n:,}: validate-nb exited {run.done.returncode}: {run.done.stderr.strip()[-300:]}"
        runner = ValidationRunner(CrmStates.open(client[BENCH_DB], None))
        pending, seconds, before, peak = peak_while(on.process.pid, lambda: sum(1 for _ in runner.pending_ids()))
        client.close()
        return (f"{kind} {n:,} profiles validated in {run.seconds:.1f} s; one pending pass ({pending} pending) "
                f"{seconds:.1f} s: server RSS {before:,.0f} MB before, {peak:,.0f} MB at its peak, "
                f"+{peak - before:,.0f} MB ({(peak - before) * 1024 / n:.1f} KB per position)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="30000,60000", help="comma-separated sizes")
    parser.add_argument("--servers", default=",".join(KINDS), help="comma-separated: secantus, mongod")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.profiles.split(",")]
    with tempfile.TemporaryDirectory(prefix="crm-states-bench-") as temp:
        for kind in args.servers.split(","):
            for n in sizes:
                print(one(kind, n, Path(temp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
