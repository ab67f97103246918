"""A user changes their account email (docs/diagrams/change_email.mmd): tell the CRM, record the outcome.

EmailChanged reads the request (the new email, from the caller's inputs, or from the run being resumed)
and the CRM id (the app user id the caller passes, else the profile's ``sf_app_user_id``), which does not
change. RequestEmailChangeInSalesforce
is persisted before the request goes out (a CRM write) and calls ``change_user_email(crm_id, new_email)``.
The run records the new email and the outcome in ``crm_state.change_email.detail``; it writes no other
profile field (Sefaria keeps emails in its SQL user table). A profile without ``sf_app_user_id``, or a
new email that is not a non-empty string, is an unexpected response recorded, with nothing sent.

``CrmLog`` codes:

- ``EmailChangeSalesforceWriteError-<datetime>: <error>``: the CRM refused or failed the change
  (WroteSalesforceErrorToDb), or nothing was sent because the request was invalid.

LoggedDbFailure: the result's DB write failed and was journaled. Resuming a run that stopped there after
``OK`` (same email, same CRM id) records it without calling the CRM again.
"""

from __future__ import annotations

from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_ok

NAME = "change_email"
LOG_ERROR = "EmailChangeSalesforceWriteError"
#: The detail key marking a run whose CRM call succeeded (kept through the DB-failure edge).
ANSWER_OK = {"answer": "OK"}


def request_of(run: Run) -> dict[str, Any]:
    """The request: the caller's ``new_email``, else the one the resumed run (``prior``) was sending."""
    new_email = run.inputs.get("new_email", run.prior.get("new_email"))
    crm_id = run.inputs.get("crm_id") or run.profile.get("sf_app_user_id")
    return {"new_email": new_email, "crm_id": crm_id if isinstance(crm_id, str) and crm_id else None}



def email_changed(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestEmailChangeInSalesforce", request_of(run))


def request_email_change(run: Run, crm: CrmConnectionManager) -> Outcome:
    request = {"new_email": run.detail.get("new_email"), "crm_id": run.detail.get("crm_id")}
    if journaled_ok(run, request):
        return Outcome("OK", {**request, **ANSWER_OK, "source": "journal"})
    new_email, crm_id = request["new_email"], request["crm_id"]
    if not isinstance(new_email, str) or not new_email.strip():
        return Outcome("UnexpectedResponse", {**request, "error": f"invalid input, nothing sent: new_email must be "
                                                                  f"a non-empty string, got {new_email!r}"})
    if crm_id is None:
        return Outcome("UnexpectedResponse", {**request, "error": "invalid input, nothing sent: the profile has no "
                                                                  "sf_app_user_id"})
    try:
        crm.change_user_email(crm_id, new_email)
    except Exception as exc:
        return Outcome("UnexpectedResponse", {**request, **crm_failure(exc)})
    return Outcome("OK", {**request, **ANSWER_OK})


def write_ok(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite()  # the new email and the outcome are the state's detail, written with it


def write_error(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line(LOG_ERROR, at, run.detail.get("error") or "no detail"))


BINDINGS = {
    "EmailChanged": Act(each(email_changed), frozenset({"RequestEmailChangeInSalesforce"}), external=False),
    "RequestEmailChangeInSalesforce": Act(each(request_email_change, on_error="UnexpectedResponse"),
                                          frozenset({"OK", "UnexpectedResponse"}), on_error="UnexpectedResponse",
                                          write_ahead=True),
    "OK": Write(write_ok, success="WroteEmailChange", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteSalesforceErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
