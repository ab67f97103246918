"""The four flow machines (issue 5) against their ``.mmd`` diagrams: every check of tests/test_conformance.py
that holds for any machine, run for these modules, plus each diagram written out literally (so an edit of
a diagram is a visible change here) and a drive through the one shared ``transitions`` machine."""

from __future__ import annotations

import importlib
from typing import Any

import mongomock
import pytest

import crm_states.spec as engine_module
from crm_states.api import MACHINES
from crm_states.crm.memory import InMemoryCrm
from crm_states.engine import Engine
from crm_states.store import Store
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
    test_models_are_released_even_when_a_drive_raises,
    test_non_terminal_state_without_a_binding,
    test_spec_is_built_from_the_checked_in_diagram,
    test_transitions_mermaid_export_reads_back,
    test_unaltered_bindings_build,
    test_write_edge_no_binding_takes_when_failure_is_redirected,
)

MODULES = ["machines.change_email", "machines.mark_as_spam", "machines.mailing_list_signup",
           "machines.sync_sustainers"]

def _shape(initial: str, request: str, request_label: str, final: str, error_written: str) -> dict[str, Any]:
    """The signup diagram's shape: initial --> request --> OK / UnexpectedResponse --> written / LoggedDbFailure."""
    edges = {
        (initial, request): request_label,
        (request, "OK"): "200 OK",
        ("OK", final): "Db write success",
        ("OK", "LoggedDbFailure"): "Db write failure",
        (request, "UnexpectedResponse"): "Unexpected Response",
        ("UnexpectedResponse", error_written): "Db write success",
        ("UnexpectedResponse", "LoggedDbFailure"): "Db write failure",
    }
    states = {initial, request, "OK", final, "UnexpectedResponse", error_written, "LoggedDbFailure"}
    return {"initial": initial, "edges": edges, "states": states, "finals": {final}, "request": request,
            "db_failures": {"LoggedDbFailure"}}


EXPECTED = {
    "change_email": _shape("EmailChanged", "RequestEmailChangeInSalesforce", "Send HTTP request to Salesforce",
                           "WroteEmailChange", "WroteSalesforceErrorToDb"),
    "mark_as_spam": _shape("MarkedAsSpam", "RequestMarkAsSpamInCrm", "Send HTTP request to CRM",
                           "WroteMarkedAsSpam", "WroteCrmErrorToDb"),
    "mailing_list_signup": _shape("SignedUpForMailingList", "RequestAddToMailingLists",
                                  "Send HTTP request to Salesforce", "WroteMailingListSignup",
                                  "WroteSalesforceErrorToDb"),
    "sync_sustainers": _shape("CrmIdRead", "RequestedSustainerStatus", "Send HTTP request to Salesforce",
                              "WroteSustainerStatus", "WroteUnexpectedResponse"),
}
#: CRM writes are persisted before the request goes out; the sustainer status is a read.
WRITE_AHEAD = {"change_email": True, "mark_as_spam": True, "mailing_list_signup": True, "sync_sustainers": False}


@pytest.fixture(params=MODULES)
def module(request):
    return importlib.import_module(request.param)


def test_diagram_is_the_one_written_here(module):
    expected, diagram = EXPECTED[module.NAME], _diagram(module)
    assert diagram.initial == expected["initial"]
    assert set(diagram.states) == expected["states"]
    assert {(e.source, e.dest): e.label for e in diagram.edges} == expected["edges"]
    assert diagram.finals == expected["finals"]
    assert module.SPEC.db_failure_states == expected["db_failures"]


def test_diagram_says_what_it_is_derived_from(module):
    text = diagram_path(module.NAME).read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("%% Derived from the design document's sequence diagram")
    assert "CRM.md" in text.split("stateDiagram-v2")[0]


def test_crm_writes_are_write_ahead_and_reads_are_not(module):
    request = EXPECTED[module.NAME]["request"]
    binding = module.BINDINGS[request]
    assert binding.external is True and binding.write_ahead is WRITE_AHEAD[module.NAME]
    assert binding.on_error == "UnexpectedResponse"
    initial = module.BINDINGS[EXPECTED[module.NAME]["initial"]]
    assert initial.external is False  # reading the request is local


def test_registered_for_report_resume_and_replay(module):
    assert MACHINES[module.NAME] is module.SPEC


# --- a drive through the one shared machine ----------------------------------------------------------

def _start(module) -> tuple[dict[str, Any], InMemoryCrm, dict[str, Any]]:
    crm = InMemoryCrm()
    app_user = crm.add_app_user(email="someone@example.org")
    crm.sustainers = {app_user}
    profile = {"id": 17, "sf_app_user_id": app_user}
    inputs = {"change_email": {"new_email": "new@example.org"}, "mark_as_spam": {"review": False},
              "mailing_list_signup": {"email": "someone@example.org", "lists": ["Weekly Parasha"]},
              "sync_sustainers": {"is_sustainer": True}}[module.NAME]
    return profile, crm, inputs


def test_driving_uses_the_shared_machine_and_creates_none(module, monkeypatch):
    machine = module.MACHINE
    before = len(machine.models)
    monkeypatch.setattr(engine_module, "Machine", lambda *a, **k: pytest.fail("a drive built a Machine"))
    changes: list[tuple[Any, str, str]] = []
    monkeypatch.setattr(machine, "after_state_change", [
        *machine.after_state_change,
        lambda event: changes.append((event.model, event.transition.source, event.transition.dest))])
    profile, crm, inputs = _start(module)
    db = mongomock.MongoClient().db
    store = Store(db)
    db.profiles.insert_one(dict(profile))
    engine = Engine(module.SPEC, store, context=crm)
    run = engine.prepare(store.require_profile(17), inputs=inputs)
    [result] = engine.drive([run])
    final = next(iter(EXPECTED[module.NAME]["finals"]))
    assert result.finished and result.state == final
    assert changes and all(model is run for model, _, _ in changes)
    path = [changes[0][1]] + [dest for _, _, dest in changes]
    diagram = _diagram(module)
    assert path[0] == diagram.initial and path[-1] == final
    assert all(edge in diagram.edge_set for edge in zip(path, path[1:]))
    assert len(machine.models) == before and run not in machine.models
