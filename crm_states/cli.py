"""The ``crm-states`` command. Each subcommand says what it does in ``--help``; exit codes:
0 done, 1 finished with problems to look at, 2 bad usage or configuration, 3 database unreachable,
4 stopped by the CRM's API limit (run again later to resume)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pymongo.database import Database
from pymongo.errors import PyMongoError

from .api import connect
from .testing.mongo import MongoServer, MongoServerError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_DB, EXIT_LIMIT = 0, 1, 2, 3, 4
DATA_DIR = Path(".crm-states")
EMBEDDED_DB = "crm_states_demo"


class CliError(Exception):
    """A problem to report in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def database(args: argparse.Namespace) -> Iterator[Database]:
    """``MONGO_URL``/``--mongo-url`` when given; otherwise an embedded SecantusDB process keeping its
    data under ``./.crm-states/`` so one command sees what the previous one left."""
    url = args.mongo_url or os.environ.get("MONGO_URL")
    if url:
        db = connect(url, args.db or os.environ.get("MONGO_DB"))
        _ping(db)
        yield db
        db.client.close()
        return
    data = Path(args.data_dir)
    try:
        server = MongoServer(data / "db", log_path=data / "secantusd.log",
                             test_commands=getattr(args, "test_commands", False)).start()
    except MongoServerError as exc:
        raise CliError(f"cannot start the embedded database: {exc}", EXIT_DB) from exc
    try:
        db = connect(server.url, args.db or os.environ.get("MONGO_DB") or EMBEDDED_DB)
        yield db
        db.client.close()
    finally:
        server.stop()


def _ping(db: Database) -> None:
    try:
        db.client.admin.command("ping")
    except PyMongoError as exc:
        raise CliError(f"cannot reach MongoDB: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                       EXIT_DB) from exc


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mongo-url", help="MongoDB URL (default: $MONGO_URL, else an embedded SecantusDB)")
    parser.add_argument("--db", help="database name (default: $MONGO_DB, else crm_states_demo when embedded, "
                                     "sefaria otherwise)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="where the embedded database keeps its data")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    args.test_commands = True  # the demo injects a database outage window through a fail point
    with database(args) as db:
        return run_demo(db, profiles=args.profiles, seed=args.seed, journal_path=Path(args.data_dir) / "journal.jsonl",
                        out=sys.stdout)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import print_counts

    with database(args) as db:
        print_counts(db, sys.stdout)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-states", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run both machines on synthetic profiles against a local fake CRM",
                          description="Start the embedded database and a fake CRM on loopback, seed synthetic "
                                      "profiles, run NationBuilder-profile validation and new-user signups with a "
                                      "mix of CRM and database faults, then print every path and the count per state.")
    _common(demo)
    demo.add_argument("--profiles", type=_positive, default=40, help="how many synthetic profiles (default 40)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic data and faults")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="count profiles in each state of each machine")
    _common(report)
    report.set_defaults(func=cmd_report)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"crm-states: {exc}", file=sys.stderr)
        return exc.code
    except PyMongoError as exc:
        print(f"crm-states: database error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return EXIT_DB
    except KeyboardInterrupt:
        print("crm-states: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


