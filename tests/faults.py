"""Test helpers: a database wrapper that fails chosen writes, and history checks against a diagram."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pymongo.errors import AutoReconnect

from crm_states.engine import StateMachine
from crm_states.records import START, Transition
from crm_states.store import POSITIONS


class WritePlan:
    """Which write calls fail: ``{("crm_positions", "update", 2)}`` fails the second update of positions."""

    def __init__(self, failing: set[tuple[str, str, int]] | None = None) -> None:
        self.failing = set(failing or ())
        self.counts: Counter[tuple[str, str]] = Counter()
        self.down = False

    def hit(self, collection: str, kind: str) -> None:
        self.counts[(collection, kind)] += 1
        if self.down or (collection, kind, self.counts[(collection, kind)]) in self.failing:
            raise AutoReconnect(f"injected failure of {kind} #{self.counts[(collection, kind)]} on {collection}")


class FlakyCollection:
    _KINDS = {"insert_many": "insert", "insert_one": "insert", "bulk_write": "update", "update_one": "update",
              "delete_many": "delete"}

    def __init__(self, inner: Any, plan: WritePlan) -> None:
        self._inner = inner
        self._plan = plan

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "with_options":  # the store journals its commit record through a derived collection
            return lambda *args, **kwargs: FlakyCollection(attr(*args, **kwargs), self._plan)
        kind = self._KINDS.get(name)
        if kind is None:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self._plan.hit(self._inner.name, kind)
            return attr(*args, **kwargs)

        return write


class FlakyDatabase:
    """Hands out collections whose writes follow a ``WritePlan``; reads always work."""

    def __init__(self, inner: Any, plan: WritePlan) -> None:
        self._inner = inner
        self.plan = plan

    def __getitem__(self, name: str) -> FlakyCollection:
        return FlakyCollection(self._inner[name], self.plan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def assert_history_is_path(spec: StateMachine, history: list[Transition]) -> None:
    """Each run in the history is a path of the diagram from ``[*]``; seqs are 1..n with no gap."""
    assert [t.seq for t in history] == list(range(1, len(history) + 1)), [t.seq for t in history]
    state = None
    run_id = None
    for t in history:
        if t.source == START:
            assert state is None or state in spec.terminal, f"new run started from non-terminal {state}"
            assert t.dest == spec.diagram.initial
            run_id = t.run_id
        else:
            assert t.source == state, f"{t.source} does not follow {state}"
            assert t.run_id == run_id, "a run changed id half-way"
            assert (t.source, t.dest) in spec.diagram.edge_set, f"{t.source} --> {t.dest} is not in the diagram"
            assert t.trigger == spec.triggers[(t.source, t.dest)]
        state = t.dest


class Commits:
    """The store's writes, in order, against planned faults (``WritePlan`` keys): ``commit(writes_profile)``
    is one step's commit (its guarded profile write first when it has one, then its position). Records
    whether each profile write landed: that is what the profile holds, whatever the position says."""

    def __init__(self, faults: set) -> None:
        self.faults = faults
        self.n = {"profiles": 0, POSITIONS: 0}
        self.profile_writes: list[bool] = []

    def _write(self, collection: str) -> bool:
        self.n[collection] += 1
        return (collection, "update", self.n[collection]) not in self.faults

    def commit(self, writes_profile: bool) -> bool:
        if writes_profile:
            landed = self._write("profiles")
            self.profile_writes.append(landed)
            if not landed:
                return False
        return self._write(POSITIONS)


def expect_commits(faults: set, steps: list[tuple[bool, bool]], failure_state: str,
                   success_states: list[str | None]) -> tuple[str | None, str | None, Commits]:
    """``(state the run reports, state persisted, writes)`` for a run committed in ``steps``: each is
    ``(writes the profile, ends in a Write state's success)`` and persists ``success_states[i]``. A failed
    commit that carried a Write state's success takes the failure edge (one more commit, without a profile
    write); any other failed commit interrupts the run."""
    commits = Commits(faults)
    persisted: str | None = None
    for (writes_profile, has_write), state in zip(steps, success_states):
        if commits.commit(writes_profile):
            persisted = state
            continue
        if not has_write:
            return None, persisted, commits
        return failure_state, failure_state if commits.commit(False) else persisted, commits
    return success_states[-1], persisted, commits


def states_by_profile(db: Any, machine: str) -> dict[Any, str]:
    """Every profile's state in ``machine``, read in one pass over the project's positions."""
    return {d["profile_id"]: d["state"] for d in db[POSITIONS].find({"machine": machine}, {"profile_id": 1, "state": 1})}


def history_lengths(db: Any, machine: str) -> Counter[Any]:
    """Transitions per profile in ``machine``, in one pass."""
    pipeline = [{"$match": {"machine": machine}}, {"$project": {"profile_id": 1, "n": {"$size": "$history"}}}]
    return Counter({d["profile_id"]: d["n"] for d in db[POSITIONS].aggregate(pipeline)})

