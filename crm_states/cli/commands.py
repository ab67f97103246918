"""The ``crm-states`` subcommands but ``report`` (``report_command``): each parses nothing itself, checks
what it can before the database starts, calls the library, prints what the database holds and returns the
exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from machines import nb_profile_validation as nb
from machines import sync_sustainers as sustainers_machine

from ..api import MACHINES
from ..journal import ReadReport
from .common import (
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_PROBLEMS,
    WRITERS,
    CliError,
    check_refusal,
    command_crm,
    database,
    existing_file,
    known,
    machine_crm,
    open_states,
    print_counts,
)

#: Where ``load-log`` can send the interim log: a CRM that keeps what it is sent.
LOAD_TARGETS = ("SALESFORCE", "NATIONBUILDER")
SHOWN_PROBLEMS = 5


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoRefused, run_demo

    args.test_commands = True  # the demo injects a database outage window through a fail point
    with database(args) as db:
        try:
            return run_demo(db, profiles=args.profiles, seed=args.seed,
                            journal_path=Path(args.data_dir) / "journal.jsonl", out=sys.stdout, progress=sys.stderr)
        except DemoRefused as exc:
            raise CliError(f"demo refused: {exc}") from None


def cmd_validate_nb(args: argparse.Namespace) -> int:
    from ..runner import RunnerConfig, ValidationRunner
    from .validate_modes import dry_run_line, lookup_for, summary_lines

    needs = None if args.dry_run or args.from_export else machine_crm(nb.NAME)
    crm = command_crm("validate-nb", needs, "to look profiles up")
    lookup = lookup_for(args, crm)
    config = RunnerConfig(chunk_size=args.chunk_size, lookup_size=args.lookup_size, concurrency=args.concurrency,
                          limit=args.limit, dry_run=args.dry_run, max_api_calls=args.max_api_calls,
                          lease_seconds=args.lease_seconds)
    with database(args) as db:
        states = open_states(db, args, crm)
        report = ValidationRunner(states, config, lookup=lookup(states)).run()
    check_refusal(crm, "validate-nb", f"{report.processed} profiles were validated before it; the others stay "
                                      f"pending")
    if args.dry_run:
        print(dry_run_line(report, args, config.range_size))
        return EXIT_OK
    print("\n".join(summary_lines(report)))
    print_counts(report.states)
    problems = {k: v for k, v in report.outcomes.items() if k in ("interrupted", "conflict")}
    if problems:
        print("  not finished: " + ", ".join(f"{v} {k}" for k, v in sorted(problems.items())))
    if report.skipped_ranges:
        print(f"  {report.skipped_ranges} id ranges were leased by another runner")
    if report.stopped:
        print(f"stopped: {report.stopped} ({report.api_requests} API requests spent)")
        print("run `crm-states validate-nb` again (same options) to resume where this run stopped")
        return EXIT_LIMIT
    failed = (report.snapshot or {}).get("state") == "failed"
    return EXIT_PROBLEMS if problems or failed else EXIT_OK


def cmd_signup(args: argparse.Namespace) -> int:
    from .sweep_command import check_signup_flags, cmd_signup_pending

    check_signup_flags(args)
    if args.pending:
        return cmd_signup_pending(args)
    crm = command_crm("signup", WRITERS)
    with database(args) as db:
        result = open_states(db, args, crm).run_signup(args.user_id, email=args.email, first_name=args.first_name,
                                                      last_name=args.last_name, lang=args.lang, educator=args.educator)
    check_refusal(crm, "signup", f"user {args.user_id} stays in {result.state}")
    print(f"user {args.user_id}: {result.state} ({result.outcome}{': ' + result.error if result.error else ''})")
    return EXIT_OK if result.state == "WroteSalesforceAppUserUid" else EXIT_PROBLEMS


def cmd_resume(args: argparse.Namespace) -> int:
    from ..api import machine

    spec = known(machine, args.machine)
    if args.state not in spec.diagram.states:
        raise CliError(f"{args.machine} has no state {args.state!r}; its states: {', '.join(spec.diagram.states)}")
    if args.state in spec.diagram.finals:
        raise CliError(f"{args.state} is the final state of {args.machine}: nothing to resume")
    # A DB-failure state may hold results that need no CRM call: its CRM is asked for only when used.
    needs = None if args.state in spec.db_failure_states or not machine_crm(args.machine) else machine_crm(args.machine)
    crm = command_crm("resume", needs, f"to re-drive {args.machine} profiles in {args.state}")
    outcomes: Counter[str] = Counter()
    halted: Counter[str] = Counter()  # not re-driven: where they stand now
    failed: Counter[str] = Counter()  # back where they were, in a DB-failure state, or not finished
    stopped = None
    failure_states = spec.db_failure_states | {args.state}
    with database(args) as db:
        resumed = open_states(db, args, crm).resume(args.machine, args.state, limit=args.limit or 0)
    for result in resumed.results:
        state = result.state or "not started"
        if result.outcome == "halted":
            halted[state] += 1
            stopped = stopped or result.error
            continue
        outcomes[state] += 1
        if result.outcome != "finished" or state in failure_states:
            failed[f"{state} ({result.outcome})" if result.outcome != "finished" else state] += 1
    if resumed.not_tried:  # the same refusal or limit would stop every later batch: these were not tried
        halted[args.state] += resumed.not_tried
    print(f"{sum(outcomes.values())} profiles in {args.state} re-driven:")
    print_counts(outcomes)
    check_refusal(crm, "resume", f"{sum(halted.values())} profiles not re-driven, where they stand now: "
                                 f"{_counts_text(halted)}")
    if halted:
        print(f"stopped: {stopped}; {sum(halted.values())} profiles not re-driven ({_counts_text(halted)}); run the "
              f"same command again later")
        return EXIT_LIMIT
    if failed:
        print(f"{sum(failed.values())} of them failed again ({_counts_text(failed)}): `crm-states report --machine "
              f"{args.machine}` says what each state needs")
        return EXIT_PROBLEMS
    return EXIT_OK


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} in {state}" for state, n in sorted(counts.items())) or "none"


def cmd_sync_sustainers(args: argparse.Namespace) -> int:
    from ..sustainers import sync_sustainers

    crm = command_crm("sync-sustainers", machine_crm(sustainers_machine.NAME), "to read the sustainer set")
    if not args.verbose:  # what the sync logs for a cron job, this command prints itself
        logging.getLogger("crm_states.sustainers").setLevel(logging.CRITICAL)
    with database(args) as db:
        report = sync_sustainers(open_states(db, args, crm), max_demote_share=args.max_demote_share, force=args.force,
                                 dry_run=args.dry_run, batch_size=args.batch_size)
    check_refusal(crm, "sync-sustainers", "nothing changed")
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


def problem_lines(problems: Collection[tuple[int, str]], total: int) -> list[str]:
    """The first few unreadable lines of an input file, one per line, and how many more there are."""
    shown = list(problems)[:SHOWN_PROBLEMS]
    lines = [f"  line {number}: {reason}" for number, reason in shown]
    if total > len(shown):
        lines.append(f"  ... and {total - len(shown)} more")
    return lines


def _refuse_file(path: Path, what: str, lines: int, problems: Collection[tuple[int, str]], bad: int) -> CliError:
    """A file without one valid entry: bad input, refused before anything starts."""
    if lines == 0:
        return CliError(f"{path} is empty: no {what} in it; nothing done")
    other = f", {lines - bad} other text" if lines > bad else ""
    first = f"{path} holds no valid {what} ({lines} lines: {bad} unreadable{other}); nothing done"
    return CliError("\n".join([first, *problem_lines(problems, bad)]))


def cmd_replay(args: argparse.Namespace) -> int:
    from ..journal import read_file, replay_file
    from ..store import Store

    path = existing_file(args.file)
    scan = ReadReport()  # read once before the database starts: a file with no entry is refused at once
    for _ in read_file(path, scan, machines=MACHINES):
        pass
    if scan.entries == 0:
        raise _refuse_file(path, "journal entry", scan.skipped_lines + scan.unreadable, scan.problems,
                           scan.unreadable)
    with database(args) as db:
        store = Store(db)
        report = replay_file(store, path, machines=MACHINES)
        staying = _still_in_db_failure(store, report.profiles)
    other = f"; {report.skipped_lines} other lines skipped" if report.skipped_lines else ""
    print(f"{report.entries} journal entries in {path}: {report.applied} applied now, {report.unchanged} already "
          f"applied{other} (replay restores the journaled history and profile data)")
    for (machine, state), count in sorted(staying.items()):
        print(f"  {count} of their profiles stay in {state} ({machine}) until `crm-states resume --machine {machine} "
              f"--state {state}` moves them on")
    read = report.read
    if read.unreadable:
        print(f"{read.unreadable} lines could not be read ({read.torn_lines} torn, {read.invalid_entries} invalid "
              f"entries):")
        print("\n".join(problem_lines(read.problems, read.unreadable)))
    for entry_id, error in report.failed:
        print(f"  failed {entry_id}: {error}")
    return EXIT_PROBLEMS if report.failed or read.unreadable else EXIT_OK


def _still_in_db_failure(store: Any, profiles: Mapping[str, set[int]]) -> Counter[tuple[str, str]]:
    """How many of the replayed profiles stand in a DB-failure state of their machine now (their positions,
    read by id)."""
    staying: Counter[tuple[str, str]] = Counter()
    for machine, ids in profiles.items():
        failures = MACHINES[machine].db_failure_states
        for position in store.positions_of(machine, sorted(ids)).values():
            if position.state in failures:
                staying[(machine, position.state)] += 1
    return staying


def cmd_load_log(args: argparse.Namespace) -> int:
    from ..crm import load_log
    from ..crm.log import LogEntry, read_log

    path = existing_file(args.file)
    lines, problems = 0, []  # read once before the CRM is built: a file with no entry is refused at once
    for number, found in read_log(path):
        lines += 1
        if isinstance(found, LogEntry):
            break  # one valid entry is enough: load_log reads the rest and names its invalid lines
        problems.append((number, found))
    if lines == len(problems):
        raise _refuse_file(path, "CRM log entry", lines, problems[:SHOWN_PROBLEMS], len(problems))
    crm = command_crm("load-log", LOAD_TARGETS, "to send the log to (NONE and LOG keep nothing)")
    report = load_log(path, crm.resolve())
    sent = ", ".join(f"{n} {method}" for method, n in sorted(report.sent.items()))
    print(f"sent {report.total_sent} CRM writes from {path}" + (f": {sent}" if sent else ""))
    print(f"  {report.skipped_already_loaded} already loaded, {report.invalid_lines} invalid lines, "
          f"{len(report.failed)} failed, {len(report.created)} app users created")
    for line in problem_lines(report.invalid, report.invalid_lines):
        print(line)
    for entry_id, error in report.failed:
        print(f"  failed {entry_id}: {error}")
    if report.stopped:
        print(f"stopped: {report.stopped}; run the same command again later to load the rest")
        return EXIT_LIMIT
    return EXIT_PROBLEMS if report.failed or report.invalid_lines else EXIT_OK
