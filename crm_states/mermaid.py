"""A reader for mermaid ``stateDiagram-v2`` files: the diagrams are the contract, so machines are read
from them rather than restated in code.

Reads what the project's diagrams use (states, ``[*]``, labelled edges, ``%%`` comments,
``state "Label" as Id``, ``state Id``, ``Id : description``, ``direction``; front matter and
``classDef``/``class`` styling are read and dropped) and refuses anything else
with a ``DiagramError`` naming the file and line, so a diagram feature we would silently drop (a
composite state, a fork, a note) can never change a machine unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

START_END = "[*]"
_ID = r"[A-Za-z_][A-Za-z0-9_]*"
_EDGE = re.compile(rf"^(?P<src>{_ID}|\[\*\])\s*-->\s*(?P<dst>{_ID}|\[\*\])\s*(?::\s*(?P<label>.*))?$")
_STATE_AS = re.compile(rf'^state\s+"(?P<label>[^"]*)"\s+as\s+(?P<id>{_ID})$')
_STATE = re.compile(rf"^state\s+(?P<id>{_ID})$")
_DESCRIPTION = re.compile(rf"^(?P<id>{_ID})\s*:\s*(?P<label>.+)$")
# Mermaid words that are never state ids: "note : x" is a note, not a state called "note".
_KEYWORDS = frozenset({"note", "state", "direction", "classDef", "class", "click", "style", "end", "as"})
_DIRECTION = re.compile(r"^direction\s+(TB|BT|LR|RL)$")
# Styling changes no state or edge, so it is read and dropped (transitions' own mermaid export emits it).
_STYLING = re.compile(rf"^(classDef\s+{_ID}\s+.*|[Cc]lass\s+{_ID}(\s*,\s*{_ID})*\s+{_ID}|{_ID}:::{_ID})$")


class DiagramError(ValueError):
    """A diagram could not be read; the message names the file and the line."""


@attrs.frozen
class Edge:
    source: str
    dest: str
    label: str | None = None


@attrs.frozen
class Diagram:
    """A state diagram as read: states in order of first mention, the single initial state, the states
    with an edge to ``[*]`` (finals), and the edges between named states."""

    name: str
    states: tuple[str, ...]
    initial: str
    finals: frozenset[str]
    edges: tuple[Edge, ...]
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def edge_set(self) -> frozenset[tuple[str, str]]:
        return frozenset((e.source, e.dest) for e in self.edges)

    def outgoing(self, state: str) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.source == state)

    @property
    def terminal_states(self) -> frozenset[str]:
        """States with no outgoing edge: where a run stops (finals and the failure states)."""
        sources = {e.source for e in self.edges}
        return frozenset(s for s in self.states if s not in sources)


def read_diagram(path: str | Path, name: str | None = None) -> Diagram:
    path = Path(path)
    return parse_diagram(path.read_text(encoding="utf-8"), name or path.stem, source=str(path))


def parse_diagram(text: str, name: str, source: str = "<string>") -> Diagram:
    states: dict[str, None] = {}
    labels: dict[str, str] = {}
    edges: list[Edge] = []
    initials: list[tuple[str, int]] = []
    finals: set[str] = set()
    seen_header = False
    in_front_matter = False

    def fail(lineno: int, why: str) -> DiagramError:
        return DiagramError(f"{source}:{lineno}: {why}")

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("%%"):
            continue
        if not seen_header and line == "---":  # YAML front matter (a title), before the header
            in_front_matter = not in_front_matter
            continue
        if in_front_matter:
            continue
        if not seen_header:
            if line != "stateDiagram-v2":
                raise fail(lineno, f"expected 'stateDiagram-v2' header, found {line!r}")
            seen_header = True
            continue
        if _DIRECTION.match(line) or _STYLING.match(line):
            continue
        if m := _EDGE.match(line):
            src, dst, label = m["src"], m["dst"], (m["label"] or "").strip() or None
            if src == START_END and dst == START_END:
                raise fail(lineno, "an edge from [*] to [*] means nothing")
            if src == START_END:
                initials.append((dst, lineno))
                states.setdefault(dst)
            elif dst == START_END:
                finals.add(src)
                states.setdefault(src)
            else:
                if any(e.source == src and e.dest == dst for e in edges):
                    raise fail(lineno, f"duplicate edge {src} --> {dst}")
                states.setdefault(src)
                states.setdefault(dst)
                edges.append(Edge(src, dst, label))
            continue
        if m := _STATE_AS.match(line):
            states.setdefault(m["id"])
            labels[m["id"]] = m["label"]
            continue
        if m := _STATE.match(line):
            states.setdefault(m["id"])
            continue
        if (m := _DESCRIPTION.match(line)) and m["id"] not in _KEYWORDS:
            states.setdefault(m["id"])
            labels[m["id"]] = m["label"].strip()
            continue
        raise fail(lineno, f"cannot read {line!r} (supported: states, [*], labelled edges, %% comments, "
                           "state \"Label\" as Id, direction)")
    if not seen_header:
        raise DiagramError(f"{source}: empty diagram: no 'stateDiagram-v2' header")
    if not initials:
        raise DiagramError(f"{source}: no initial state ([*] --> State)")
    if len(initials) > 1:
        lines = ", ".join(f"{s} (line {n})" for s, n in initials)
        raise DiagramError(f"{source}:{initials[1][1]}: several initial states: {lines}")
    return Diagram(
        name=name,
        states=tuple(states),
        initial=initials[0][0],
        finals=frozenset(finals),
        edges=tuple(edges),
        labels=tuple(sorted(labels.items())),
    )
