"""The mermaid reader (crm_states.mermaid): the project's two state diagrams read to exactly the design
document's machines, every supported construct is read, every unsupported one is refused with the file
and line, and random diagrams round-trip through text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.mermaid import Diagram, DiagramError, Edge, parse_diagram, read_diagram

DIAGRAMS = Path(__file__).resolve().parent.parent / "docs" / "diagrams"

# --- the design document's diagrams, written out literally (CRM.md) ------------------------------

NB_STATES = {
    "NotChecked", "ScriptFailureLogged", "RequestedContact", "OkResponse", "NotFound",
    "WroteSalesforceAppUserUid", "UnexpectedResponse", "WroteUnexpectedResponse",
    "DbWriteUnexpectedResFailure", "DbWriteOkErrorLogged", "DbWriteNotFoundErrorLogged", "WroteNotFound",
}
NB_EDGES = {
    ("NotChecked", "ScriptFailureLogged"): "Unexpected Error",
    ("NotChecked", "RequestedContact"): "Send HTTP request to Salesforce",
    ("RequestedContact", "OkResponse"): "200 OK",
    ("RequestedContact", "NotFound"): "404 Not Found",
    ("OkResponse", "WroteSalesforceAppUserUid"): "DB write success",
    ("RequestedContact", "UnexpectedResponse"): "Unexpected Response / Failure",
    ("UnexpectedResponse", "WroteUnexpectedResponse"): "DB write success",
    ("UnexpectedResponse", "DbWriteUnexpectedResFailure"): "DB write failure",
    ("OkResponse", "DbWriteOkErrorLogged"): "Db write failure",
    ("NotFound", "DbWriteNotFoundErrorLogged"): "Db write failure",
    ("NotFound", "WroteNotFound"): "DB write success",
}
NB_INITIAL = "NotChecked"
NB_FINALS = {"WroteSalesforceAppUserUid"}

SIGNUP_STATES = {
    "UserCreated", "RequestAddToSalesforce", "OK", "WroteSalesforceAppUserUid", "UnexpectedResponse",
    "WroteSalesforceErrorToDb", "LoggedDbFailure",
}
SIGNUP_SEED_EDGES = {
    ("UserCreated", "RequestAddToSalesforce"): "Send HTTP request to Salesforce",
    ("RequestAddToSalesforce", "OK"): "200 OK",
    ("OK", "WroteSalesforceAppUserUid"): "Db write success",
    ("RequestAddToSalesforce", "UnexpectedResponse"): "Unexpected Response",
    ("UnexpectedResponse", "WroteSalesforceErrorToDb"): "Db write success",
    ("UnexpectedResponse", "LoggedDbFailure"): "Db write failure",
}
# The one documented addition to the design document's diagram.
SIGNUP_ADDITION = {("OK", "LoggedDbFailure"): "Db write failure"}
SIGNUP_EDGES = {**SIGNUP_SEED_EDGES, **SIGNUP_ADDITION}
SIGNUP_INITIAL = "UserCreated"
SIGNUP_FINALS = {"WroteSalesforceAppUserUid"}

REFERENCE_FILES = [
    "migration_process.mmd",
    "sequence_change_email.mmd",
    "sequence_mailing_list_signup.mmd",
    "sequence_mark_as_spam.mmd",
    "sequence_sync_sustainers.mmd",
    "sequence_user_signup.mmd",
]


def _labelled_edges(d: Diagram) -> dict[tuple[str, str], str | None]:
    return {(e.source, e.dest): e.label for e in d.edges}


@pytest.mark.parametrize(
    "file, states, edges, initial, finals",
    [
        ("nb_profile_validation.mmd", NB_STATES, NB_EDGES, NB_INITIAL, NB_FINALS),
        ("new_user_signup.mmd", SIGNUP_STATES, SIGNUP_EDGES, SIGNUP_INITIAL, SIGNUP_FINALS),
    ],
)
def test_project_diagrams_are_the_design_documents(file, states, edges, initial, finals):
    d = read_diagram(DIAGRAMS / file)
    assert d.name == file.removesuffix(".mmd")
    assert set(d.states) == states
    assert len(d.states) == len(states)  # no state listed twice
    assert d.edge_set == set(edges)
    assert len(d.edges) == len(edges)
    assert _labelled_edges(d) == edges
    assert d.initial == initial
    assert d.finals == finals


def test_nb_terminal_states_are_the_failure_states_and_the_final():
    d = read_diagram(DIAGRAMS / "nb_profile_validation.mmd")
    assert d.terminal_states == {
        "ScriptFailureLogged", "WroteSalesforceAppUserUid", "WroteUnexpectedResponse",
        "DbWriteUnexpectedResFailure", "DbWriteOkErrorLogged", "DbWriteNotFoundErrorLogged", "WroteNotFound",
    }
    assert {e.dest for e in d.outgoing("RequestedContact")} == {"OkResponse", "NotFound", "UnexpectedResponse"}


def test_signup_addition_is_the_only_change_and_is_documented_by_a_comment():
    path = DIAGRAMS / "new_user_signup.mmd"
    d = read_diagram(path)
    assert d.edge_set - set(SIGNUP_SEED_EDGES) == set(SIGNUP_ADDITION)
    assert set(SIGNUP_SEED_EDGES) <= d.edge_set

    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    edge_re = re.compile(r"^OK\s*-->\s*LoggedDbFailure\b")
    at = [i for i, line in enumerate(lines) if edge_re.match(line)]
    assert len(at) == 1, "the addition OK --> LoggedDbFailure must appear exactly once"
    i = at[0]
    assert i > 0 and lines[i - 1].startswith("%%"), "the addition must be preceded by a %% comment line"
    block = []
    j = i - 1
    while j >= 0 and lines[j].startswith("%%"):
        block.append(lines[j])
        j -= 1
    assert any("addition" in c.lower() for c in block), f"comment before the addition does not say so: {block}"


@pytest.mark.parametrize("file", REFERENCE_FILES)
def test_reference_diagrams_are_refused(file):
    path = DIAGRAMS / file
    first = next(n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip() and not line.strip().startswith("%%"))
    with pytest.raises(DiagramError) as info:
        read_diagram(path)
    message = str(info.value)
    assert f"{path}:{first}:" in message
    assert "stateDiagram-v2" in message


# --- supported constructs ----------------------------------------------------------------------


def test_start_end_labelled_unlabelled_and_spacing():
    d = parse_diagram(
        "stateDiagram-v2\n"
        "[*] --> A\n"
        "A --> B : spaced label\n"
        "B-->C\n"
        "C -->D:tight\n"
        "D  -->  E   :   padded   \n"
        "E --> F :\n"
        "F --> [*]\n"
        "D --> [*] : done\n",
        "t",
    )
    assert d.states == ("A", "B", "C", "D", "E", "F")
    assert d.initial == "A"
    assert d.finals == {"F", "D"}
    assert d.edges == (
        Edge("A", "B", "spaced label"),
        Edge("B", "C", None),
        Edge("C", "D", "tight"),
        Edge("D", "E", "padded"),
        Edge("E", "F", None),
    )
    assert d.terminal_states == {"F"}


def test_declarations_descriptions_direction_comments_and_styling():
    text = """\
