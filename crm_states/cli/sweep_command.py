"""``crm-states signup --pending``: the signup sweep (``crm_states.sweep``), and what it prints."""

from __future__ import annotations

import argparse
import os

from ..sweep import SweepReport, sweep_signups
from ..users import SETTING, Window, source_from_env
from .common import EXIT_LIMIT, EXIT_OK, EXIT_PROBLEMS, WRITERS, CliError, check_refusal, command_crm, database, \
    open_states, print_counts

#: Flags that only mean something for one user, and only for the sweep.
ONE_USER = ("email", "first_name", "last_name", "educator")
SWEEP_ONLY = ("older_than", "joined_after", "joined_before", "limit", "max_api_calls", "dry_run")


def check_signup_flags(args: argparse.Namespace) -> None:
    """``--pending`` and ``--user-id`` take different flags; a flag of the other kind is a usage error."""
    wrong = ONE_USER if args.pending else SWEEP_ONLY
    given = [f"--{name.replace('_', '-')}" for name in wrong if getattr(args, name)]
    if args.pending and args.lang != "en":
        given.append("--lang")
    if given:
        mode = "--pending (the users' own data is read)" if args.pending else "--user-id (they are --pending's)"
        raise CliError(f"{', '.join(given)} cannot be used with {mode}")


def cmd_signup_pending(args: argparse.Namespace) -> int:
    try:
        source = source_from_env()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    crm = command_crm("signup --pending", None if args.dry_run else WRITERS)
    window = Window(joined_after=args.joined_after, joined_before=args.joined_before)
    with database(args) as db:
        report = sweep_signups(open_states(db, args, crm), source=source, window=window, older_than=args.older_than,
                               batch_size=args.batch_size, limit=args.limit, max_api_calls=args.max_api_calls,
                               dry_run=args.dry_run)
    check_refusal(crm, "signup --pending", f"{report.pending} users stay without an app user")
    print("\n".join(summary_lines(report, os.environ.get(SETTING) or "profiles")))
    if report.dry_run:
        return EXIT_OK
    print_counts(report.counts.states)
    if report.sources:
        print("  app users: " + ", ".join(f"{n} {how}" for how, n in sorted(report.sources.items())))
    problems = {k: v for k, v in report.counts.outcomes.items() if k not in ("finished", "halted")}
    if problems:
        print("  not finished: " + ", ".join(f"{v} {k}" for k, v in sorted(problems.items())))
    if report.stopped:
        print(f"stopped: {report.stopped} ({report.api_requests} API requests spent); run the same command again "
              f"to sign up the rest")
        return EXIT_LIMIT
    failed = sum(n for state, n in report.counts.states.items() if state != "WroteSalesforceAppUserUid")
    return EXIT_PROBLEMS if failed or problems or report.counts.unrecorded else EXIT_OK


def summary_lines(report: SweepReport, source: str) -> list[str]:
    """What was read and found, then what was done (each figure counted from the database's answers)."""
    found = (f"{report.users_read} users read from {source}{' before it stopped' if report.stopped else ''}: "
             f"{report.signed_up} have an app user, "
             f"{report.without_email} without an email, {report.left_for_operator} refused by the CRM before (left "
             f"to `crm-states resume --machine new_user_signup --state WroteSalesforceErrorToDb`)")
    if report.recent:
        found += f", {report.recent} moved in the last --older-than seconds (left to their signup)"
    if report.dry_run:
        return [found, f"{report.pending} users would be signed up (dry run: nothing claimed, sent or written)"]
    if not report.pending:
        return [found, "nothing to sign up"]
    signed = report.counts.states["WroteSalesforceAppUserUid"]
    batches = f"{report.batches} batch{'' if report.batches == 1 else 'es'}"
    return [found, f"{signed} of the {report.pending} users found{' so far' if report.stopped else ''} signed up in "
                   f"{report.seconds:.1f}s ({report.api_requests} API requests, {batches}):"]
