"""The engine: a diagram plus bindings becomes one shared ``transitions`` machine, and runs of profiles
are driven through it with every transition persisted.

A binding says what a state does:

- ``Act``: an effect that decides the next state (a CRM request when ``external``, else a local check);
  ``write_ahead`` when the effect is a CRM write that must not happen unrecorded.
  Effects take a batch of runs, so a batch runner can make one CRM call for a thousand profiles.
- ``Write``: the state's effect is a DB write, with a success edge and a DB-failure edge.

Persistence is write-ahead: pending transitions are committed before a ``write_ahead`` effect runs and
when a run stops, so a crash never leaves a CRM side effect unrecorded (a read, such as a lookup, is
simply asked again after a crash, so its transitions are committed with the outcome, in one write). A ``Write`` state's data is
committed together with its success transition; if MongoDB refuses it, the run takes the failure edge
and the intended write goes to the journal. The engine knows no CRM and no collection names.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from transitions import Machine

from . import metrics
from .journal import Journal, JournalEntry
from .logs import fields
from .mermaid import Diagram, read_diagram
from .records import START, Position, ProfileWrite, Transition, new_run_id, utcnow
from .store import ConcurrentTransition, Step, Store, StoreError, position_of

log = logging.getLogger("crm_states.engine")


class BindingError(ValueError):
    """Bindings and diagram disagree; raised when a machine module is imported."""


class Halt(Exception):
    """Raised by an effect to stop the whole batch (say, the CRM's daily allocation is spent).
    Runs stay where they were persisted and continue on the next drive."""


@attrs.frozen
class Outcome:
    """What an ``Act`` effect decided for one run: the next state and what to record about it."""

    dest: str
    detail: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Act:
    """``effect(runs, context)`` returns one ``Outcome`` per run; ``context`` is what the ``Engine``
    was given (the CRM, for the project's machines). An exception sends every run to ``on_error``.
    ``write_ahead``: the effect changes the CRM, so the run's transitions are persisted before it runs."""

    effect: Callable[[Sequence["Run"], Any], Sequence[Outcome]]
    dests: frozenset[str]
    on_error: str | None = None
    external: bool = True
    write_ahead: bool = False


@attrs.frozen
class Write:
    """``write(run, at)`` returns the profile write committed with the ``success`` transition."""

    write: Callable[["Run", Any], ProfileWrite]
    success: str
    failure: str


def each(fn: Callable[["Run", Any], Outcome],
         on_error: str | None = None) -> Callable[[Sequence["Run"], Any], list[Outcome]]:
    """A batch effect from a one-run function; an exception sends only that run to ``on_error``
    (without one, it propagates and the engine applies the ``Act``'s own ``on_error``)."""

    def effect(runs: Sequence[Run], context: Any) -> list[Outcome]:
        outcomes = []
        for run in runs:
            try:
                outcomes.append(fn(run, context))
            except Halt:
                raise
            except Exception as exc:
                if on_error is None:
                    raise
                outcomes.append(Outcome(on_error, {"error": describe(exc)}))
        return outcomes

    return effect


Binding = Act | Write


@attrs.define(eq=False)
class Run:
    """One profile's pass through a machine; the model object of the shared ``transitions`` machine."""

    profile_id: int
    profile: Mapping[str, Any]
    position: Position
    run_id: str
    state: str
    detail: Mapping[str, Any] = attrs.field(factory=dict)
    prior: Mapping[str, Any] = attrs.field(factory=dict)
    inputs: Mapping[str, Any] = attrs.field(factory=dict)
    pending: list[Transition] = attrs.field(factory=list)
    token: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    result: "RunResult | None" = None


@attrs.frozen
class RunResult:
    """How a run ended: ``finished`` in ``state``; ``interrupted`` (the store was down before anything
    could be decided, the profile stays at ``state``); ``conflict`` (another writer moved it);
    ``halted`` (an effect stopped the batch). ``journaled``: the run's DB failure went to the journal."""

    profile_id: int
    state: str | None
    outcome: str
    error: str | None = None
    journaled: bool = False

    @property
    def finished(self) -> bool:
        return self.outcome == "finished"


def trigger_name(label: str | None, dest: str) -> str:
    """A Python-identifier trigger from an edge label: "DB write success" -> ``db_write_success``,
    "200 OK" -> ``on_200_ok``; an unlabelled edge -> ``to_<Dest>``."""
    if not label:
        return f"to_{dest}"
    slug = re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")
    return slug if slug and not slug[0].isdigit() else f"on_{slug}"


class StateMachine:
    """A diagram, its bindings, and the one ``transitions.Machine`` shared by every run of it."""

    def __init__(self, diagram: Diagram, bindings: Mapping[str, Binding]) -> None:
        self.diagram = diagram
        self.name = diagram.name
        self.bindings = dict(bindings)
        self.terminal = diagram.terminal_states
        self.triggers: dict[tuple[str, str], str] = {}
        for edge in diagram.edges:
            name = trigger_name(edge.label, edge.dest)
            clash = [d for (s, d), t in self.triggers.items() if s == edge.source and t == name]
            if clash:
                raise BindingError(f"{diagram.name}: edges {edge.source} --> {clash[0]} and {edge.source} --> "
                                   f"{edge.dest} would share the trigger {name!r}")
            self.triggers[(edge.source, edge.dest)] = name
        _check_bindings(diagram, self.bindings)
        self.db_failure_states = frozenset(b.failure for b in self.bindings.values() if isinstance(b, Write))
        self.machine = Machine(
            model=None,
            states=list(diagram.states),
            transitions=[{"trigger": t, "source": s, "dest": d} for (s, d), t in self.triggers.items()],
            initial=diagram.initial,
            auto_transitions=False,
            send_event=True,
            after_state_change=self._record,
        )

    @classmethod
    def from_file(cls, path: str | Path, bindings: Mapping[str, Binding]) -> StateMachine:
        return cls(read_diagram(path), bindings)

    def _record(self, event: Any) -> None:
        """Every state change the machine makes becomes a pending ``Transition`` of its run."""
        run: Run = event.model
        seq = run.pending[-1].seq if run.pending else run.position.seq
        kwargs = event.kwargs
        run.pending.append(Transition(
            profile_id=run.profile_id, machine=self.name, run_id=run.run_id, seq=seq + 1,
            source=event.transition.source, dest=event.transition.dest, trigger=event.event.name,
            at=kwargs["at"], detail=dict(kwargs.get("detail") or {}), write=kwargs.get("write"), by=run.token))
        run.detail = dict(kwargs.get("detail") or {})

    def fire(self, run: Run, dest: str, at: Any, detail: Mapping[str, Any] | None = None,
             write: ProfileWrite | None = None) -> None:
        trigger = self.triggers.get((run.state, dest))
        if trigger is None:
            raise BindingError(f"{self.name}: no edge {run.state} --> {dest}")
        # Runs are not registered with the machine (add_model binds a dozen methods per object and
        # would dominate the cost of a run); the shared machine's events drive them directly.
        self.machine.events[trigger].trigger(run, at=at, detail=detail or {}, write=write)


def _check_bindings(diagram: Diagram, bindings: Mapping[str, Binding]) -> None:
    problems: list[str] = []
    states = set(diagram.states)
    edges = diagram.edge_set
    covered: set[tuple[str, str]] = set()
    for state, binding in bindings.items():
        if state not in states:
            problems.append(f"binding for unknown state {state!r}")
            continue
        if state in diagram.terminal_states:
            problems.append(f"binding for terminal state {state!r} (it has no outgoing edge)")
        if isinstance(binding, Act):
            dests = set(binding.dests) | ({binding.on_error} if binding.on_error else set())
        else:
            dests = {binding.success, binding.failure}
        for dest in sorted(dests):
            if (state, dest) not in edges:
                problems.append(f"binding names edge {state} --> {dest}, which the diagram lacks")
            covered.add((state, dest))
    for state in diagram.states:
        if state not in diagram.terminal_states and state not in bindings:
            problems.append(f"state {state!r} has outgoing edges but no binding")
    for source, dest in sorted(edges - covered):
        if source in bindings:
            problems.append(f"edge {source} --> {dest} is never taken by its binding")
    if problems:
        raise BindingError(f"{diagram.name}: " + "; ".join(problems))


class Engine:
    """Drives runs of one ``StateMachine`` with a ``Store`` and a ``Journal``."""

    def __init__(self, spec: StateMachine, store: Store, journal: Journal | None = None, *,
                 context: Any = None, clock: Callable[[], Any] = utcnow) -> None:
        self.spec = spec
        self.store = store
        self.journal = journal or Journal()
        self.context = context
        self.clock = clock

    # --- preparing runs -----------------------------------------------------------------------
    def prepare(self, profile: Mapping[str, Any], *, restart: bool = False,
                inputs: Mapping[str, Any] | None = None) -> Run:
        """A run for ``profile``: new when it never started (or, with ``restart``, stopped in a
        terminal state), continued when a previous run stopped half-way (a crash, an outage)."""
        position = position_of(profile, self.spec.name)
        run = Run(profile_id=profile["id"], profile=profile, position=position, run_id=position.run_id or "",
                  state=position.state or self.spec.diagram.initial, detail=dict(position.detail),
                  inputs=dict(inputs or {}))
        if position.state is None or (restart and position.state in self.spec.terminal):
            run.run_id = new_run_id(run.profile_id, position.seq + 1)
            run.prior = dict(position.detail) if position.state else {}
            run.state = self.spec.diagram.initial
            run.detail = {}
            run.pending.append(Transition(
                profile_id=run.profile_id, machine=self.spec.name, run_id=run.run_id, seq=position.seq + 1,
                source=START, dest=self.spec.diagram.initial, trigger="start", at=self.clock(), by=run.token))
        elif position.state in self.spec.terminal:
            run.result = RunResult(run.profile_id, position.state, "finished")
        return run

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
            active = [r for r in active if r.result is None]
        return [r.result for r in runs]  # type: ignore[misc]

    def _writes_ahead(self, run: Run) -> bool:
        binding = self.spec.bindings[run.state]
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
        try:
            outcomes = list(binding.effect(batch, self.context))
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

    # --- persistence --------------------------------------------------------------------------
    def _flush(self, runs: Iterable[Run]) -> None:
        """Commit every run's pending transitions; route DB failures along the diagram."""
        batch = [r for r in runs if r.pending and r.result is None]
        if not batch:
            return
        errors = self.store.commit([_step(r) for r in batch])
        retry: list[Run] = []
        for run, error in zip(batch, errors):
            if error is None:
                self._persisted(run)
            elif isinstance(error, ConcurrentTransition):
                self._conflict(run, error)
            elif self._take_failure_edge(run, error):
                retry.append(run)
            else:
                self._interrupted(run, error)
        if retry:
            errors = self.store.commit([_step(r) for r in retry])
            for run, error in zip(retry, errors):
                persisted = error is None
                if isinstance(error, ConcurrentTransition):
                    self._conflict(run, error)
                    continue
                self.journal.record(JournalEntry(
                    profile_id=run.profile_id, machine=self.spec.name, transitions=tuple(run.pending),
                    write=_intended(run), error=run.detail.get("error", ""),
                    persisted=persisted))
                if persisted:
                    self._persisted(run)
                run.result = RunResult(run.profile_id, run.state, "finished", run.detail.get("error"), journaled=True)
                run.pending.clear()

    def _persisted(self, run: Run) -> None:
        last = run.pending[-1]
        run.position = Position(last.dest, last.run_id, last.seq, dict(last.detail))
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
        lost, then rolled forward), adopt the settled position and go on; otherwise stop the run."""
        run.pending.clear()
        if error.by == run.token and error.position.state is not None:
            run.position = error.position
            run.detail = dict(error.position.detail)
            self.spec.machine.set_state(error.position.state, run)
            return
        run.result = RunResult(run.profile_id, error.position.state, "conflict", str(error))


def _step(run: Run) -> Step:
    return Step(run.profile_id, run.pending[0].machine, run.position, tuple(run.pending))


def _intended(run: Run) -> ProfileWrite | None:
    return ProfileWrite.from_doc(run.detail.get("intended"))


def describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:299] + "…"
