"""Each machine module's ``MACHINE`` is exactly its ``.mmd`` diagram, is one shared ``transitions``
machine, survives transitions' own mermaid export, and its bindings are checked against the diagram."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import attrs
import mongomock
import pytest
from transitions import Machine
from transitions.extensions import GraphMachine

import crm_states.spec as engine_module
from crm_states.crm.memory import InMemoryCrm
from crm_states.engine import Act, BindingError, Engine, Outcome, StateMachine, Write, trigger_name
from crm_states.mermaid import parse_diagram, read_diagram
from crm_states.records import Position
from crm_states.store import Store

DIAGRAMS = Path(__file__).resolve().parent.parent / "docs" / "diagrams"
MODULES = ["machines.nb_profile_validation", "machines.new_user_signup"]


@pytest.fixture(params=MODULES)
def module(request):
    return importlib.import_module(request.param)


def _diagram(module):
    return read_diagram(DIAGRAMS / f"{module.NAME}.mmd")


def _event_edges(machine: Machine) -> set[tuple[str, str | None]]:
    return {(t.source, t.dest) for event in machine.events.values()
            for transitions in event.transitions.values() for t in transitions}


def _event_triggers(machine: Machine) -> dict[tuple[str, str | None], set[str]]:
    out: dict[tuple[str, str | None], set[str]] = {}
    for name, event in machine.events.items():
        for transitions in event.transitions.values():
            for t in transitions:
                out.setdefault((t.source, t.dest), set()).add(name)
    return out


# --- MACHINE is the diagram ----------------------------------------------------------------------


def test_machine_is_a_transitions_machine_without_auto_transitions(module):
    machine = module.MACHINE
    assert isinstance(machine, Machine)
    assert machine.auto_transitions is False
    diagram = _diagram(module)
    expected_triggers = {trigger_name(e.label, e.dest) for e in diagram.edges}
    # no trigger beyond the diagram's edges (auto transitions would add to_<State> for every state)
    assert set(machine.events) == expected_triggers
    for state in diagram.states:
        if f"to_{state}" not in expected_triggers:
            assert f"to_{state}" not in machine.events


def test_machine_initial_and_states_are_the_diagrams(module):
    machine, diagram = module.MACHINE, _diagram(module)
    assert machine.initial == diagram.initial
    assert set(machine.states) == set(diagram.states)
    assert len(machine.states) == len(diagram.states)


def test_machine_edges_are_the_diagrams_exactly(module):
    machine, diagram = module.MACHINE, _diagram(module)
    assert _event_edges(machine) == set(diagram.edge_set)
    # and each edge fires by the trigger its label names, and by no other
    triggers = _event_triggers(machine)
    for edge in diagram.edges:
        assert triggers[(edge.source, edge.dest)] == {trigger_name(edge.label, edge.dest)}


def test_spec_is_built_from_the_checked_in_diagram(module):
    diagram = _diagram(module)
    assert module.SPEC.diagram.states == diagram.states
    assert module.SPEC.diagram.edges == diagram.edges
    assert module.SPEC.diagram.initial == diagram.initial
    assert module.SPEC.name == module.NAME == diagram.name


# --- MACHINE is one shared object ----------------------------------------------------------------


def _profile_and_crm(module) -> tuple[dict[str, Any], InMemoryCrm]:
    crm = InMemoryCrm()
    crm.add_app_user(nationbuilder_id=4242)
    return {"id": 17, "nationbuilder_id": 4242, "email": "someone@example.org", "first_name": "Some",
            "last_name": "One"}, crm


def test_machine_is_shared_across_imports_and_engines(module):
    again = importlib.import_module(module.__name__)
    from_import = getattr(__import__(module.__name__, fromlist=["MACHINE"]), "MACHINE")
    assert again.MACHINE is module.MACHINE is from_import
    assert module.SPEC.machine is module.MACHINE
    one = Engine(module.SPEC, Store(mongomock.MongoClient().db_one))
    two = Engine(module.SPEC, Store(mongomock.MongoClient().db_two))
    assert one.spec.machine is two.spec.machine is module.MACHINE


def test_driving_runs_uses_the_shared_machine_and_creates_none(module, monkeypatch):
    machine = module.MACHINE
    before = len(machine.models)
    created: list[Any] = []

    def no_new_machines(*args, **kwargs):
        created.append((args, kwargs))
        raise AssertionError("a drive must not build a transitions.Machine")

    monkeypatch.setattr(engine_module, "Machine", no_new_machines)
    # every state change the shared MACHINE makes is seen here (its model, source and dest)
    changes: list[tuple[Any, str, str]] = []
    monkeypatch.setattr(machine, "after_state_change", [
        *machine.after_state_change,
        lambda event: changes.append((event.model, event.transition.source, event.transition.dest))])

    profile, crm = _profile_and_crm(module)
    db = mongomock.MongoClient().db
    store = Store(db)
    store.ensure_indexes([module.NAME])
    db.profiles.insert_one(dict(profile))
    engine = Engine(module.SPEC, store, context=crm)

    run = engine.prepare(store.require_profile(profile["id"]))
    results = engine.drive([run])

    assert results[0].finished and results[0].state == "WroteSalesforceAppUserUid"
    assert created == []
    diagram = _diagram(module)
    assert changes and all(model is run for model, _, _ in changes), "the run was not driven by the shared MACHINE"
    path = [changes[0][1]] + [dest for _, _, dest in changes]
    assert path[0] == diagram.initial and path[-1] == "WroteSalesforceAppUserUid"
    assert all(edge in diagram.edge_set for edge in zip(path, path[1:]))
    assert len(machine.models) == before
    assert run not in machine.models
    # a second engine over another store: same machine, same bookkeeping
    other = Engine(module.SPEC, Store(mongomock.MongoClient().db), context=crm)
    other.store.profiles.insert_one(dict(profile, id=18))
    changes.clear()
    assert other.drive([other.prepare(other.store.require_profile(18))])[0].finished
    assert changes and len(machine.models) == before


class _BrokenStore:
    def position(self, profile_id, machine):
        return Position()

    def commit(self, steps):
        raise RuntimeError("store exploded")


def test_models_are_released_even_when_a_drive_raises(module):
    machine = module.MACHINE
    before = len(machine.models)
    profile, crm = _profile_and_crm(module)
    engine = Engine(module.SPEC, _BrokenStore(), context=crm)  # type: ignore[arg-type]
    runs = [engine.prepare(dict(profile, id=i)) for i in (1, 2, 3)]
    with pytest.raises(RuntimeError, match="store exploded"):
        engine.drive(runs)
    assert len(machine.models) == before
    assert not any(run in machine.models for run in runs)


# --- transitions' own mermaid export reads back as the same machine --------------------------------


def test_transitions_mermaid_export_reads_back(module):
    machine, diagram = module.MACHINE, _diagram(module)
    transitions = [{"trigger": name, "source": t.source, "dest": t.dest}
                   for name, event in machine.events.items()
                   for ts in event.transitions.values() for t in ts]
    graph = GraphMachine(model=None, states=list(machine.states), transitions=transitions,
                         initial=machine.initial, auto_transitions=False, graph_engine="mermaid")

    class Model:
        pass

    model = Model()
    graph.add_model(model)
    text = model.get_graph().draw(None)
    assert isinstance(text, str) and "stateDiagram-v2" in text
    exported = parse_diagram(text, module.NAME, source="<transitions export>")
    assert exported.edge_set == diagram.edge_set
    assert exported.initial == diagram.initial
    assert set(exported.states) == set(diagram.states)
    # the exported labels are the trigger names
    assert {(e.source, e.dest): e.label for e in exported.edges} == {
        (e.source, e.dest): trigger_name(e.label, e.dest) for e in diagram.edges}


# --- binding validation --------------------------------------------------------------------------


def _noop(runs, context):
    return [Outcome("nowhere") for _ in runs]


def _build(module, bindings) -> StateMachine:
    return StateMachine(_diagram(module), bindings)


def test_unaltered_bindings_build(module):
    spec = _build(module, dict(module.BINDINGS))
    assert spec.machine is not module.MACHINE  # a fresh StateMachine builds its own
    assert spec.diagram.edge_set == module.SPEC.diagram.edge_set


def _raises(module, bindings) -> str:
    with pytest.raises(BindingError) as info:
        _build(module, bindings)
    message = str(info.value)
    assert message.startswith(f"{module.NAME}: ")
    return message


def test_binding_for_a_state_the_diagram_lacks(module):
    bindings = dict(module.BINDINGS)
    bindings["NoSuchState"] = Act(_noop, frozenset())
    assert "binding for unknown state 'NoSuchState'" in _raises(module, bindings)


def test_binding_naming_an_edge_the_diagram_lacks(module):
    bindings = dict(module.BINDINGS)
    state, write = next((s, b) for s, b in bindings.items() if isinstance(b, Write))
    bogus = _diagram(module).initial
    assert (state, bogus) not in _diagram(module).edge_set
    bindings[state] = attrs.evolve(write, success=bogus)
    message = _raises(module, bindings)
    assert f"binding names edge {state} --> {bogus}, which the diagram lacks" in message
    assert f"edge {state} --> {write.success} is never taken" in message


def test_binding_naming_an_act_dest_the_diagram_lacks(module):
    bindings = dict(module.BINDINGS)
    state, act = next((s, b) for s, b in bindings.items() if isinstance(b, Act))
    bogus = sorted(module.SPEC.terminal)[0]
    assert (state, bogus) not in _diagram(module).edge_set
    bindings[state] = attrs.evolve(act, dests=act.dests | {bogus})
    assert f"{state} --> {bogus}" in _raises(module, bindings)


def test_non_terminal_state_without_a_binding(module):
    bindings = dict(module.BINDINGS)
    state = next(s for s, b in bindings.items() if isinstance(b, Write))
    del bindings[state]
    message = _raises(module, bindings)
    assert f"state {state!r} has outgoing edges but no binding" in message
    assert message.count("no binding") == 1


def test_edge_no_binding_takes(module):
    bindings = dict(module.BINDINGS)
    state, act = next((s, b) for s, b in bindings.items()
                      if isinstance(b, Act) and len(b.dests) >= 2)
    dropped = sorted(act.dests - {act.on_error})[0]
    bindings[state] = attrs.evolve(act, dests=act.dests - {dropped})
    message = _raises(module, bindings)
    assert f"edge {state} --> {dropped} is never taken by its binding" in message
    assert message.count("never taken") == 1


def test_write_edge_no_binding_takes_when_failure_is_redirected(module):
    bindings = dict(module.BINDINGS)
    state, write = next((s, b) for s, b in bindings.items() if isinstance(b, Write))
    bindings[state] = attrs.evolve(write, failure=write.success)  # failure edge no longer taken
    assert f"edge {state} --> {write.failure} is never taken" in _raises(module, bindings)


def test_binding_on_a_terminal_state(module):
    bindings = dict(module.BINDINGS)
    terminal = sorted(module.SPEC.terminal)[0]
    bindings[terminal] = Act(_noop, frozenset())
    message = _raises(module, bindings)
    assert f"binding for terminal state {terminal!r}" in message


def test_every_problem_is_reported_at_once(module):
    bindings = dict(module.BINDINGS)
    missing = next(s for s, b in bindings.items() if isinstance(b, Write))
    del bindings[missing]
    bindings["Ghost"] = Act(_noop, frozenset())
    message = _raises(module, bindings)
    assert "'Ghost'" in message and repr(missing) in message
