"""``crm-states report``: where the profiles stand in each machine, and what to do about it.

- default: per machine, every diagram state with its count, its kind (final / stopped / db failure), the
  oldest and newest time a profile entered it, and for each failure state the design document's handling
  note (docs CRM.md, "Handling failure states");
- ``--json``: the same data as one JSON document, ``machine -> state -> {count, oldest, newest, kind, note}``;
- ``--state S --csv FILE``: the profiles now in S, streamed from a cursor into a CSV (``-``: stdout;
  ``crm_states.report_profiles``, re-exported here);
- ``--mermaid``: the machine's ``stateDiagram-v2`` with each state's count in its label.

The counts and times come from ONE aggregation per machine over the project's ``crm_positions``
(``$group`` by state, on the (machine, state, at) index).
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import attrs
from pymongo.database import Database

from .api import MACHINES
from .engine import StateMachine
from .records import iso
from .report_profiles import CSV_COLUMNS, export_csv, first_in_state  # noqa: F401  (report's API, stable)
from .store import Store, heal

# --- kinds of states --------------------------------------------------------------------------------
FINAL = "final"  # the diagram's happy end (an edge to [*])
STOPPED = "stopped"  # a terminal state that is not final: a failure someone has to look at
DB_FAILURE = "db failure"  # a Write state's failure edge: the intended write is in the journal
INTERMEDIATE = "intermediate"  # has outgoing edges: a profile here is a run stopped half-way
UNKNOWN = "not in diagram"  # in the database but not in today's diagram (renamed or removed state)
FAILURE_KINDS = frozenset({STOPPED, DB_FAILURE})  # what an operator has to act on

#: Handling of each failure state, quoted or closely paraphrased from the design document (CRM.md,
#: 'Handling "Failure States"'), with the command of this project that does the step.
NOTES: Mapping[str, Mapping[str, str]] = {
    "nb_profile_validation": {
        "ScriptFailureLogged":
            "The script to validate users did not complete. Debug errors (the position's detail.error holds "
            "the error: `crm-states report --machine nb_profile_validation --state ScriptFailureLogged --csv -`) "
            "and re-run the script: `crm-states resume --machine "
            "nb_profile_validation --state ScriptFailureLogged`.",
        "DbWriteOkErrorLogged":
            "The user was found in Salesforce but there was an issue writing data to the database. Manually "
            "resolve this (or write another script to handle these folks). The app user id was journaled: "
            "`crm-states replay <journal>` writes it, and `crm-states resume` writes it without asking "
            "Salesforce again.",
        "DbWriteNotFoundErrorLogged":
            "ErrorLogged status: the 404 result should have been written to Mongo but was not. Pull these from "
            "the logs and write to Mongo: `crm-states replay <journal>` (the journal file or the application log).",
        "WroteNotFound":
            "The user was not in Salesforce but has a Nationbuilder ID: possibly a spam user that was not "
            "deleted properly, OR there was an issue migrating the user. Create a CSV of these users "
            "(`crm-states report --machine nb_profile_validation --state WroteNotFound --csv FILE`) and decide "
            "with MarComs how to resolve them. These have `NbProfileNotFoundInSalesforce-datetime` in their "
            "`CrmLog` on Mongo.",
        "WroteUnexpectedResponse":
            "Manually look through these and figure out what went wrong. These have "
            "`NbProfileUnexpectedRes-datetime: {error message}` in their `CrmLog` on Mongo. Once the cause is "
            "fixed, `crm-states resume --machine nb_profile_validation --state WroteUnexpectedResponse` asks again.",
        "DbWriteUnexpectedResFailure":
            "ErrorLogged status: the unexpected response should have been written to Mongo but was not. Pull "
            "these from the logs and write to Mongo: `crm-states replay <journal>` (the journal file or the "
            "application log).",
    },
    "new_user_signup": {
        "WroteSalesforceErrorToDb":
            "These need to be checked and debugged. They have `NewUserSalesforceWriteError-datetime: "
            "{error message}` in their `CrmLog` on Mongo. Once fixed, `crm-states resume --machine "
            "new_user_signup --state WroteSalesforceErrorToDb` tries again (never a second app user).",
        "LoggedDbFailure":
            "Manually resolve. The database write failed; after OK the app user already exists in Salesforce "
            "and its id was journaled: pull it from the logs and write it to Mongo with `crm-states replay "
            "<journal>`, or `crm-states resume --machine new_user_signup --state LoggedDbFailure` writes it "
            "without calling Salesforce again. Never create these users anew.",
    },

    "change_email": {
        "WroteSalesforceErrorToDb":
            "Check and debug these. They have `EmailChangeSalesforceWriteError-datetime: {error message}` in their "
            "`CrmLog` on Mongo (\"the profile has no sf_app_user_id\": nothing was sent; validate or sign up the "
            "profile first). Once fixed, `crm-states resume --machine change_email --state WroteSalesforceErrorToDb` "
            "sends the change again.",
        "LoggedDbFailure":
            "The database write of the result failed and was journaled. After OK Salesforce already has the new "
            "email: `crm-states resume --machine change_email --state LoggedDbFailure` records it without a second "
            "request (after an unexpected response it asks again); `crm-states replay <journal>` restores the "
            "journaled history and CrmLog line.",
    },
    "mark_as_spam": {
        "WroteCrmErrorToDb":
            "Check and debug these. They have `SpamMarkCrmWriteError-datetime: {action}: {error message}` in their "
            "`CrmLog` on Mongo. Once fixed, `crm-states resume --machine mark_as_spam --state WroteCrmErrorToDb` "
            "sends the same action (spam or review) again.",
        "LoggedDbFailure":
            "The database write of the result failed and was journaled. After OK the CRM already acted (NationBuilder "
            "deleted the person, Salesforce flagged the app user): `crm-states resume --machine mark_as_spam --state "
            "LoggedDbFailure` records it without calling the CRM again; `crm-states replay <journal>` restores the "
            "journaled history and CrmLog line.",
    },
    "mailing_list_signup": {
        "WroteSalesforceErrorToDb":
            "Check and debug these. They have `MailingListSignupSalesforceWriteError-datetime: {error message}` in "
            "their `CrmLog` on Mongo (documents with a negative id and `mailing_list_only` are signups without a "
            "Sefaria account). Once fixed, `crm-states resume --machine mailing_list_signup --state "
            "WroteSalesforceErrorToDb` sends the signup again.",
        "LoggedDbFailure":
            "The database write of the result failed and was journaled. After OK the CRM has the signup: "
            "`crm-states resume --machine mailing_list_signup --state LoggedDbFailure` records it without sending it "
            "again; `crm-states replay <journal>` restores the journaled history and CrmLog line.",
    },
    "sync_sustainers": {
        "WroteUnexpectedResponse":
            "The sustainer status could not be read for these profiles (a resumed run whose read failed, or a "
            "profile without sf_app_user_id). They have `SustainerSyncUnexpectedRes-datetime: {error message}` in "
            "their `CrmLog` on Mongo. The next weekly `crm-states sync-sustainers` reads the whole set again; "
            "`crm-states resume --machine sync_sustainers --state WroteUnexpectedResponse` reads it now.",
        "LoggedDbFailure":
            "The write of is_sustainer failed and was journaled. `crm-states resume --machine sync_sustainers "
            "--state LoggedDbFailure` writes the journaled status without reading the CRM again (`crm-states "
            "replay` restores the history, but never overwrites an is_sustainer that holds the other value); the "
            "next weekly sync writes the then-current status anyway.",
    },
    "retire_nb_ids": {
        "ScriptFailureLogged":
            "The retirement could not check the profile (the position's detail.error says why; e.g. no "
            "nationbuilder_id to retire, or a resume without a validation). Nothing was removed. Run `crm-states "
            "retire-nb-ids` again, which reads each profile's validation afresh.",
        "ValidationNoLongerHolds":
            "Not retired: the profile's validation no longer speaks for it (its sf_app_user_id changed or vanished "
            "since, or its nationbuilder_id is not validated or its failure state was not accepted). Export them "
            "(`crm-states report --machine retire_nb_ids --state ValidationNoLongerHolds --csv FILE`); `crm-states "
            "heal` restores an erased sf_app_user_id, then `crm-states retire-nb-ids` retires them. With "
            "detail.after_recording the value was recorded first: `--undo` covers them.",
        "DbWriteRemovalErrorLogged":
            "MongoDB refused the removal (journaled). The value is kept in the position: `crm-states resume "
            "--machine retire_nb_ids --state DbWriteRemovalErrorLogged` (or the next `crm-states retire-nb-ids`) "
            "removes it; `--undo` restores it.",
        "RestoreRefused":
            "Not restored: the profile holds another nationbuilder_id now, which was not written over. Look at "
            "them by hand (the recorded value is the position's detail.nationbuilder_id).",
        "DbWriteRestoreErrorLogged":
            "MongoDB refused the restore (journaled). `crm-states resume --machine retire_nb_ids --state "
            "DbWriteRestoreErrorLogged` restores it; `crm-states replay <journal>` writes it where the field is "
            "absent.",
    },
    "reconcile_by_email": {
        "ScriptFailureLogged":
            "No email to look up (no such user in Django's auth_user, or an empty email). The position's "
            "detail.error says why. A later `crm-states reconcile-by-email` looks again once the email changes.",
        "WroteEmailNotFound":
            "No App User has the user's email: a user the migration missed, or one who changed their email. "
            "These have `EmailReconcileNotFoundInSalesforce-datetime` in their `CrmLog`. Export them (`crm-states "
            "report --machine reconcile_by_email --state WroteEmailNotFound --csv FILE`) and decide with MarComs; "
            "`crm-states resume --machine reconcile_by_email --state WroteEmailNotFound` asks again.",
        "WroteAmbiguousResponse":
            "Several App Users have the email, or its one App User is already held by another profile: nothing was "
            "written (`EmailReconcileAmbiguous-datetime: ...` in `CrmLog` lists the candidates). Resolve them in "
            "Salesforce, then `crm-states resume --machine reconcile_by_email --state WroteAmbiguousResponse`.",
        "WroteUnexpectedResponse":
            "The lookup failed or answered records that were refused (`EmailReconcileUnexpectedRes-datetime: "
            "{error}` in `CrmLog`). Once fixed, `crm-states resume --machine reconcile_by_email --state "
            "WroteUnexpectedResponse` asks again.",
        "DbWriteOkErrorLogged":
            "The App User was found but MongoDB refused the write of its id (journaled): `crm-states replay "
            "<journal>` writes it where the profile holds none, or `crm-states resume --machine reconcile_by_email "
            "--state DbWriteOkErrorLogged` looks it up and writes it.",
        "DbWriteEmailNotFoundErrorLogged":
            "ErrorLogged status: the not-found result should have been written to Mongo but was not: `crm-states "
            "replay <journal>`.",
        "DbWriteAmbiguousErrorLogged":
            "ErrorLogged status: the ambiguous result should have been written to Mongo but was not: `crm-states "
            "replay <journal>`.",
        "DbWriteUnexpectedResFailure":
            "ErrorLogged status: the unexpected response should have been written to Mongo but was not: "
            "`crm-states replay <journal>`.",
    },
}

#: The design document's note on a whole machine, printed under its states in the text report.
MACHINE_NOTES: Mapping[str, str] = {
    "nb_profile_validation": "Only after the failure states are handled can we remove nationbuilder_id from Mongo "
                             "(`crm-states retire-nb-ids` refuses until then).",
    "retire_nb_ids": "`crm-states retire-nb-ids --undo` restores every retired nationbuilder_id exactly.",
}

HALF_WAY_NOTE = ("A run stopped half-way (crash or outage): `crm-states resume --machine {machine} --state {state}` "
                 "or re-running the same command continues it.")
UNKNOWN_NOTE = ("Not a state of the current diagram (an older diagram's name?): the machine cannot continue "
                "these profiles; look at them by hand.")

_STYLES = {FINAL: ("final", "fill:#d4edda,stroke:#28a745"),
           STOPPED: ("stopped", "fill:#fff3cd,stroke:#d39e00"),
           DB_FAILURE: ("dbfailure", "fill:#f8d7da,stroke:#dc3545")}


@attrs.frozen
class StateRow:
    """One state of one machine: how many profiles stand in it and since when."""

    machine: str
    state: str
    count: int
    oldest: dt.datetime | None
    newest: dt.datetime | None
    kind: str
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "oldest": _iso(self.oldest), "newest": _iso(self.newest), "kind": self.kind,
                "note": self.note}


def kind_of(spec: StateMachine, state: str) -> str:
    if state in spec.db_failure_states:
        return DB_FAILURE
    if state in spec.diagram.finals:
        return FINAL
    if state in spec.terminal:
        return STOPPED
    if state in spec.diagram.states:
        return INTERMEDIATE
    return UNKNOWN


def note_for(machine: str, state: str, kind: str, count: int) -> str | None:
    """The handling note of a failure state (always), or of a mid-way / unknown state holding profiles."""
    note = NOTES.get(machine, {}).get(state)
    if note is not None:
        return note
    if kind == INTERMEDIATE and count:
        return HALF_WAY_NOTE.format(machine=machine, state=state)
    if kind == UNKNOWN and count:
        return UNKNOWN_NOTE
    return None


def collect(db: Database, machines: Iterable[str] | None = None) -> dict[str, list[StateRow]]:
    """Per machine, one row per diagram state (diagram order), then any state found only in the database.
    One aggregation per machine."""
    store = Store(db)
    result: dict[str, list[StateRow]] = {}
    for name in (list(machines) if machines is not None else list(MACHINES)):
        spec = MACHINES[name]
        found = store.state_summary(name)
        extra = sorted((s for s in found if s not in spec.diagram.states), key=str)
        rows = []
        for state in [*spec.diagram.states, *extra]:
            row = found.get(state) or {}
            count = int(row.get("count", 0))
            kind = kind_of(spec, state)
            rows.append(StateRow(name, str(state), count, row.get("oldest"), row.get("newest"), kind,
                                 note_for(name, str(state), kind, count)))
        result[name] = rows
    return result


# --- the three outputs ------------------------------------------------------------------------------
#: The text report's column headers, over the columns of its rows.
TEXT_HEADER = f"  {'state':<30} {'count':>8}  {'kind':<14}  since (oldest .. newest entry)"


def drift_counts(db: Database, machines: Iterable[str] | None = None) -> dict[str, int]:
    """Per machine, the profiles whose data drifted (``crm-states heal --dry-run``: a read)."""
    names = list(machines) if machines is not None else list(MACHINES)
    report = heal(Store(db), list(MACHINES), only=names, dry_run=True)
    return {name: report.drifted[name] for name in names}


def write_text(data: Mapping[str, list[StateRow]], out: TextIO, drift: Mapping[str, int] | None = None) -> None:
    for name, rows in data.items():
        total = sum(r.count for r in rows)
        print(f"{name} ({total} profiles)", file=out)
        print(TEXT_HEADER, file=out)
        for r in rows:
            mark = "" if r.kind == INTERMEDIATE else r.kind
            since = f"{_iso(r.oldest)} .. {_iso(r.newest)}" if r.count else ""
            print(f"  {r.state:<30} {r.count:>8}  {mark:<14}  {since}".rstrip(), file=out)
            if r.note:
                print(textwrap.fill(r.note, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                    break_on_hyphens=False, break_long_words=False), file=out)
        if drift is not None and name in drift:
            print(f"  drift: {drift[name]} profiles whose data Sefaria's profile saves erased"
                  + (" (`crm-states heal` writes it back)" if drift[name] else ""), file=out)
        if name in MACHINE_NOTES:
            print(f"  NOTE: {MACHINE_NOTES[name]}", file=out)


def print_counts(db: Database, out: TextIO) -> None:
    """Per machine, every diagram state with its count, kind, entry times and handling note (the demo's
    closing table and the default ``crm-states report``)."""
    write_text(collect(db), out, drift_counts(db))


def write_json(data: Mapping[str, list[StateRow]], out: TextIO) -> None:
    doc = {name: {r.state: r.to_json() for r in rows} for name, rows in data.items()}
    json.dump(doc, out, indent=2, ensure_ascii=False)
    out.write("\n")


def mermaid_text(spec: StateMachine, rows: Iterable[StateRow], db_name: str = "") -> str:
    """The machine's diagram with ``"State (count)"`` labels, its edges (with labels) and ``[*]`` edges;
    reads back with ``crm_states.mermaid.parse_diagram`` to the same states and edges."""
    by_state = {r.state: r for r in rows}
    labels = dict(spec.diagram.labels)
    lines = ["stateDiagram-v2",
             f"%% {spec.name}: profiles per state" + (f" in database {db_name}" if db_name else "")
             + " (crm-states report --mermaid)"]
    for state in spec.diagram.states:
        count = by_state[state].count if state in by_state else 0
        label = labels.get(state, state).replace('"', "'")
        lines.append(f'state "{label} ({count:,})" as {state}')
    lines.append(f"[*] --> {spec.diagram.initial}")
    for edge in spec.diagram.edges:
        lines.append(f"{edge.source} --> {edge.dest}" + (f": {edge.label}" if edge.label else ""))
    for state in spec.diagram.states:
        if state in spec.diagram.finals:
            lines.append(f"{state} --> [*]")
    unknown = [r for r in by_state.values() if r.kind == UNKNOWN and r.count]
    for r in unknown:
        lines.append(f"%% not in the diagram: {' '.join(r.state.split())} ({r.count:,})")  # one line, whatever it holds
    for kind, (cls, style) in _STYLES.items():
        members = [s for s in spec.diagram.states if kind_of(spec, s) == kind]
        if members:
            lines.append(f"classDef {cls} {style}")
            lines.append(f"class {','.join(members)} {cls}")
    return "\n".join(lines) + "\n"


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return iso(value)
    return str(value)
