"""The weekly sustainer sync, per profile (docs/diagrams/sync_sustainers.mmd): a change of ``is_sustainer``
is one persisted run.

``crm_states.sustainers`` reads the WHOLE sustainer set from the CRM once, compares it with the profiles
(by ``sf_app_user_id``) and starts a run only for a profile whose ``is_sustainer`` differs, passing the
status read as the ``is_sustainer`` input. CrmIdRead records the profile's CRM id and current status;
RequestedSustainerStatus takes the status the sync read (a read, so nothing is committed before it: the
run's transitions are committed once, with the outcome and the profile write, in bulk for a batch); OK
writes ``is_sustainer``. A run without an input (``crm-states resume`` of a stopped run) reads the set
itself, once per batch; a resumed DB failure writes the journaled status without asking the CRM again.
A profile without ``sf_app_user_id`` is an unexpected response recorded.

``CrmLog`` codes:

- ``SustainerSyncUnexpectedRes-<datetime>: <error>``: the status could not be read for the profile
  (WroteUnexpectedResponse): the set's read failed in a resumed run, or the profile has no CRM id.

LoggedDbFailure: the write of ``is_sustainer`` failed and was journaled. ``crm-states resume`` writes the
journaled status without reading the CRM again; ``crm-states replay`` restores the history but, by the
store's rule for journaled writes, never overwrites an ``is_sustainer`` that holds the other value; the
next weekly sync writes the then-current status anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure

NAME = "sync_sustainers"
LOG_ERROR = "SustainerSyncUnexpectedRes"


def crm_id_of(profile: Any) -> str | None:
    value = profile.get("sf_app_user_id")
    return value if isinstance(value, str) and value else None


def journaled_status(run: Run) -> bool | None:
    """The status a previous run read but could not write (a DB-failure state), else ``None``."""
    if run.prior.get("answer") != "OK":
        return None
    value = ((run.prior.get("intended") or {}).get("set") or {}).get("is_sustainer")
    return value if isinstance(value, bool) else None


def crm_id_read(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestedSustainerStatus", {"crm_id": crm_id_of(run.profile),
                                                "was": bool(run.profile.get("is_sustainer"))})


def request_status(runs: Sequence[Run], crm: CrmConnectionManager) -> list[Outcome]:
    """The status given by the sync (read for the whole set), else the journaled one, else one read of
    the whole set for every run of the batch that still needs it; a failed read sends those runs to
    UnexpectedResponse."""
    decided: dict[int, Outcome] = {}
    ask: list[Run] = []
    for run in runs:
        base = {"crm_id": run.detail.get("crm_id"), "was": run.detail.get("was")}
        given = run.inputs.get("is_sustainer")
        known = journaled_status(run)
        if base["crm_id"] is None:
            decided[id(run)] = Outcome("UnexpectedResponse", {**base, "error": "the profile has no sf_app_user_id"})
        elif isinstance(given, bool):
            decided[id(run)] = Outcome("OK", {**base, "is_sustainer": given, "answer": "OK", "source": "sync"})
        elif "is_sustainer" in run.inputs:
            decided[id(run)] = Outcome("UnexpectedResponse", {**base, "error": f"is_sustainer must be a bool, "
                                                                               f"got {given!r}"})
        elif known is not None:
            decided[id(run)] = Outcome("OK", {**base, "is_sustainer": known, "answer": "OK", "source": "journal"})
        else:
            ask.append(run)
    if ask:
        try:
            sustainers = frozenset(crm.get_sustainers())
        except Exception as exc:
            failure = crm_failure(exc)
            for run in ask:
                decided[id(run)] = Outcome("UnexpectedResponse", {"crm_id": run.detail.get("crm_id"),
                                                                  "was": run.detail.get("was"), **failure})
        else:
            for run in ask:
                decided[id(run)] = Outcome("OK", {"crm_id": run.detail["crm_id"], "was": run.detail.get("was"),
                                                  "is_sustainer": run.detail["crm_id"] in sustainers,
                                                  "answer": "OK", "source": "crm"})
    return [decided[id(run)] for run in runs]


def write_status(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={"is_sustainer": bool(run.detail["is_sustainer"])}, requires_profile=True)


def write_unexpected(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line(LOG_ERROR, at, run.detail.get("error") or "no detail"))


BINDINGS = {
    "CrmIdRead": Act(each(crm_id_read), frozenset({"RequestedSustainerStatus"}), external=False),
    "RequestedSustainerStatus": Act(request_status, frozenset({"OK", "UnexpectedResponse"}),
                                    on_error="UnexpectedResponse"),
    "OK": Write(write_status, success="WroteSustainerStatus", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_unexpected, success="WroteUnexpectedResponse", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
