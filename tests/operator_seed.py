"""A database with known counts for the operator's view (HTML page, Prometheus text, metrics, logs): the
machines are driven through the public API against FakeSalesforce over HTTP, with the fake refusing one
lookup and one create and the database refusing two writes."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import structlog
from pymongo.database import Database

from crm_states.api import CrmStates
from crm_states.crm import RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import TokenCache
from crm_states.runner import RunnerConfig, ValidationRunner
from crm_states.testing import FakeSalesforce, Fault
from tests.faults import FlakyDatabase, WritePlan
from tests.reliability.checks import seed_nb_profiles, seed_signup_profiles

NB, SIGNUP = "nb_profile_validation", "new_user_signup"
FAST = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0, read_timeout=5.0)

#: What the seed leaves: machine -> state -> profiles (every other state holds none).
EXPECTED = {
    NB: {"WroteSalesforceAppUserUid": 12, "WroteNotFound": 24, "WroteUnexpectedResponse": 5},
    SIGNUP: {"WroteSalesforceAppUserUid": 4, "LoggedDbFailure": 2, "WroteSalesforceErrorToDb": 1},
}
JOURNALED = 2  # the two signups whose id's write the database refused


def json_handler(stream: io.StringIO) -> logging.Handler:
    """A handler formatted as Sefaria's structlog configuration formats stdlib records: JSON lines with
    the records' ``extra`` fields as keys."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.add_log_level,
                           structlog.stdlib.ExtraAdder(), structlog.processors.TimeStamper(fmt="iso")],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()]))
    return handler


@contextmanager
def json_logs(level: int = logging.INFO) -> Iterator[io.StringIO]:
    """The ``crm_states`` loggers' records at ``level`` and above, as JSON lines, while the block runs."""
    stream = io.StringIO()
    handler = json_handler(stream)
    logger = logging.getLogger("crm_states")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def crm_for(fake: FakeSalesforce) -> SalesforceConnectionManager:
    return SalesforceConnectionManager(fake.url, fake.client_id, fake.client_secret, policy=FAST,
                                       sleep=lambda s: None, token_cache=TokenCache())


def seed(db: Database, fake: FakeSalesforce, tmp_path: Path, *, runner: bool = False) -> CrmStates:
    """Drive profiles into the states of ``EXPECTED``. With ``runner`` the NationBuilder-era profiles go
    through the validate-nb batch runner (chunks of 12), else through ``CrmStates.validate_profiles``."""
    crm = crm_for(fake)
    journal = str(tmp_path / "journal.jsonl")
    app = CrmStates.open(db, crm, journal_path=journal)

    seed_nb_profiles(db, fake, 36, first_id=1)  # every third one has an app user: 12 found, 24 not found
    if runner:
        report = ValidationRunner(app, RunnerConfig(chunk_size=12, concurrency=1),).run()
        assert report.processed == 36, report
    else:
        app.validate_profiles(list(db.profiles.find({"id": {"$lte": 36}})))
    seed_nb_profiles(db, fake, 5, first_id=101, found_every=10_000)
    fake.inject(Fault.error(503), times=FAST.attempts, kind="query")  # past the retry budget
    app.validate_profiles(list(db.profiles.find({"id": {"$gte": 101, "$lte": 105}})))

    users = seed_signup_profiles(db, 7, first_id=201)
    for uid in users[:4]:
        app.run_signup(uid)
    for uid in users[4:6]:  # Salesforce creates the app user, the write of its id is refused
        flaky = CrmStates.open(FlakyDatabase(db, WritePlan({("profiles", "update", 1)})), crm,
                               journal_path=journal)
        flaky.run_signup(uid)
    fake.inject(Fault.error(400, body=b'[{"errorCode": "INVALID_EMAIL_ADDRESS", "message": "bad email"}]'),
                times=1, kind="create")
    app.run_signup(users[6])
    return app


class PageFigures(HTMLParser):
    """The figures an HTML report shows: per machine, each state's count in its table row
    (``table``) and the texts of its node in the diagram (``picture``, keyed by the node's SVG id), plus
    every start tag seen (to check what the page contains)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.table: dict[str, dict[str, str]] = {}
        self.picture: dict[str, dict[str, list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._machine: str | None = None
        self._row: str | None = None
        self._cell: str | None = None
        self._node: str | None = None
        self._g_depth = 0
        self._node_depth = 0
        self._in_text = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        classes = (a.get("class") or "").split()
        if tag == "section" and "machine" in classes:
            self._machine = a.get("data-machine")
            self.table[self._machine or ""] = {}
            self.picture[self._machine or ""] = {}
        elif tag == "tr" and self._machine and a.get("data-state") is not None and self._node is None:
            self._row = a["data-state"]
        elif tag == "td" and self._row is not None:
            self._cell = "count" if "count" in classes else None
        elif tag == "g":
            self._g_depth += 1
            if "node" in classes and self._machine:
                self._node, self._node_depth = a.get("id") or "", self._g_depth
                self.picture[self._machine][self._node] = []
        elif tag == "text" and self._node is not None:
            self._in_text = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._machine = None
        elif tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "g":
            if self._node is not None and self._g_depth == self._node_depth:
                self._node = None
            self._g_depth -= 1
        elif tag == "text":
            self._in_text = False

    def handle_data(self, data: str) -> None:
        if self._cell == "count" and self._row is not None and self._machine:
            self.table[self._machine][self._row] = self.table[self._machine].get(self._row, "") + data.strip()
        if self._in_text and self._node is not None and self._machine:
            self.picture[self._machine][self._node].append(data.strip())
