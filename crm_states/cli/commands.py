"""The ``crm-states`` subcommands but ``report`` (``report_command``): each parses nothing itself, calls the
library, prints what the database holds and returns the exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import (
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_PROBLEMS,
    CliError,
    crm_from_settings,
    database,
    existing_file,
    known,
    open_states,
    print_counts,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    args.test_commands = True  # the demo injects a database outage window through a fail point
    with database(args) as db:
        return run_demo(db, profiles=args.profiles, seed=args.seed, journal_path=Path(args.data_dir) / "journal.jsonl",
                        out=sys.stdout, progress=sys.stderr)


def cmd_validate_nb(args: argparse.Namespace) -> int:
    from ..runner import RunnerConfig, ValidationRunner

    config = RunnerConfig(chunk_size=args.chunk_size, concurrency=args.concurrency, limit=args.limit,
                          dry_run=args.dry_run, max_api_calls=args.max_api_calls, lease_seconds=args.lease_seconds)
    with database(args) as db:
        report = ValidationRunner(open_states(db, args), config).run()
    if args.dry_run:
        print(f"{report.pending_at_start} profiles pending validation; a run would make about "
              f"{-(-report.processed // args.chunk_size)} batched lookups (dry run: nothing claimed, sent or written)")
        return EXIT_OK
    print(f"{report.processed} of {report.pending_at_start} pending profiles validated in {report.seconds:.1f}s "
          f"({report.rate:.0f}/s, {report.lookups} batched lookups)")
    print_counts(report.states)
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
        result = open_states(db, args).run_signup(args.user_id, email=args.email, first_name=args.first_name,
                                           last_name=args.last_name, lang=args.lang, educator=args.educator)
    print(f"user {args.user_id}: {result.state} ({result.outcome}{': ' + result.error if result.error else ''})")
    return EXIT_OK if result.state == "WroteSalesforceAppUserUid" else EXIT_PROBLEMS


def cmd_resume(args: argparse.Namespace) -> int:
    from ..api import machine

    spec = known(machine, args.machine)
    if args.state not in spec.diagram.states:
        raise CliError(f"{args.machine} has no state {args.state!r}; states: {', '.join(spec.diagram.states)}")
    if args.state in spec.diagram.finals:
        raise CliError(f"{args.state} is the final state of {args.machine}: nothing to resume")
    with database(args) as db:
        outcomes = open_states(db, args).resume(args.machine, args.state, limit=args.limit or 0)
    print(f"{sum(outcomes.values())} profiles in {args.state} re-driven:")
    print_counts(outcomes)
    return EXIT_OK


def cmd_sync_sustainers(args: argparse.Namespace) -> int:
    from ..sustainers import sync_sustainers

    if not args.verbose:  # what the sync logs for a cron job, this command prints itself
        logging.getLogger("crm_states.sustainers").setLevel(logging.CRITICAL)
    with database(args) as db:
        report = sync_sustainers(open_states(db, args), max_demote_share=args.max_demote_share, force=args.force,
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
    print_counts(report.states)
    if report.skipped:
        print(f"  {report.skipped} profiles no longer differed and were skipped")
    return EXIT_PROBLEMS if report.problems else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from ..journal import replay_file
    from ..store import Store

    path = existing_file(args.file)
    with database(args) as db:
        report = replay_file(Store(db), path)
    print(f"{report.entries} journal entries: {report.applied} applied, {report.unchanged} already applied; "
          f"{report.skipped_lines} other lines skipped")
    for entry_id, error in report.failed:
        print(f"  failed {entry_id}: {error}")
    return EXIT_PROBLEMS if report.failed else EXIT_OK


def cmd_load_log(args: argparse.Namespace) -> int:
    from ..crm import load_log

    path = existing_file(args.file)
    report = load_log(path, crm_from_settings())
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
