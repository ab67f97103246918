"""``crm-states heal``: write back the machine data that Sefaria's whole-document profile saves erased.

Every number it prints is read from the database in the same pass: drifted profiles (their
``sf_app_user_id``, ``CrmLog`` lines or ``is_sustainer`` disagree with what finished runs recorded),
the ones written back, the ones waiting for Sefaria to create the profile, and the ones whose inputs
changed since (due for validation again, not asserted).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..api import MACHINES
from ..store import HealReport
from .common import EXIT_OK, CliError, add_common, command_crm, database, open_states


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--machine", metavar="M", help=f"only this machine's data ({', '.join(MACHINES)})")
    parser.add_argument("--dry-run", action="store_true", help="count what drifted; write nothing")
    parser.add_argument("--json", action="store_true", help="one JSON document: machine -> figures")
    parser.set_defaults(func=cmd_heal)


def cmd_heal(args: argparse.Namespace) -> int:
    if args.machine is not None and args.machine not in MACHINES:
        raise CliError(f"unknown machine {args.machine!r}; known machines: {', '.join(MACHINES)}")
    with database(args) as db:
        report = open_states(db, args, command_crm("heal", None)).heal(args.machine, dry_run=args.dry_run)
    names = [args.machine] if args.machine else list(MACHINES)
    if args.json:
        json.dump(as_json(report, names), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    verb = "would write back" if args.dry_run else "wrote back"
    print(f"{report.checked} profiles with machine data checked; {report.total_drifted} drifted, {verb} "
          f"{report.drifted_profiles if args.dry_run else report.healed_profiles}"
          + (" (dry run: nothing written)" if args.dry_run else ""))
    print(f"  {'machine':<22} {'drifted':>8} {'healed':>8} {'waiting':>8} {'stale':>8}")
    for name in names:
        print(f"  {name:<22} {report.drifted[name]:>8} {report.healed[name]:>8} {report.waiting[name]:>8} "
              f"{report.stale_inputs[name]:>8}")
    if any(report.waiting.values()):
        print("  waiting: the profile document does not exist yet (a signup before Sefaria saved the profile); "
              "a later heal writes it")
    if any(report.stale_inputs.values()):
        print("  stale: the profile's inputs changed since the run (its nationbuilder_id): not asserted; "
              "`crm-states validate-nb` looks at it again")
    return EXIT_OK


def as_json(report: HealReport, names: list[str]) -> dict[str, dict[str, int]]:
    return {name: {"drifted": report.drifted[name], "healed": report.healed[name], "waiting": report.waiting[name],
                   "stale_inputs": report.stale_inputs[name]} for name in names}