---
title: A title
config:
  theme: dark
---
%% a comment before the header

stateDiagram-v2
    direction LR
    %% comment after the header
    classDef bad fill:#f00,color:white
    state "A long label" as Labelled
    state Declared
    Described : what it does: a lot
    class Labelled, Declared bad
    Class Described bad
    Labelled:::bad
    [*] --> Labelled
    Labelled --> Declared
"""
    d = parse_diagram(text, "t")
    assert d.states == ("Labelled", "Declared", "Described")
    assert d.initial == "Labelled"
    assert d.edge_set == {("Labelled", "Declared")}
    assert dict(d.labels) == {"Labelled": "A long label", "Described": "what it does: a lot"}
    assert d.finals == frozenset()
    assert d.terminal_states == {"Declared", "Described"}


@pytest.mark.parametrize("direction", ["TB", "BT", "LR", "RL"])
def test_directions(direction):
    d = parse_diagram(f"stateDiagram-v2\ndirection {direction}\n[*] --> A\n", "t")
    assert d.states == ("A",)


def test_windows_line_endings_and_indentation():
    d = parse_diagram("stateDiagram-v2\r\n  [*] --> A\r\n\tA --> B: x\r\n", "t")
    assert d.edges == (Edge("A", "B", "x"),)


# --- refusals ----------------------------------------------------------------------------------

VALID_HEAD = "%% c\nstateDiagram-v2\n[*] --> A\nA --> B\n"  # lines 1-4; the bad line is line 5

UNSUPPORTED = [
    "state Composite {",
    "}",
    "note right of A : a note",
    "note left of B",
    "end note",
    "state Fork <<fork>>",
    "state Join <<join>>",
    "state Choice <<choice>>",
    "--",
    "A -> B",
    "A --> ",
    "A --x B",
    "A --> B --> C",
    "[*] --> [*]",
    "flowchart TD",
    "sequenceDiagram",
    "stateDiagram-v2",
    "graph LR",
    "direction XY",
    "this is garbage",
    "A --> B %% trailing comment",
    "1A --> B",
    "state \"unterminated as X",
    "---",
]


@pytest.mark.parametrize("bad", UNSUPPORTED)
def test_unsupported_construct_names_file_and_line(bad):
    text = VALID_HEAD + bad + "\nB --> [*]\n"
    with pytest.raises(DiagramError) as info:
        parse_diagram(text, "t", source="docs/diagrams/thing.mmd")
    assert str(info.value).startswith("docs/diagrams/thing.mmd:5:")


def test_unsupported_construct_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "composite.mmd"
    path.write_text("stateDiagram-v2\n[*] --> A\n\n%% x\nstate A {\n  [*] --> B\n}\n", encoding="utf-8")
    with pytest.raises(DiagramError) as info:
        read_diagram(path)
    assert str(info.value).startswith(f"{path}:5:")


@pytest.mark.parametrize(
    "header, line",
    [
        ("flowchart TD\n    A --> B", 2),
        ("sequenceDiagram\n    A->>B: hi", 2),
        ("graph LR\nA-->B", 2),
        ("stateDiagram\n[*] --> A", 2),
        ("[*] --> A", 2),
        ("garbage", 2),
    ],
)
def test_wrong_or_missing_header(header, line):
    with pytest.raises(DiagramError) as info:
        parse_diagram("%% first line\n" + header + "\n", "t", source="x.mmd")
    assert str(info.value).startswith(f"x.mmd:{line}:")
    assert "stateDiagram-v2" in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "%% only a comment\n", "---\ntitle: t\n---\n"])
def test_no_header(text):
    with pytest.raises(DiagramError, match=r"^x\.mmd: .*no 'stateDiagram-v2' header"):
        parse_diagram(text, "t", source="x.mmd")


def test_no_initial_state():
    with pytest.raises(DiagramError, match=r"^x\.mmd: no initial state"):
        parse_diagram("stateDiagram-v2\nA --> B\nB --> [*]\n", "t", source="x.mmd")


def test_two_initial_states_name_the_second_line():
    with pytest.raises(DiagramError) as info:
        parse_diagram("stateDiagram-v2\n[*] --> A\nA --> B\n%% x\n[*] --> B\n", "t", source="x.mmd")
    message = str(info.value)
    assert message.startswith("x.mmd:5:")
    assert "A (line 2)" in message and "B (line 5)" in message


def test_duplicate_edge_names_its_line():
    with pytest.raises(DiagramError) as info:
        parse_diagram("stateDiagram-v2\n[*] --> A\nA --> B: one\n\nA-->B : two\n", "t", source="x.mmd")
    assert str(info.value).startswith("x.mmd:5:")
    assert "duplicate edge A --> B" in str(info.value)


def test_same_pair_in_both_directions_is_not_a_duplicate():
    d = parse_diagram("stateDiagram-v2\n[*] --> A\nA --> B\nB --> A\n", "t")
    assert d.edge_set == {("A", "B"), ("B", "A")}


# --- round trip: random diagrams rendered to text and read back --------------------------------

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
# Printable label text without line breaks; a description must not begin with ':' ("A:::cls" is styling).
TEXT_CHARS = st.characters(
    min_codepoint=32, max_codepoint=0x2FF, blacklist_categories=("Cc", "Zl", "Zp"), blacklist_characters="\x85"
)
LABEL = st.text(TEXT_CHARS, max_size=30)
DESCRIPTION = st.text(TEXT_CHARS, min_size=1, max_size=30).filter(
    lambda s: s.strip() != "" and not s.strip().startswith(":")
)
QUOTED = st.text(TEXT_CHARS.filter(lambda c: c != '"'), max_size=20)
ARROW = st.sampled_from(["-->", " --> ", "  -->  ", " -->", "--> "])
COLON = st.sampled_from([":", " :", " : ", ": ", "  :  "])
INDENT = st.sampled_from(["", " ", "    ", "\t"])


@st.composite
def diagrams(draw):
    names = draw(st.lists(IDENT, min_size=1, max_size=8, unique=True))
    initial = draw(st.sampled_from(names))
    pairs = [(a, b) for a in names for b in names]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=16))
    items: list[tuple] = [("init", initial, draw(st.none() | LABEL))]
    for src, dst in chosen:
        items.append(("edge", src, dst, draw(st.none() | LABEL)))
    for name in draw(st.lists(st.sampled_from(names), unique=True)):
        items.append(("final", name, draw(st.none() | LABEL)))
    mentioned = {initial} | {p for pair in chosen for p in pair}
    for name in names:
        # states with no edge must be declared; others may be
        if name not in mentioned or draw(st.booleans()):
            kind = draw(st.sampled_from(["state", "state_as", "description"]))
            text = {"state": None, "state_as": QUOTED, "description": DESCRIPTION}[kind]
            items.append(("decl", kind, name, draw(text) if text is not None else None))
    for _ in range(draw(st.integers(0, 6))):
        items.append(draw(st.sampled_from([
            ("blank", ""), ("blank", "   "), ("direction", "direction LR"), ("direction", "direction TB"),
            ("style", "classDef hot fill:#f00,color:white"), ("style", f"class {names[0]} hot"),
            ("style", f"{names[-1]}:::hot"),
        ])))
        items.append(("comment", "%%" + draw(st.text(TEXT_CHARS, max_size=30))))
    items = draw(st.permutations(items))
    front_matter = draw(st.booleans())

    lines: list[str] = []
    if draw(st.booleans()):
        lines.append("%% leading comment")
    if front_matter:
        lines += ["---", "title: random", "---"]
    lines.append("stateDiagram-v2")
    states: dict[str, None] = {}
    edges: list[Edge] = []
    finals: set[str] = set()
    labels: dict[str, str] = {}

    def edge_text(src, dst, label):
        text = f"{src}{draw(ARROW)}{dst}"
        if label is not None:
            text += f"{draw(COLON)}{label}"
        return text

    for item in items:
        indent = draw(INDENT)
        kind = item[0]
        if kind == "init":
            lines.append(indent + edge_text("[*]", item[1], item[2]))
            states.setdefault(item[1])
        elif kind == "final":
            lines.append(indent + edge_text(item[1], "[*]", item[2]))
            states.setdefault(item[1])
            finals.add(item[1])
        elif kind == "edge":
            _, src, dst, label = item
            lines.append(indent + edge_text(src, dst, label))
            states.setdefault(src)
            states.setdefault(dst)
            edges.append(Edge(src, dst, (label or "").strip() or None))
        elif kind == "decl":
            _, how, name, text = item
            if how == "state":
                lines.append(f"{indent}state {name}")
            elif how == "state_as":
                lines.append(f'{indent}state "{text}" as {name}')
                labels[name] = text
            else:
                lines.append(f"{indent}{name}{draw(COLON)}{text}")
                labels[name] = text.strip()
            states.setdefault(name)
        else:
            lines.append(indent + item[1])
    expected = Diagram(name="random", states=tuple(states), initial=initial, finals=frozenset(finals),
                       edges=tuple(edges), labels=tuple(sorted(labels.items())))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline])), expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(diagrams())
def test_random_diagrams_round_trip(case):
    text, expected = case
    d = parse_diagram(text, "random")
    assert d.states == expected.states
    assert d.initial == expected.initial
    assert d.finals == expected.finals
    assert d.edges == expected.edges
    assert d.edge_set == {(e.source, e.dest) for e in expected.edges}
    assert d.labels == expected.labels
    assert d == expected


BAD_LINES = st.sampled_from([
    "state X {", "}", "note right of X : n", "state F <<fork>>", "state J <<join>>", "--", "flowchart TD",
    "sequenceDiagram", "stateDiagram-v2", "A -> B", "what is this", "X --> Y --> Z",
])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(diagrams(), BAD_LINES, st.data())
def test_an_unsupported_line_anywhere_after_the_header_is_reported_at_its_line(case, bad, data):
    text, _ = case
    lines = text.splitlines()
    header = lines.index("stateDiagram-v2")
    at = data.draw(st.integers(header + 1, len(lines)))  # index into lines; line number at + 1
    lines.insert(at, bad)
    with pytest.raises(DiagramError) as info:
        parse_diagram("\n".join(lines), "random", source="random.mmd")
    assert str(info.value).startswith(f"random.mmd:{at + 1}:")
