"""The signup sweep (``crm-states signup --pending``, Celery task ``crm_states.signup_sweep``): sign up every
user whose signup hook never ran or never finished (a hook that was not called, a worker that died, an
outage), in batches.

Users come from a pluggable source (``crm_states.users``: Django's ``auth_user`` or the profiles). A user is
the sweep's when no app user id is known for them (in the machines' records or on the profile) and their
signup run is not finished (``new_user_signup.needs_signup``). Their runs are driven through the signup
machine ``LOOKUP_GROUP`` at a time, marked ``batch``: the write-ahead commit takes every run's claim, then
one packed email lookup of the whole group (an App User with that email is adopted; one API request for
10,000 emails) and one sObject Collections request per ``batch_size`` users creates the rest
(``machines/new_user_signup.py``): 100,000 users cost 10 lookups and 500 creates. A SIGKILL at any instant
loses nothing and creates nothing twice: the next sweep meets the claimed runs of a dead driver and decides
them from an email lookup.

What it reports is what the database holds: a state is counted only for a commit it acknowledged, and how
each app user came about (created, adopted by email, journaled) is read back from the positions.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from machines import nb_profile_validation as nb
from machines import new_user_signup as signup

from .api import CrmStates
from .crm.base import requests_sent
from .progress import RunnerReport
from .records import Position
from .users import User, UserSource, Window, lang_of, source_from_env

#: Users per sObject Collections create request (Salesforce's most, and the default).
BATCH = signup.BATCH_RECORDS
#: Runs per drive: what one packed email lookup holds (five query subrequests of 2,000 emails).
LOOKUP_GROUP = 10_000
#: Users read (positions and profiles in one query each) at a time.
READ_CHUNK = 1000


@attrs.define
class SweepReport:
    """What a sweep found and did. ``counts`` holds the driven runs' results as the batch runner counts
    them (states only for acknowledged commits); ``sources`` how the signed-up users' app users came about."""

    window: Window = Window()
    users_read: int = 0
    without_email: int = 0
    signed_up: int = 0
    left_for_operator: int = 0
    recent: int = 0
    pending: int = 0
    counts: RunnerReport = attrs.field(factory=RunnerReport)
    sources: Counter[str] = attrs.field(factory=Counter)
    batches: int = 0
    api_requests: int = 0
    stopped: str | None = None
    dry_run: bool = False
    seconds: float = 0.0


def sweep_signups(app: CrmStates, *, source: UserSource | None = None, window: Window = Window(),
                  older_than: float | None = None, batch_size: int = BATCH, limit: int | None = None,
                  max_api_calls: int | None = None, dry_run: bool = False) -> SweepReport:
    """Sign up the users of ``source`` (default: ``CRM_STATES_USER_SOURCE``) that need it; see the module
    docstring. ``older_than`` (seconds) leaves alone users who joined, and runs that moved, more recently
    (a live hook's). ``dry_run`` only counts; ``limit`` drives at most that many users."""
    if not 1 <= batch_size <= BATCH:
        raise ValueError(f"batch_size must be 1 to {BATCH}")
    started = time.monotonic()
    cutoff = None if older_than is None else dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than)
    if cutoff is not None and (window.joined_before is None or cutoff < _aware(window.joined_before)):
        window = attrs.evolve(window, joined_before=cutoff)
    report = SweepReport(window=window, dry_run=dry_run)
    users = (source or source_from_env())(window, app=app)
    at_start = 0 if dry_run else requests_sent(app.crm)  # a dry run asks the CRM nothing, not even its count
    budget = _Budget(app, batch_size, max_api_calls, at_start)
    group: list[tuple[User, Mapping[str, Any], Position]] = []
    size = 0 if dry_run else budget.group_size(report)
    try:
        for pending in _pending(app, users, report, cutoff):
            if limit is not None and report.pending >= limit:
                break
            report.pending += 1
            if dry_run or report.stopped:
                continue  # counted, so the report says how many are left
            group.append(pending)
            if len(group) == size:
                if not _drive(app, group, batch_size, report):
                    break
                group = []
                size = budget.group_size(report)
        if group and not report.stopped:
            _drive(app, group, batch_size, report)
    finally:
        report.api_requests = 0 if dry_run else requests_sent(app.crm) - at_start
        report.seconds = time.monotonic() - started
    return report


