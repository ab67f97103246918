"""Validation of profiles that have a ``nationbuilder_id`` (docs/diagrams/nb_profile_validation.mmd).

NotChecked checks the profile, RequestedContact asks Salesforce for the app user holding that
NationBuilder id (one batched request for a whole batch of runs), and the three response states write
what was learnt: the app user id, or a ``CrmLog`` line the failure-state report is built on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_app_user_id

NAME = "nb_profile_validation"


def nationbuilder_id(profile: dict[str, Any]) -> int:
    """The profile's NationBuilder id as a positive int; anything else is a clear error."""
    value = profile.get("nationbuilder_id")
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip()):  # ASCII digits only
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"nationbuilder_id must be a positive integer below 2**63, got {shown}")
    return value


def check_profile(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestedContact", {"nationbuilder_id": nationbuilder_id(dict(run.profile))})


def request_contact(runs: Sequence[Run], crm: CrmConnectionManager) -> list[Outcome]:
    """One batched lookup for every run; a failed request sends the whole batch to UnexpectedResponse."""
    known = {id(run): app_user for run in runs if (app_user := journaled_app_user_id(run))}
    ask = sorted({run.detail["nationbuilder_id"] for run in runs if id(run) not in known})
    found: dict[int, str] = {}
    failure = None
    if ask:
        try:
            found = dict(crm.find_app_users_by_nationbuilder_ids(ask))
        except Exception as exc:
            failure = crm_failure(exc)
    outcomes = []
    for run in runs:
        nb = run.detail["nationbuilder_id"]
        if id(run) in known:
            outcomes.append(Outcome("OkResponse", {"nationbuilder_id": nb, "app_user_id": known[id(run)],
                                                   "source": "journal"}))
        elif failure is not None:
            outcomes.append(Outcome("UnexpectedResponse", {"nationbuilder_id": nb, **failure}))
        elif nb in found:
            outcomes.append(Outcome("OkResponse", {"nationbuilder_id": nb, "status": 200, "app_user_id": found[nb]}))
        else:
            outcomes.append(Outcome("NotFound", {"nationbuilder_id": nb, "status": 404}))
    return outcomes


def write_app_user_id(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={"sf_app_user_id": run.detail["app_user_id"]})


def write_not_found(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line("NbProfileNotFoundInSalesforce", at))


def write_unexpected(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line("NbProfileUnexpectedRes", at, run.detail.get("error") or "no detail"))


BINDINGS = {
    "NotChecked": Act(each(check_profile, on_error="ScriptFailureLogged"), frozenset({"RequestedContact"}),
                      on_error="ScriptFailureLogged", external=False),
    "RequestedContact": Act(request_contact, frozenset({"OkResponse", "NotFound", "UnexpectedResponse"}),
                            on_error="UnexpectedResponse"),
    "OkResponse": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="DbWriteOkErrorLogged"),
    "NotFound": Write(write_not_found, success="WroteNotFound", failure="DbWriteNotFoundErrorLogged"),
    "UnexpectedResponse": Write(write_unexpected, success="WroteUnexpectedResponse",
                                failure="DbWriteUnexpectedResFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
