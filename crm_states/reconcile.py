"""``crm-states reconcile-by-email``: the App User of each migrated profile that has no nationbuilder_id.

The design document leaves "App Users migrated from Nationbuilder that don't have nationbuilder ID" open;
Sefaria's ``scripts/resolve_crm_users.py`` matched them by email from an exported report. This runs
machines/reconcile_by_email.py over every pending profile with the validation runner's pieces (id ranges,
expiring leases, ``--limit``, ``--dry-run``, ``--max-api-calls``): one packed email lookup per chunk.

Pending: a profile with no nationbuilder_id and no real App User id (none, or a ``pending:``/``dummy:``
placeholder of the interim modes) whose signup is not in flight (no ``new_user_signup`` run that has not
finished), optionally only users who joined before a date, and that this machine has not judged with the
same email already; plus every run of this machine stopped half-way (continued whatever the profile holds
now). Emails and join dates come from a ``crm_states.users`` source, read once per batch.

One App User is never given to two profiles: an App User id already held by another profile (an indexed
read of ``profiles.sf_app_user_id`` per chunk; the index is made on the first run), or matched by two
profiles of one chunk, is ambiguous. Two profiles sharing one email in different chunks worked at the same
instant could still both be given it, which is why ``--concurrency`` defaults to 1 here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from machines import new_user_signup as signup
from machines import reconcile_by_email as reconcile

from .batch_jobs import by_profile, positions_for, release_refused
from .crm.results import normalise_email
from .engine import RunResult
from .progress import Progress, RunnerReport
from .protocols import States as CrmStates
from .records import Position
from .runner import RunnerConfig, ValidationRunner
from .store.documents import position_from_doc
from .user_emails import UserSource, aware, default_users

#: Profiles without a (truthy) nationbuilder_id: the App User id is checked in Python (placeholders).
CANDIDATES = {reconcile.NB_FIELD: {"$in": [None, False, 0, ""]}}
PROFILE_VIEW = {"_id": 0, "id": 1, reconcile.NB_FIELD: 1, reconcile.APP_USER: 1}
_RECONCILE_VIEW = {"state": 1, "seq": 1, "detail.email": 1}
IN_FLIGHT = frozenset(s for s in reconcile.SPEC.diagram.states if s not in reconcile.SPEC.terminal)


def holders(store: Any, app_user_ids: Collection[str]) -> dict[str, list[int]]:
    """``{app user id: [ids of the profiles holding it]}`` for the ids given (one ``$in`` read)."""
    found: dict[str, list[int]] = {}
    for doc in store.profiles.find({reconcile.APP_USER: {"$in": list(app_user_ids)}},
                                   {"_id": 0, "id": 1, reconcile.APP_USER: 1}):
        found.setdefault(doc[reconcile.APP_USER], []).append(doc["id"])
    return found


class ReconcileRunner(ValidationRunner):
    """The batch runner over ``reconcile_by_email``: ranges, leases, budget and counts are ``ValidationRunner``'s."""

    machine = reconcile.NAME

    def __init__(self, app: CrmStates, config: RunnerConfig = RunnerConfig(concurrency=1), *,
                 joined_before: dt.datetime | dt.date | None = None, users: UserSource | None = None,
                 progress: Callable[[int], Progress] | None = None) -> None:
        super().__init__(app, config, progress=progress)
        if isinstance(joined_before, dt.date) and not isinstance(joined_before, dt.datetime):
            joined_before = dt.datetime.combine(joined_before, dt.time(), dt.timezone.utc)
        self.joined_before = aware(joined_before)
        if joined_before is not None and self.joined_before is None:
            raise TypeError(f"joined_before must be a date or datetime, got {joined_before!r}")
        self.users = users or default_users(app.store)

    def run(self) -> RunnerReport:
        if not self.config.dry_run:
            self.app.store.ensure_profile_index(reconcile.APP_USER)
        return super().run()

    # --- which profiles ---------------------------------------------------------------------------------
    def pending_after(self, after: int | None, batch_size: int) -> Iterator[int]:
        above = {} if after is None else {"$gt": after}
        store = self.app.store
        where = {**CANDIDATES, **({"id": above} if above else {})}
        profiles = store.profiles.find(where, PROFILE_VIEW).sort("id", 1).batch_size(batch_size)
        streams = {"profile": profiles,
                   "signup": store.scan(signup.NAME, {"state": 1}, {"profile_id": above} if above else None,
                                        batch_size=batch_size),
                   "reconcile": store.scan(reconcile.NAME, _RECONCILE_VIEW, {"profile_id": above} if above else None,
                                           batch_size=batch_size)}
        batch: list[tuple[int, Position]] = []
        try:
            for pid, docs in by_profile(streams):
                position = position_from_doc(docs.get("reconcile"))
                if self._candidate(docs.get("profile"), position_from_doc(docs.get("signup")), position):
                    batch.append((pid, position))
                if len(batch) >= batch_size:
                    yield from (pid for pid, _ in self._with_emails(batch))
                    batch = []
            yield from (pid for pid, _ in self._with_emails(batch))
        finally:
            profiles.close()

    @staticmethod
    def _candidate(profile: Mapping[str, Any] | None, signed_up: Position, position: Position) -> bool:
        """What the profile and positions alone say (the user's email is asked for after)."""
        if position.state in IN_FLIGHT:
            return True
        if profile is None or not reconcile.unresolved(profile):
            return False
        if signed_up.state is not None and signed_up.state not in signup.SPEC.terminal:
            return False  # a signup in flight will give it its App User
        return position.state not in reconcile.SPEC.diagram.finals

    def _with_emails(self, batch: Sequence[tuple[int, Position]]) -> list[tuple[int, str | None]]:
        """``(id, normalised email)`` of the candidates that are pending once their users are read: joined
        before the date (when given), and not judged already with this email."""
        if not batch:
            return []
        users = self.users([pid for pid, _ in batch])
        chosen = []
        for pid, position in batch:
            user = users.get(pid)
            email = normalise_email(user.email) if user is not None and user.email else None
            if position.state not in IN_FLIGHT:
                joined = aware(user.date_joined) if user is not None else None
                if self.joined_before is not None and (joined is None or joined >= self.joined_before):
                    continue
                if position.state is not None and position.detail.get("email") == email:
                    continue  # a stopped run already looked this email up
            chosen.append((pid, email))
        return chosen

    # --- one chunk --------------------------------------------------------------------------------------
    def _read_chunk(self, where: Mapping[str, Any], count: int) -> tuple[list[dict[str, Any]], dict[int, Any]]:
        store = self.app.store
        positions = positions_for(store, reconcile.NAME, where)
        carried = [pid for pid, p in positions.items() if p.state in IN_FLIGHT]
        profiles = {p["id"]: p for p in self.profiles.find({**where, **CANDIDATES}, PROFILE_VIEW)
                    if isinstance(p.get("id"), int) and not isinstance(p["id"], bool)}
        missing = [pid for pid in carried if pid not in profiles]
        if missing:  # it may hold an id now: the run decides that
            profiles.update({p["id"]: p for p in self.profiles.find({"id": {"$in": missing}}, PROFILE_VIEW)})
        ids = sorted(set(profiles) | set(carried))
        signups = store.positions_of(signup.NAME, ids)
        batch = [(pid, positions.get(pid, Position())) for pid in ids
                 if self._candidate(profiles.get(pid), signups.get(pid, Position()), positions.get(pid, Position()))]
        chosen = self._with_emails(batch)[:count]
        items = {pid: (positions.get(pid, Position()), email) for pid, email in chosen}
        return [profiles.get(pid) or {"id": pid} for pid, _ in chosen], items

    def _range_lookups(self, profiles: list[dict[str, Any]], drives: int) -> None:
        return None  # not NationBuilder ids: each drive makes its own lookups

    def _drive(self, profiles: list[dict[str, Any]], items: Mapping[int, Any],  # type: ignore[override]
               lookups: Any = None) -> list[RunResult]:
        # The lookups go through the run's budget (``--max-api-calls``), as the validation's do.
        context = reconcile.Context(self.lookup.context(), lambda ids: holders(self.app.store, ids))
        engine = self.app.engine(reconcile.NAME, context=context)
        runs = [engine.prepare(p, items[p["id"]][0], restart=True, inputs={"email": items[p["id"]][1]})
                for p in profiles]
        results = engine.drive(runs)
        release_refused(self.app.store, reconcile.NAME, runs, results)
        return results
