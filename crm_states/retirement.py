"""``crm-states retire-nb-ids``: remove ``nationbuilder_id`` from every validated profile, and ``--undo``.

The design document: "Only after the failure states are handled can we remove nationbuilder_id from mongo".
So a survey comes first, one pass over the profiles holding a nationbuilder_id joined with their
validation (``nb_profile_validation``) and retirement positions: while any of them is not validated for its
current id, or its validation stopped in a failure state the operator did not accept (``accept``: MarComs
decided about WroteNotFound, say), nothing is changed and the counts per blocking state are the answer.
Otherwise the batch runner (``ValidationRunner``'s id ranges, leases, ``--limit``, ``--dry-run``) drives
each pending profile through machines/retire_nb_ids.py: the value is committed to ``crm_positions`` before
the profile loses it, the removal is a compare-and-set on that value, so a SIGKILL at any instant followed
by a second run leaves what one run leaves.

Pending for a retirement: a profile holding a nationbuilder_id that is ready and not already judged as it
stands (a retired id that Sefaria's stale save brought back is "reappeared" and retired again), and every
retirement stopped half-way or in its DB-failure state. Pending for ``--undo``: every retirement that may
have removed the field; each is restored where the profile holds no nationbuilder_id, never over another.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import attrs

from machines import nb_profile_validation as nb
from machines import retire_nb_ids as retire

from .batch_jobs import by_profile, positions_for, release_refused
from .engine import RunResult
from .progress import Progress, RunnerReport
from .protocols import States as CrmStates
from .records import Position
from .runner import NB_FILTER, RunnerConfig, ValidationRunner
from .store.documents import position_from_doc

PROFILE_VIEW = {"_id": 0, "id": 1, retire.FIELD: 1, retire.APP_USER: 1}
_VALIDATION_VIEW = {"state": 1, "seq": 1, "detail.input": 1, "detail.input_shown": 1, "detail.app_user_id": 1}
_RETIRE_VIEW = {"state": 1, "seq": 1, "detail": 1}
#: Retirements a retire pass continues whatever the profile holds now: stopped half-way, or refused by MongoDB.
IN_FLIGHT = frozenset(s for s in retire.SPEC.diagram.states if s not in retire.SPEC.terminal) | {
    "DbWriteRemovalErrorLogged"}


def check_accept(states: Collection[str]) -> frozenset[str]:
    """``--allow-state`` values: failure states of nb_profile_validation; anything else is a clear error."""
    failures = nb.SPEC.terminal - nb.SPEC.diagram.finals
    wrong = [s for s in states if s not in failures]
    if wrong:
        raise ValueError(f"--allow-state {wrong[0]!r} is not a failure state of {nb.NAME}; "
                         f"its failure states: {', '.join(sorted(failures))}")
    return frozenset(states)


@attrs.define
class Readiness:
    """What the survey found. ``blocking``: profiles not ready, by category (``retire.NOT_VALIDATED`` or the
    validation's failure state); ``to_retire``: ready profiles by their validation's state; ``reappeared``:
    of those, profiles holding the very id this machine retired (a stale save brought it back);
    ``in_flight``: retirements continued; ``settled``: stopped ones that already judged the profile as it
    stands; ``to_restore``: with ``--undo``, retirements that may have removed the field."""

    with_id: int = 0
    blocking: Counter[str] = attrs.field(factory=Counter)
    to_retire: Counter[str] = attrs.field(factory=Counter)
    reappeared: int = 0
    in_flight: int = 0
    settled: int = 0
    to_restore: int = 0

    @property
    def refused(self) -> bool:
        return bool(self.blocking)

    @property
    def pending(self) -> int:
        return sum(self.to_retire.values()) + self.in_flight + self.to_restore


@attrs.define
class RetireReport:
    """The survey, and what the run did (``run`` is None when refused or a dry run: nothing was written)."""

    readiness: Readiness
    undo: bool = False
    dry_run: bool = False
    run: RunnerReport | None = None

    @property
    def refused(self) -> bool:
        return not self.undo and self.readiness.refused


class RetirementRunner(ValidationRunner):
    """The batch runner over ``retire_nb_ids``: ranges, leases and counts are ``ValidationRunner``'s."""

    machine = retire.NAME

    def __init__(self, app: CrmStates, config: RunnerConfig = RunnerConfig(), *, accept: Collection[str] = (),
                 undo: bool = False, progress: Callable[[int], Progress] | None = None) -> None:
        super().__init__(app, config, progress=progress)
        self.accept = check_accept(accept)
        self.undo = undo

    # --- which profiles ---------------------------------------------------------------------------------
    def survey(self) -> Readiness:
        readiness = Readiness()
        for _ in self._walk(None, self.config.chunk_size, readiness):
            pass
        return readiness

    def pending_after(self, after: int | None, batch_size: int) -> Iterator[int]:
        return self._walk(after, batch_size)

    def _walk(self, after: int | None, batch_size: int, readiness: Readiness | None = None) -> Iterator[int]:
        """Pending ids in id order: the profiles holding a nationbuilder_id joined with both machines'
        positions (three sorted cursors, one profile at a time)."""
        above = {} if after is None else {"$gt": after}
        store = self.app.store
        streams: dict[str, Any] = {"retire": store.scan(retire.NAME, _RETIRE_VIEW, {"profile_id": above} if above
                                                        else None, batch_size=batch_size)}
        if not self.undo:
            where = {**NB_FILTER, **({"id": above} if above else {})}
            streams["profile"] = store.profiles.find(where, PROFILE_VIEW).sort("id", 1).batch_size(batch_size)
            streams["validation"] = store.scan(nb.NAME, _VALIDATION_VIEW, {"profile_id": above} if above else None,
                                               batch_size=batch_size)
        try:
            for pid, docs in by_profile(streams):
                if self._pending(docs.get("profile"), position_from_doc(docs.get("retire")),
                                 position_from_doc(docs.get("validation")), readiness or Readiness()):
                    yield pid
        finally:
            if "profile" in streams:
                streams["profile"].close()

    def _pending(self, profile: Mapping[str, Any] | None, position: Position, validation: Position,
                 readiness: Readiness) -> bool:
        if self.undo:
            if retire.restorable(position):
                readiness.to_restore += 1
                return True
            return False
        if position.state in IN_FLIGHT:
            readiness.in_flight += 1
            return True
        if profile is None or not retire.holds_id(profile):
            return False
        readiness.with_id += 1
        blocked = retire.blocking_state(profile, validation, self.accept)
        if blocked is not None:
            readiness.blocking[blocked] += 1
            return False
        if retire.settled(profile, position, validation):
            readiness.settled += 1
            return False
        readiness.to_retire[validation.state or ""] += 1
        if position.state == "WroteNbIdRemoved" and retire.same_value(retire.restored(position.detail),
                                                                       profile[retire.FIELD]):
            readiness.reappeared += 1
        return True

    # --- one chunk --------------------------------------------------------------------------------------
    def _read_chunk(self, where: Mapping[str, Any], count: int) -> tuple[list[dict[str, Any]], dict[int, Any]]:
        """The chunk's pending profiles, read fresh, each with its retirement and validation positions."""
        store = self.app.store
        positions = positions_for(store, retire.NAME, where)
        carried = [pid for pid, p in positions.items() if (retire.restorable(p) if self.undo else p.state in IN_FLIGHT)]
        profiles: dict[int, dict[str, Any]] = {}
        if not self.undo:
            profiles = {p["id"]: p for p in self.profiles.find({**where, **NB_FILTER}, PROFILE_VIEW)
                        if isinstance(p.get("id"), int) and not isinstance(p["id"], bool)}
        missing = [pid for pid in carried if pid not in profiles]
        if missing:
            profiles.update({p["id"]: p for p in self.profiles.find({"id": {"$in": missing}}, PROFILE_VIEW)})
        ids = sorted(set(profiles) | set(carried))
        validations = {} if self.undo else store.positions_of(nb.NAME, ids)
        items = {}
        for pid in ids:
            profile = profiles.get(pid)
            position, validation = positions.get(pid, Position()), validations.get(pid, Position())
            if self._pending(profile, position, validation, Readiness()):
                items[pid] = (profile or {"id": pid}, position, validation)
        chosen = sorted(items)[:count]
        return [items[pid][0] for pid in chosen], {pid: items[pid] for pid in chosen}

    def _range_lookups(self, profiles: list[dict[str, Any]], drives: int) -> None:
        return None  # the retirement asks the CRM nothing

    def _drive(self, profiles: list[dict[str, Any]], items: Mapping[int, Any],  # type: ignore[override]
               lookups: Any = None) -> list[RunResult]:
        engine = self.app.engine(retire.NAME)
        runs = [engine.prepare(p, items[p["id"]][1], restart=True, inputs=self._inputs(items[p["id"]][2]))
                for p in profiles]
        results = engine.drive(runs)
        release_refused(self.app.store, retire.NAME, runs, results)
        if self.undo:
            results = self._restore_continued(engine, profiles, results)
        return results

    def _inputs(self, validation: Position) -> dict[str, Any]:
        return {"undo": True} if self.undo else {"undo": False, "validation": validation, "accept": self.accept}

    def _restore_continued(self, engine: Any, profiles: Sequence[Mapping[str, Any]],
                           results: list[RunResult]) -> list[RunResult]:
        """``--undo`` met retirements stopped half-way: they were finished first; now restore those."""
        again = [r.profile_id for r in results if r.finished and r.state in retire.REMOVING]
        if not again:
            return results
        positions = self.app.store.positions_of(retire.NAME, again)
        docs = {p["id"]: p for p in profiles}
        runs = [engine.prepare(docs[pid], positions[pid], restart=True, inputs={"undo": True})
                for pid in again if pid in positions]
        second = engine.drive(runs)
        release_refused(self.app.store, retire.NAME, runs, second)
        restored = {r.profile_id: r for r in second}
        return [restored.get(r.profile_id, r) for r in results]


def retire_nb_ids(app: CrmStates, config: RunnerConfig = RunnerConfig(), *, accept: Collection[str] = (),
                  undo: bool = False, progress: Callable[[int], Progress] | None = None) -> RetireReport:
    """Survey, then (unless refused or a dry run) retire every ready profile's nationbuilder_id, or with
    ``undo`` restore every retired one. See the module docstring."""
    runner = RetirementRunner(app, config, accept=accept, undo=undo, progress=progress)
    report = RetireReport(runner.survey(), undo=undo, dry_run=config.dry_run)
    if report.refused or config.dry_run:
        return report
    report.run = runner.run()
    return report
