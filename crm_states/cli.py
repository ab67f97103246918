"""The ``crm-states`` command. Each subcommand says what it does in ``--help``; exit codes:
0 done, 1 finished with problems to look at, 2 bad usage or configuration, 3 database unreachable,
4 stopped early by the CRM's API limit or --max-api-calls (run again to resume)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError

from .api import MACHINES, connect
from .crm.errors import CrmConfigError, CrmError, CrmLimitExceeded
from .store import ProfileNotFound, StoreUnavailable
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
                        out=sys.stdout, progress=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report

    with database(args) as db:
        return run_report(db, args, sys.stdout)


@contextmanager
def _crm_configuration() -> Iterator[None]:
    """A missing or wrong CRM setting is a usage error (exit 2), said in one line."""
    try:
        yield
    except CrmConfigError as exc:
        raise CliError(f"CRM configuration: {exc}") from exc


def _crm() -> Any:
    """The CRM named by ``CRM_TYPE`` and Sefaria's settings."""
    from .crm import crm_from_env

    with _crm_configuration():
        return crm_from_env()


def _app(db: Database, args: argparse.Namespace) -> Any:
    """``CrmStates.from_env`` (shared with the Celery tasks); the journal defaults to the data dir's."""
    from .api import CrmStates

    with _crm_configuration():
        return CrmStates.from_env(db, journal_path=str(Path(args.data_dir) / "journal.jsonl"))


def cmd_validate_nb(args: argparse.Namespace) -> int:
    from .runner import RunnerConfig, ValidationRunner

    config = RunnerConfig(chunk_size=args.chunk_size, concurrency=args.concurrency, limit=args.limit,
                          dry_run=args.dry_run, max_api_calls=args.max_api_calls, lease_seconds=args.lease_seconds)
    with database(args) as db:
        report = ValidationRunner(_app(db, args), config).run()
    if args.dry_run:
        print(f"{report.pending_at_start} profiles pending validation; a run would make about "
              f"{-(-report.processed // args.chunk_size)} batched lookups (dry run: nothing claimed, sent or written)")
        return EXIT_OK
    print(f"{report.processed} of {report.pending_at_start} pending profiles validated in {report.seconds:.1f}s "
          f"({report.rate:.0f}/s, {report.lookups} batched lookups)")
    _print_counts(report.states)
    problems = {k: v for k, v in report.outcomes.items() if k in ("interrupted", "conflict")}
    if problems:
        print("  not finished: " + ", ".join(f"{v} {k}" for k, v in sorted(problems.items())))
    if report.skipped_ranges:
        print(f"  {report.skipped_ranges} id ranges were leased by another runner")
    if report.stopped:
        print(f"stopped: {report.stopped}")
        print("run `crm-states validate-nb` again to resume where this run stopped")
        return EXIT_LIMIT
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_signup(args: argparse.Namespace) -> int:
    with database(args) as db:
        result = _app(db, args).run_signup(args.user_id, email=args.email, first_name=args.first_name,
                                           last_name=args.last_name, lang=args.lang, educator=args.educator)
    print(f"user {args.user_id}: {result.state} ({result.outcome}{': ' + result.error if result.error else ''})")
    return EXIT_OK if result.state == "WroteSalesforceAppUserUid" else EXIT_PROBLEMS


def cmd_resume(args: argparse.Namespace) -> int:
    from .api import machine

    spec = _known(machine, args.machine)
    if args.state not in spec.diagram.states:
        raise CliError(f"{args.machine} has no state {args.state!r}; states: {', '.join(spec.diagram.states)}")
    if args.state in spec.diagram.finals:
        raise CliError(f"{args.state} is the final state of {args.machine}: nothing to resume")
    outcomes: Counter[str] = Counter()
    with database(args) as db:
        app = _app(db, args)
        # Ids first: a re-driven profile may land in the same state again and must not be met twice.
        ids = [p["id"] for p in app.profiles_in_state(args.machine, args.state, limit=args.limit or 0,
                                                      projection={"_id": 0, "id": 1})]
        for start in range(0, len(ids), 1000):
            batch = list(app.store.profiles.find({"id": {"$in": ids[start:start + 1000]},
                                                  f"crm_state.{args.machine}.state": args.state}))
            outcomes.update(r.state or "not started" for r in app.redrive(args.machine, batch))
    print(f"{sum(outcomes.values())} profiles in {args.state} re-driven:")
    _print_counts(outcomes)
    return EXIT_OK


