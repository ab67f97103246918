"""``crm-states report``: the command's flags and checks around the library's ``crm_states.report``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, TypeVar

from pymongo.database import Database

from ..api import MACHINES
from ..report import (
    StateRow,
    collect,
    drift_counts,
    mermaid_text,
    write_json,
    write_text,
)
from ..report_profiles import CSV_COLUMNS, export_csv
from .common import EXIT_OK, CliError, database

T = TypeVar("T")


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
                     "  crm-states report --machine nb_profile_validation --mermaid\n"
                     "  crm-states report --html report.html\n"
                     "  crm-states report --prometheus /var/lib/node_exporter/textfile/crm_states.prom")
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
    parser.add_argument("--no-drift", action="store_true",
                        help="skip the drift count (profiles whose data Sefaria's saves erased: one pass over the "
                             "machines' data and the profiles, as `crm-states heal --dry-run`)")
    parser.add_argument("--html", metavar="FILE",
                        help="write one self-contained HTML page: each machine's diagram with its counts, the "
                             "counts table, the first profiles of each failure state (needs Graphviz's dot)")
    parser.add_argument("--prometheus", metavar="FILE", nargs="?", const="-",
                        help="Prometheus text exposition of the counts (for node-exporter's textfile collector), "
                             "to FILE (written atomically) or stdout; needs crm_states[metrics]")


def run_report(db: Database, args: argparse.Namespace, out: TextIO) -> int:
    machines, state = _check(args)
    try:
        if state is not None:
            return _run_csv(db, machines[0], state, args.csv, out)
        data = collect(db, machines)
        as_json, as_mermaid = getattr(args, "json", False), getattr(args, "mermaid", False)
        drift = None if getattr(args, "no_drift", False) or as_json or as_mermaid else drift_counts(db, machines)
        if getattr(args, "html", None) is not None:
            return _run_html(db, data, args.html, out, drift)
        if getattr(args, "prometheus", None) is not None:
            return _run_prometheus(data, args.prometheus, out, drift)
        if as_mermaid:
            out.write(mermaid_text(MACHINES[machines[0]], data[machines[0]], db.name))
        elif as_json:
            write_json(data, out)
        else:
            write_text(data, out, drift)
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
    _check_page_outputs(args)
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


def _check_page_outputs(args: argparse.Namespace) -> None:
    """``--html`` and ``--prometheus`` are outputs of their own, and each needs a program or package that
    may be missing: said in one line before anything is read."""
    html, prometheus = getattr(args, "html", None), getattr(args, "prometheus", None)
    if html is None and prometheus is None:
        return
    from ..diagram_svg import (  # graphviz is imported only for --html
        DotMissing,
        check_dot,
    )
    from ..report_prometheus import PrometheusMissing, check_prometheus
    chosen = [flag for flag, on in (("--html", html is not None), ("--prometheus", prometheus is not None),
                                    ("--json", getattr(args, "json", False)),
                                    ("--mermaid", getattr(args, "mermaid", False)),
                                    ("--csv", getattr(args, "csv", None) is not None)) if on]
    if len(chosen) > 1:
        raise CliError(f"{' and '.join(chosen)} are different outputs: choose one")
    try:
        if html is not None:
            check_dot()
        if prometheus is not None:
            check_prometheus()
    except (DotMissing, PrometheusMissing) as exc:
        raise CliError(str(exc)) from None


def _run_csv(db: Database, machine: str, state: str, dest: str, out: TextIO) -> int:
    n = _write_to(dest, out, lambda f: export_csv(db, machine, state, f), newline="")
    if dest != "-":
        print(f"{n} profiles of {machine} in {state} written to {dest}", file=out)
    return EXIT_OK


def _run_html(db: Database, data: dict[str, list[StateRow]], dest: str, out: TextIO,
              drift: dict[str, int] | None) -> int:
    from ..diagram_svg import DotMissing
    from ..report_html import (
        write_html,  # jinja2, graphviz and the template only when a page is asked for
    )

    try:
        _write_to(dest, out, lambda f: write_html(db, data, f, drift=drift))
    except DotMissing as exc:  # dot went away between the check and the drawing
        raise CliError(str(exc)) from None
    if dest != "-":
        total = sum(r.count for rows in data.values() for r in rows)
        print(f"report of {len(data)} machines ({total} profiles) written to {dest}", file=out)
    return EXIT_OK


def _run_prometheus(data: dict[str, list[StateRow]], dest: str, out: TextIO, drift: dict[str, int] | None) -> int:
    from ..report_prometheus import exposition

    text = exposition(data, drift=drift)
    _write_to(dest, out, lambda f: f.write(text))
    return EXIT_OK


def _write_to(dest: str, out: TextIO, write: Callable[[TextIO], T], newline: str | None = None) -> T:
    """``write`` into ``out`` for ``-``, else into ``dest`` (UTF-8) written beside it and renamed into place, so
    a failed export never leaves half a file (and a textfile collector never reads one)."""
    if dest == "-":
        if hasattr(out, "reconfigure") and str(getattr(out, "encoding", "utf-8")).lower().replace("-", "") != "utf8":
            out.reconfigure(encoding="utf-8")  # UTF-8 whatever the locale says
        result = write(out)
        out.flush()
        return result
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            with open(tmp, "w", encoding="utf-8", newline=newline) as f:
                result = write(f)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return result


def _discard_output(out: TextIO) -> None:
    """After a closed pipe, point ``out`` at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a StringIO in tests)
        pass
