"""Validation of profiles that have a ``nationbuilder_id`` (docs/diagrams/nb_profile_validation.mmd).

NotChecked checks the profile, RequestedContact asks Salesforce for the app user holding that
NationBuilder id (one batched request for a whole batch of runs), and the three response states write
what was learnt: the app user id, or a ``CrmLog`` line the failure-state report is built on.

Every outcome is tied to the input it was computed from: the run records the profile's
``nationbuilder_id`` as read (``detail.input``), and its profile write is guarded by it, so a profile whose
id changed (or that was deleted) while the lookup was in flight gets nothing and is looked at again
(``validated_for`` tells the runner whether a finished run still speaks for the profile).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.crm.results import Matches
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, describe, each
from crm_states.lookups import RecordedLookup
from crm_states.records import Position, ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_app_user_id

NAME = "nb_profile_validation"


def nationbuilder_id(profile: Mapping[str, Any]) -> int:
    """The profile's NationBuilder id as a positive int; anything else is a clear error."""
    value = profile.get("nationbuilder_id")
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip()):  # ASCII digits only
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise ValueError(f"nationbuilder_id must be a positive integer below 2**63, got {shown(value)}")
    return value


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_profile(run: Run, crm: Any) -> Outcome:
    raw = run.profile.get("nationbuilder_id")
    try:
        parsed = nationbuilder_id(dict(run.profile))
    except ValueError as exc:
        return Outcome("ScriptFailureLogged", {"error": describe(exc), "input_shown": shown(raw)})
    return Outcome("RequestedContact", {"nationbuilder_id": parsed, "input": raw})


def validated_for(profile: Mapping[str, Any], position: Position) -> bool:
    """Whether ``position`` is a finished validation of the profile's current ``nationbuilder_id``."""
    if position.state not in SPEC.terminal:
        return False
    raw = profile.get("nationbuilder_id")
    if "input" in position.detail:
        return position.detail["input"] == raw and type(position.detail["input"]) is type(raw)
    return position.detail.get("input_shown") == shown(raw)


def request_contact(runs: Sequence[Run], crm: CrmConnectionManager) -> list[Outcome]:
    """One batched lookup for every run; a failed request sends the whole batch to UnexpectedResponse.
    The lookup is the CRM's (packed REST queries), or a ``RecordedLookup`` (a snapshot of the CRM), whose
    outcomes also name what they were read from.

    An answer is taken only when it is one clean App User id: several App Users for one NationBuilder id,
    or a record the client refused (not a Salesforce id, an oversized value), is UnexpectedResponse with a
    detail naming the candidates (the operator's CSV shows them), never a silent pick."""
    known = {id(run): app_user for run in runs if (app_user := journaled_app_user_id(run))}
    ask = sorted({run.detail["nationbuilder_id"] for run in runs if id(run) not in known})
    found: dict[int, Matches] = {}
    read_from: dict[int, Mapping[str, Any]] = {}
    failure = None
    recorded = isinstance(crm, RecordedLookup)  # a snapshot of the CRM: the detail names what was read
    if ask:
        try:
            if recorded:
                found, read_from = crm.recorded_app_users(ask)
            else:
                found = dict(crm.lookup_app_users_by_nationbuilder_ids(ask))
        except Exception as exc:
            failure = crm_failure(exc)
    outcomes = []
    for run in runs:
        base = {"nationbuilder_id": run.detail["nationbuilder_id"], "input": run.detail.get("input")}
        if recorded and id(run) not in known:
            base.update({**crm.source, **read_from.get(base["nationbuilder_id"], {})})
        matches = found.get(base["nationbuilder_id"])
        if id(run) in known:
            outcomes.append(Outcome("OkResponse", {**base, "app_user_id": known[id(run)], "source": "journal"}))
        elif failure is not None:
            outcomes.append(Outcome("UnexpectedResponse", {**base, **failure}))
        elif matches is None:
            outcomes.append(Outcome("NotFound", {**base, "status": 404}))
        elif matches.single is not None:
            outcomes.append(Outcome("OkResponse", {**base, "status": 200, "app_user_id": matches.single}))
        else:
            outcomes.append(Outcome("UnexpectedResponse", {**base, **unclear(matches)}))
    return outcomes


#: How many candidate ids an unclear answer's detail lists (the rest are counted).
SHOWN_CANDIDATES = 10


def unclear(matches: Matches) -> dict[str, Any]:
    """The detail of an answer that is not one clean App User: the candidates, and what was refused."""
    parts = []
    if len(matches.ids) > 1:
        shown = ", ".join(matches.ids[:SHOWN_CANDIDATES])
        more = f" and {len(matches.ids) - SHOWN_CANDIDATES} more" if len(matches.ids) > SHOWN_CANDIDATES else ""
        parts.append(f"{len(matches.ids)} App Users hold NationBuilder id {matches.key}: {shown}{more}")
    if matches.rejected:
        parts.append(f"{len(matches.rejected)} records refused: {'; '.join(matches.rejected[:3])}")
    return {"error": "; ".join(parts)[:300], "candidates": list(matches.ids[:SHOWN_CANDIDATES]),
            "status": 300 if len(matches.ids) > 1 else 200}


def _guarded(run: Run, **write: Any) -> ProfileWrite:
    """A write that holds only while the profile keeps the ``nationbuilder_id`` the run looked up."""
    return ProfileWrite(guard={"nationbuilder_id": run.detail.get("input")}, requires_profile=True, **write)


def write_app_user_id(run: Run, at: Any) -> ProfileWrite:
    return _guarded(run, set={"sf_app_user_id": run.detail["app_user_id"]})


def write_not_found(run: Run, at: Any) -> ProfileWrite:
    return _guarded(run, crm_log=crm_log_line("NbProfileNotFoundInSalesforce", at))


def write_unexpected(run: Run, at: Any) -> ProfileWrite:
    return _guarded(run, crm_log=crm_log_line("NbProfileUnexpectedRes", at, run.detail.get("error") or "no detail"))


BINDINGS = {
    "NotChecked": Act(each(check_profile, on_error="ScriptFailureLogged"),
                      frozenset({"RequestedContact", "ScriptFailureLogged"}), on_error="ScriptFailureLogged",
                      external=False),
    "RequestedContact": Act(request_contact, frozenset({"OkResponse", "NotFound", "UnexpectedResponse"}),
                            on_error="UnexpectedResponse"),
    "OkResponse": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="DbWriteOkErrorLogged"),
    "NotFound": Write(write_not_found, success="WroteNotFound", failure="DbWriteNotFoundErrorLogged"),
    "UnexpectedResponse": Write(write_unexpected, success="WroteUnexpectedResponse",
                                failure="DbWriteUnexpectedResFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
