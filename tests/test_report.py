"""``crm-states report`` against a real wire-protocol server: profiles are put in their states by running
the machines (an in-memory CRM told to fail, a database told to refuse a write), plus a few written by
hand (a run stopped half-way, a state an older diagram had)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import ASCENDING, DESCENDING, MongoClient, monitoring

from crm_states import report
from crm_states.api import MACHINES, CrmStates
from crm_states.cli import CliError, build_parser, main
from crm_states.cli.report_command import run_report
from crm_states.crm import CrmRejected, CrmTransientError
from crm_states.crm.memory import InMemoryCrm
from crm_states.mermaid import parse_diagram
from crm_states.records import iso
from crm_states.store import POSITIONS, Store
from tests.faults import FlakyDatabase, WritePlan

NB, SIGNUP = "nb_profile_validation", "new_user_signup"
BASE = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.timezone.utc)

#: Names and emails a CSV must carry through unchanged.
AWKWARD = [
    (11, "דבורה", "כהן, לוי", 'dvora"q"@example.org'),
    (12, 'Mary "Mo"', "O'Brien,\nJr.", "mo,mary@example.org"),
    (13, "\u200fשָׁלוֹם\u200f", 'line1\r\nline2 "x"', "שלום@דוגמה.ישראל"),
    (14, "=cmd|' /C calc'!A0", "  spaced  ", None),
]


class Clock:
    """A clock a second apart per call, so oldest and newest differ."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


def _open(db, crm: InMemoryCrm, tmp_path: Path, clock: Clock) -> CrmStates:
    app = CrmStates.open(db, crm, journal_path=str(tmp_path / "journal.jsonl"))
    app.clock = clock
    return app


@pytest.fixture
def seeded(db, tmp_path: Path):
    """Profiles in every kind of state of both machines, reached by running the machines."""
    crm = InMemoryCrm()
    clock = Clock(BASE)
    app = _open(db, crm, tmp_path, clock)

    # NationBuilder validation: found, not found (with awkward names), a bad nationbuilder_id.
    found = [{"id": i, "nationbuilder_id": 1000 + i, "email": f"u{i}@example.org"} for i in (1, 2, 3)]
    for p in found:
        crm.add_app_user(nationbuilder_id=p["nationbuilder_id"], email=p["email"])
    awkward = []
    for pid, first, last, email in AWKWARD:
        doc = {"id": pid, "nationbuilder_id": 1000 + pid, "first_name": first, "last_name": last,
               "CrmLog": ["OlderLine-2025-01-01T00:00:00.000Z"]}
        if email is not None:
            doc["email"] = email
        awkward.append(doc)
    bad = [{"id": 20, "nationbuilder_id": "not-a-number"}]
    db.profiles.insert_many(found + awkward + bad)
    app.validate_profiles(list(db.profiles.find({"id": {"$in": [1, 2, 3, 11, 12, 13, 14, 20]}})))

    # The lookup fails: the batch lands in WroteUnexpectedResponse.
    db.profiles.insert_many([{"id": i, "nationbuilder_id": 1000 + i} for i in (30, 31)])
    crm.fail_next(CrmTransientError("503 Service Unavailable", status=503))
    app.validate_profiles(list(db.profiles.find({"id": {"$in": [30, 31]}})))

    # The database refuses the write of the result: DbWriteNotFoundErrorLogged / DbWriteOkErrorLogged.
    db.profiles.insert_many([{"id": 40, "nationbuilder_id": 1040}, {"id": 41, "nationbuilder_id": 1041}])
    crm.add_app_user(nationbuilder_id=1041)
    for pid in (40, 41):
        flaky = _open(FlakyDatabase(db, WritePlan({("profiles", "update", 1)})), crm, tmp_path, clock)
        flaky.validate_profiles([db.profiles.find_one({"id": pid})])

    # Signups: created, rejected, and created but the id's write refused (the write-ahead writes no profile).
    db.profiles.insert_many([{"id": i} for i in (101, 102, 103)])
    app.run_signup(101, email="new@example.org", first_name="נועה")
    crm.fail_next(CrmRejected("INVALID_EMAIL_ADDRESS", status=400))
    app.run_signup(102, email="bad@example")
    flaky = _open(FlakyDatabase(db, WritePlan({("profiles", "update", 1)})), crm, tmp_path, clock)
    flaky.run_signup(103, email="lost@example.org")

    # By hand: a signup stopped half-way (a crash after the write-ahead), and a state no diagram has.
    db.profiles.insert_many([{"id": 104}, {"id": 50, "nationbuilder_id": 1050}])
    db[POSITIONS].insert_many([
        {"_id": f"{SIGNUP}:104", "machine": SIGNUP, "profile_id": 104, "state": "RequestAddToSalesforce",
         "run_id": "104-1", "seq": 3, "at": BASE - dt.timedelta(days=2), "detail": {}, "history": []},
        {"_id": f"{NB}:50", "machine": NB, "profile_id": 50, "state": "RetiredState", "run_id": "50-1", "seq": 2,
         "at": BASE, "detail": {}, "history": []},
    ])
    return db


