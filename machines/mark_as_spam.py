"""An administrator marks a user as spam (docs/diagrams/mark_as_spam.mmd): tell the CRM, record the outcome.

MarkedAsSpam reads the request: the action (``mark_as_spam``, or ``mark_for_review`` with a truthy
``review`` input) and the CRM id, the profile's ``sf_app_user_id``. RequestMarkAsSpamInCrm is persisted
before the request goes out (a CRM write) and calls ``mark_as_spam_in_crm(crm_id)`` or
``mark_for_review_in_crm(crm_id)``; what that does is the CRM client's business (NationBuilder deletes
the person, Salesforce sets ``Manual_Review_Required__c``). The outcome is recorded in
``crm_state.mark_as_spam``; no other profile field is written. A profile without ``sf_app_user_id`` is an
unexpected response recorded, with nothing sent.

``CrmLog`` codes:

- ``SpamMarkCrmWriteError-<datetime>: <action>: <error>``: the CRM refused or failed the request
  (WroteCrmErrorToDb), or nothing was sent because the profile has no CRM id.

LoggedDbFailure: the result's DB write failed and was journaled. Resuming a run that stopped there after
``OK`` (same action, same CRM id) records it without calling the CRM again (NationBuilder has deleted
the person by then).
"""

from __future__ import annotations

from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_ok

NAME = "mark_as_spam"
LOG_ERROR = "SpamMarkCrmWriteError"
MARK_AS_SPAM, MARK_FOR_REVIEW = "mark_as_spam", "mark_for_review"
#: The detail key marking a run whose CRM call succeeded (kept through the DB-failure edge).
ANSWER_OK = {"answer": "OK"}


def request_of(run: Run) -> dict[str, Any]:
    """The request: ``review`` from the caller's inputs, else the resumed run's action."""
    if "review" in run.inputs:
        action = MARK_FOR_REVIEW if run.inputs["review"] else MARK_AS_SPAM
    else:
        action = run.prior.get("action", MARK_AS_SPAM)
    crm_id = run.inputs.get("crm_id") or run.profile.get("sf_app_user_id")
    return {"action": action, "review": action == MARK_FOR_REVIEW,
            "crm_id": crm_id if isinstance(crm_id, str) and crm_id else None}



def marked_as_spam(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestMarkAsSpamInCrm", request_of(run))


def request_mark(run: Run, crm: CrmConnectionManager) -> Outcome:
    request = {k: run.detail.get(k) for k in ("action", "review", "crm_id")}
    if journaled_ok(run, request):
        return Outcome("OK", {**request, **ANSWER_OK, "source": "journal"})
    action, crm_id = request["action"], request["crm_id"]
    if action not in (MARK_AS_SPAM, MARK_FOR_REVIEW):
        return Outcome("UnexpectedResponse", {**request, "error": f"invalid input, nothing sent: action {action!r}"})
    if crm_id is None:
        return Outcome("UnexpectedResponse", {**request, "error": "invalid input, nothing sent: the profile has no "
                                                                  "sf_app_user_id"})
    try:
        if action == MARK_FOR_REVIEW:
            crm.mark_for_review_in_crm(crm_id)
        else:
            crm.mark_as_spam_in_crm(crm_id)
    except Exception as exc:
        return Outcome("UnexpectedResponse", {**request, **crm_failure(exc)})
    return Outcome("OK", {**request, **ANSWER_OK})


def write_ok(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite()  # the action and the outcome are the state's detail, written with it


def write_error(run: Run, at: Any) -> ProfileWrite:
    message = f"{run.detail.get('action')}: {run.detail.get('error') or 'no detail'}"
    return ProfileWrite(crm_log=crm_log_line(LOG_ERROR, at, message))


BINDINGS = {
    "MarkedAsSpam": Act(each(marked_as_spam), frozenset({"RequestMarkAsSpamInCrm"}), external=False),
    "RequestMarkAsSpamInCrm": Act(each(request_mark, on_error="UnexpectedResponse"),
                                  frozenset({"OK", "UnexpectedResponse"}), on_error="UnexpectedResponse",
                                  write_ahead=True),
    "OK": Write(write_ok, success="WroteMarkedAsSpam", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteCrmErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
