"""The ``crm-states`` command. Each subcommand says what it does in ``--help``; exit codes:
0 done, 1 finished with problems to look at, 2 bad usage or configuration, 3 database unreachable,
4 stopped early by the CRM's API limit or --max-api-calls (run again to resume)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pymongo.errors import PyMongoError

from ..api import MACHINES
from ..crm.errors import CrmConfigError, CrmError, CrmLimitExceeded
from ..store import ProfileNotFound, StoreUnavailable
from .commands import (
    cmd_demo,
    cmd_load_log,
    cmd_replay,
    cmd_resume,
    cmd_signup,
    cmd_sync_sustainers,
    cmd_validate_nb,
)
from .common import (
    EXIT_DB,
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    CliError,
    add_common,
    at_most,
    positive,
    seconds,
    share,
    when,
)
from .heal_command import configure_parser as configure_heal
from .migration_command import configure_reconcile, configure_retire
from .report_command import cmd_report
from .report_command import configure_parser as configure_report

__all__ = ["main", "build_parser", "CliError", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "EXIT_DB", "EXIT_LIMIT"]

#: ``validate-nb``'s default range: the NationBuilder ids one packed Salesforce lookup carries (five queries
#: of 2,000 ids in one ``/composite`` request), so the REST path costs 100 requests per 1,000,000 profiles
#: while each drive still holds only a chunk.
LOOKUP_SIZE = 10_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-states", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run both machines on synthetic profiles against a local fake CRM",
                          description="Start the embedded database and a fake CRM on loopback, seed synthetic "
                                      "profiles, run NationBuilder-profile validation and new-user signups with a "
                                      "mix of CRM and database faults, then print every path and the count per state. "
                                      "CRM: none (CRM_TYPE is not read; the demo starts its own fake Salesforce).")
    add_common(demo)
    demo.add_argument("--profiles", type=at_most(1_000_000), default=10_000,
                      help="how many synthetic profiles (default 10,000; at most 1,000,000)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic data and faults")
    demo.set_defaults(func=cmd_demo)

    validate = sub.add_parser("validate-nb", help="validate every pending profile that has a nationbuilder_id",
                              description="Stream profiles whose nationbuilder_id is truthy and whose validation is "
                                          "not finished, claim id ranges with expiring leases, and drive each range "
                                          "through the nb_profile_validation machine with one batched CRM lookup. "
                                          "Safe to run several at once and to kill at any time: run it again to "
                                          "resume. --snapshot answers from one Bulk API query job instead of a "
                                          "lookup per range, --from-export from the operators' export file. CRM: "
                                          "needs CRM_TYPE=SALESFORCE and Sefaria's Salesforce settings (--dry-run "
                                          "and --from-export need none).")
    add_common(validate)
    validate.add_argument("--chunk-size", type=at_most(100_000), default=1000,
                          help="profiles driven and written together (default 1000, at most 100,000)")
    validate.add_argument("--lookup-size", type=at_most(100_000), default=LOOKUP_SIZE,
                          help="profiles per leased range and per packed lookup, driven a chunk at a time (default "
                               f"{LOOKUP_SIZE:,}: one /composite request of five 2,000-id queries; at least the "
                               "chunk size)")
    validate.add_argument("--concurrency", type=at_most(64), default=2, help="ranges worked at once (default 2, "
                                                                              "at most 64)")
    validate.add_argument("--limit", type=positive, help="stop after this many profiles")
    validate.add_argument("--dry-run", action="store_true", help="count pending profiles; claim, send, write nothing")
    validate.add_argument("--max-api-calls", type=positive,
                          help="send at most this many API requests, as Salesforce counts them (each query page, "
                               "each try; with --snapshot the job, its polls and its result pages)")
    validate.add_argument("--lease-seconds", type=seconds, default=300.0,
                          help="how long a range lease lasts (default 300; above 0, at most a week)")
    modes = validate.add_mutually_exclusive_group()
    modes.add_argument("--snapshot", action="store_true",
                       help="answer from one Bulk API 2.0 query job of every App User with a NationBuilder id, "
                            "loaded into the database first (reused by a later run while Salesforce keeps it); "
                            "the job, its polls and its result pages are the only API requests")
    modes.add_argument("--from-export", metavar="FILE.csv",
                       help="answer from the Salesforce report the operators export (CSV); no API request, no CRM "
                            "needed; each history names the file and its lines")
    validate.add_argument("--page-records", type=at_most(1_000_000), default=50_000,
                          help="with --snapshot: rows per results page, one API request each (default 50,000)")
    validate.set_defaults(func=cmd_validate_nb)

    signup_cmd = sub.add_parser("signup", help="run the new-user signup machine for one user, or every user a "
                                               "signup missed (--pending)",
                                description="What Sefaria's signup hook calls: create the app user in the CRM "
                                            "and save its id. Safe to repeat: never creates a second app user. "
                                            "--pending sweeps every user with no app user id and no finished signup "
                                            "(a hook that never ran, a worker that died, an outage), read from "
                                            "CRM_STATES_USER_SOURCE (django, profiles or module:function), in "
                                            "batches: one packed email lookup per 10,000 users (an App User with that "
                                            "email is adopted) and one sObject Collections create per batch of up "
                                            "to 200. CRM: any "
                                            "CRM_TYPE (NONE stores a dummy: placeholder id, LOG logs the create for "
                                            "load-log).")
    add_common(signup_cmd)
    who = signup_cmd.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", type=positive, help="Sefaria user id (profiles.id)")
    who.add_argument("--pending", action="store_true", help="every user a signup missed (see above)")
    signup_cmd.add_argument("--email", help="default: the profile's email")
    signup_cmd.add_argument("--first-name")
    signup_cmd.add_argument("--last-name")
    signup_cmd.add_argument("--lang", default="en", choices=["en", "he"])
    signup_cmd.add_argument("--educator", action="store_true")
    signup_cmd.add_argument("--older-than", type=seconds, metavar="S",
                            help="with --pending: only users who joined (and runs that moved) more than S seconds "
                                 "ago, so a live signup hook is left to finish")
    signup_cmd.add_argument("--joined-after", type=when, metavar="DATE",
                            help="with --pending: only users who joined at or after DATE (ISO 8601, UTC)")
    signup_cmd.add_argument("--joined-before", type=when, metavar="DATE",
                            help="with --pending: only users who joined before DATE (ISO 8601, UTC)")
    signup_cmd.add_argument("--batch-size", type=at_most(200), default=200,
                            help="with --pending: users per batch, one create request each (default and most 200)")
    signup_cmd.add_argument("--limit", type=positive, help="with --pending: at most this many users")
    signup_cmd.add_argument("--max-api-calls", type=positive,
                            help="with --pending: stop before a batch would pass this many API requests")
    signup_cmd.add_argument("--dry-run", action="store_true",
                            help="with --pending: count the users it would sign up; send and write nothing")
    signup_cmd.set_defaults(func=cmd_signup)

    resume = sub.add_parser("resume", help="re-drive profiles stuck in a state",
                            description="A new run from [*] for profiles in a stopped state (the CRM is asked "
                                        "again), the journaled CRM result written without asking the CRM again for "
                                        "DB-failure states, and the stopped run continued for mid-way states. Exit 1 "
                                        "when profiles fail again (back in the same state or a DB-failure state, or not "
                                        "finished). CRM: none for a DB-failure state "
                                        "whose journaled results need no CRM call (asked for only if one is made); "
                                        "otherwise the machine's: CRM_TYPE=SALESFORCE for nb_profile_validation, "
                                        "SALESFORCE or NATIONBUILDER for sync_sustainers, any CRM_TYPE for the others.")
    add_common(resume)
    resume.add_argument("--machine", required=True, help="the machine: " + ", ".join(MACHINES))
    resume.add_argument("--state", required=True, help="the state whose profiles to re-drive")
    resume.add_argument("--limit", type=positive, help="at most this many profiles")
    resume.set_defaults(func=cmd_resume)

    sync = sub.add_parser("sync-sustainers", help="the weekly sustainer sync: is_sustainer from the CRM",
                          description="Read the whole sustainer set from the CRM (nothing changes if the read "
                                      "fails or is incomplete), then set is_sustainer where a profile differs "
                                      "(matched by sf_app_user_id), each change a persisted run of the "
                                      "sync_sustainers machine, in batches. A second run changes nothing. Refuses "
                                      "to demote more than --max-demote-share of the current sustainers unless "
                                      "--force. Exit 0 done; 1 read failed, refused or some runs not finished; 4 the "
                                      "CRM's API limit stopped the read. CRM: needs CRM_TYPE=SALESFORCE or "
                                      "NATIONBUILDER (also for --dry-run).")
    add_common(sync)
    sync.add_argument("--max-demote-share", type=share, default=0.1,
                      help="refuse to demote more than this share of the current sustainers (default 0.1)")
    sync.add_argument("--force", action="store_true", help="demote even beyond --max-demote-share")
    sync.add_argument("--dry-run", action="store_true", help="read the CRM and count the changes; write nothing")
    sync.add_argument("--batch-size", type=at_most(100_000), default=1000,
                      help="profiles per bulk write (default 1000, at most 100,000)")
    sync.set_defaults(func=cmd_sync_sustainers)

    replay = sub.add_parser("replay", help="apply journaled DB writes (a JSONL journal or an application log)",
                            description="Apply every journal entry in FILE idempotently: replaying twice changes "
                                        "nothing more. Replay restores the journaled history and profile data; the "
                                        "profiles stay in their DB-failure state until `crm-states resume` moves them "
                                        "on. Lines of an application log that are not journal entries are skipped and "
                                        "counted; torn lines (a crash mid-append) and invalid entries are named, and "
                                        "exit 1 (a file with no entry at all: exit 2, nothing done). CRM: none.")
    add_common(replay)
    replay.add_argument("file", help="journal JSONL or application log")
    replay.set_defaults(func=cmd_replay)

    load = sub.add_parser("load-log", help="load the interim CRM log (CRM_TYPE=LOG) into the CRM",
                          description="The migration's 'load log data to Salesforce': send every entry of the log "
                                      "once (a second load sends nothing twice) to the CRM named by CRM_TYPE. Invalid "
                                      "lines are named and exit 1 (a file with no entry at all: exit 2, nothing sent). "
                                      "CRM: needs CRM_TYPE=SALESFORCE or NATIONBUILDER.")
    load.add_argument("file", help="the CRM_LOG_PATH file")
    load.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    load.set_defaults(func=cmd_load_log)

    heal = sub.add_parser("heal", help="write back machine data that Sefaria's profile saves erased (no CRM call)",
                          description="Sefaria replaces whole profile documents with stale copies, which can erase the "
                                      "sf_app_user_id, CrmLog lines and is_sustainer the machines wrote. Find every "
                                      "profile whose data disagrees with what its finished runs recorded and write it "
                                      "back, in batches; idempotent: run it every few minutes. CRM: none.")
    configure_heal(heal)

    configure_retire(sub.add_parser("retire-nb-ids", help="remove nationbuilder_id from every validated profile "
                                                          "(--undo puts them back); no CRM call"))
    configure_reconcile(sub.add_parser("reconcile-by-email", help="give profiles without a nationbuilder_id or an App "
                                                                  "User id the App User of their email"))

    report = sub.add_parser("report", help="count profiles in each state of each machine")
    add_common(report)
    configure_report(report)
    report.set_defaults(func=cmd_report)
    return parser


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
    except CrmConfigError as exc:  # a CRM built or asked outside a machine (load-log's target)
        print(f"crm-states: CRM configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CrmError as exc:
        print(f"crm-states: CRM error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except PyMongoError as exc:
        print(f"crm-states: database error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return EXIT_DB
    except KeyboardInterrupt:
        print("crm-states: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
