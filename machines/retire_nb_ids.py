"""Retiring ``nationbuilder_id`` once its validation is done (docs/diagrams/retire_nb_ids.mmd).

The design document: "Only after the failure states are handled can we remove nationbuilder_id from mongo".
One run per profile removes it, and a run of its own (``undo``) puts it back exactly:

- NotChecked checks that the profile's validation still speaks for it: a finished ``nb_profile_validation``
  run for its current ``nationbuilder_id`` (``nb.validated_for``), ending in the final state or in a failure
  state the operator accepted (``accept``: MarComs decided about WroteNotFound, say), and the profile's
  ``sf_app_user_id`` still the one that validation recorded (none for a profile not found). Otherwise
  ValidationNoLongerHolds, and nothing is touched.
- NbIdRecorded is write-ahead: it is committed to ``crm_positions`` with the value as read (type included)
  and the run's fenced claim BEFORE the profile loses it, so a crash at any instant never loses the value.
- RemovalOk removes the field under a compare-and-set (``ProfileWrite.expect``): only while the profile
  still holds the value recorded (or already lacks it: the removal landed before a crash) and the
  ``sf_app_user_id`` checked. Writing it again is a no-op, so a driver that takes over a killed one's claim
  simply does the same (``adopt`` is the effect). The position's data then holds the ``sf_app_user_id``,
  which ``heal`` keeps on the profile (the validation's own record, tied to the nationbuilder_id, no longer
  applies once the id is gone).
- Undo (NotChecked with the ``undo`` input, or resuming a stopped undo) restores the recorded value where
  the profile holds no nationbuilder_id, never over another one (RestoreRefused).

Sefaria's ``UserProfile.save()`` writes back a stale copy, which can bring a retired id back. The next
``crm-states retire-nb-ids`` finds it (a profile holding the very id this machine retired: "reappeared")
and retires it again, in a new run of the same profile; the value recorded stays the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from bson.int64 import Int64

from crm_states.engine import Act, Outcome, Run, StateMachine, Write, describe, each
from crm_states.records import Position, ProfileWrite

from . import diagram_path
from . import nb_profile_validation as nb

NAME = "retire_nb_ids"
FIELD = "nationbuilder_id"
APP_USER = "sf_app_user_id"
#: The blocking category of a profile whose current nationbuilder_id has no finished validation.
NOT_VALIDATED = "not validated"
#: States whose run may have removed the field: what ``--undo`` restores.
REMOVING = frozenset({"NbIdRecorded", "RemovalOk", "WroteNbIdRemoved", "DbWriteRemovalErrorLogged"})


# --- values ---------------------------------------------------------------------------------------------

def recorded(value: Any) -> dict[str, Any]:
    """The detail that keeps ``value`` exactly: a BSON int64 is flagged, so that a trip through the JSON
    journal (``replay``) still restores an int64, not an int32 of the same number."""
    return {FIELD: value, f"{FIELD}_int64": True} if isinstance(value, Int64) else {FIELD: value}


def restored(detail: Mapping[str, Any]) -> Any:
    value = detail[FIELD]
    return Int64(value) if detail.get(f"{FIELD}_int64") and not isinstance(value, Int64) else value


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type: ``"123"`` is not ``123``, an int64 is not an int32 (validated_for's rule)."""
    return type(a) is type(b) and a == b


def holds_id(profile: Mapping[str, Any]) -> bool:
    """Whether the profile holds a truthy nationbuilder_id (what validation and retirement are about)."""
    return bool(profile.get(FIELD))


