"""The engine: runs of profiles driven through a machine (``spec.StateMachine``) with every transition
persisted by the ``Store``.

Persistence is write-ahead: pending transitions are committed before a ``write_ahead`` effect runs and
when a run stops, so a crash never leaves a CRM side effect unrecorded (a read, such as a lookup, is
simply asked again after a crash, so its transitions are committed with the outcome, in one write). A
``Write`` state's data is committed together with its success transition; if MongoDB refuses it, the run
takes the failure edge and the intended write goes to the journal.

At most one CRM write per intended write, whoever drives it: committing a transition into a write-ahead
state takes the run's fenced claim (on the database's clock), and only the run that took it sends. A
driver that meets a write-ahead state claimed by another never sends: while the claim lives it reports
``claimed``; once the claim expired, or its holder is provably gone, it takes the claim over (a
compare-and-set) and calls the act's ``adopt``, which decides from reads (did the request land?) or ends
in the act's error state with "outcome unknown". The engine knows no CRM and no collection names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import metrics, owners
from .journal import Journal, JournalEntry
from .logs import fields
from .records import (
    START,
    Claim,
    Position,
    ProfileWrite,
    Transition,
    iso,
    new_run_id,
    utcnow,
)
from .spec import (
    Act,
    Binding,
    BindingError,
    Halt,
    Outcome,
    Run,
    RunResult,
    StateMachine,
    Write,
    describe,
    each,
    trigger_name,
)
from .store import (
    ConcurrentTransition,
    InputChanged,
    ProfileGone,
    Step,
    Store,
    StoreError,
)

__all__ = ["Engine", "Act", "Write", "Outcome", "Run", "RunResult", "StateMachine", "Binding", "BindingError",
           "Halt", "each", "describe", "trigger_name"]

log = logging.getLogger("crm_states.engine")

#: How long a claim on a write-ahead state lasts: longer than any CRM write takes with its retries and the
#: create's settle window, so that a live driver never loses it mid-request.
CLAIM_SECONDS = 300.0


class Engine:
    """Drives runs of one ``StateMachine`` with a ``Store`` and a ``Journal``."""

    def __init__(self, spec: StateMachine, store: Store, journal: Journal | None = None, *,
                 context: Any = None, clock: Callable[[], Any] = utcnow, claim_seconds: float = CLAIM_SECONDS,
                 holder: owners.Holder | None = None) -> None:
        self.spec = spec
        self.store = store
        self.journal = journal or Journal()
        self.context = context
        self.clock = clock
        self.claim_seconds = claim_seconds
        self.holder = holder or owners.Holder.me()

    # --- preparing runs -----------------------------------------------------------------------
    def prepare(self, profile: Mapping[str, Any], position: Position | None = None, *, restart: bool = False,
                inputs: Mapping[str, Any] | None = None) -> Run:
        """A run for ``profile`` (a document with at least ``id``) from ``position`` (read from the store
        when not given): new when it never started (or, with ``restart``, stopped in a terminal state),
        continued when a previous run stopped half-way (a crash, an outage)."""
        if position is None:
            position = self.store.position(profile["id"], self.spec.name)
        run = Run(profile_id=profile["id"], profile=profile, position=position, run_id=position.run_id or "",
                  state=position.state or self.spec.diagram.initial, detail=dict(position.detail),
                  inputs=dict(inputs or {}))
        run.holds_claim = position.claim is not None and position.claim.by == run.token
        if position.state is None or (restart and position.state in self.spec.terminal):
            run.run_id = new_run_id(run.profile_id, position.seq + 1)
            run.prior = position.detail if position.state else {}  # read only: shared with the position
            run.state = self.spec.diagram.initial
            run.detail = {}
            run.pending.append(Transition(
                profile_id=run.profile_id, machine=self.spec.name, run_id=run.run_id, seq=position.seq + 1,
                source=START, dest=self.spec.diagram.initial, trigger="start", at=self.clock(), by=run.token))
        elif position.state in self.spec.terminal:
            run.result = RunResult(run.profile_id, position.state, "finished")
        return run

    def prepare_all(self, profiles: Sequence[Mapping[str, Any]], *, restart: bool = False,
                    inputs: Mapping[str, Any] | None = None) -> list[Run]:
        """Runs for many profiles, their positions read in one query."""
        positions = self.store.positions_of(self.spec.name, [p["id"] for p in profiles])
        return [self.prepare(p, positions.get(p["id"], Position()), restart=restart, inputs=inputs) for p in profiles]

    # --- driving ------------------------------------------------------------------------------
    def drive(self, runs: Sequence[Run]) -> list[RunResult]:
        """Drive every run to a terminal state (or until it cannot go on); results in input order."""
        active = [r for r in runs if r.result is None]
        while active:
            for run in active:
                self._advance_locally(run)
            self._flush([r for r in active if r.state in self.spec.terminal or self._writes_ahead(r)])
            active = [r for r in active if r.result is None]
            waiting: dict[str, list[Run]] = {}
            for run in active:
                if run.state in self.spec.terminal:
                    run.result = RunResult(run.profile_id, run.state, "finished")
                else:
                    waiting.setdefault(run.state, []).append(run)
            try:
                for state, batch in waiting.items():
                    self._act(state, batch)
            except Halt as halt:
                for run in active:
                    if run.result is None:
                        run.result = RunResult(run.profile_id, run.position.state, "halted", str(halt))
                        self._release(run)
            active = [r for r in active if r.result is None]
        return [r.result for r in runs]  # type: ignore[misc]

    def _release(self, run: Run) -> None:
        """A halted run at a write-ahead state did not send (the CRM refused before acting): let it go."""
        if run.holds_claim and self._writes_ahead(run) and not run.pending:
            self.store.release(run.profile_id, self.spec.name, run.position.seq, run.token)
            run.holds_claim = False

    def _writes_ahead(self, run: Run) -> bool:
        binding = self.spec.bindings.get(run.state)
        return isinstance(binding, Act) and binding.write_ahead

    def _advance_locally(self, run: Run) -> None:
        """Take every step that needs no CRM call: local acts and DB-write states."""
        while run.state not in self.spec.terminal:
            binding = self.spec.bindings[run.state]
            if isinstance(binding, Write):
                at = self.clock()
                self.spec.fire(run, binding.success, at, dict(run.detail), binding.write(run, at))
            elif not binding.external:
                self._act(run.state, [run])
            else:
                return

    def _act(self, state: str, batch: list[Run]) -> None:
        binding = self.spec.bindings[state]
        assert isinstance(binding, Act)
        groups: list[tuple[Callable[[Sequence[Run], Any], Sequence[Outcome]], list[Run]]] = []
        if binding.write_ahead:
            for run in batch:
                if not run.holds_claim:
                    self._take_over(run)
            own = [run for run in batch if run.holds_claim and run.adopted is None]
            adopted = [run for run in batch if run.holds_claim and run.adopted is not None]
            groups = [(binding.effect, own), (binding.adopt or _unknown_outcome(binding), adopted)]
        else:
            groups = [(binding.effect, batch)]
        for effect, runs in groups:
            if runs:
                self._apply(state, binding, effect, runs)

    def _apply(self, state: str, binding: Act, effect: Callable[[Sequence[Run], Any], Sequence[Outcome]],
               batch: list[Run]) -> None:
        try:
            outcomes = list(effect(batch, self.context))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"effect of {state} returned {len(outcomes)} outcomes for {len(batch)} runs")
        except Halt:
            raise
        except Exception as exc:
            if binding.on_error is None:
                for run in batch:
                    run.result = RunResult(run.profile_id, run.position.state, "interrupted", describe(exc))
                return
            outcomes = [Outcome(binding.on_error, {"error": describe(exc)})] * len(batch)
        at = self.clock()
        for run, outcome in zip(batch, outcomes):
            dest = outcome.dest if outcome.dest in binding.dests else binding.on_error
            if dest is None:
                run.result = RunResult(run.profile_id, run.position.state, "interrupted",
                                       f"effect of {state} chose {outcome.dest!r}, not one of its edges")
                continue
            self.spec.fire(run, dest, at, outcome.detail)

    def _take_over(self, run: Run) -> bool:
        """A run met at a write-ahead state it did not claim. A released claim (its holder knew nothing was
        sent) is taken and the run goes on as usual; an expired one, or one whose holder is provably gone, is
        taken over and ``adopted`` is set (that request may have gone out); a live one ends the run as
        ``claimed``, nothing sent."""
        claim = run.position.claim
        dead = claim is not None and owners.gone(claim.owner)
        mine = {"by": run.token, "owner": self.holder.key, "seconds": self.claim_seconds}
        taken = self.store.take_over(run.profile_id, self.spec.name, run.position, mine,
                                     from_holder=claim.by if dead and claim is not None else None)
        if taken is not None:
            run.position, run.holds_claim = taken, True
            if claim is not None:
                run.adopted = "dead" if dead else "expired"
                log.warning("profile %s %s: taking over the unfinished %s of another driver (%s)", run.profile_id,
                            self.spec.name, run.state, "process gone" if dead else "claim expired")
            return True
        now = self.store.position(run.profile_id, self.spec.name)
        if now.seq != run.position.seq:
            run.result = RunResult(run.profile_id, now.state, "conflict", f"moved to {now.state} by another driver")
        else:
            run.result = RunResult(run.profile_id, run.position.state, "claimed", _held(now.claim))
        return False

    # --- persistence --------------------------------------------------------------------------
    def _flush(self, runs: Iterable[Run]) -> None:
        """Commit every run's pending transitions; route DB failures along the diagram."""
        batch = [r for r in runs if r.pending and r.result is None]
        if not batch:
            return
        steps = [self._step(r) for r in batch]
        errors = self.store.commit(steps)
        retry: list[Run] = []
        for run, step, error in zip(batch, steps, errors):
            if error is None:
                self._persisted(run, step)
            elif isinstance(error, ConcurrentTransition):
                self._conflict(run, error)
            elif isinstance(error, (InputChanged, ProfileGone)):
                outcome = "changed" if isinstance(error, InputChanged) else "deleted"
                run.result = RunResult(run.profile_id, run.position.state, outcome, str(error))
                run.pending.clear()
            elif self._take_failure_edge(run, error):
                retry.append(run)
            else:
                self._interrupted(run, error)
        if retry:
            steps = [self._step(r) for r in retry]
            errors = self.store.commit(steps)
            for run, step, error in zip(retry, steps, errors):
                persisted = error is None
                if isinstance(error, ConcurrentTransition):
                    self._conflict(run, error)
                    continue
                self.journal.record(JournalEntry(
                    profile_id=run.profile_id, machine=self.spec.name, transitions=tuple(run.pending),
                    write=_intended(run), error=run.detail.get("error", ""),
                    persisted=persisted))
                if persisted:
                    self._persisted(run, step)
                run.result = RunResult(run.profile_id, run.state, "finished", run.detail.get("error"), journaled=True,
                                       persisted=persisted)
                run.pending.clear()

    def _step(self, run: Run) -> Step:
        claim = ({"by": run.token, "owner": self.holder.key, "seconds": self.claim_seconds}
                 if self._writes_ahead(run) else None)
        return Step(run.profile_id, self.spec.name, run.position, tuple(run.pending), claim)

    def _persisted(self, run: Run, step: Step) -> None:
        run.position = step.after()
        run.holds_claim = step.claim is not None
        run.pending.clear()

    def _take_failure_edge(self, run: Run, error: StoreError) -> bool:
        """When the failed commit carried a DB write, rewind to the ``Write`` state and take its failure
        edge, keeping the intended write in the detail. False when there was no write to fail."""
        for index, t in enumerate(run.pending):
            binding = self.spec.bindings.get(t.source)
            if isinstance(binding, Write) and t.dest == binding.success:
                intended = t.write
                del run.pending[index:]
                self.spec.machine.set_state(t.source, run)
                detail = {**{k: v for k, v in t.detail.items() if k != "error"},
                          "error": f"DB write failed: {error}"[:300],
                          "intended": intended.to_doc() if intended else None}
                self.spec.fire(run, binding.failure, self.clock(), detail)
                metrics.db_failure_transition(self.spec.name, binding.failure)
                return True
        return False

    def _interrupted(self, run: Run, error: StoreError) -> None:
        log.warning("profile %s %s: not persisted, stays at %s: %s", run.profile_id, self.spec.name,
                    run.position.state, error, extra=fields(machine=self.spec.name, profile_id=run.profile_id,
                                                            state=run.position.state, outcome="interrupted",
                                                            error_class=type(error).__name__))
        run.result = RunResult(run.profile_id, run.position.state, "interrupted", str(error)[:300])
        run.pending.clear()

    def _conflict(self, run: Run, error: ConcurrentTransition) -> None:
        """Another writer took the slot. If that writer was this run itself (a write whose answer was
        lost), adopt the persisted position and go on; otherwise stop the run."""
        run.pending.clear()
        if error.by == run.token and error.position.state is not None:
            run.position = error.position
            run.detail = dict(error.position.detail)
            run.holds_claim = error.position.claim is not None and error.position.claim.by == run.token
            self.spec.machine.set_state(error.position.state, run)
            return
        run.result = RunResult(run.profile_id, error.position.state, "conflict", str(error))


def _intended(run: Run) -> ProfileWrite | None:
    return ProfileWrite.from_doc(run.detail.get("intended"))


def _held(claim: Claim | None) -> str:
    if claim is None:
        return "another driver holds this run"
    holder = owners.Holder.parse(claim.owner)
    who = f"{holder.host} pid {holder.pid}" if holder else "another driver"
    since = f" since {iso(claim.at)}" if claim.at else ""
    return f"{who} holds this run{since} for {claim.seconds:g}s: nothing sent"


def _unknown_outcome(binding: Act) -> Callable[[Sequence[Run], Any], list[Outcome]]:
    """The default ``adopt``: the request may or may not have reached the CRM, so nothing is sent and the
    run ends in the act's error state saying so (a resume asks again)."""

    def adopt(runs: Sequence[Run], context: Any) -> list[Outcome]:
        return [Outcome(binding.on_error or "", {**run.detail, "outcome_unknown": True, "error": (
            f"outcome unknown: the driver that claimed this request ({'process gone' if run.adopted == 'dead' else 'claim expired'}) "
            "did not record an answer; it may or may not have reached the CRM")}) for run in runs]

    return adopt
