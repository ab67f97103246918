"""Applying what a DB failure kept out of MongoDB (a journal entry): idempotent, so replaying twice
equals replaying once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pymongo.errors import PyMongoError

from ..records import START, Position, ProfileWrite, Transition, is_newest
from .documents import position_key
from .errors import StoreUnavailable
from .profile_writes import WRITTEN, PlannedWrite, apply_writes
from .steps import Step


class Store(Protocol):
    """What applying an entry needs of ``core.Store`` (named here so this module does not import it)."""

    profiles: Any
    positions: Any

    def position(self, profile_id: int, machine: str) -> Position: ...

    def get_profile(self, profile_id: int, projection: Any = None) -> dict[str, Any] | None: ...

    def commit(self, steps: Sequence[Step]) -> list[Any]: ...

    def fill_profile(self, profile_id: int, write: ProfileWrite) -> bool: ...


def chains(position: Position, transitions: Sequence[Transition]) -> bool:
    """True when the transitions continue the profile from ``position`` without a gap or a jump."""
    state, run_id, seq = position.state, position.run_id, position.seq
    for t in transitions:
        if t.seq != seq + 1:
            return False
        if t.source != START and (t.source != state or t.run_id != run_id):
            return False
        state, run_id, seq = t.dest, t.run_id, t.seq
    return True


def apply_journaled(store: Store, profile_id: int, machine: str, transitions: Sequence[Transition],
                    write: ProfileWrite | None) -> bool:
    """Record ``transitions`` if the profile still stands where they start, then apply ``write`` (never
    over a different value of a field) and note it in the position's data, so ``heal`` keeps it there.
    Returns True when anything changed."""
    changed = False
    position = store.position(profile_id, machine)
    if transitions and chains(position, transitions):
        error = store.commit([Step(profile_id, machine, position, tuple(transitions))])[0]
        if isinstance(error, StoreUnavailable):
            raise error
        changed = error is None
        position = store.position(profile_id, machine)
    if write is None or write.empty:
        return changed
    new_fields = any(position.data.fields.get(k) != v for k, v in write.set.items())
    new_line = bool(write.crm_log) and write.crm_log not in position.data.crm_log
    if not new_fields and not new_line:
        return changed  # the position's data already holds it: applied before
    wrote = store.fill_profile(profile_id, ProfileWrite(set=write.set, guard=write.guard)) if write.set else False
    if new_line:
        before = store.get_profile(profile_id, {"CrmLog": 1}) or {}
        outcome = apply_writes(store.profiles, [PlannedWrite(profile_id, ProfileWrite(crm_log=write.crm_log,
                                                                                         guard=write.guard),
                                                             position.data.crm_log)])[0]
        if isinstance(outcome, StoreUnavailable):
            raise outcome
        wrote = wrote or (outcome == WRITTEN and write.crm_log not in (before.get("CrmLog") or []))
    if position.state is not None and _holds(store, profile_id, write):
        _note_data(store, machine, profile_id, position, write)
        return True
    return changed or wrote


def _holds(store: Store, profile_id: int, write: ProfileWrite) -> bool:
    """Whether the profile now holds the write (under its guard): a field that holds another value is never
    overwritten, and then the write is not noted as the machine's."""
    try:
        profile = store.get_profile(profile_id)
    except PyMongoError as exc:
        raise StoreUnavailable(f"reading profile {profile_id}: {type(exc).__name__}") from exc
    if profile is None or any(profile.get(k) != v for k, v in write.guard.items()):
        return False
    lines = profile.get("CrmLog") or []
    return all(profile.get(k) == v for k, v in write.set.items()) and (
        not write.crm_log or write.crm_log in lines or not is_newest(write.crm_log, lines))


def _note_data(store: Store, machine: str, profile_id: int, position: Position, write: ProfileWrite) -> None:
    """Add ``write`` to the position's data, guarded by its seq (a position moved meanwhile keeps its own)."""
    at = position.at
    if at is None:
        return
    data = position.data.with_write(write, at)
    try:
        store.positions.update_one({"_id": position_key(machine, profile_id), "seq": position.seq},
                                   {"$set": {"data": data.to_doc()}})
    except PyMongoError as exc:
        raise StoreUnavailable(f"noting the journaled write of {profile_id}: {type(exc).__name__}") from exc