def app_user_of(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def validated_app_user(validation: Position) -> str | None:
    """The App User id the validation found (``None``: not found, or no answer)."""
    return app_user_of(validation.detail.get("app_user_id"))


def blocking_state(profile: Mapping[str, Any], validation: Position, accept: Collection[str]) -> str | None:
    """Why ``validation`` does not let the profile's nationbuilder_id go: ``NOT_VALIDATED`` (no finished run
    for its current id), or the validation's failure state when the operator did not accept it; else None."""
    if not nb.validated_for(profile, validation):
        return NOT_VALIDATED
    if validation.state in nb.SPEC.diagram.finals or validation.state in accept:
        return None
    return validation.state


def settled(profile: Mapping[str, Any], position: Position, validation: Position) -> bool:
    """A stopped retirement that already judged the profile as it stands (same id, same sf_app_user_id,
    same validation state): running it again would say the same."""
    detail = position.detail
    return (position.state == "ValidationNoLongerHolds" and FIELD in detail
            and same_value(restored(detail), profile.get(FIELD))
            and detail.get(APP_USER) == profile.get(APP_USER) and detail.get("validation") == validation.state)


def restorable(position: Position) -> bool:
    """Whether a retirement may have removed the field (``--undo`` restores it)."""
    if position.state in REMOVING:
        return FIELD in position.detail
    return position.state == "ValidationNoLongerHolds" and bool(position.detail.get("after_recording"))


# --- effects --------------------------------------------------------------------------------------------

def _undoing(run: Run) -> bool:
    """The ``undo`` input; a resumed run without one continues what the stopped run was doing."""
    return bool(run.inputs["undo"]) if "undo" in run.inputs else bool(run.prior.get("undo"))


def check(run: Run, context: Any) -> Outcome:
    if _undoing(run):
        return _check_undo(run)
    prior = run.prior
    if holds_id(run.profile):
        value = run.profile[FIELD]
    elif FIELD in prior and not prior.get("undo"):  # a resumed removal: it may have landed before it stopped
        value = restored(prior)
    else:
        raise ValueError("the profile has no nationbuilder_id to retire")
    base = {**recorded(value), APP_USER: run.profile.get(APP_USER)}
    validation = run.inputs.get("validation")
    if isinstance(validation, Position):
        blocked = blocking_state({**run.profile, FIELD: value}, validation, run.inputs.get("accept") or ())
        base.update(validation=validation.state, app_user_id=validated_app_user(validation))
        if blocked is not None:
            return Outcome("ValidationNoLongerHolds", {**base, "blocked": blocked, "error": f"validation: {blocked}"})
    elif prior.get("validation") and not prior.get("blocked") and FIELD in prior and same_value(restored(prior), value):
        base.update(validation=prior["validation"], app_user_id=prior.get("app_user_id"))  # resumed: as checked then
    else:
        raise ValueError("no validation given for this nationbuilder_id: run `crm-states retire-nb-ids`")
    now = app_user_of(run.profile.get(APP_USER))
    if now != base["app_user_id"]:
        return Outcome("ValidationNoLongerHolds", {**base, "error": (
            f"sf_app_user_id is {now or 'absent'}, the validation recorded {base['app_user_id'] or 'none'}: "
            "not retired (crm-states heal restores an erased id)")})
    return Outcome("NbIdRecorded", base)


def _check_undo(run: Run) -> Outcome:
    if FIELD not in run.prior:
        raise ValueError("no retired nationbuilder_id recorded to restore")
    value = restored(run.prior)
    base = {**recorded(value), "undo": True}
    now = run.profile.get(FIELD)
    if now is not None and not same_value(now, value):
        return Outcome("RestoreRefused", {**base, "found": nb.shown(now), "error": (
            "the profile holds another nationbuilder_id; the recorded one was not written over it")})
    return Outcome("RestoreOk", base)


def confirm(runs: Sequence[Run], context: Any) -> list[Outcome]:
    """The value is recorded: remove it if the profile still holds it (or already lacks it) and still the
    sf_app_user_id checked. A driver taking over a killed one's claim decides the same way, from its own
    read of the profile: the removal is idempotent, so doing it again is safe."""
    outcomes = []
    for run in runs:
        try:
            outcomes.append(_confirm(run))
        except Exception as exc:  # the recorded value stays in the detail whatever happens
            outcomes.append(Outcome("ValidationNoLongerHolds", {**run.detail, "after_recording": True,
                                                                "error": describe(exc)}))
    return outcomes


def _confirm(run: Run) -> Outcome:
    value = restored(run.detail)
    now = run.profile.get(FIELD)
    if now is not None and not same_value(now, value):
        return Outcome("ValidationNoLongerHolds", {**run.detail, "after_recording": True, "error": (
            f"the profile now holds nationbuilder_id {nb.shown(now)}, not the one recorded")})
    if app_user_of(run.profile.get(APP_USER)) != run.detail.get("app_user_id"):
        return Outcome("ValidationNoLongerHolds", {**run.detail, "after_recording": True, "error": (
            "sf_app_user_id changed since the nationbuilder_id was recorded")})
    return Outcome("RemovalOk", dict(run.detail))


def write_removal(run: Run, at: Any) -> ProfileWrite:
    app_user = run.detail.get("app_user_id")
    return ProfileWrite(set={APP_USER: app_user} if app_user else {}, unset=(FIELD,),
                        expect={FIELD: restored(run.detail), APP_USER: run.detail.get(APP_USER)},
                        requires_profile=True)


def write_restore(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={FIELD: restored(run.detail)}, expect={FIELD: None}, requires_profile=True)


BINDINGS = {
    "NotChecked": Act(each(check, on_error="ScriptFailureLogged"),
                      frozenset({"ScriptFailureLogged", "ValidationNoLongerHolds", "NbIdRecorded", "RestoreOk",
                                 "RestoreRefused"}), on_error="ScriptFailureLogged", external=False),
    "NbIdRecorded": Act(confirm, frozenset({"RemovalOk", "ValidationNoLongerHolds"}), write_ahead=True,
                        adopt=confirm),
    "RemovalOk": Write(write_removal, success="WroteNbIdRemoved", failure="DbWriteRemovalErrorLogged"),
    "RestoreOk": Write(write_restore, success="WroteNbIdRestored", failure="DbWriteRestoreErrorLogged"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
