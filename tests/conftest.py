"""Shared fixtures: a real MongoDB server as a separate process and a fresh database per test.

One switch chooses the server for the whole run: ``pytest --backend secantus|mongod|mongod-rs``, or the
environment variable ``CRM_STATES_TEST_BACKEND`` (the option wins; default ``mongod``, the faster). SecantusDB is
a MongoDB wire-protocol server written in Python; ``mongod`` is a genuine MongoDB 6.0 standalone and
``mongod-rs`` the same as a single-node replica set. ``CRM_STATES_TEST_MONGO_URL`` points the shared
database at a MongoDB of your own instead; tests that stop, kill, restart or fail-point their server
still start a private one of the chosen kind (``mongo_server_factory``), and commands run without a
URL use it as their embedded server (``CRM_STATES_EMBEDDED_SERVER``).

The suite runs on pytest-xdist workers (``-n auto``: one per core, at most ``MAX_WORKERS``; ``-n 0`` runs it in
this process), each with a server of its own. The reliability figures each worker recorded come back to the
controller, which prints them at the end under "reliability figures".
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from crm_states.testing.mongo import KINDS, MongoServer
from crm_states.testing.processes import die_with_parent
from tests.reliability.checks import RESULTS

BACKEND_ENV = "CRM_STATES_TEST_BACKEND"
URL_ENV = "CRM_STATES_TEST_MONGO_URL"
#: Each worker runs its own database server and the tests' own servers and subprocesses: more than this
#: many gains little on a shared machine and costs memory.
MAX_WORKERS = 4
FIGURES = "reliability_figures"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", choices=KINDS, default=None,
                     help=f"the database server of the run: {', '.join(KINDS)} "
                          f"(default: ${BACKEND_ENV}, else mongod)")


def backend_of(config: pytest.Config) -> str:
    chosen = config.getoption("--backend") or os.environ.get(BACKEND_ENV) or "mongod"
    if chosen not in KINDS:
        raise pytest.UsageError(f"{BACKEND_ENV}={chosen!r}: expected one of {', '.join(KINDS)}")
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    # Commands the tests run without a URL (the demo, the embedded database) use the same kind of server.
    os.environ["CRM_STATES_EMBEDDED_SERVER"] = backend_of(config)
    if hasattr(config, "workerinput"):  # an xdist worker: it and its servers end with the controller
        die_with_parent()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand this worker's figures to the controller
        workeroutput[FIGURES] = json.dumps(RESULTS, sort_keys=True, default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    figures = getattr(node, "workeroutput", {}).get(FIGURES)
    if figures:
        for name, values in json.loads(figures).items():
            RESULTS.setdefault(name, {}).update(values)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    if not RESULTS:
        return
    terminalreporter.section("reliability figures")
    for name, figures in sorted(RESULTS.items()):
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True, default=str)}")


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get(URL_ENV)
    shared = f"the MongoDB at {URL_ENV}" if url else "a server started for the run"
    return f"database backend: {backend_of(config)} (shared database: {shared})"


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> str:
    """The server kind of this run: ``secantus``, ``mongod`` or ``mongod-rs``."""
    return backend_of(pytestconfig)


@pytest.fixture(scope="session")
def mongo_url(backend: str) -> Iterator[str]:
    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    with MongoServer(":memory:", kind=backend) as server:
        yield server.url


@pytest.fixture(scope="session")
def mongo_client(mongo_url: str) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client: MongoClient) -> Iterator[Database]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


ServerFactory = Callable[..., MongoServer]


@pytest.fixture
def mongo_server_factory(backend: str, tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts a private server of the run's kind, for a test that stops, kills, restarts or fail-points
    it: ``mongo_server_factory(storage=":memory:", test_commands=True)``. Its log is ``tmp_path/<kind>.log``
    unless ``log_path`` says otherwise; every server it started is stopped after the test."""
    started: list[MongoServer] = []

    def start(storage: str | Path = ":memory:", **options: Any) -> MongoServer:
        options.setdefault("log_path", tmp_path / f"{backend}-{len(started)}.log")
        server = MongoServer(storage, kind=backend, **options)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()

