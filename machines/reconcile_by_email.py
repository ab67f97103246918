"""Resolving migrated users who have no nationbuilder_id (docs/diagrams/reconcile_by_email.mmd).

The design document leaves "App Users migrated from Nationbuilder that don't have nationbuilder ID" as an
open TODO. Sefaria's own attempt (``scripts/resolve_crm_users.py``) matched an exported report by email.
This machine does the same against Salesforce itself, for one profile at a time in batches, and unlike a
signup it never creates an App User:

- NotChecked records the user's email (``inputs["email"]``: Sefaria keeps emails in Django's ``auth_user``,
  see ``crm_states.reconcile``) and what the profile held when read (``sf_app_user_id``, which may be a
  ``pending:``/``dummy:`` placeholder of the interim log mode, never a Salesforce id, and
  ``nationbuilder_id``).
- RequestedAppUser looks the App Users up by email, one packed request for the whole batch
  (``lookup_app_users_by_emails``: compared case-insensitively after trimming, SOQL-escaped). It is
  write-ahead: the write of an id takes the profile out of the pending set, so the run is committed first.
  A lookup is a read: a driver that takes over a killed one's claim simply asks again.
- Exactly one App User: its id (an App User id, never a Contact id) is written as ``sf_app_user_id`` under
  a compare-and-set (``ProfileWrite.expect``): only while the profile still holds what was read (or already
  that id), so an id someone else wrote is never overwritten. An App User already held by another profile,
  or matched by two profiles of one batch, is ambiguous, never given twice. None: EmailNotFound, with a
  ``CrmLog`` line. Several: AmbiguousResponse, listing the candidates. A profile that got an id (or a
  nationbuilder_id) while its lookup ran: ResolvedElsewhere, nothing written.

``CrmLog`` codes: ``EmailReconcileNotFoundInSalesforce-<datetime>``, ``EmailReconcileAmbiguous-<datetime>:
<candidates>``, ``EmailReconcileUnexpectedRes-<datetime>: <error>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import attrs

from crm_states.crm import CrmConnectionManager
from crm_states.crm.dummy import DUMMY_ID_PREFIX
from crm_states.crm.log import PENDING_PREFIX
from crm_states.crm.results import Matches, normalise_email
from crm_states.engine import Act, Outcome, Run, StateMachine, Write, each
from crm_states.records import ProfileWrite, crm_log_line

from . import diagram_path
from ._common import crm_failure

NAME = "reconcile_by_email"
APP_USER = "sf_app_user_id"
NB_FIELD = "nationbuilder_id"
SHOWN_CANDIDATES = 10
NOT_FOUND, AMBIGUOUS, UNEXPECTED = ("EmailReconcileNotFoundInSalesforce", "EmailReconcileAmbiguous",
                                    "EmailReconcileUnexpectedRes")

#: ``holders(app user ids) -> {app user id: [profile ids holding it]}``: a read of Sefaria's profiles.
Holders = Callable[[Collection[str]], Mapping[str, Sequence[int]]]


@attrs.frozen
class Context:
    """What the effects are given: the CRM, and a read of the profiles that already hold App User ids."""

    crm: CrmConnectionManager
    holders: Holders | None = None


def placeholder(value: Any) -> bool:
    """A ``pending:`` (``CRM_TYPE=LOG``) or ``dummy:`` (``CRM_TYPE=NONE``) id: never a Salesforce one."""
    return isinstance(value, str) and value.startswith((PENDING_PREFIX, DUMMY_ID_PREFIX))


def real_app_user(value: Any) -> str | None:
    """The profile's App User id when it holds a real one (not empty, not a placeholder)."""
    return value if isinstance(value, str) and value.strip() and not placeholder(value) else None


def unresolved(profile: Mapping[str, Any]) -> bool:
    """Neither a nationbuilder_id nor a real App User id: what this machine is for."""
    return not profile.get(NB_FIELD) and real_app_user(profile.get(APP_USER)) is None


def check(run: Run, context: Any) -> Outcome:
    email = run.inputs["email"] if "email" in run.inputs else run.prior.get("email", run.profile.get("email"))
    read = {APP_USER: run.profile.get(APP_USER), NB_FIELD: run.profile.get(NB_FIELD)}
    if not isinstance(email, str) or not normalise_email(email):
        return Outcome("ScriptFailureLogged", {"email": None, **read, "error": "the user has no email to look up"})
    return Outcome("RequestedAppUser", {"email": normalise_email(email), **read})


