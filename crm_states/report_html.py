"""``crm-states report --html FILE``: one self-contained page an operator opens in a browser.

Per machine: the diagram with each state's count (inline SVG from ``diagram_svg``), the counts table with
oldest/newest entry and handling note, and for each failure state holding profiles the first few of them
with the commands that export and resume them; optionally the drift ``crm-states heal`` measured. The
page needs no network: CSS and SVG are inline, no script, no web font. Every figure comes from
``report.collect`` (and ``report_profiles.first_in_state``), so the page says what the database holds.

The template is Jinja2 with autoescaping: state names found only in the database, CrmLog lines and
error texts are untrusted. The database is named by host and database name only, never by its URL.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from collections.abc import Mapping
from typing import Any, TextIO

import jinja2
from markupsafe import Markup, escape
from pymongo.database import Database

from .api import MACHINES
from .diagram_svg import COLOURS, diagram_svg
from .records import iso, utcnow
from .report import FAILURE_KINDS, MACHINE_NOTES, UNKNOWN, StateRow
from .report_profiles import first_in_state

FIRST_ROWS = 5  # profiles shown per failure state
_CODE = re.compile(r"`([^`]+)`")
_ENV = jinja2.Environment(loader=jinja2.PackageLoader("crm_states", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def database_label(db: Database) -> str:
    """``host:port[,host:port...]/database``: the servers the client knows, never the URL (which may hold
    a user name and password)."""
    hosts = []
    for host, port in sorted(db.client.topology_description.server_descriptions()):
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return f"{','.join(hosts) or '?'}/{db.name}"


def write_html(db: Database, data: Mapping[str, list[StateRow]], out: TextIO, *,
               drift: Mapping[str, int] | None = None, first_rows: int = FIRST_ROWS,
               generated: dt.datetime | None = None) -> None:
    """Write the page for ``data`` (``report.collect(db, machines)``) to ``out``. ``drift``, when not None,
    is ``crm-states heal``'s count per machine of profiles whose data drifted."""
    out.write(render(page(db, data, drift=drift, first_rows=first_rows, generated=generated)))


def page(db: Database, data: Mapping[str, list[StateRow]], *, drift: Mapping[str, int] | None = None,
         first_rows: int = FIRST_ROWS, generated: dt.datetime | None = None) -> dict[str, Any]:
    """What the template shows, as plain values (the failure rows are read here, one query per state)."""
    machines = []
    for name, rows in data.items():
        spec = MACHINES[name]
        labels = dict(spec.diagram.labels)
        failures = [_failure(db, name, r, first_rows) for r in rows if r.kind in FAILURE_KINDS and r.count]
        machines.append({
            "name": name,
            "total": sum(r.count for r in rows),
            "in_failure": sum(r.count for r in rows if r.kind in FAILURE_KINDS),
            "svg": Markup(diagram_svg(spec, rows)),  # dot escaped every text it wrote into the SVG
            "note": MACHINE_NOTES.get(name),
            "drift": None if drift is None else drift.get(name),
            "rows": [{"state": r.state, "label": labels.get(r.state, r.state), "kind": r.kind,
                      "kind_class": _css(r.kind), "count": r.count, "oldest": _time(r.oldest),
                      "newest": _time(r.newest), "note": r.note, "known": r.kind != UNKNOWN} for r in rows],
            "failures": failures,
        })
    return {"generated": iso(generated or utcnow()), "database": database_label(db), "machines": machines,
            "drift_known": drift is not None,
            "legend": [{"kind": k, "kind_class": _css(k), "fill": f, "border": b} for k, (f, b) in COLOURS.items()]}


def render(context: Mapping[str, Any]) -> str:
    return _ENV.get_template("report.html").render(**context)


def _failure(db: Database, machine: str, row: StateRow, limit: int) -> dict[str, Any]:
    profiles = [{"id": p["id"], "last_crm_log": p["last_crm_log"], "since": _time(p["since"])}
                for p in first_in_state(db, machine, row.state, limit)]
    quoted = shlex.quote(machine), shlex.quote(row.state)
    return {"state": row.state, "kind": row.kind, "kind_class": _css(row.kind), "count": row.count,
            "profiles": profiles,
            "export": f"crm-states report --machine {quoted[0]} --state {quoted[1]} "
                      f"--csv {shlex.quote(f'{machine}.{row.state}.csv')}",
            "resume": f"crm-states resume --machine {quoted[0]} --state {quoted[1]}"}


def _css(kind: str) -> str:
    return "kind-" + kind.replace(" ", "-")


def _time(value: Any) -> str | None:
    if value is None:
        return None
    return iso(value) if isinstance(value, dt.datetime) else str(value)


def _with_code(text: str | None) -> Markup:
    """A handling note with its `backticked` commands as ``<code>``; everything else escaped."""
    if not text:
        return Markup("")
    return Markup(_CODE.sub(lambda m: f"<code>{m.group(1)}</code>", str(escape(text))))


_ENV.filters["with_code"] = _with_code
_ENV.filters["thousands"] = lambda n: f"{n:,}"
_ENV.filters["profiles"] = lambda n: f"{n:,} profile" + ("" if n == 1 else "s")
