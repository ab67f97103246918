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

Batched signups (``crm-states signup --pending``, ``crm_states.sweep``) mark their runs ``batch``: those runs'
creates go out together, in sObject Collections requests of up to 200 records (``create_app_users``, one API
request each, ``allOrNone: false``), after ONE packed lookup of all the emails driven together (the sweep
drives up to 10,000 runs at once: one composite request of five 2,000-email queries; users migrated from
NationBuilder without an id already have an App User, which carries no external id): an App User with that
email is adopted, several are a failure (never a create). Each record's own answer is its run's outcome; a
request whose answer is lost ends its runs "outcome unknown", never re-sent blindly. The write-ahead commit
of the batch takes every run's claim before the request, as a single signup's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crm_states.crm import CrmConnectionManager
from crm_states.crm.errors import CrmBatchOutcomeUnknown, CrmConfigError, transient_error_text
from crm_states.crm.results import Matches, NewAppUser, RecordResult, normalise_email
from crm_states.engine import Act, Halt, Outcome, Run, StateMachine, Write, each
from crm_states.records import Position, ProfileWrite, crm_log_line

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
    batch = run.inputs.get("batch", run.prior.get("batch"))  # True, or the records per create request
    return Outcome("RequestAddToSalesforce", {"request": request, **({"batch": batch} if batch else {})})


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


# --- batches (the sweep) -------------------------------------------------------------------------------------

#: Records per sObject Collections request (Salesforce's limit).
BATCH_RECORDS = 200
#: How many candidate ids an ambiguous email's detail lists.
SHOWN_CANDIDATES = 10


def add_batch(runs: Sequence[Run], crm: CrmConnectionManager) -> list[Outcome]:
    """RequestAddToSalesforce for a batch: runs marked ``batch`` together (an email lookup, then
    collections creates) where the CRM can create in batches; every other run alone, as a single signup."""
    return _split(runs, crm, lambda batch: _batch_outcomes(batch, crm, look_up=True), add_to_salesforce)


def adopt_batch(runs: Sequence[Run], crm: CrmConnectionManager) -> list[Outcome]:
    """The takeover of claimed creates: batch runs are looked up by email together (one packed lookup);
    found is the outcome, none found is a create only when the old holder is provably gone."""
    return _split(runs, crm, lambda batch: _adopted_outcomes(batch, crm), adopt_request)


def _split(runs: Sequence[Run], crm: CrmConnectionManager, together: Any, alone: Any) -> list[Outcome]:
    batch = [run for run in runs if run.detail.get("batch")]
    decided = together(batch) if batch and _creates_in_batches(crm) else {}
    single = each(alone, on_error="UnexpectedResponse")
    return [decided[id(run)] if id(run) in decided else single([run], crm)[0] for run in runs]


def _creates_in_batches(crm: Any) -> bool:
    """The Salesforce client does; NONE, LOG and NationBuilder create one by one. A CRM that is not
    configured is asked nothing here: the runs go one by one (a journaled id needs no CRM)."""
    try:
        return hasattr(crm, "create_app_users")
    except CrmConfigError:
        return False


def _adopted_outcomes(runs: list[Run], crm: CrmConnectionManager) -> dict[int, Outcome]:
    dead = [run for run in runs if run.adopted == "dead"]
    decided = _batch_outcomes(runs, crm, look_up=True, create=dead)
    for run in runs:
        if run.adopted != "dead" and decided.get(id(run), Outcome("")).dest == "":
            decided[id(run)] = Outcome("UnexpectedResponse", {**_request(run), "outcome_unknown": True, "error": (
                "outcome unknown: another driver claimed this create and may still send it; no app user with this "
                "email yet. Nothing was sent; a resume creates it (upsert on the user id, or email lookup first)")})
    return decided


def _request(run: Run) -> dict[str, Any]:
    return {"request": run.detail.get("request") or {}, "batch": run.detail.get("batch") or True}


def _records_per_request(sending: list[tuple[Run, dict[str, Any]]]) -> int:
    """The batch size the sweep asked for (its runs record it), else Salesforce's most."""
    asked = sending[0][0].detail.get("batch") if sending else None
    return asked if type(asked) is int and 1 <= asked <= BATCH_RECORDS else BATCH_RECORDS


def _batch_outcomes(runs: list[Run], crm: CrmConnectionManager, *, look_up: bool,
                    create: list[Run] | None = None) -> dict[int, Outcome]:
    """Outcomes by ``id(run)``: journaled ids, invalid input, the email lookup's adoptions and ambiguities,
    then the creates of the runs still without an App User (only those in ``create`` when given; the others
    get no outcome here: an empty ``dest``)."""
    decided: dict[int, Outcome] = {}
    valid: list[tuple[Run, dict[str, Any]]] = []
    for run in runs:
        if known := journaled_app_user_id(run):
            decided[id(run)] = Outcome("OK", {**_request(run), "app_user_id": known, "source": "journal"})
            continue
        try:
            valid.append((run, _valid_request(run)))
        except ValueError as exc:
            decided[id(run)] = Outcome("UnexpectedResponse", {**_request(run),
                                                               "error": f"invalid input, nothing sent: {exc}"})
    if look_up and valid:
        try:
            found = crm.lookup_app_users_by_emails([fields["email"] for _, fields in valid])
        except Exception as exc:  # nothing was sent; the daily limit or no CRM halts the batch
            failure = crm_failure(exc)  # a run taken over may have had its create sent by the old holder
            return {**decided, **{id(run): Outcome("UnexpectedResponse", {
                **_request(run), **failure, **({"outcome_unknown": True} if run.adopted else {})}) for run, _ in valid}}
        unmatched = []
        for run, fields in valid:
            matches = found.get(normalise_email(fields["email"]))
            if matches is None:
                unmatched.append((run, fields))
            else:
                decided[id(run)] = _email_outcome(run, matches)
        valid = unmatched
    allowed = None if create is None else {id(run) for run in create}
    sending = [(run, fields) for run, fields in valid if allowed is None or id(run) in allowed]
    for run, _ in valid:
        decided.setdefault(id(run), Outcome(""))
    decided.update(_create(sending, crm))
    return decided


