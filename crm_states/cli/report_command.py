"""``crm-states report``: the command's flags and checks around the library's ``crm_states.report``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import TextIO

from pymongo.database import Database

from ..api import MACHINES
from ..report import (
    CSV_COLUMNS,
    collect,
    export_csv,
    mermaid_text,
    write_json,
    write_text,
)
from .common import EXIT_OK, CliError, database


def cmd_report(args: argparse.Namespace) -> int:
    _check(args)  # a bad flag is said before the database starts
    with database(args) as db:
        return run_report(db, args, sys.stdout)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's own flags (the database flags are added by the CLI)."""
    parser.description = textwrap.fill(
        "Count the profiles in each state of each machine, with the oldest and newest time a profile entered "
        "it and, for failure states, what to do about them (the design document's notes). Exports the profiles "
        "of one state as CSV, or draws a machine's diagram with its counts. CRM: none (it reads only the "
        "database).", width=78)
    parser.epilog = ("examples:\n"
                     "  crm-states report\n"
                     "  crm-states report --json --machine new_user_signup\n"
                     "  crm-states report --state WroteNotFound --csv not_found.csv\n"
                     "  crm-states report --machine nb_profile_validation --mermaid")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    known = ", ".join(MACHINES)
    parser.add_argument("--machine", metavar="M", help=f"only this machine ({known}; default all)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON document: machine -> state -> {count, oldest, newest, kind, note}")
    parser.add_argument("--state", metavar="S", help="with --csv: the state whose profiles to export "
                                                     "(needs --machine when S is in several machines)")
    parser.add_argument("--csv", metavar="FILE", help=f"export the profiles in --state as CSV "
                                                      f"({', '.join(CSV_COLUMNS)}); - for stdout")
    parser.add_argument("--mermaid", action="store_true",
                        help="print the --machine's stateDiagram-v2 with each state's count in its label")


def run_report(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    machines, state = _check(args)
    try:
        if state is not None:
            return _run_csv(db, machines[0], state, args.csv, out)
        data = collect(db, machines)
        if getattr(args, "mermaid", False):
            out.write(mermaid_text(MACHINES[machines[0]], data[machines[0]], db.name))
        elif getattr(args, "json", False):
            write_json(data, out)
        else:
            write_text(data, out)
        out.flush()
    except BrokenPipeError:  # `crm-states report ... | head`: the reader has what it wanted
        _discard_output(out)
    return EXIT_OK


def _check(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The machines to report on and the state to export, or ``CliError`` for a bad combination."""
    machine = getattr(args, "machine", None)
    state = getattr(args, "state", None)
    csv_to = getattr(args, "csv", None)
    as_json = getattr(args, "json", False)
    as_mermaid = getattr(args, "mermaid", False)
    known = ", ".join(MACHINES)
    if machine is not None and machine not in MACHINES:
        raise CliError(f"unknown machine {machine!r}; known machines: {known}")
    if as_json and as_mermaid:
        raise CliError("--json and --mermaid are two different outputs: choose one")
    if csv_to is not None and state is None:
        raise CliError("--csv needs --state S: the state whose profiles to export")
    if state is not None and csv_to is None:
        raise CliError(f"--state {state} selects the profiles to export: add --csv FILE (- for stdout)")
    if csv_to is not None and (as_json or as_mermaid):
        raise CliError("--csv writes the profiles of one state; it cannot be combined with --json or --mermaid")
    if as_mermaid and machine is None:
        raise CliError(f"--mermaid draws one machine's diagram: add --machine ({known})")
    if state is None:
        return ([machine] if machine else list(MACHINES)), None
    if machine is not None:
        states = MACHINES[machine].diagram.states
        if state not in states:
            raise CliError(f"{machine} has no state {state!r}; its states: {', '.join(states)}")
        return [machine], state
    owners = [name for name, spec in MACHINES.items() if state in spec.diagram.states]
    if not owners:
        listing = "".join(f"\n  {name}: {', '.join(spec.diagram.states)}" for name, spec in MACHINES.items())
        raise CliError(f"no machine has a state {state!r}; the states of each machine:{listing}")
    if len(owners) > 1:
        raise CliError(f"state {state!r} is in several machines ({', '.join(owners)}): add --machine")
    return owners, state


def _run_csv(db: Database, machine: str, state: str, dest: str, out: TextIO) -> int:
    if dest == "-":
        if hasattr(out, "reconfigure") and str(getattr(out, "encoding", "utf-8")).lower().replace("-", "") != "utf8":
            out.reconfigure(encoding="utf-8")  # the CSV is UTF-8 whatever the locale says
        export_csv(db, machine, state, out)
        out.flush()
        return EXIT_OK
    path = Path(dest)
    # Written beside the target and renamed into place: a failed export never leaves half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                n = export_csv(db, machine, state, f)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror or exc}") from None
    print(f"{n} profiles of {machine} in {state} written to {dest}", file=out)
    return EXIT_OK


def _discard_output(out: TextIO) -> None:
    """After a closed pipe, point ``out`` at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a StringIO in tests)
        pass
