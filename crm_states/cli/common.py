"""What every ``crm-states`` command shares: exit codes, the one-line error, the database (a URL or the
embedded server), the CRM from the environment, argument types and the per-state count lines."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..api import connect
from ..crm.errors import CrmConfigError
from ..testing.mongo import MongoServer, MongoServerError

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


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mongo-url", help="MongoDB URL (default: $MONGO_URL, else an embedded SecantusDB)")
    parser.add_argument("--db", help="database name (default: $MONGO_DB, else crm_states_demo when embedded, "
                                     "sefaria otherwise)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="where the embedded database keeps its data")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


@contextmanager
def crm_configuration() -> Iterator[None]:
    """A missing or wrong CRM setting is a usage error (exit 2), said in one line."""
    try:
        yield
    except CrmConfigError as exc:
        raise CliError(f"CRM configuration: {exc}") from exc


def crm_from_settings() -> Any:
    """The CRM named by ``CRM_TYPE`` and Sefaria's settings."""
    from ..crm import crm_from_env

    with crm_configuration():
        return crm_from_env()


def open_states(db: Database, args: argparse.Namespace) -> Any:
    """``CrmStates.from_env`` (shared with the Celery tasks); the journal defaults to the data dir's."""
    from ..api import CrmStates

    with crm_configuration():
        return CrmStates.from_env(db, journal_path=str(Path(args.data_dir) / "journal.jsonl"))


def print_counts(counts: Mapping[str, int]) -> None:
    """One line per state, as every command that drives profiles reports them."""
    for state, count in sorted(counts.items()):
        print(f"  {state:<30} {count:>8}")


def existing_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    return path


def known(lookup: Callable[[str], Any], name: str) -> Any:
    try:
        return lookup(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {value}")
    return value
