"""A new user signs up (docs/diagrams/new_user_signup.mmd): create the Salesforce app user, write its id.

The create is the one non-idempotent CRM write. UserCreated records the request (email, names, language,
educator) and RequestAddToSalesforce is persisted with the run's fenced claim before the request goes out;
the request carries the Sefaria user id as ``external_id`` (an upsert where the org has that field). A
driver that finds this state claimed by another, unfinished driver looks the app user up by the recorded
email first (``adopt_request``): one found is the outcome; none found is a create only when that driver is
provably gone (it can send nothing more), else UnexpectedResponse marked ``outcome_unknown`` with nothing
sent. Every create is idempotent (the client upserts on the user id, or looks the email up first).

The profile document need not exist yet (Sefaria calls the signup before it saves the profile): the id is
recorded in the position's data and reaches the profile with ``heal`` once Sefaria has created it.
"""

from __future__ import annotations

from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_app_user_id, text_input

NAME = "new_user_signup"


REQUEST_FIELDS = ("email", "first_name", "last_name", "lang", "educator")


def user_created(run: Run, crm: Any) -> Outcome:
    """Record what will be sent, so whoever finishes this run knows what was asked."""
    request: dict[str, Any] = {}
    for field in REQUEST_FIELDS:
        value = run.inputs.get(field, run.profile.get(field, run.prior.get("request", {}).get(field)))
        if value is not None:
            request[field] = value
    return Outcome("RequestAddToSalesforce", {"request": request})


def _valid_request(run: Run) -> dict[str, Any]:
    """The recorded request, checked; ``ValueError`` says what is wrong."""
    request = dict(run.detail.get("request") or {})
    view = Run(profile_id=run.profile_id, profile={}, position=run.position, run_id=run.run_id, state=run.state,
               inputs=request)
    return {"email": text_input(view, "email", required=True),
            "first_name": text_input(view, "first_name", required=False) or "",
            "last_name": text_input(view, "last_name", required=False) or "",
            "lang": text_input(view, "lang", required=False) or "en",
            "educator": bool(request.get("educator", False))}


def _looked_up(crm: CrmConnectionManager, email: str) -> str | None:
    found = crm.find_crm_id(email)
    return found if isinstance(found, str) and found else None


def add_to_salesforce(run: Run, crm: CrmConnectionManager) -> Outcome:
    known = journaled_app_user_id(run)
    request = {"request": run.detail.get("request") or {}}
    if known:
        return Outcome("OK", {**request, "app_user_id": known, "source": "journal"})
    try:
        fields = _valid_request(run)
    except ValueError as exc:
        return Outcome("UnexpectedResponse", {**request, "error": f"invalid input, nothing sent: {exc}"})
    try:  # the client's create is idempotent: an upsert on the user id, or an email lookup first
        app_user_id = crm.add_user_to_crm(fields["email"], fields["first_name"], fields["last_name"],
                                          lang=fields["lang"], educator=fields["educator"], external_id=run.profile_id)
    except Exception as exc:
        return Outcome("UnexpectedResponse", {**request, **crm_failure(exc)})
    return Outcome("OK", {**request, "app_user_id": app_user_id})


def adopt_request(run: Run, crm: CrmConnectionManager) -> Outcome:
    """Another driver claimed this create and did not finish: its request may have gone out. Look first.
    Found: that is the outcome. Not found: if that driver is provably gone (killed), it can send nothing
    more, so the create goes out now (idempotent as every create is); if it may still be alive (paused past
    its claim, on another host), nothing is sent and the run ends "outcome unknown"."""
    request = {"request": run.detail.get("request") or {}}
    try:
        found = _looked_up(crm, _valid_request(run)["email"])
    except ValueError as exc:
        return Outcome("UnexpectedResponse", {**request, "error": f"invalid input, nothing sent: {exc}"})
    except Exception as exc:
        return Outcome("UnexpectedResponse", {**request, "outcome_unknown": True, **crm_failure(exc)})
    if found:
        return Outcome("OK", {**request, "app_user_id": found, "source": "adopted"})
    if run.adopted == "dead":
        return add_to_salesforce(run, crm)
    return Outcome("UnexpectedResponse", {**request, "outcome_unknown": True, "error": (
        "outcome unknown: another driver claimed this create and may still send it; no app user with this "
        "email yet. Nothing was sent; a resume creates it idempotently (upsert on the user id, or email lookup "
        "first)")})


def write_app_user_id(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={"sf_app_user_id": run.detail["app_user_id"]})


def write_error(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line("NewUserSalesforceWriteError", at,
                                             run.detail.get("error") or "no detail"))


BINDINGS = {
    "UserCreated": Act(each(user_created), frozenset({"RequestAddToSalesforce"}),
                       external=False),
    "RequestAddToSalesforce": Act(each(add_to_salesforce, on_error="UnexpectedResponse"),
                                  frozenset({"OK", "UnexpectedResponse"}), on_error="UnexpectedResponse",
                                  write_ahead=True, adopt=each(adopt_request, on_error="UnexpectedResponse")),
    "OK": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteSalesforceErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