def request_app_users(runs: Sequence[Run], context: Any) -> list[Outcome]:
    """One packed lookup for the batch's emails; a failed request sends every run to UnexpectedResponse
    (the CRM's API limit halts the batch instead: the runs stay here and a later run asks again)."""
    crm, holders = (context.crm, context.holders) if isinstance(context, Context) else (context, None)
    found: dict[str, Matches] = {}
    failure = None
    try:
        found = dict(crm.lookup_app_users_by_emails(sorted({run.detail["email"] for run in runs})))
    except Exception as exc:
        failure = crm_failure(exc)
    singles = [m.single for run in runs if (m := found.get(run.detail["email"])) and m.single]
    twice = {x for x, n in Counter(singles).items() if n > 1}
    held = dict(holders(sorted(set(singles)))) if holders and singles and failure is None else {}
    return [_outcome(run, found.get(run.detail["email"]), failure, twice, held) for run in runs]


def _outcome(run: Run, matches: Matches | None, failure: Mapping[str, Any] | None, twice: Collection[str],
             held: Mapping[str, Sequence[int]]) -> Outcome:
    base = dict(run.detail)
    single = matches.single if matches is not None else None
    now = run.profile.get(APP_USER)
    if run.profile.get(NB_FIELD):
        return Outcome("ResolvedElsewhere", {**base, "error": "the profile now holds a nationbuilder_id"})
    if real_app_user(now) and now != base.get(APP_USER) and now != single:
        return Outcome("ResolvedElsewhere", {**base, "error": "the profile now holds an App User id"})
    if failure is not None:
        return Outcome("UnexpectedResponse", {**base, **failure})
    if matches is None:
        return Outcome("EmailNotFound", {**base, "status": 404})
    if single is None and len(matches.ids) > 1:
        return Outcome("AmbiguousResponse", {**base, **_candidates(matches.ids),
                                             "error": f"{len(matches.ids)} App Users have this email: "
                                                      f"{_listed(matches.ids)}"})
    if single is None:
        return Outcome("UnexpectedResponse", {**base, "error": f"{len(matches.rejected)} records refused: "
                                                               f"{'; '.join(matches.rejected[:3])}"[:300]})
    others = sorted(pid for pid in held.get(single, ()) if pid != run.profile_id)
    if others or single in twice:
        whom = f"profiles {', '.join(map(str, others[:SHOWN_CANDIDATES]))}" if others else \
            "another profile of this batch, with the same email"
        return Outcome("AmbiguousResponse", {**base, **_candidates([single]), "held_by": others[:SHOWN_CANDIDATES],
                                             "error": f"App User {single} is already claimed by {whom}: "
                                                      "not given twice"})
    return Outcome("OkResponse", {**base, "status": 200, "app_user_id": single})


def _candidates(ids: Sequence[str]) -> dict[str, Any]:
    return {"candidates": list(ids[:SHOWN_CANDIDATES]), "status": 300}


def _listed(ids: Sequence[str]) -> str:
    more = f" and {len(ids) - SHOWN_CANDIDATES} more" if len(ids) > SHOWN_CANDIDATES else ""
    return ", ".join(ids[:SHOWN_CANDIDATES]) + more


def _expected(run: Run) -> dict[str, Any]:
    """The compare-and-set every write of a run is applied under: the profile as NotChecked read it."""
    return {APP_USER: run.detail.get(APP_USER), NB_FIELD: run.detail.get(NB_FIELD)}


def write_app_user_id(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={APP_USER: run.detail["app_user_id"]}, expect=_expected(run), requires_profile=True)


def _log(code: str) -> Callable[[Run, Any], ProfileWrite]:
    """A ``CrmLog`` line stamped with the time the lookup was committed (RequestedAppUser, write-ahead): a
    run finished again after a crash writes the very same line, never a second line of one finding."""
    def write(run: Run, at: Any) -> ProfileWrite:
        message = None if code == NOT_FOUND else (run.detail.get("error") or "no detail")
        return ProfileWrite(crm_log=crm_log_line(code, run.position.at or at, message), expect=_expected(run),
                            requires_profile=True)

    return write


BINDINGS = {
    "NotChecked": Act(each(check, on_error="ScriptFailureLogged"),
                      frozenset({"RequestedAppUser", "ScriptFailureLogged"}), on_error="ScriptFailureLogged",
                      external=False),
    "RequestedAppUser": Act(request_app_users, frozenset({"OkResponse", "EmailNotFound", "AmbiguousResponse",
                                                          "UnexpectedResponse", "ResolvedElsewhere"}),
                            on_error="UnexpectedResponse", write_ahead=True, adopt=request_app_users),
    "OkResponse": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="DbWriteOkErrorLogged"),
    "EmailNotFound": Write(_log(NOT_FOUND), success="WroteEmailNotFound", failure="DbWriteEmailNotFoundErrorLogged"),
    "AmbiguousResponse": Write(_log(AMBIGUOUS), success="WroteAmbiguousResponse",
                               failure="DbWriteAmbiguousErrorLogged"),
    "UnexpectedResponse": Write(_log(UNEXPECTED), success="WroteUnexpectedResponse",
                                failure="DbWriteUnexpectedResFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