def _pending(app: CrmStates, users: Iterator[User], report: SweepReport,
             cutoff: dt.datetime | None) -> Iterator[tuple[User, Mapping[str, Any], Position]]:
    """The users that need a signup, with their profile document (or ``{"id": n}``) and signup position."""
    for chunk in _chunks(users, READ_CHUNK):
        report.users_read += len(chunk)
        ids = [user.id for user in chunk]
        positions = app.store.positions_of(signup.NAME, ids)
        validations = app.store.positions_of(nb.NAME, ids)
        fields = {"_id": 0, "id": 1, "sf_app_user_id": 1, "settings": 1}
        profiles = {p["id"]: p for p in app.store.profiles.find({"id": {"$in": ids}}, fields)}
        for user in chunk:
            position = positions.get(user.id, Position())
            if not user.email:
                report.without_email += 1
            elif _has_app_user(profiles.get(user.id), position, validations.get(user.id)):
                report.signed_up += 1
            elif not signup.needs_signup(position):
                report.left_for_operator += 1
            elif cutoff is not None and position.at is not None and position.at > cutoff:
                report.recent += 1
            else:
                yield user, profiles.get(user.id) or {"id": user.id}, position


def _has_app_user(profile: Mapping[str, Any] | None, *positions: Position | None) -> bool:
    """An app user id is known: recorded by a finished signup or validation, or on the profile."""
    values = [p.data.fields.get("sf_app_user_id") for p in positions if p is not None]
    values.append((profile or {}).get("sf_app_user_id"))
    return any(isinstance(v, str) and v for v in values)


@attrs.define
class _Budget:
    """How many users the next drive may take: a whole ``LOOKUP_GROUP``, or under ``--max-api-calls`` what
    the requests left pay for (its lookup, then one create request per ``batch_size`` users)."""

    app: CrmStates
    batch_size: int
    max_api_calls: int | None
    at_start: int

    def group_size(self, report: SweepReport) -> int:
        most = LOOKUP_GROUP - LOOKUP_GROUP % self.batch_size
        if self.max_api_calls is None:
            return most
        creates = self.max_api_calls - (requests_sent(self.app.crm) - self.at_start) - 1
        if creates < 1:
            report.stopped = f"--max-api-calls {self.max_api_calls} reached"
            return 0
        return min(most, creates * self.batch_size)


def _drive(app: CrmStates, group: Sequence[tuple[User, Mapping[str, Any], Position]], batch_size: int,
           report: SweepReport) -> bool:
    """One group through the machine; False when the run must stop (the API limit)."""
    engine = app.engine(signup.NAME)
    runs = [engine.prepare(profile, position, restart=position.state in signup.SPEC.terminal,
                           inputs={"email": user.email, "first_name": user.first_name, "last_name": user.last_name,
                                   "lang": user.lang or lang_of(dict(profile)), "educator": user.educator,
                                   "batch": batch_size})
            for user, profile, position in group]
    results = engine.drive(runs)
    report.batches += -(-len(group) // batch_size)
    report.counts.add(results)
    done = [r.profile_id for r in results if r.finished and r.persisted and r.state == "WroteSalesforceAppUserUid"]
    for position in app.store.positions_of(signup.NAME, done).values():
        report.sources[str(position.detail.get("source") or "created")] += 1
    if report.counts.stopped:
        report.stopped = report.counts.stopped
        return False
    return True


def _chunks(items: Iterator[User], size: int) -> Iterator[list[User]]:
    chunk: list[User] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
