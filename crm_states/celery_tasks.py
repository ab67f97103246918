"""Celery tasks for Sefaria's workers (the optional extra ``crm_states[celery]``).

Five tasks call exactly what the command line and Sefaria's hooks call:

- ``crm_states.run_signup(user_id, ...)``: ``CrmStates.run_signup`` (``crm-states signup``);
- ``crm_states.validate_chunk(profile_ids=[...] | id_range=[lo, hi])``: the batch runner's per-chunk
  step (``ValidationRunner.validate_chunk``) for the chunk's pending profiles: one batched CRM lookup
  and bulk writes, as ``crm-states validate-nb`` does for each of its ranges;
- ``crm_states.sync_sustainers(force=False, ...)``: ``crm_states.sustainers.sync_sustainers``
  (``crm-states sync-sustainers``);
- ``crm_states.heal(machine=None, dry_run=False)``: ``CrmStates.heal`` (``crm-states heal``), for Celery beat
  every few minutes: Sefaria's profile saves erase machine data at any time;
- ``crm_states.signup_sweep(older_than=1800, joined_after=None, joined_before=None, limit=None)``: the signup
  sweep (``crm-states signup --pending``, ``crm_states.sweep``), for Celery beat: the users whose signup hook
  never ran or never finished, signed up in batches. ``older_than`` leaves alone the users (and runs) a live
  hook or a retrying ``run_signup`` task may still be on (its retries back off for up to about 16 minutes).
  Dates are ISO 8601 strings. Never retried: what a sweep could not do is a state the next sweep takes up.

Arguments and results are JSON: ids, flags, and a summary with the state, the outcome and per-state
counts. Every task builds its ``CrmStates`` with ``CrmStates.from_env``, as the commands do: ``MONGO_URL``
and ``MONGO_DB``, ``CRM_TYPE`` and Sefaria's CRM settings, ``CRM_STATES_JOURNAL``; one per worker process.

Retries. The machines record a CRM failure as a state instead of raising, so a task looks at where its
profiles ended: a transient CRM failure (``CrmTransientError`` or a subclass: 5xx, timeouts, dropped
connections, past the client's own retries) raises ``CrmTransientError`` and Celery retries the task with
exponential backoff. That is safe because the machines are idempotent: a finished profile is left alone,
and a retry re-drives only the profiles that a transient failure stopped (a signup's create carries the
user id, or looks the email up first, so it never makes a second app user; a lookup is a read; a failed
sustainer read has changed nothing). ``CrmLimitExceeded`` (the daily API limit) is never retried: the
run halts, the summary says so, and the same task sent again tomorrow goes on from where it stopped. On
the last attempt a task returns its summary instead of raising: the failure is a state that
``crm-states report`` shows and ``crm-states resume`` finishes.

Sefaria registers the tasks on its own app with ``register_tasks(app)``; ``app`` below is a default app
configured from ``CRM_STATES_BROKER_URL`` for ``celery -A crm_states.celery_tasks worker``. Nothing in
the library imports this module.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from celery import Celery, Task

from machines import nb_profile_validation as nb
from machines import new_user_signup as signup

from .api import MACHINES, CrmStates
from .crm.errors import CrmLimitExceeded, CrmTransientError, transient_error_text
from .engine import RunResult
from .records import Position
from .runner import (
    NB_FILTER,
    PROJECTION,
    Progress,
    RunnerConfig,
    RunnerReport,
    ValidationRunner,
)
from .sustainers import DEFAULT_BATCH_SIZE, DEFAULT_MAX_DEMOTE_SHARE, SyncReport

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: Seconds: the first retry waits up to this long, each later one twice as long (full jitter), capped.
DEFAULT_RETRY_BACKOFF = 30
DEFAULT_MAX_RETRIES = 5
#: The most profiles one ``validate_chunk`` takes: about what one batched lookup carries.
MAX_CHUNK = 5000
#: Seconds: the signup sweep leaves alone users who joined (and runs that moved) more recently than this.
SWEEP_OLDER_THAN = 1800.0

#: Per machine, the state in which a CRM failure stopped a run after the failure was written.
_CRM_FAILURE_STATE = {nb.NAME: "WroteUnexpectedResponse", signup.NAME: "WroteSalesforceErrorToDb"}


class CrmTasks(NamedTuple):
    """The tasks as registered on one app."""

    run_signup: Task
    validate_chunk: Task
    sync_sustainers: Task
    heal: Task
    signup_sweep: Task


# --- the CrmStates of a worker process ------------------------------------------------------------------

_shared: tuple[int, CrmStates] | None = None
_shared_lock = threading.Lock()


def shared_states() -> CrmStates:
    """One ``CrmStates.from_env()`` per process, built on first use: a worker keeps its Mongo connection
    pool and CRM token between tasks, and a forked pool child builds its own (pymongo is not fork-safe)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), CrmStates.from_env())
        return _shared[1]


