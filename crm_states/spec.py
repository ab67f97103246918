"""What a machine is: a diagram, the bindings that say what each state does, and the one shared
``transitions`` machine that every run of it moves through. The ``Engine`` (engine.py) drives runs.

A binding says what a state does:

- ``Act``: an effect that decides the next state (a CRM request when ``external``, else a local check);
  ``write_ahead`` when the effect is a CRM write that must not happen unrecorded.
  Effects take a batch of runs, so a batch runner can make one CRM call for a thousand profiles.
- ``Write``: the state's effect is a DB write, with a success edge and a DB-failure edge.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from transitions import Machine

from .mermaid import Diagram, read_diagram
from .records import Position, ProfileWrite, Transition


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
    #: For a ``write_ahead`` act: what a run that took over another driver's unfinished claim does instead
    #: of ``effect`` (it must not send blindly: that request may have gone out). Default: ``on_error``
    #: with an "outcome unknown" detail.
    adopt: Callable[[Sequence["Run"], Any], Sequence[Outcome]] | None = None


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


class _RunTokens:
    """Fencing tokens for runs, one per run: 80 random bits drawn once per process and a counter (32 hex digits,
    as a uuid4's, for the first 2**48 runs). A uuid4 per run cost a ``getrandom`` call and 4 % of the runner's CPU; a
    forked child draws its own prefix, so two processes never share one."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = uuid.uuid4().hex[:20]
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


run_token = _RunTokens()
os.register_at_fork(after_in_child=run_token.reset)


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
    token: str = attrs.field(factory=run_token)
    result: "RunResult | None" = None
    #: This run committed the write-ahead state it stands in (its fenced claim): it may send the CRM write.
    holds_claim: bool = False
    #: Set when this run took over a write-ahead state another driver claimed and did not finish:
    #: ``"dead"`` (that process is gone) or ``"expired"`` (its claim ran out). Its request may have gone out.
    adopted: str | None = None


@attrs.frozen
class RunResult:
    """How a run ended: ``finished`` in ``state``; ``interrupted`` (the store was down before anything
    could be decided, the profile stays at ``state``); ``conflict`` (another writer moved it);
    ``halted`` (an effect stopped the batch); ``claimed`` (another live driver holds its write-ahead
    state: nothing sent); ``changed`` (the profile's inputs changed while the run was in flight: nothing
    committed, look again); ``deleted`` (the profile was deleted meanwhile: nothing committed).
    ``journaled``: the run's DB failure went to the journal; ``persisted``: its state reached the database."""

    profile_id: int
    state: str | None
    outcome: str
    error: str | None = None
    journaled: bool = False
    #: False when the run reached a DB-failure state that could not be written either (journaled only).
    persisted: bool = True

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
        # One copy, shared by the transition and the run: details are replaced, never changed in place, and
        # a batch of 10,000 runs otherwise holds a second dict per transition until it is committed.
        detail = dict(kwargs.get("detail") or {})
        run.pending.append(Transition(
            profile_id=run.profile_id, machine=self.name, run_id=run.run_id, seq=seq + 1,
            source=event.transition.source, dest=event.transition.dest, trigger=event.event.name,
            at=kwargs["at"], detail=detail, write=kwargs.get("write"), by=run.token))
        run.detail = detail

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



def describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:299] + "…"
