"""A machine's diagram as an SVG picture whose states carry their counts, for the HTML report.

Laid out by Graphviz's ``dot`` through the ``graphviz`` package: the package quotes the DOT text (state
names found only in the database are arbitrary strings) and ``dot`` escapes what it writes into the SVG.
Hand-placed boxes would be a layout engine of our own; mermaid would need a browser and a CDN to render.

Kinds are told apart by colour (final green, stopped amber, db failure red, mid-way white, not in the
diagram grey and dashed), and a failure state that holds profiles gets a heavy border.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import graphviz

from .engine import StateMachine
from .report import (
    DB_FAILURE,
    FAILURE_KINDS,
    FINAL,
    INTERMEDIATE,
    STOPPED,
    UNKNOWN,
    StateRow,
)

#: fill and border colour per kind (also the page's legend: ``report_html`` reads it).
COLOURS: dict[str, tuple[str, str]] = {
    FINAL: ("#d4edda", "#28a745"),
    STOPPED: ("#fff3cd", "#d39e00"),
    DB_FAILURE: ("#f8d7da", "#dc3545"),
    INTERMEDIATE: ("#ffffff", "#6c757d"),
    UNKNOWN: ("#e2e3e5", "#6c757d"),
}
INSTALL_HINT = ("Graphviz's dot program is not installed: install it (Debian/Ubuntu: apt-get install graphviz; "
                "macOS: brew install graphviz) to draw the diagrams of --html")
_LABEL_LIMIT = 48
_COMMENT = re.compile(r"<!--.*?-->", re.S)


class DotMissing(RuntimeError):
    """Graphviz's ``dot`` cannot be run; the message says what to install."""


def check_dot() -> None:
    """Raise ``DotMissing`` unless ``dot`` runs (``dot -V``)."""
    try:
        graphviz.version()
    except (graphviz.ExecutableNotFound, OSError) as exc:
        raise DotMissing(INSTALL_HINT) from exc


def node_id(machine: str, state: str) -> str:
    """The SVG id of a diagram state's node (the page's tests and links use it)."""
    return f"state-{machine}-{state}"


def diagram_svg(spec: StateMachine, rows: Iterable[StateRow]) -> str:
    """The ``<svg>`` element of ``spec``'s diagram with each state's count under its name."""
    rows = list(rows)
    graph = graphviz.Digraph(spec.name, graph_attr={
        "id": f"diagram-{spec.name}", "rankdir": "TB", "bgcolor": "transparent", "fontname": "Helvetica",
        "nodesep": "0.35", "ranksep": "0.45", "pad": "0.1"})
    graph.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11", margin="0.15,0.06")
    graph.attr("edge", fontname="Helvetica", fontsize="9", color="#6c757d", fontcolor="#495057", arrowsize="0.7")
    labels = dict(spec.diagram.labels)
    graph.node("__start", label="", shape="circle", style="filled", fillcolor="#212529", color="#212529",
               width="0.18", fixedsize="true", id=f"start-{spec.name}")
    graph.node("__end", label="", shape="doublecircle", style="filled", fillcolor="#212529", color="#212529",
               width="0.14", fixedsize="true", id=f"end-{spec.name}")
    unknown = 0
    for row in rows:
        if row.kind == UNKNOWN:
            unknown += 1
            name, ident = f"__unknown{unknown}", f"unknown-{spec.name}-{unknown}"
            title = "not in the diagram: " + _printable(row.state)
        else:
            name, ident, title = row.state, node_id(spec.name, row.state), _printable(labels.get(row.state, row.state))
        fill, border = COLOURS.get(row.kind, COLOURS[INTERMEDIATE])
        heavy = row.kind in FAILURE_KINDS and row.count > 0
        style = "rounded,filled" + (",dashed" if row.kind == UNKNOWN else "") + (",bold" if heavy else "")
        graph.node(name, label=_label(title) + "\\n" + f"{row.count:,}", id=ident, fillcolor=fill,
                   color=border, penwidth="3" if heavy else "1.2", style=style,
                   fontcolor="#212529" if row.count else "#6c757d",
                   **{"class": f"state kind-{row.kind.replace(' ', '-')}" + (" has-profiles" if row.count else "")})
    graph.edge("__start", spec.diagram.initial, id=f"edge-{spec.name}-start")
    for index, edge in enumerate(spec.diagram.edges):
        graph.edge(edge.source, edge.dest, label=_label(_printable(edge.label or "")),
                   id=f"edge-{spec.name}-{index}")
    for state in spec.diagram.states:
        if state in spec.diagram.finals:
            graph.edge(state, "__end", id=f"edge-{spec.name}-end-{state}")
    try:
        svg = graph.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound as exc:
        raise DotMissing(INSTALL_HINT) from exc
    return _COMMENT.sub("", svg[svg.index("<svg"):]).strip()


def _label(text: str) -> str:
    """DOT label text shown literally: no backslash escapes, no HTML label, and ``&`` made ``&amp;`` because
    dot passes what looks like an entity (``&lt;``) through to the SVG, where it would show as ``<``."""
    return graphviz.escape(text.replace("&", "&amp;"))


def _printable(text: str, limit: int = _LABEL_LIMIT) -> str:
    """One line of at most ``limit`` printable characters: control characters, lone surrogates and runs of
    whitespace from a database value must not reach ``dot`` (the table shows the value in full)."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