def _email_outcome(run: Run, matches: Matches) -> Outcome:
    if matches.single is not None:
        return Outcome("OK", {**_request(run), "app_user_id": matches.single, "source": "adopted by email"})
    shown = ", ".join(matches.ids[:SHOWN_CANDIDATES])
    refused = f"; {len(matches.rejected)} records refused" if matches.rejected else ""
    error = (f"{len(matches.ids)} App Users hold this email{': ' + shown if shown else ''}{refused}; none adopted, "
             "nothing created")
    return Outcome("UnexpectedResponse", {**_request(run), "candidates": list(matches.ids[:SHOWN_CANDIDATES]),
                                          "error": error[:300]})


def _create(sending: list[tuple[Run, dict[str, Any]]], crm: Any) -> dict[int, Outcome]:
    """One collections request per batch of runs (at most ``BATCH_RECORDS``); each record's answer is its
    run's outcome."""
    decided: dict[int, Outcome] = {}
    sent = False
    size = _records_per_request(sending)
    for start in range(0, len(sending), size):
        chunk = sending[start:start + size]
        users = [NewAppUser(f["email"], f["first_name"], f["last_name"], f["lang"], f["educator"], run.profile_id)
                 for run, f in chunk]
        try:
            results: Sequence[RecordResult] = crm.create_app_users(users)
        except CrmBatchOutcomeUnknown as exc:
            done = {r.index: r for r in exc.completed if isinstance(r, RecordResult)}
            for index, (run, _) in enumerate(chunk):
                decided[id(run)] = (_record_outcome(run, done[index]) if index in done else _unknown(run, str(exc))
                                    if index in exc.in_doubt else _not_sent(run, str(exc)))
            sent = True
            continue
        except Exception as exc:
            try:
                failure = crm_failure(exc)  # refused whole: nothing of this request was created
            except Halt as halt:
                if not sent:
                    raise
                failure = {"error": f"not sent: {halt}"}
            for run, _ in sending[start:]:
                decided[id(run)] = Outcome("UnexpectedResponse", {**_request(run), **failure, "not_sent": True})
            return decided
        sent = True
        for result in results:
            run = chunk[result.index][0]
            decided[id(run)] = _record_outcome(run, result)
    return decided


def _record_outcome(run: Run, result: RecordResult) -> Outcome:
    if result.ok and result.id:
        return Outcome("OK", {**_request(run), "app_user_id": result.id, "source": "created" if result.created
                              else "upserted onto an existing record"})
    error = result.error
    assert error is not None
    if error.status_code == "INVALID_ANSWER":  # Salesforce said success with an id we refused: it may exist
        return _unknown(run, error.message)
    return Outcome("UnexpectedResponse", {**_request(run), "error": f"{error.status_code}: {error.message}"[:300],
                                          "fields": list(error.fields)})


def _unknown(run: Run, why: str) -> Outcome:
    return Outcome("UnexpectedResponse", {**_request(run), "outcome_unknown": True, "error": (
        f"outcome unknown, not re-sent: {why}")[:300]})


def _not_sent(run: Run, why: str) -> Outcome:
    return Outcome("UnexpectedResponse", {**_request(run), "not_sent": True,
                                          "error": f"not sent (an earlier request's outcome is unknown): {why}"[:300]})


def needs_signup(position: Position) -> bool:
    """Whether a user without an app user id is the sweep's to sign up: never started, stopped half-way (a
    worker died), a DB failure (the journaled id is written without the CRM), or a CRM failure worth trying
    again (transient, outcome unknown, not sent). A CRM refusal (a required field, a duplicate) waits for
    an operator: sending it again would be refused again."""
    if position.state is None or position.state not in SPEC.terminal or position.state == "LoggedDbFailure":
        return True
    detail = position.detail
    return position.state == "WroteSalesforceErrorToDb" and bool(
        detail.get("outcome_unknown") or detail.get("not_sent") or transient_error_text(detail.get("error")))


def write_app_user_id(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(set={"sf_app_user_id": run.detail["app_user_id"]})


def write_error(run: Run, at: Any) -> ProfileWrite:
    return ProfileWrite(crm_log=crm_log_line("NewUserSalesforceWriteError", at,
                                             run.detail.get("error") or "no detail"))


BINDINGS = {
    "UserCreated": Act(each(user_created), frozenset({"RequestAddToSalesforce"}),
                       external=False),
    "RequestAddToSalesforce": Act(add_batch, frozenset({"OK", "UnexpectedResponse"}), on_error="UnexpectedResponse",
                                  write_ahead=True, adopt=adopt_batch),
    "OK": Write(write_app_user_id, success="WroteSalesforceAppUserUid", failure="LoggedDbFailure"),
    "UnexpectedResponse": Write(write_error, success="WroteSalesforceErrorToDb", failure="LoggedDbFailure"),
}

SPEC = StateMachine.from_file(diagram_path(NAME), BINDINGS)
MACHINE = SPEC.machine
