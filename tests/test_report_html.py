"""``crm-states report --html`` and ``--prometheus`` as an operator runs them: the figures of the page and of
the exposition equal ``report --json`` on the same database, the failure sections' commands work, hostile
values stay text, and a missing ``dot`` or ``prometheus_client`` is one clear line (exit 2)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from markupsafe import escape
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from crm_states.api import MACHINES
from crm_states import report
from crm_states.diagram_svg import node_id
from crm_states.report_html import database_label, write_html
from crm_states.report_prometheus import exposition
from crm_states.store import POSITIONS, Store
from crm_states.testing import FakeSalesforce
from tests.operator_seed import EXPECTED, NB, SIGNUP, PageFigures, seed
from tests.reliability.checks import cli, cli_command, cli_env

SAFE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "main", "footer", "h1", "h2", "h3", "p",
             "time", "strong", "span", "table", "thead", "tbody", "tr", "th", "td", "a", "section", "small", "br",
             "div", "code", "svg", "g", "path", "polygon", "ellipse", "text", "polyline"}


@pytest.fixture
def seeded(db, mongo_url: str, tmp_path: Path):
    with FakeSalesforce() as fake:
        seed(db, fake, tmp_path)
        yield db, cli_env(mongo_url, db.name, fake, tmp_path / "journal.jsonl")


def _samples(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_page_and_exposition_equal_report_json(seeded, tmp_path: Path) -> None:
    db, env = seeded
    as_json = cli(env, "report", "--json")
    page = tmp_path / "report.html"
    html = cli(env, "report", "--html", str(page))
    prom = cli(env, "report", "--prometheus")
    assert as_json.returncode == html.returncode == prom.returncode == 0, (html.stderr, prom.stderr)
    doc = json.loads(as_json.stdout)
    assert {m: {s: r["count"] for s, r in states.items() if r["count"]} for m, states in doc.items()
            if any(r["count"] for r in states.values())} == EXPECTED

    dom = PageFigures(page.read_text(encoding="utf-8"))
    samples = _samples(prom.stdout)
    gauges = {(s.labels["machine"], s.labels["state"]): s for s in samples["crm_states_profiles"]}
    ages = {(s.labels["machine"], s.labels["state"]): s.value for s in samples["crm_states_oldest_profile_age_seconds"]}
    generated = samples["crm_states_report_timestamp_seconds"][0].value
    assert len(gauges) == sum(len(states) for states in doc.values())
    for machine, states in doc.items():
        for state, row in states.items():
            assert dom.table[machine][state] == f"{row['count']:,}"
            assert dom.picture[machine][node_id(machine, state)][-1] == f"{row['count']:,}"
            assert gauges[(machine, state)].value == row["count"] and gauges[(machine, state)].labels["kind"] == row["kind"]
            if row["kind"] in report.FAILURE_KINDS and row["count"]:
                oldest = dt.datetime.fromisoformat(row["oldest"].replace("Z", "+00:00")).timestamp()
                assert ages[(machine, state)] == pytest.approx(generated - oldest, abs=0.01)
            else:
                assert (machine, state) not in ages
    # Drift is what `crm-states heal --dry-run` measures, in the page and in the exposition alike.
    healed = json.loads(cli(env, "heal", "--dry-run", "--json").stdout)
    assert {s.labels["machine"]: s.value for s in samples["crm_states_drift_profiles"]} == {
        m: figures["drifted"] for m, figures in healed.items()}
    assert "profiles whose data drifted" in page.read_text(encoding="utf-8")
    assert html.stdout == f"report of {len(MACHINES)} machines ({sum(map(sum, (s.values() for s in EXPECTED.values())))} " \
                          f"profiles) written to {page}\n"


def test_failure_sections_list_the_longest_waiting_profiles_with_commands_that_work(seeded, tmp_path: Path) -> None:
    db, env = seeded
    out = io.StringIO()
    write_html(db, report.collect(db), out, first_rows=3)
    html = out.getvalue()
    failing = [(m, s) for m, states in EXPECTED.items() for s in states if s not in ("WroteSalesforceAppUserUid",)]
    for machine, state in failing:
        first = report.first_in_state(db, machine, state, 3)
        assert len(first) == min(3, EXPECTED[machine][state]) and set(first[0]) == {"id", "last_crm_log", "since"}
        everyone = list(Store(db).in_state(machine, state))
        assert [p["id"] for p in first] == [p["id"] for p in everyone[:3]]
        for profile in first:
            assert f"<tr><td>{profile['id']}</td>" in html
        export = f"crm-states report --machine {machine} --state {state} --csv {machine}.{state}.csv"
        assert export in html and f"crm-states resume --machine {machine} --state {state}" in html
        done = subprocess.run(cli_command(*export.split()[1:]), env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        rows = list(csv.DictReader(open(tmp_path / f"{machine}.{state}.csv", encoding="utf-8")))
        assert len(rows) == EXPECTED[machine][state]
    assert "NewUserSalesforceWriteError" in html  # the rejected create's CrmLog line
    with pytest.raises(ValueError):
        report.first_in_state(db, NB, "WroteNotFound", 0)


def test_drift_is_rendered_only_when_given(seeded) -> None:
    db, _ = seeded
    data = report.collect(db, [NB, SIGNUP])
    without, with_drift = io.StringIO(), io.StringIO()
    write_html(db, data, without)
    write_html(db, data, with_drift, drift={NB: 1234})
    assert "data-drift" not in without.getvalue() and "drifted" not in without.getvalue()
    page = with_drift.getvalue()
    assert 'data-drift="1234"' in page and "1,234 profiles whose data drifted" in page
    assert 'data-drift=""' in page and "not measured" in page  # new_user_signup: heal did not say
    samples = _samples(exposition(data, drift={NB: 1234, SIGNUP: 0}))
    assert {s.labels["machine"]: s.value for s in samples["crm_states_drift_profiles"]} == {NB: 1234, SIGNUP: 0}


HOSTILE_STATE = '</svg><script>x()</script>"\\\n{{7*7}} &amp; -->'
HOSTILE_LOG = '<img src=x onerror=alert(1)> "quoted" \\ back & <b>bold</b>'


def test_hostile_values_from_the_database_stay_text(db) -> None:
    db.profiles.insert_many([{"id": 1}, {"id": 2, "CrmLog": [HOSTILE_LOG]}])
    db[POSITIONS].insert_many([
        {"_id": f"{NB}:1", "machine": NB, "profile_id": 1, "state": HOSTILE_STATE, "run_id": "1-1", "seq": 1,
         "at": dt.datetime(2026, 1, 1), "detail": {}, "history": []},
        {"_id": f"{SIGNUP}:2", "machine": SIGNUP, "profile_id": 2, "state": "WroteSalesforceErrorToDb", "run_id": "2-1",
         "seq": 3, "at": dt.datetime(2026, 1, 2), "detail": {}, "history": []},
    ])
    data = report.collect(db, [NB, SIGNUP])
    out = io.StringIO()
    write_html(db, data, out)
    dom = PageFigures(out.getvalue())
    assert {tag for tag, _ in dom.tags} <= SAFE_TAGS
    assert all(not name.startswith("on") for _, attrs in dom.tags for name in attrs)
    assert dom.table[NB][HOSTILE_STATE] == "1"
    unknown = dom.picture[NB]["unknown-nb_profile_validation-1"]
    assert unknown[-1] == "1" and "</svg><script>" in unknown[0] and "&amp;" in unknown[0] and "49" not in unknown[0]
    assert f'<td class="log">{escape(HOSTILE_LOG)}</td>' in out.getvalue()
    samples = _samples(exposition(data))
    assert any(s.labels["state"] == HOSTILE_STATE for s in samples["crm_states_profiles"])  # escaped, read back


def test_the_page_needs_no_network(seeded) -> None:
    db, _ = seeded
    out = io.StringIO()
    write_html(db, report.collect(db), out)
    dom = PageFigures(out.getvalue())
    links = [(tag, name, value) for tag, attrs in dom.tags for name, value in attrs.items()
             if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data")]
    assert all(value and value.startswith("#machine-") for _, _, value in links), links
    assert not any(tag in ("script", "link", "img", "iframe", "object", "embed", "image") for tag, _ in dom.tags)
    assert "url(" not in out.getvalue() and "@import" not in out.getvalue() and "@font-face" not in out.getvalue()


def test_the_database_is_named_by_host_and_name_only() -> None:
    client: MongoClient = MongoClient("mongodb://operator:SENTINEL-pass-8d1@db1.example:27017,db2.example:27018/"
                                      "admin?authSource=admin&tls=false", connect=False)
    try:
        assert database_label(client["sefaria"]) == "db1.example:27017,db2.example:27018/sefaria"
    finally:
        client.close()


def test_missing_dot_and_prometheus_client_are_one_line_each(seeded, tmp_path: Path) -> None:
    db, env = seeded
    page = tmp_path / "page.html"
    no_dot = cli({**env, "PATH": str(tmp_path / "empty-bin")}, "report", "--html", str(page))
    assert no_dot.returncode == 2 and not page.exists(), no_dot.stderr
    assert no_dot.stderr.count("\n") == 1 and "apt-get install graphviz" in no_dot.stderr
    hide = "import sys; sys.modules['prometheus_client'] = None; from crm_states.cli import main; sys.exit(main())"
    no_prom = subprocess.run([sys.executable, "-c", hide, "report", "--prometheus"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert no_prom.returncode == 2 and no_prom.stdout == "", no_prom.stderr
    assert no_prom.stderr == 'crm-states: the Prometheus output needs prometheus_client: pip install "crm_states[metrics]"\n'
    both = cli(env, "report", "--html", str(page), "--json")
    assert both.returncode == 2 and "--html and --json are different outputs" in both.stderr


def test_prometheus_file_is_replaced_whole(seeded, tmp_path: Path) -> None:
    db, env = seeded
    target = tmp_path / "crm_states.prom"
    target.write_text("stale\n")
    done = cli(env, "report", "--prometheus", str(target), "--machine", SIGNUP)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    samples = _samples(target.read_text())
    assert {s.labels["state"]: s.value for s in samples["crm_states_profiles"] if s.value} == EXPECTED[SIGNUP]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
