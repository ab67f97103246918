"""``crm-states retire-nb-ids`` and ``crm-states reconcile-by-email``: the last two steps of the migration
(README "The migration, step by step"). Their own flags are checked before the database starts, and every
number printed is what the database holds."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Mapping

from machines import nb_profile_validation as nb
from machines import reconcile_by_email as reconcile
from machines import retire_nb_ids as retire

from ..progress import RunnerReport
from ..retirement import Readiness, RetireReport, check_accept
from ..user_emails import source_name
from .common import (
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_PROBLEMS,
    CliError,
    add_common,
    at_most,
    check_refusal,
    command_crm,
    database,
    machine_crm,
    open_states,
    positive,
    print_counts,
    seconds,
)


def _batch_flags(parser: argparse.ArgumentParser, *, concurrency_note: str) -> None:
    add_common(parser)
    parser.add_argument("--limit", type=positive, help="stop after this many profiles")
    parser.add_argument("--dry-run", action="store_true", help="count and print what a run would do; write nothing")
    parser.add_argument("--chunk-size", type=at_most(100_000), default=1000,
                        help="profiles per range (default 1000, at most 100,000)")
    parser.add_argument("--concurrency", type=at_most(64), default=1,
                        help=f"ranges worked at once (default 1, at most 64){concurrency_note}")
    parser.add_argument("--lease-seconds", type=seconds, default=300.0,
                        help="how long a range lease lasts (default 300; above 0, at most a week)")


def configure_retire(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Remove nationbuilder_id from every validated profile (the design document: only after the failure "
        "states are handled). Refused, nothing changed, while any profile holding one has no finished "
        "nb_profile_validation run for its current id, or its run stopped in a failure state not accepted with "
        "--allow-state. The value removed is kept in crm_positions first; --undo puts every retired id back "
        "exactly. Safe to kill and run again. CRM: none.")
    _batch_flags(parser, concurrency_note="")
    parser.add_argument("--allow-state", action="append", default=[], metavar="S",
                        help="accept profiles whose validation stopped in failure state S (repeatable), e.g. "
                             "WroteNotFound once MarComs decided; their ids are retired too")
    parser.add_argument("--undo", action="store_true", help="restore every retired nationbuilder_id instead")
    parser.set_defaults(func=cmd_retire_nb_ids)


def configure_reconcile(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Give each profile that has neither a nationbuilder_id nor an App User id (nor a signup in flight) the "
        "App User that has its user's email, when exactly one does; never creates an App User. Not found and "
        "ambiguous profiles are listed in their states (with a CrmLog line). Emails and join dates come from "
        "Django's auth_user when Django is configured, else from the profiles' email and date_joined. Safe to "
        "kill and run again. CRM: needs CRM_TYPE=SALESFORCE (--dry-run needs none).")
    _batch_flags(parser, concurrency_note="; above 1, two profiles sharing one email in different ranges "
                                          "could both be given its App User")
    parser.add_argument("--joined-before", metavar="DATE",
                        help="only users who joined before DATE (YYYY-MM-DD or an ISO-8601 time; UTC unless it "
                             "says otherwise)")
    parser.add_argument("--max-api-calls", type=positive, help="make at most this many batched CRM lookups")
    parser.set_defaults(func=cmd_reconcile_by_email)


def joined_before(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"--joined-before expects a date (YYYY-MM-DD) or an ISO-8601 time, got {text[:40]!r}") from None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


# --- retire-nb-ids -----------------------------------------------------------------------------------------

def cmd_retire_nb_ids(args: argparse.Namespace) -> int:
    if args.undo and args.allow_state:
        raise CliError("--allow-state is for retiring; --undo restores every retired id whatever its validation")
    try:
        check_accept(args.allow_state)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with database(args) as db:
        report = open_states(db, args, command_crm("retire-nb-ids", None)).retire_nb_ids(
            accept=args.allow_state, undo=args.undo, dry_run=args.dry_run, limit=args.limit,
            chunk_size=args.chunk_size, concurrency=args.concurrency, lease_seconds=args.lease_seconds)
    return print_undo(report) if args.undo else print_retire(report, args.allow_state)


def print_retire(report: RetireReport, accepted: list[str]) -> int:
    ready = report.readiness
    print(f"{ready.with_id} profiles hold a nationbuilder_id; {sum(ready.to_retire.values())} ready to retire, "
          f"{ready.in_flight} retirements to continue")
    for state, count in sorted(ready.to_retire.items()):
        note = " (accepted)" if state in accepted else ""
        print(f"  validated: {state + note:<30} {count:>8}")
    if ready.reappeared:
        print(f"  {ready.reappeared} of them hold the very id this machine retired before (a stale profile save "
              f"brought it back): retired again")
    if ready.settled:
        print(f"  {ready.settled} already judged as they stand (ValidationNoLongerHolds): `crm-states report "
              f"--machine {retire.NAME} --state ValidationNoLongerHolds --csv FILE`")
    if report.refused:
        print_blocking(ready)
        return EXIT_PROBLEMS
    if report.dry_run:
        print("dry run: nothing recorded or removed")
        return EXIT_OK
    return print_run(report.run, "retired", {"WroteNbIdRemoved"})


def print_blocking(ready: Readiness) -> None:
    print(f"refused: {sum(ready.blocking.values())} profiles holding a nationbuilder_id are not ready; nothing "
          f"was recorded or removed:")
    for state, count in sorted(ready.blocking.items()):
        if state == retire.NOT_VALIDATED:
            what = "run `crm-states validate-nb` (or finish its runs: `crm-states report`)"
        else:
            what = (f"export: `crm-states report --machine {nb.NAME} --state {state} --csv FILE`; once handled, "
                    f"accept with --allow-state {state}")
        print(f"  {state:<30} {count:>8}  {what}")


def print_undo(report: RetireReport) -> int:
    print(f"{report.readiness.to_restore} retired nationbuilder_ids to restore")
    if report.dry_run:
        print("dry run: nothing restored")
        return EXIT_OK
    return print_run(report.run, "restored", {"WroteNbIdRestored"})


def print_run(run: RunnerReport | None, verb: str, done: set[str]) -> int:
    assert run is not None
    print(f"{run.processed} of {run.pending_at_start} pending profiles {verb} or stopped in {run.seconds:.1f}s "
          f"({run.lookups} batches)")
    print_counts(run.states)
    return _exit(run, done)


def _exit(run: RunnerReport, done: set[str]) -> int:
    unfinished = {k: v for k, v in run.outcomes.items() if k != "finished"}
    if unfinished:
        print("  not finished: " + ", ".join(f"{v} {k}" for k, v in sorted(unfinished.items())))
    if run.skipped_ranges:
        print(f"  {run.skipped_ranges} id ranges were leased by another runner")
    if run.stopped:
        print(f"stopped: {run.stopped}")
        print("run the same command again to resume where this run stopped")
        return EXIT_LIMIT
    failed = {state: n for state, n in run.states.items() if state not in done}
    return EXIT_PROBLEMS if failed or unfinished or run.unrecorded else EXIT_OK


# --- reconcile-by-email ------------------------------------------------------------------------------------

def cmd_reconcile_by_email(args: argparse.Namespace) -> int:
    before = joined_before(args.joined_before)
    try:
        source_name()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    crm = command_crm("reconcile-by-email", None if args.dry_run else machine_crm(reconcile.NAME),
                      "to look App Users up by email")
    with database(args) as db:
        report = open_states(db, args, crm).reconcile_by_email(
            joined_before=before, dry_run=args.dry_run, limit=args.limit, max_api_calls=args.max_api_calls,
            chunk_size=args.chunk_size, concurrency=args.concurrency, lease_seconds=args.lease_seconds)
    check_refusal(crm, "reconcile-by-email", f"{report.processed} profiles were looked up before it; the others "
                                             f"stay pending")
    since = f" (users who joined before {before.date().isoformat()})" if before else ""
    if args.dry_run:
        print(f"{report.pending_at_start} profiles without a nationbuilder_id or an App User id{since} pending; a "
              f"run would make about {-(-report.processed // args.chunk_size)} batched lookups (dry run: nothing "
              f"claimed, sent or written)")
        return EXIT_OK
    print(f"{report.processed} of {report.pending_at_start} pending profiles{since} looked up in {report.seconds:.1f}s "
          f"({report.lookups} batched lookups, {report.api_requests} API requests)")
    print_counts(report.states)
    notes: Mapping[str, str] = {"WroteEmailNotFound": "no App User has the email",
                                "WroteAmbiguousResponse": "several App Users, or one already held"}
    for state, note in notes.items():
        if report.states.get(state):
            print(f"  {state}: {note}: `crm-states report --machine {reconcile.NAME} --state {state} --csv FILE`")
    return _exit(report, {"WroteSalesforceAppUserUid", "ResolvedElsewhere"})