# --- apps and registration ------------------------------------------------------------------------------

def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app for these tasks: broker ``broker_url`` or ``CRM_STATES_BROKER_URL`` (default local
    Redis), results in ``result_backend`` or ``CRM_STATES_RESULT_BACKEND``, else in the broker when it is
    Redis. JSON only: the tasks take and return plain data. No task is registered here."""
    broker = broker_url or os.environ.get("CRM_STATES_BROKER_URL") or DEFAULT_BROKER_URL
    backend = result_backend or os.environ.get("CRM_STATES_RESULT_BACKEND") or (
        broker if broker.startswith(("redis://", "rediss://")) else None)
    app = Celery("crm_states", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True, result_expires=7 * 24 * 3600)
    return app


def register_tasks(app: Celery, *, open_states: Callable[[], CrmStates] | None = None,
                   max_retries: int = DEFAULT_MAX_RETRIES, retry_backoff: int | None = None) -> CrmTasks:
    """Register the tasks above (``crm_states.run_signup``, ``validate_chunk``, ``sync_sustainers``, ``heal``,
    ``signup_sweep``) on ``app`` (Sefaria's own app, or ``make_app()``). ``open_states`` gives the ``CrmStates``
    a task uses (default: ``shared_states``, from the environment). ``retry_backoff`` defaults to
    ``CRM_STATES_RETRY_BACKOFF`` or 30 seconds.

    ``acks_late``: a worker that dies mid-task leaves the message to be delivered again, which is safe
    for the same reason retries are."""
    states = open_states or shared_states
    backoff = retry_backoff or int(os.environ.get("CRM_STATES_RETRY_BACKOFF") or DEFAULT_RETRY_BACKOFF)
    options: dict[str, Any] = {
        # shared=False: the tasks belong to ``app`` alone, never to every app created later in the process
        # (Celery's default), so Sefaria's registration with its own ``open_states`` is the one that runs.
        "bind": True, "shared": False, "acks_late": True, "max_retries": max_retries,
        "autoretry_for": (CrmTransientError,), "dont_autoretry_for": (CrmLimitExceeded,),
        "retry_backoff": backoff, "retry_backoff_max": 3600, "retry_jitter": True,
    }

    def run_signup_task(task: Task, user_id: int, email: str | None = None, first_name: str | None = None,
                        last_name: str | None = None, lang: str = "en", educator: bool = False,
                        restart: bool = False) -> dict[str, Any]:
        """``CrmStates.run_signup`` for one new user; a retry restarts the run only if a transient CRM
        failure stopped it."""
        return _run_signup(task, states(), user_id, email=email, first_name=first_name, last_name=last_name,
                           lang=lang, educator=educator, restart=restart)

    def validate_chunk_task(task: Task, profile_ids: Sequence[int] | None = None,
                            id_range: Sequence[int] | None = None) -> dict[str, Any]:
        """Validate the chunk's pending NationBuilder profiles: one batched CRM lookup, bulk writes."""
        return _validate_chunk(task, states(), profile_ids=profile_ids, id_range=id_range)

    def sync_sustainers_task(task: Task, force: bool = False, dry_run: bool = False,
                             max_demote_share: float = DEFAULT_MAX_DEMOTE_SHARE,
                             batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
        """The weekly sustainer sync; ``force`` demotes beyond ``max_demote_share``."""
        return _sync_sustainers(task, states(), force=force, dry_run=dry_run, max_demote_share=max_demote_share,
                                batch_size=batch_size)

    def heal_task(task: Task, machine: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """``crm-states heal``: write back the machine data Sefaria's profile saves erased (no CRM call);
        meant for Celery beat every few minutes."""
        report = states().heal(machine, dry_run=dry_run)
        names = [machine] if machine else list(MACHINES)
        return {"dry_run": dry_run, "checked": report.checked, "drifted_profiles": report.drifted_profiles,
                "healed_profiles": report.healed_profiles,
                "machines": {name: {"drifted": report.drifted[name], "healed": report.healed[name],
                                    "waiting": report.waiting[name], "stale_inputs": report.stale_inputs[name]}
                             for name in names}}

    def signup_sweep_task(task: Task, older_than: float = SWEEP_OLDER_THAN, joined_after: str | None = None,
                          joined_before: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """``crm-states signup --pending``: sign up the users a signup missed; meant for Celery beat."""
        return _signup_sweep(states(), older_than=older_than, joined_after=joined_after, joined_before=joined_before,
                             limit=limit)

    return CrmTasks(
        run_signup=app.task(name="crm_states.run_signup", **options)(run_signup_task),
        validate_chunk=app.task(name="crm_states.validate_chunk", **options)(validate_chunk_task),
        sync_sustainers=app.task(name="crm_states.sync_sustainers", **options)(sync_sustainers_task),
        heal=app.task(name="crm_states.heal", **{**options, "autoretry_for": ()})(heal_task),
        signup_sweep=app.task(name="crm_states.signup_sweep", **{**options, "autoretry_for": ()})(signup_sweep_task),
    )


# --- the task bodies (plain functions: ``task`` is only asked for its attempt number) -------------------

def _run_signup(task: Task, app: CrmStates, user_id: int, *, email: str | None = None,
               first_name: str | None = None, last_name: str | None = None, lang: str = "en",
               educator: bool = False, restart: bool = False) -> dict[str, Any]:
    """The first attempt is ``crm-states signup``; a retry restarts the run only from the failure state a
    transient CRM error left, as ``crm-states resume`` would (never from the final state)."""
    if _attempt(task) > 1 and not restart:
        restart = bool(_stopped_by_transient(app, signup.NAME, _positions(app, signup.NAME, [user_id], None)))
    result = app.run_signup(user_id, email=email, first_name=first_name, last_name=last_name, lang=lang,
                            educator=educator, restart=restart)
    summary = {"machine": signup.NAME, "attempt": _attempt(task), **_run_result(result)}
    stuck = (_stopped_by_transient(app, signup.NAME, _positions(app, signup.NAME, [user_id], None))
             if result.finished else [])
    if stuck:
        _retry_or_give_up(task, summary, stuck, signup.NAME)
    return summary


def _validate_chunk(task: Task, app: CrmStates, *, profile_ids: Sequence[int] | None = None,
                   id_range: Sequence[int] | None = None) -> dict[str, Any]:
    """Exactly the chunk's profiles still pending go through the runner's own per-chunk step (its range
    query, ``CrmStates.validate_profiles``, its conflict handling and counting); a list of ids restricts
    that step's query to the list. Profiles outside the chunk are never read. No range lease is taken:
    the store's compare-and-set keeps a concurrent ``crm-states validate-nb`` from moving a profile twice.
    A retry first re-drives the chunk's profiles that a transient CRM failure stopped (``resume``)."""
    ids, bounds = _chunk(profile_ids, id_range)
    where: dict[str, Any] = ({"id": {"$in": ids}} if ids is not None
                             else {"id": {"$gte": bounds[0], "$lt": bounds[1]}})
    count = len(ids) if ids is not None else min(bounds[1] - bounds[0], MAX_CHUNK)
    runner = ValidationRunner(app, RunnerConfig(chunk_size=max(1, count), concurrency=1))
    report = RunnerReport()
    progress = Progress(count, stream=io.StringIO())  # log lines, never a progress bar, in a worker
    if _attempt(task) > 1:
        stuck = _stopped_by_transient(app, nb.NAME, _positions(app, nb.NAME, ids, bounds))
        if stuck:
            docs = {p["id"]: p for p in app.store.profiles.find({"id": {"$in": [pid for pid, _ in stuck]}}, PROJECTION)}
            runner.record(app.redrive(nb.NAME, [docs[pid] for pid, _ in stuck if pid in docs]), report, progress)
    if not report.stopped:
        runner.validate_chunk(where, count, report, progress)
    profiles = list(app.store.profiles.find(where, PROJECTION))
    positions = _positions(app, nb.NAME, ids, bounds)
    chunk = Counter(positions[p["id"]].state if p["id"] in positions else "not started" for p in profiles)
    profiles = [p for p in profiles if p.get("nationbuilder_id") not in NB_FILTER["nationbuilder_id"]["$nin"]]
    summary = {"machine": nb.NAME, "attempt": _attempt(task),
               "chunk": {"profile_ids": len(ids)} if ids is not None else {"id_range": list(bounds)},
               "processed": report.processed, "lookups": report.lookups, "states": dict(report.states),
               "outcomes": dict(report.outcomes),
               "stopped": report.stopped, "chunk_states": dict(chunk),
               "pending_after": sum(1 for p in profiles
                                    if not nb.validated_for(p, positions.get(p["id"], Position())))}
    if not report.stopped:  # a halt is the CRM's API limit: never retried
        stuck = _stopped_by_transient(app, nb.NAME, positions)
        if stuck:
            _retry_or_give_up(task, summary, stuck, nb.NAME)
    return summary


def _sync_sustainers(task: Task, app: CrmStates, *, force: bool = False, dry_run: bool = False,
                    max_demote_share: float = DEFAULT_MAX_DEMOTE_SHARE,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """``sync_sustainers``; a read that failed on a transient CRM error changed nothing, so it is retried."""
    report = app.sync_sustainers(max_demote_share=max_demote_share, force=force, dry_run=dry_run,
                                 batch_size=batch_size)
    summary = {"machine": "sync_sustainers", "attempt": _attempt(task), **_sync_report(report)}
    if report.read_failed and not report.read_limit and _is_transient(report.read_failed):
        if _retries_left(task):
            raise CrmTransientError(f"the sustainer read failed: {report.read_failed}")
        summary["retries_exhausted"] = True
    return summary


def _signup_sweep(app: CrmStates, *, older_than: float, joined_after: str | None, joined_before: str | None,
                  limit: int | None) -> dict[str, Any]:
    """The sweep with JSON arguments and a JSON summary (the figures ``crm-states signup --pending`` prints)."""
    from .sweep import sweep_signups
    from .users import Window

    window = Window(*(None if d is None else _utc(dt.datetime.fromisoformat(d)) for d in (joined_after, joined_before)))
    report = sweep_signups(app, window=window, older_than=older_than, limit=limit)
    return {"machine": signup.NAME, "users_read": report.users_read, "signed_up_before": report.signed_up,
            "without_email": report.without_email, "left_for_operator": report.left_for_operator,
            "recent": report.recent, "pending": report.pending, "states": dict(report.counts.states),
            "outcomes": dict(report.counts.outcomes), "app_users": dict(report.sources), "batches": report.batches,
            "api_requests": report.api_requests, "stopped": report.stopped, "seconds": round(report.seconds, 3)}


def _utc(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


# --- helpers ------------------------------------------------------------------------------------------------

def _chunk(profile_ids: Sequence[int] | None,
           id_range: Sequence[int] | None) -> tuple[list[int] | None, tuple[int, int]]:
    """``(ids or None, [lo, hi) bounds)`` from exactly one of a list of ids and a half-open id range."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if (profile_ids is None) == (id_range is None):
        raise ValueError("validate_chunk takes profile_ids or id_range, exactly one of them")
    if profile_ids is not None:
        if isinstance(profile_ids, (str, bytes)) or not all(is_int(i) for i in profile_ids):
            raise TypeError(f"profile_ids must be a list of ints (Sefaria's user ids), got {profile_ids!r:.200}")
        ids = sorted(set(profile_ids))
        if not ids or len(ids) > MAX_CHUNK:
            raise ValueError(f"a chunk holds 1 to {MAX_CHUNK} profile ids, got {len(ids)}")
        return ids, (ids[0], ids[-1] + 1)
    assert id_range is not None
    if len(id_range) != 2 or not all(is_int(i) for i in id_range) or id_range[0] >= id_range[1]:
        raise ValueError(f"id_range must be [first id, end id) with first < end, got {id_range!r:.200}")
    return None, (id_range[0], id_range[1])


def _attempt(task: Task) -> int:
    return int(getattr(task.request, "retries", 0) or 0) + 1


def _retries_left(task: Task) -> bool:
    """Whether raising now still gets the task another attempt from Celery's autoretry."""
    return task.max_retries is None or _attempt(task) <= task.max_retries


def _is_transient(error: Any) -> bool:
    """Whether a recorded error (``engine.describe``: ``"ClassName: message"``) is a transient CRM one."""
    return transient_error_text(error)


def _positions(app: CrmStates, machine_name: str, ids: Sequence[int] | None,
               bounds: tuple[int, int] | None) -> dict[int, Position]:
    """The machine's positions of a chunk: the listed ids, or the id range."""
    if ids is not None:
        return app.store.positions_of(machine_name, ids)
    assert bounds is not None
    return app.store.positions_between(machine_name, bounds[0], bounds[1])


def _stopped_by_transient(app: CrmStates, machine_name: str,
                          positions: Mapping[int, Position]) -> list[tuple[int, Position]]:
    """The profiles whose run stopped in the machine's CRM-failure state on a transient error."""
    failed = _CRM_FAILURE_STATE[machine_name]
    return [(pid, pos) for pid, pos in sorted(positions.items())
            if pos.state == failed and _is_transient(pos.detail.get("error"))]


def _retry_or_give_up(task: Task, summary: dict[str, Any], stuck: Sequence[tuple[int, Position]],
                      machine_name: str) -> None:
    """Raise ``CrmTransientError`` for Celery's autoretry while attempts remain; else mark the summary."""
    if _retries_left(task):
        pid, position = stuck[0]
        raise CrmTransientError(f"{len(stuck)} profiles of {machine_name} stopped by a transient CRM failure, "
                                f"e.g. profile {pid}: {position.detail.get('error')}")
    summary["retries_exhausted"] = True


def _run_result(result: RunResult) -> dict[str, Any]:
    return {"profile_id": result.profile_id, "state": result.state, "outcome": result.outcome,
            "error": result.error, "journaled": result.journaled}


def _sync_report(report: SyncReport) -> dict[str, Any]:
    return {"dry_run": report.dry_run, "read_failed": report.read_failed, "read_limit": report.read_limit,
            "refused": report.refused, "sustainers_in_crm": report.sustainers_in_crm, "matched": report.matched,
            "unmatched": report.unmatched, "current_sustainers": report.current_sustainers,
            "sustainers_without_crm_id": report.sustainers_without_crm_id, "to_promote": report.to_promote,
            "to_demote": report.to_demote, "skipped": report.skipped, "changed": report.changed,
            "problems": report.problems, "states": dict(report.states), "outcomes": dict(report.outcomes),
            "seconds": round(report.seconds, 3)}


#: The default app, for ``celery -A crm_states.celery_tasks worker``; building it connects to nothing.
app = make_app()
run_signup, validate_chunk, sync_sustainers, heal, signup_sweep = register_tasks(app)