def cmd_sync_sustainers(args: argparse.Namespace) -> int:
    from .sustainers import sync_sustainers

    if not args.verbose:  # what the sync logs for a cron job, this command prints itself
        logging.getLogger("crm_states.sustainers").setLevel(logging.CRITICAL)
    with database(args) as db:
        report = sync_sustainers(_app(db, args), max_demote_share=args.max_demote_share, force=args.force,
                                 dry_run=args.dry_run, batch_size=args.batch_size)
    if report.read_failed is not None:
        print(f"crm-states: could not read the whole sustainer set from the CRM: {report.read_failed}; "
              f"nothing changed", file=sys.stderr)
        return EXIT_LIMIT if report.read_limit else EXIT_PROBLEMS
    print(f"{report.sustainers_in_crm} sustainers in the CRM: {report.matched} match a profile by sf_app_user_id, "
          f"{report.unmatched} match none")
    print(f"{report.current_sustainers} current sustainers ({report.sustainers_without_crm_id} without a CRM id, "
          f"left alone); to promote {report.to_promote}, to demote {report.to_demote} "
          f"({report.demote_share:.1%} of current sustainers; limit {args.max_demote_share:.1%})")
    if report.refused is not None:
        print(f"crm-states: refused: {report.refused}; nothing changed. Check the CRM's sustainer data; "
              f"--force demotes anyway", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.dry_run:
        print("dry run: nothing written")
        return EXIT_OK
    print(f"{report.changed} profiles changed in {report.seconds:.1f}s")
    _print_counts(report.states)
    if report.skipped:
        print(f"  {report.skipped} profiles no longer differed and were skipped")
    return EXIT_PROBLEMS if report.problems else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from .journal import replay_file
    from .store import Store

    path = _existing_file(args.file)
    with database(args) as db:
        report = replay_file(Store(db), path)
    print(f"{report.entries} journal entries: {report.applied} applied, {report.unchanged} already applied; "
          f"{report.skipped_lines} other lines skipped")
    for entry_id, error in report.failed:
        print(f"  failed {entry_id}: {error}")
    return EXIT_PROBLEMS if report.failed else EXIT_OK


def cmd_load_log(args: argparse.Namespace) -> int:
    from .crm import load_log

    path = _existing_file(args.file)
    report = load_log(path, _crm())
    print(f"sent {report.total_sent} CRM writes from {path}: "
          + ", ".join(f"{n} {method}" for method, n in sorted(report.sent.items())))
    print(f"  {report.skipped_already_loaded} already loaded, {report.invalid_lines} invalid lines, "
          f"{len(report.failed)} failed, {len(report.created)} app users created")
    for entry_id, error in report.failed:
        print(f"  failed {entry_id}: {error}")
    if report.stopped:
        print(f"stopped: {report.stopped}; run the same command again later to load the rest")
        return EXIT_LIMIT
    return EXIT_PROBLEMS if report.failed else EXIT_OK


def _print_counts(counts: Mapping[str, int]) -> None:
    """One line per state, as every command that drives profiles reports them."""
    for state, count in sorted(counts.items()):
        print(f"  {state:<30} {count:>8}")


def _existing_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    return path


def _known(lookup: Callable[[str], Any], name: str) -> Any:
    try:
        return lookup(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-states", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run both machines on synthetic profiles against a local fake CRM",
                          description="Start the embedded database and a fake CRM on loopback, seed synthetic "
                                      "profiles, run NationBuilder-profile validation and new-user signups with a "
                                      "mix of CRM and database faults, then print every path and the count per state.")
    _common(demo)
    demo.add_argument("--profiles", type=_positive, default=10_000,
                      help="how many synthetic profiles (default 10,000)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic data and faults")
    demo.set_defaults(func=cmd_demo)

    validate = sub.add_parser("validate-nb", help="validate every pending profile that has a nationbuilder_id",
                              description="Stream profiles whose nationbuilder_id is truthy and whose validation is "
                                          "not finished, claim id ranges with expiring leases, and drive each range "
                                          "through the nb_profile_validation machine with one batched CRM lookup. "
                                          "Safe to run several at once and to kill at any time: run it again to "
                                          "resume. The CRM comes from CRM_TYPE and Sefaria's settings.")
    _common(validate)
    validate.add_argument("--chunk-size", type=_positive, default=1000, help="profiles per range (default 1000)")
    validate.add_argument("--concurrency", type=_positive, default=2, help="ranges worked at once (default 2)")
    validate.add_argument("--limit", type=_positive, help="stop after this many profiles")
    validate.add_argument("--dry-run", action="store_true", help="count pending profiles; claim, send, write nothing")
    validate.add_argument("--max-api-calls", type=_positive, help="make at most this many batched CRM lookups "
                                                                  "(one API call each while the ids fit one URL)")
    validate.add_argument("--lease-seconds", type=float, default=300.0, help="how long a range lease lasts")
    validate.set_defaults(func=cmd_validate_nb)

    signup_cmd = sub.add_parser("signup", help="run the new-user signup machine for one user",
                                description="What Sefaria's signup hook calls: create the app user in the CRM "
                                            "and save its id. Safe to repeat: never creates a second app user.")
    _common(signup_cmd)
    signup_cmd.add_argument("--user-id", type=int, required=True, help="Sefaria user id (profiles.id)")
    signup_cmd.add_argument("--email", help="default: the profile's email")
    signup_cmd.add_argument("--first-name")
    signup_cmd.add_argument("--last-name")
    signup_cmd.add_argument("--lang", default="en", choices=["en", "he"])
    signup_cmd.add_argument("--educator", action="store_true")
    signup_cmd.set_defaults(func=cmd_signup)

    resume = sub.add_parser("resume", help="re-drive profiles stuck in a state",
                            description="A new run from [*] for profiles in a stopped state (the CRM is asked "
                                        "again), the journaled CRM result written without asking the CRM again for "
                                        "DB-failure states, and the stopped run continued for mid-way states.")
    _common(resume)
    resume.add_argument("--machine", required=True, help="the machine: " + ", ".join(MACHINES))
    resume.add_argument("--state", required=True, help="the state whose profiles to re-drive")
    resume.add_argument("--limit", type=_positive, help="at most this many profiles")
    resume.set_defaults(func=cmd_resume)

    sync = sub.add_parser("sync-sustainers", help="the weekly sustainer sync: is_sustainer from the CRM",
                          description="Read the whole sustainer set from the CRM (nothing changes if the read "
                                      "fails or is incomplete), then set is_sustainer where a profile differs "
                                      "(matched by sf_app_user_id), each change a persisted run of the "
                                      "sync_sustainers machine, in batches. A second run changes nothing. Refuses "
                                      "to demote more than --max-demote-share of the current sustainers unless "
                                      "--force. Exit 0 done; 1 read failed, refused or some runs not finished; 4 the "
                                      "CRM's API limit stopped the read.")
    _common(sync)
    sync.add_argument("--max-demote-share", type=_share, default=0.1,
                      help="refuse to demote more than this share of the current sustainers (default 0.1)")
    sync.add_argument("--force", action="store_true", help="demote even beyond --max-demote-share")
    sync.add_argument("--dry-run", action="store_true", help="read the CRM and count the changes; write nothing")
    sync.add_argument("--batch-size", type=_positive, default=1000, help="profiles per bulk write (default 1000)")
    sync.set_defaults(func=cmd_sync_sustainers)

    replay = sub.add_parser("replay", help="apply journaled DB writes (a JSONL journal or an application log)",
                            description="Apply every journal entry in FILE idempotently: replaying twice changes "
                                        "nothing more. Lines that are not journal entries are skipped and counted.")
    _common(replay)
    replay.add_argument("file", help="journal JSONL or application log")
    replay.set_defaults(func=cmd_replay)

    load = sub.add_parser("load-log", help="load the interim CRM log (CRM_TYPE=LOG) into the CRM",
                          description="The migration's 'load log data to Salesforce': send every entry of the log "
                                      "once (a second load sends nothing twice) to the CRM named by CRM_TYPE.")
    load.add_argument("file", help="the CRM_LOG_PATH file")
    load.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    load.set_defaults(func=cmd_load_log)

    from .report import configure_parser as configure_report

    report = sub.add_parser("report", help="count profiles in each state of each machine")
    _common(report)
    configure_report(report)
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


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("crm_states.runner").setLevel(logging.INFO)  # progress lines when not on a terminal
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"crm-states: {exc}", file=sys.stderr)
        return exc.code
    except ProfileNotFound as exc:
        print(f"crm-states: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        print(f"crm-states: database error: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return EXIT_DB
    except CrmLimitExceeded as exc:
        print(f"crm-states: the CRM's API limit is reached: {exc}; run again later", file=sys.stderr)
        return EXIT_LIMIT
    except CrmError as exc:
        print(f"crm-states: CRM error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except PyMongoError as exc:
        print(f"crm-states: database error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return EXIT_DB
    except KeyboardInterrupt:
        print("crm-states: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


