"""Someone signs up for mailing lists (docs/diagrams/mailing_list_signup.mmd): send the email, record it.

SignedUpForMailingList reads the request (email, lists, optional names, language, educator: from the
caller's inputs, or from the run being resumed) into the run's detail. RequestAddToMailingLists is
persisted before the request goes out (a CRM write) and calls ``add_email_to_mailing_lists``. The email is
all that identifies the person to the CRM: no CRM id comes back and none is stored. An empty list is a
signup to the CRM's default newsletter lists (Sefaria's default newsletter form sends none). An email that
is not a non-empty string, or lists that are not a list of non-empty strings, is an unexpected response
recorded, with nothing sent.

Where a run is persisted. The signup may come from someone without a Sefaria account. Runs live in the
project's own collection, not in Sefaria's documents, so such a signup needs no document at all: its runs
are kept under ``signup_id(email)``, a *negative* id derived from the normalised email, so it can never be a
Sefaria user id (those are positive), the same address always maps to the same runs (a second signup is a
new run, with its history kept), and no lookup is needed to find it again. A signed-in user's signup runs
under their own user id.

``CrmLog`` codes:

- ``MailingListSignupSalesforceWriteError-<datetime>: <error>``: the CRM refused or failed the signup
  (WroteSalesforceErrorToDb), or nothing was sent because the request was invalid.

LoggedDbFailure: the result's DB write failed and was journaled. Resuming a run that stopped there after
``OK`` records it without sending the signup again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure, journaled_ok

NAME = "mailing_list_signup"
LOG_ERROR = "MailingListSignupSalesforceWriteError"
REQUEST_FIELDS = ("email", "lists", "first_name", "last_name", "lang", "educator")
#: The detail key marking a run whose CRM call succeeded (kept through the DB-failure edge).
ANSWER_OK = {"answer": "OK"}


def normalise_email(email: str) -> str:
    return email.strip().lower()


def signup_id(email: str) -> int:
    """The negative document id of a signup without a Sefaria account: the same for the same address
    (case and surrounding spaces aside), never a Sefaria user id, within MongoDB's int64."""
    if not isinstance(email, str) or not email.strip():
        raise ValueError(f"email must be a non-empty string, got {email!r}")
    digest = hashlib.sha256(normalise_email(email).encode("utf-8")).digest()
    return -(int.from_bytes(digest[:7], "big") + 1)


def request_of(run: Run) -> dict[str, Any]:
    """The request from the caller's inputs when it gave an email, else the resumed run's."""
    source: Mapping[str, Any] = run.inputs if "email" in run.inputs else run.prior
    request = {field: source.get(field) for field in REQUEST_FIELDS}
    if request["lang"] is None:
        request["lang"] = "en"
    request["educator"] = bool(request["educator"])
    lists = request["lists"]
    if isinstance(lists, (set, frozenset)):
        request["lists"] = sorted(lists)
    elif isinstance(lists, tuple):
        request["lists"] = list(lists)
    return request


def invalid(request: Mapping[str, Any]) -> str | None:
    email, lists = request["email"], request["lists"]
    if not isinstance(email, str) or not email.strip():
        return f"email must be a non-empty string, got {email!r}"
    if not isinstance(lists, list) or not all(isinstance(x, str) and x for x in lists):
        return f"lists must be a list of list names (empty: the default lists), got {lists!r}"
    for field in ("first_name", "last_name", "lang"):
        if request[field] is not None and not isinstance(request[field], str):
            return f"{field} must be a string, got {type(request[field]).__name__}"
    return None


def signed_up(run: Run, crm: Any) -> Outcome:
    return Outcome("RequestAddToMailingLists", request_of(run))


def request_add_to_lists(run: Run, crm: CrmConnectionManager) -> Outcome:
    request = {field: run.detail.get(field) for field in REQUEST_FIELDS}
    if journaled_ok(run, request):
        return Outcome("OK", {**request, **ANSWER_OK, "source": "journal"})
    problem = invalid(request)
    if problem:
        return Outcome("UnexpectedResponse", {**request, "error": f"invalid input, nothing sent: {problem}"})
    try:
        crm.add_email_to_mailing_lists(request["email"], list(request["lists"]), first_name=request["first_name"],
                                       last_name=request["last_name"], lang=request["lang"],
                                       educator=request["educator"])
    except Exception as exc:
        return Outcome("UnexpectedResponse", {**request, **crm_failure(exc)})
    return Outcome("OK", {**request, **ANSWER_OK})


def write_ok(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite()  # the request and the outcome are the state's detail, written with it


def write_error(run: Run, at: Any) -> ProfileWrite:
    """The ``CrmLog`` line goes to a Sefaria user's profile; a signup without an account has no profile
    (its run lives only in the project's collection), so its error is in the run's history alone."""
    if run.profile_id < 0:
        return ProfileWrite()
    return ProfileWrite(crm_log=crm_log_line(LOG_ERROR, at, run.detail.get("error") or "no detail"))


BINDINGS = {
    "SignedUpForMailingList": Act(each(signed_up), frozenset({"RequestAddToMailingLists"}), external=False),
    "RequestAddToMailingLists": Act(each(request_add_to_lists, on_error="UnexpectedResponse"),
                                    frozenset({"OK", "UnexpectedResponse"}), on_error="UnexpectedResponse",
                                    write_ahead=True),
    "OK": Write(write_ok, success="WroteMailingListSignup", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteSalesforceErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
