"""What every ``crm-states`` command shares: exit codes, the one-line error, the database (a URL or the
embedded server), the CRM from the environment, argument types and the per-state count lines."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError
from pymongo.uri_parser import parse_uri

from ..api import connect
from ..crm.dummy import READ_NEEDS
from ..crm.errors import CrmConfigError, CrmNotSupported
from ..crm.factory import LazyCrm
from ..testing.mongo import KINDS, DataDirectoryHeld, MongoServer, MongoServerError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_DB, EXIT_LIMIT = 0, 1, 2, 3, 4
DATA_DIR = Path(".crm-states")
EMBEDDED_DB = "crm_states_demo"
EMBEDDED_ENV = "CRM_STATES_EMBEDDED_SERVER"
DEFAULT_EMBEDDED = "mongod"  # measured: see README, "Configuration"
WEEK = 7 * 24 * 3600


class CliError(Exception):
    """A problem to report in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def database(args: argparse.Namespace) -> Iterator[Database]:
    """``MONGO_URL``/``--mongo-url`` when given; otherwise the embedded server (``--embedded-server``)
    keeping its data under ``<data dir>/<kind>/`` so one command sees what the previous one left.
    A bad URL or database name is a usage error naming the setting, before anything is started."""
    url, url_setting = _setting(args.mongo_url, "--mongo-url", "MONGO_URL")
    name, name_setting = _setting(args.db, "--db", "MONGO_DB")
    if name is not None:
        _check_db_name(name, name_setting)
    if url is not None:
        nodes = _check_url(url, url_setting)
        db = connect(url, name)
        try:
            _ping(db, nodes, url_setting)
            with _said_if_empty(db, f"at {', '.join(nodes)}", args):
                yield db
        finally:
            db.client.close()
        return
    kind = embedded_kind(args)
    where = Path(args.data_dir) / kind
    server = MongoServer(where / "data", kind=kind, log_path=where / "server.log",
                         test_commands=getattr(args, "test_commands", False))
    _say_if_old_layout(Path(args.data_dir), kind)
    try:
        server.start()
    except DataDirectoryHeld as exc:
        raise CliError(f"{exc.holder.describe(where / 'data')}: stop it or use another --data-dir", EXIT_DB) from exc
    except MongoServerError as exc:
        raise CliError(f"cannot start the embedded database ({kind}): {exc}", EXIT_DB) from exc
    try:
        db = connect(server.url, name or EMBEDDED_DB)
        try:
            with _said_if_empty(db, f"in {where}", args):
                yield db
        finally:
            db.client.close()
    finally:
        server.stop()


def embedded_kind(args: argparse.Namespace) -> str:
    """``--embedded-server``, else ``$CRM_STATES_EMBEDDED_SERVER``, else the faster one (mongod)."""
    kind, setting = _setting(getattr(args, "embedded_server", None), "--embedded-server", EMBEDDED_ENV)
    kind = DEFAULT_EMBEDDED if kind is None else kind
    if kind not in KINDS:
        raise CliError(f"{setting}={kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def _setting(given: str | None, flag: str, env: str) -> tuple[str | None, str]:
    """The value of a flag, else of its environment variable, with the name to quote in an error."""
    if given is not None:
        return given, flag
    return os.environ.get(env), env


def _check_url(url: str, setting: str) -> list[str]:
    """The URL's ``host:port`` list; an unparsable URL is a usage error (its text is never printed:
    it may hold a password)."""
    if not url.strip():
        raise CliError(f"{setting} is set but empty: give a MongoDB URL, or unset it for the embedded database")
    try:
        parsed = parse_uri(url, warn=False)
    except (ValueError, PyMongoError) as exc:
        raise CliError(f"{setting} is not a valid MongoDB URL: {str(exc).splitlines()[0][:200]}") from None
    if parsed.get("database") is not None:
        _check_db_name(parsed["database"], f"the database of {setting}")
    return [f"{host}:{port}" for host, port in parsed["nodelist"]]


_BAD_DB_CHARACTERS = set('/\\. "$\0')


def _check_db_name(name: str, setting: str) -> None:
    """MongoDB's rule for database names on Linux: not empty, under 64 bytes, no slash, backslash, dot,
    space, double quote, dollar or NUL."""
    bad = sorted(set(name) & _BAD_DB_CHARACTERS)
    if not name or bad or len(name.encode()) > 63:
        why = ("is empty" if not name else f"contains {' '.join(repr(c) for c in bad)}" if bad
               else "is longer than 63 bytes")
        raise CliError(f"{setting}={name!r} is not a valid database name: it {why}")


def _ping(db: Database, nodes: list[str], setting: str) -> None:
    try:
        db.client.admin.command("ping")
    except PyMongoError as exc:
        raise CliError(f"cannot reach MongoDB at {', '.join(nodes)} ({setting}): {_cause(db, exc)}", EXIT_DB) from exc


def _cause(db: Database, exc: PyMongoError) -> str:
    """Why the servers did not answer (per server when there are several), without pymongo's topology
    description and timeouts."""
    causes = []
    for description in db.client.topology_description.server_descriptions().values():
        if description.error is not None:
            address = "{}:{}".format(*description.address)
            text = str(description.error).split(" (configured timeouts", 1)[0].removeprefix(f"{address}: ")
            causes.append((address, text))
    if len(causes) == 1:
        return causes[0][1][:300]
    if causes:
        return "; ".join(f"{address}: {text}" for address, text in causes)[:300]
    return str(exc).split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0].splitlines()[0][:300]


