"""A new user signs up (docs/diagrams/new_user_signup.mmd): create the Salesforce app user, write its id.

The create is the one non-idempotent CRM write, so RequestAddToSalesforce is persisted before the
request goes out and the request carries the Sefaria user id as ``external_id``: a retry after a crash
finds the app user it already made instead of making a second one.
"""

from __future__ import annotations

from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_app_user_id, text_input

NAME = "new_user_signup"


def user_created(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestAddToSalesforce")


def add_to_salesforce(run: Run, crm: CrmConnectionManager) -> Outcome:
    known = journaled_app_user_id(run)
    if known:
        return Outcome("OK", {"app_user_id": known, "source": "journal"})
    try:
        email = text_input(run, "email", required=True)
        first_name = text_input(run, "first_name", required=False) or ""
        last_name = text_input(run, "last_name", required=False) or ""
        lang = text_input(run, "lang", required=False) or "en"
        educator = bool(run.inputs.get("educator", run.profile.get("educator", False)))
    except ValueError as exc:
        return Outcome("UnexpectedResponse", {"error": f"invalid input, nothing sent: {exc}"})
    try:
        app_user_id = crm.add_user_to_crm(email, first_name, last_name, lang=lang, educator=educator,
                                          external_id=run.profile_id)
    except Exception as exc:
        return Outcome("UnexpectedResponse", crm_failure(exc))
    return Outcome("OK", {"app_user_id": app_user_id})


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
                                  write_ahead=True),
    "OK": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteSalesforceErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