def _args(*flags: str):
    return build_parser().parse_args(["report", *flags])


def _run(db, *flags: str) -> str:
    out = io.StringIO()
    assert run_report(db, _args(*flags), out) == 0
    return out.getvalue()


def _text_rows(text: str) -> dict[str, dict[str, tuple[int, str]]]:
    """machine -> state -> (count, rest of the line) from the text report."""
    rows: dict[str, dict[str, tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line.split(" (")[0]
            rows[current] = {}
        elif line == report.TEXT_HEADER:
            continue
        elif line.startswith("  ") and not line.startswith("   ") and not line.startswith(("  NOTE:", "  drift:")):
            state, count, *rest = line.split()
            rows[current][state] = (int(count), " ".join(rest))
    return rows


def test_the_seed_reaches_every_kind_of_state(seeded) -> None:
    data = report.collect(seeded)
    held = {(m, r.state) for m, rows in data.items() for r in rows if r.count}
    for pair in [(NB, "WroteSalesforceAppUserUid"), (NB, "WroteNotFound"), (NB, "ScriptFailureLogged"),
                 (NB, "WroteUnexpectedResponse"), (NB, "DbWriteNotFoundErrorLogged"), (NB, "DbWriteOkErrorLogged"),
                 (NB, "RetiredState"), (SIGNUP, "WroteSalesforceAppUserUid"), (SIGNUP, "WroteSalesforceErrorToDb"),
                 (SIGNUP, "LoggedDbFailure"), (SIGNUP, "RequestAddToSalesforce")]:
        assert pair in held, pair


def test_counts_and_times_equal_direct_queries_for_every_state(seeded) -> None:
    data = report.collect(seeded)
    assert list(data) == list(MACHINES)
    for machine, spec in MACHINES.items():
        rows = {r.state: r for r in data[machine]}
        assert [r.state for r in data[machine]][:len(spec.diagram.states)] == list(spec.diagram.states)
        positions = seeded[POSITIONS]
        for state in rows:
            query = {"machine": machine, "state": state}
            assert rows[state].count == positions.count_documents(query), (machine, state)
            first = positions.find_one(query, sort=[("at", ASCENDING)])
            last = positions.find_one(query, sort=[("at", DESCENDING)])
            assert rows[state].oldest == (first and first["at"])
            assert rows[state].newest == (last and last["at"])
        assert sum(r.count for r in rows.values()) == positions.count_documents({"machine": machine})
    not_found = {r.state: r for r in data[NB]}["WroteNotFound"]
    assert not_found.count == 4 and not_found.oldest < not_found.newest  # each write reads the clock
    half_way = {r.state: r for r in data[SIGNUP]}["RequestAddToSalesforce"]
    assert half_way.oldest == half_way.newest == (BASE - dt.timedelta(days=2)).replace(tzinfo=None)


def test_one_aggregation_per_machine_and_nothing_else(seeded, mongo_url: str) -> None:
    class Listener(monitoring.CommandListener):
        def __init__(self) -> None:
            self.commands: list[str] = []

        def started(self, event) -> None:
            self.commands.append(event.command_name)

        def succeeded(self, event) -> None:
            pass

        def failed(self, event) -> None:
            pass

    listener = Listener()
    client: MongoClient = MongoClient(mongo_url, event_listeners=[listener])
    try:
        _run(client[seeded.name], "--no-drift")
        _run(client[seeded.name], "--json")
        counts_only = [c for c in listener.commands if c not in ("hello", "isMaster", "ismaster", "endSessions")]
        listener.commands.clear()
        _run(client[seeded.name])  # the text report adds the drift pass: reads, batched
        with_drift = [c for c in listener.commands if c not in ("hello", "isMaster", "ismaster", "endSessions")]
    finally:
        client.close()
    assert counts_only == ["aggregate"] * (2 * len(MACHINES))
    assert with_drift[:len(MACHINES)] == ["aggregate"] * len(MACHINES)
    assert set(with_drift[len(MACHINES):]) <= {"find", "getMore"}  # a read never writes


def test_text_report_marks_kinds_times_and_notes(seeded) -> None:
    text = _run(seeded)
    rows = _text_rows(text)
    data = report.collect(seeded)
    for machine, spec in MACHINES.items():
        total = sum(r.count for r in data[machine])
        assert f"{machine} ({total} profiles)" in text
        for r in data[machine]:
            count, rest = rows[machine][r.state]
            assert count == r.count
            if r.kind != report.INTERMEDIATE:
                assert rest.startswith(r.kind)
            if r.count:
                assert f"{iso(r.oldest)} .. {iso(r.newest)}" in rest
            else:
                assert ".." not in rest
    # Every failure state of the design document has its handling note, profiles in it or not.
    for machine, spec in MACHINES.items():
        for state in spec.terminal - spec.diagram.finals:
            assert state in report.NOTES[machine], (machine, state)
    flat = " ".join(text.split())
    assert "NbProfileNotFoundInSalesforce-datetime" in flat and "MarComs" in flat
    assert "crm-states replay" in flat and "Pull these from the logs and write to Mongo" in flat
    assert "NewUserSalesforceWriteError-datetime" in flat
    assert "A run stopped half-way (crash or outage): `crm-states resume --machine new_user_signup --state " \
           "RequestAddToSalesforce`" in flat
    assert "RetiredState" in rows[NB] and "not in diagram" in rows[NB]["RetiredState"][1]
    # print_counts (the demo's table) is the same report, in the column layout the demo test relies on.
    out = io.StringIO()
    report.print_counts(seeded, out)
    assert out.getvalue() == text
    assert f"  {'LoggedDbFailure':<30} {1:>8}  db failure" in text


def test_machine_flag_restricts_the_report(seeded) -> None:
    text = _run(seeded, "--machine", SIGNUP)
    assert list(_text_rows(text)) == [SIGNUP]
    assert list(json.loads(_run(seeded, "--machine", SIGNUP, "--json"))) == [SIGNUP]


def test_json_parses_and_agrees_with_the_text(seeded) -> None:
    raw = _run(seeded, "--json")
    doc = json.loads(raw)
    rows = _text_rows(_run(seeded))
    assert list(doc) == list(MACHINES)
    for machine, spec in MACHINES.items():
        assert list(doc[machine])[:len(spec.diagram.states)] == list(spec.diagram.states)
        assert set(doc[machine]) == set(rows[machine])
        for state, entry in doc[machine].items():
            assert list(entry) == ["count", "oldest", "newest", "kind", "note"]
            count, rest = rows[machine][state]
            assert entry["count"] == count
            if count:
                assert f"{entry['oldest']} .. {entry['newest']}" in rest
                assert entry["oldest"].endswith("Z") and dt.datetime.fromisoformat(entry["oldest"]) <= \
                    dt.datetime.fromisoformat(entry["newest"])
            else:
                assert entry["oldest"] is None and entry["newest"] is None
    assert doc[NB]["WroteNotFound"]["kind"] == "stopped"
    assert doc[SIGNUP]["LoggedDbFailure"]["kind"] == "db failure"
    assert doc[SIGNUP]["WroteSalesforceAppUserUid"]["kind"] == "final"
    assert doc[SIGNUP]["RequestAddToSalesforce"]["note"].startswith("A run stopped half-way")
    assert doc[SIGNUP]["UserCreated"]["note"] is None  # mid-way and empty: nothing to do
    assert raw == _run(seeded, "--json")  # stable


def _read_csv(text: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    assert tuple(header) == report.CSV_COLUMNS
    return [dict(zip(header, row, strict=True)) for row in reader]


def test_csv_carries_awkward_text_field_by_field(seeded, tmp_path: Path) -> None:
    target = tmp_path / "not found.csv"
    out = _run(seeded, "--state", "WroteNotFound", "--csv", str(target))  # the state is in one machine only
    assert out == f"4 profiles of {NB} in WroteNotFound written to {target}\n"
    raw = target.read_bytes()
    assert "כהן, לוי".encode() in raw  # UTF-8, no BOM
    assert not raw.startswith(b"\xef\xbb\xbf")
    with open(target, encoding="utf-8", newline="") as f:
        rows = _read_csv(f.read())
    assert [r["id"] for r in rows] == [str(pid) for pid, *_ in AWKWARD]
    for row in rows:
        doc = seeded.profiles.find_one({"id": int(row["id"])})
        assert row["nationbuilder_id"] == str(doc["nationbuilder_id"])
        assert row["email"] == doc.get("email", "")
        assert row["first_name"] == doc["first_name"]
        assert row["last_name"] == doc["last_name"]
        assert row["sf_app_user_id"] == ""
        assert row["last_crm_log"] == doc["CrmLog"][-1] and row["last_crm_log"].startswith(
            "NbProfileNotFoundInSalesforce-")
        assert row["since"] == iso(Store(seeded).position(int(row["id"]), NB).at)
    assert not list(tmp_path.glob(".*.tmp"))


def test_csv_to_stdout_and_the_final_state(seeded) -> None:
    rows = _read_csv(_run(seeded, "--machine", SIGNUP, "--state", "WroteSalesforceAppUserUid", "--csv", "-"))
    [row] = rows
    doc = seeded.profiles.find_one({"id": 101})
    assert row == {"id": "101", "nationbuilder_id": "", "email": "", "first_name": "", "last_name": "",
                   "sf_app_user_id": doc["sf_app_user_id"], "last_crm_log": "",
                   "since": iso(Store(seeded).position(101, SIGNUP).at)}
    assert _read_csv(_run(seeded, "--machine", SIGNUP, "--state", "OK", "--csv", "-")) == []


def test_mermaid_reads_back_to_the_diagram_with_counts(seeded) -> None:
    data = {m: {r.state: r.count for r in rows} for m, rows in report.collect(seeded).items()}
    for machine, spec in MACHINES.items():
        text = _run(seeded, "--machine", machine, "--mermaid")
        back = parse_diagram(text, machine)
        assert back.edges == spec.diagram.edges  # same edges, same labels, same order
        assert back.edge_set == spec.diagram.edge_set
        assert back.states == spec.diagram.states
        assert back.initial == spec.diagram.initial and back.finals == spec.diagram.finals
        assert dict(back.labels) == {s: f"{s} ({data[machine][s]:,})" for s in spec.diagram.states}
        assert f"[*] --> {spec.diagram.initial}" in text.splitlines()
    text = _run(seeded, "--machine", NB, "--mermaid")
    assert 'state "WroteNotFound (4)" as WroteNotFound' in text.splitlines()
    assert "%% not in the diagram: RetiredState (1)" in text
    big = [report.StateRow(NB, "WroteNotFound", 1234, None, None, report.STOPPED, None)]
    assert 'state "WroteNotFound (1,234)" as WroteNotFound' in report.mermaid_text(MACHINES[NB], big)


def test_an_empty_database_reports_zeros(db) -> None:
    doc = json.loads(_run(db, "--json"))
    assert all(e["count"] == 0 and e["oldest"] is None for states in doc.values() for e in states.values())
    assert "nb_profile_validation (0 profiles)" in _run(db)


BAD_FLAGS = [
    (["--machine", "nope"], "unknown machine 'nope'; known machines: nb_profile_validation, new_user_signup"),
    (["--machine", SIGNUP, "--state", "WroteNotFound", "--csv", "-"],
     "new_user_signup has no state 'WroteNotFound'; its states: UserCreated, "),
    (["--state", "Nope", "--csv", "-"], "no machine has a state 'Nope'; the states of each machine:\n"
                                        "  nb_profile_validation: NotChecked"),
    (["--state", "UnexpectedResponse", "--csv", "-"], "is in several machines"),
    (["--csv", "x.csv"], "--csv needs --state"),
    (["--state", "WroteNotFound"], "add --csv FILE"),
    (["--json", "--mermaid", "--machine", NB], "choose one"),
    (["--mermaid"], "add --machine"),
    (["--state", "WroteNotFound", "--csv", "-", "--json"], "cannot be combined"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_usage_errors(db, flags: list[str], message: str) -> None:
    with pytest.raises(CliError) as caught:
        run_report(db, _args(*flags), io.StringIO())
    assert caught.value.code == 2
    assert message in str(caught.value)
    lines = str(caught.value).splitlines()  # one line, but the states of each machine: one line per machine
    assert len(lines) == (1 + len(MACHINES) if "each machine" in message else 1)


def test_bad_flags_through_the_cli_exit_2_with_one_line(db, mongo_url: str, tmp_path: Path, capsys) -> None:
    base = ["report", "--mongo-url", mongo_url, "--db", db.name]
    for flags in (["--machine", "nope"], ["--state", "Nope", "--csv", "-"], ["--csv", "x.csv"],
                  ["--state", "WroteNotFound", "--csv", str(tmp_path / "missing" / "x.csv")]):
        assert main([*base, *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = 1 + len(MACHINES) if flags[:2] == ["--state", "Nope"] else 1
        assert captured.err.startswith("crm-states: ") and captured.err.count("\n") == lines, captured.err
        assert "Traceback" not in captured.err
    assert not (tmp_path / "missing").exists()


def test_report_json_end_to_end(seeded, mongo_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "crm_states.cli", "report", "--mongo-url", mongo_url,
                           "--db", seeded.name, "--json"], capture_output=True, text=True, encoding="utf-8",
                          timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc == {m: {r.state: r.to_json() for r in rows} for m, rows in report.collect(seeded).items()}
    assert doc[SIGNUP]["LoggedDbFailure"]["count"] == 1


def test_a_closed_pipe_ends_the_report_quietly(seeded) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    for flags in ([], ["--json"], ["--state", "WroteNotFound", "--csv", "-"]):
        assert run_report(seeded, _args(*flags), ClosedPipe()) == 0