@contextmanager
def _said_if_empty(db: Database, where: str, args: argparse.Namespace) -> Iterator[None]:
    """A database with no collections at all is new: most likely a mistyped ``--db`` or ``--data-dir``.
    Said once the command has run (a command that fails says only why, in its one line), for every
    command but the demo, which fills it."""
    empty = getattr(args, "command", None) != "demo" and not db.list_collection_names()
    yield
    if empty:
        print(f"crm-states: the database {db.name} {where} was new and empty (a mistyped --db or --data-dir?)",
              file=sys.stderr)


def _say_if_old_layout(data_dir: Path, kind: str) -> None:
    old = data_dir / "db"
    if kind == "secantus" and old.is_dir() and not (data_dir / kind / "data").exists():
        print(f"crm-states: {old} holds SecantusDB data of an older layout; move it to {data_dir / kind / 'data'} "
              "to use it", file=sys.stderr)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mongo-url", help="MongoDB URL (default: $MONGO_URL, else an embedded server)")
    parser.add_argument("--db", help="database name (default: $MONGO_DB, else crm_states_demo when embedded, "
                                     "sefaria otherwise)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="where the embedded database keeps its data "
                                                                  "(one subdirectory per server kind)")
    parser.add_argument("--embedded-server", help=f"the embedded database without a URL: {', '.join(KINDS)} "
                                                  f"(default: ${EMBEDDED_ENV}, else {DEFAULT_EMBEDDED})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


#: The CRM_TYPE values that can serve each machine's CRM calls: lookups need a CRM that answers, writes go to
#: any (NONE accepts them with placeholder ids, LOG logs them for a later ``load-log``).
WRITERS = ("SALESFORCE", "NATIONBUILDER", "LOG", "NONE")
MACHINE_CRM: Mapping[str, tuple[str, ...]] = {
    "nb_profile_validation": READ_NEEDS["find_app_users_by_nationbuilder_ids"],
    "sync_sustainers": READ_NEEDS["get_sustainers"],
    "reconcile_by_email": READ_NEEDS["lookup_app_users_by_emails"],
    "retire_nb_ids": (),  # no CRM call
}


def machine_crm(machine: str) -> tuple[str, ...]:
    return MACHINE_CRM.get(machine, WRITERS)


def needs_text(needs: Sequence[str]) -> str:
    return "CRM_TYPE=" + " or ".join(needs) if len(needs) < len(WRITERS) else "a CRM_TYPE (any)"


def command_crm(command: str, needs: Sequence[str] | None, why: str = "") -> LazyCrm:
    """The CRM of ``CRM_TYPE`` for ``command``, built on first use. With ``needs`` (the command always asks
    the CRM) it is built and checked now, before the database starts, so a wrong setting costs nothing."""
    crm = LazyCrm()
    if needs is None:
        return crm
    try:
        built = crm.resolve()
    except CrmConfigError as exc:
        raise CliError(f"{command} needs {needs_text(needs)}: {exc}") from None
    crm_type = built.name.upper()
    if crm_type in WRITERS and crm_type not in needs:
        raise CliError(f"{command} needs {needs_text(needs)}{' ' + why if why else ''}; CRM_TYPE is {crm_type} "
                       f"(nothing was read or written)")
    return crm


def check_refusal(crm: Any, command: str, left: str) -> None:
    """After a run: if the CRM was missing or could not answer (the machines halted on it, so no verdict
    was recorded), the one-line exit 2 saying which CRM_TYPE is needed and where the profiles stay."""
    refusal = getattr(crm, "refusal", None)
    if refusal is None:
        return
    if isinstance(refusal, CrmNotSupported):
        raise CliError(f"{command}: {refusal}; {left}")
    raise CliError(f"{command} needs a CRM: {refusal}; {left}")


def open_states(db: Database, args: argparse.Namespace, crm: LazyCrm) -> Any:
    """``CrmStates.from_env`` (shared with the Celery tasks) with the command's CRM; the journal defaults to
    the data dir's."""
    from ..api import CrmStates

    return CrmStates.from_env(db, journal_path=str(Path(args.data_dir) / "journal.jsonl"), crm=crm)


def print_counts(counts: Mapping[str, int]) -> None:
    """One line per state, as every command that drives profiles reports them."""
    for state, count in sorted(counts.items()):
        print(f"  {state:<30} {count:>8}")


def existing_file(name: str) -> Path:
    """A readable regular file, or the usage error that says what it is instead."""
    path = Path(name)
    if path.is_dir():
        raise CliError(f"{path} is a directory: give the file in it")
    if not path.exists():
        raise CliError(f"no such file: {path}")
    if not path.is_file():
        raise CliError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise CliError(f"cannot read {path}: permission denied")
    return path


def known(lookup: Callable[[str], Any], name: str) -> Any:
    try:
        return lookup(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def positive(text: str, maximum: int | None = None) -> int:
    """A whole number above 0 (and at most ``maximum``): ``argparse``'s type for counts and sizes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"expected at most {maximum:,}, got {value:,}")
    return value


def at_most(maximum: int) -> Callable[[str], int]:
    """``positive`` with an upper bound, for values that size threads or memory."""
    return lambda text: positive(text, maximum)


def _finite(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A finite duration above 0, at most a week (a lease of ``inf`` or ``nan`` would never expire)."""
    return _finite(text, f"seconds above 0 and at most {WEEK:,} (a week)", lambda v: 0.0 < v <= WEEK)


def share(text: str) -> float:
    return _finite(text, "a share between 0 and 1", lambda v: 0.0 <= v <= 1.0)


def when(text: str) -> dt.datetime:
    """An ISO 8601 date or date and time (UTC unless it says otherwise), as an aware datetime."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 date such as 2026-01-31 or 2026-01-31T12:00, "
                                         f"got {text[:40]!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
