"""The migration's two machines against their ``.mmd`` diagrams: every generic check of
tests/test_conformance.py, each diagram written out literally (an edit of a diagram is a visible change
here), the seed's style (every DB write has its DB-failure edge), and their registration."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from crm_states.api import MACHINES
from crm_states.engine import Write
from crm_states.report import NOTES, collect
from machines import diagram_path

# The generic checks, collected here again so that they run with this module's ``module`` fixture.
from tests.test_conformance import (  # noqa: F401
    _diagram,
    test_binding_for_a_state_the_diagram_lacks,
    test_binding_naming_an_act_dest_the_diagram_lacks,
    test_binding_naming_an_edge_the_diagram_lacks,
    test_binding_on_a_terminal_state,
    test_edge_no_binding_takes,
    test_every_problem_is_reported_at_once,
    test_machine_edges_are_the_diagrams_exactly,
    test_machine_initial_and_states_are_the_diagrams,
    test_machine_is_a_transitions_machine_without_auto_transitions,
    test_machine_is_shared_across_imports_and_engines,
    test_spec_is_built_from_the_checked_in_diagram,
    test_transitions_mermaid_export_reads_back,
    test_unaltered_bindings_build,
    test_write_edge_no_binding_takes_when_failure_is_redirected,
)

MODULES = ["machines.retire_nb_ids", "machines.reconcile_by_email"]

EDGES: dict[str, dict[tuple[str, str], str]] = {
    "retire_nb_ids": {
        ("NotChecked", "ScriptFailureLogged"): "Unexpected Error",
        ("NotChecked", "ValidationNoLongerHolds"): "Validation no longer holds",
        ("NotChecked", "NbIdRecorded"): "Record nationbuilder_id",
        ("NbIdRecorded", "RemovalOk"): "Profile holds the recorded id",
        ("NbIdRecorded", "ValidationNoLongerHolds"): "Profile changed since recorded",
        ("RemovalOk", "WroteNbIdRemoved"): "DB write success",
        ("RemovalOk", "DbWriteRemovalErrorLogged"): "DB write failure",
        ("NotChecked", "RestoreOk"): "Undo",
        ("NotChecked", "RestoreRefused"): "Profile holds another nationbuilder_id",
        ("RestoreOk", "WroteNbIdRestored"): "DB write success",
        ("RestoreOk", "DbWriteRestoreErrorLogged"): "DB write failure",
    },
    "reconcile_by_email": {
        ("NotChecked", "ScriptFailureLogged"): "Unexpected Error",
        ("NotChecked", "RequestedAppUser"): "Send HTTP request to Salesforce",
        ("RequestedAppUser", "OkResponse"): "200 OK",
        ("RequestedAppUser", "EmailNotFound"): "No App User has this email",
        ("RequestedAppUser", "AmbiguousResponse"): "Several App Users",
        ("RequestedAppUser", "UnexpectedResponse"): "Unexpected Response / Failure",
        ("RequestedAppUser", "ResolvedElsewhere"): "Profile got an id meanwhile",
        ("OkResponse", "WroteSalesforceAppUserUid"): "DB write success",
        ("OkResponse", "DbWriteOkErrorLogged"): "Db write failure",
        ("EmailNotFound", "WroteEmailNotFound"): "DB write success",
        ("EmailNotFound", "DbWriteEmailNotFoundErrorLogged"): "Db write failure",
        ("AmbiguousResponse", "WroteAmbiguousResponse"): "DB write success",
        ("AmbiguousResponse", "DbWriteAmbiguousErrorLogged"): "Db write failure",
        ("UnexpectedResponse", "WroteUnexpectedResponse"): "DB write success",
        ("UnexpectedResponse", "DbWriteUnexpectedResFailure"): "DB write failure",
    },
}
FINALS = {"retire_nb_ids": {"WroteNbIdRemoved", "WroteNbIdRestored"},
          "reconcile_by_email": {"WroteSalesforceAppUserUid", "ResolvedElsewhere"}}
WRITE_AHEAD = {"retire_nb_ids": "NbIdRecorded", "reconcile_by_email": "RequestedAppUser"}


@pytest.fixture(params=MODULES)
def module(request: Any) -> Any:
    return importlib.import_module(request.param)


def test_diagram_is_the_one_written_here(module) -> None:
    diagram = _diagram(module)
    assert diagram.initial == "NotChecked"
    assert {(e.source, e.dest): e.label for e in diagram.edges} == EDGES[module.NAME]
    assert diagram.finals == FINALS[module.NAME]


def test_drawn_in_the_seeds_style(module) -> None:
    """Every DB write is a ``Write`` state with a success and a DB-failure edge named as the seed names
    them (``Wrote...``, ``...ErrorLogged``/``...Failure``); the one write-ahead state is the one that must
    be committed before its effect."""
    writes = {state: b for state, b in module.BINDINGS.items() if isinstance(b, Write)}
    assert writes and all(b.success.startswith("Wrote") for b in writes.values())
    assert all(b.failure.startswith("DbWrite") and b.failure.endswith(("ErrorLogged", "Failure"))
               for b in writes.values())
    assert module.SPEC.db_failure_states == {b.failure for b in writes.values()}
    assert [s for s, b in module.BINDINGS.items() if getattr(b, "write_ahead", False)] == [WRITE_AHEAD[module.NAME]]
    text = diagram_path(module.NAME).read_text(encoding="utf-8")
    assert text.startswith("%% Derived from the design document's") and "CRM.md" in text.split("stateDiagram-v2")[0]


def test_registered_and_every_failure_state_has_its_note(module, db) -> None:
    assert MACHINES[module.NAME] is module.SPEC
    rows = collect(db, [module.NAME])[module.NAME]
    failures = {r.state for r in rows if r.kind in ("stopped", "db failure")}
    assert failures and failures <= set(NOTES[module.NAME])
