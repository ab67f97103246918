"""The database every ``crm-states`` command opens, driven as a subprocess: a bad ``MONGO_URL`` or
``MONGO_DB`` is one usage line naming the setting and starts nothing, an unreachable database says host,
port and cause, a new empty database is said, and the embedded server is SecantusDB or mongod."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import MongoClient

from crm_states.testing.mongo import MongoServer, free_port

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("MONGO_URL", "MONGO_DB", "CRM_STATES_EMBEDDED_SERVER")


def run(cwd: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    base.update(PYTHONPATH=str(ROOT), CRM_TYPE="NONE", **env)
    return subprocess.run([sys.executable, "-m", "crm_states.cli", *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


@pytest.mark.parametrize(("url", "why"), [
    ("mongodb://127.0.0.1:99999", "Port must be an integer between 0 and 65535"),
    ("mongodb://127.0.0.1:abc", "Port contains non-digit characters"),
    ("http://127.0.0.1:27017", "Invalid URI scheme"),
    ("mongodb://", "Must provide at least one hostname"),
    ("mongodb://127.0.0.1/?nosuchoption=1", "Unknown option"),
    ("   ", "set but empty"),
])
def test_a_bad_mongo_url_is_one_usage_line_and_starts_nothing(tmp_path: Path, url: str, why: str) -> None:
    done = run(tmp_path, "report", MONGO_URL=url)
    assert done.returncode == 2 and done.stdout == ""
    line = one_line(done)
    assert line.startswith("crm-states: MONGO_URL ") and why in line
    assert list(tmp_path.iterdir()) == []  # no embedded database was started instead
    flag = run(tmp_path, "report", "--mongo-url", url)
    assert flag.returncode == 2 and one_line(flag).startswith("crm-states: --mongo-url ")


@pytest.mark.parametrize(("name", "why"), [("a b", "contains ' '"), ("a/b", "contains '/'"), ("a.b", "contains '.'"),
                                           ("", "is empty"), ("x" * 64, "is longer than 63 bytes"),
                                           ('a"$', "contains '\"' '$'")])
def test_a_bad_database_name_is_one_usage_line(tmp_path: Path, name: str, why: str, mongo_url: str) -> None:
    for extra in ({}, {"MONGO_URL": mongo_url}):  # embedded or not: checked before anything starts
        done = run(tmp_path, "report", MONGO_DB=name, **extra)
        assert done.returncode == 2 and done.stdout == ""
        assert one_line(done) == f"crm-states: MONGO_DB={name!r} is not a valid database name: it {why}"
    assert list(tmp_path.iterdir()) == []
    flag = run(tmp_path, "report", "--db", name)
    assert flag.returncode == 2 and one_line(flag).startswith(f"crm-states: --db={name!r} is not a valid")


def test_an_unreachable_database_says_host_port_and_cause_without_the_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = run(tmp_path, "report",
               MONGO_URL=f"mongodb://operator:s3cret-pw@127.0.0.1:{port}/?serverSelectionTimeoutMS=300")
    assert done.returncode == 3
    line = one_line(done)
    assert line == f"crm-states: cannot reach MongoDB at 127.0.0.1:{port} (MONGO_URL): [Errno 111] Connection refused"
    assert "s3cret" not in done.stderr + done.stdout


def test_a_new_empty_database_is_said_in_one_line_and_the_command_goes_on(tmp_path: Path, mongo_url: str, db) -> None:
    fresh = run(tmp_path, "report", "--json", MONGO_URL=mongo_url, MONGO_DB=db.name)
    assert fresh.returncode == 0 and fresh.stdout.startswith("{")
    assert one_line(fresh) == (f"crm-states: the database {db.name} at {mongo_url.split('/')[2]} was new and empty "
                               "(a mistyped --db or --data-dir?)")
    # A command that fails on it says only why, in its one line.
    failed = run(tmp_path, "report", "--machine", "nope", MONGO_URL=mongo_url, MONGO_DB=db.name)
    assert failed.returncode == 2 and one_line(failed).startswith("crm-states: unknown machine 'nope'")
    db.profiles.insert_one({"id": 1})
    used = run(tmp_path, "report", "--json", MONGO_URL=mongo_url, MONGO_DB=db.name)
    assert used.returncode == 0 and used.stderr == ""


@pytest.mark.parametrize("kind", ["secantus", "mongod"])
def test_the_embedded_server_keeps_one_directory_per_kind(tmp_path: Path, kind: str) -> None:
    first = run(tmp_path, "report", "--json", "--embedded-server", kind)
    assert first.returncode == 0, first.stderr
    assert one_line(first) == (f"crm-states: the database crm_states_demo in .crm-states/{kind} was new and empty "
                               "(a mistyped --db or --data-dir?)")
    assert sorted(p.name for p in (tmp_path / ".crm-states").iterdir()) == [kind]
    assert {p.name for p in (tmp_path / ".crm-states" / kind).iterdir()} == {"data", "server.log"}
    assert not (tmp_path / ".crm-states" / kind / "data" / "server.json").exists()  # removed on stop
    # The environment chooses too, and the option wins over it; a bad value is a usage error.
    other = "mongod" if kind == "secantus" else "secantus"
    by_env = run(tmp_path, "report", "--json", CRM_STATES_EMBEDDED_SERVER=other)
    assert by_env.returncode == 0 and f".crm-states/{other} was new" in by_env.stderr
    wins = run(tmp_path, "report", "--json", "--embedded-server", kind, CRM_STATES_EMBEDDED_SERVER=other)
    assert wins.returncode == 0 and f".crm-states/{kind} was new" in wins.stderr  # report creates nothing
    bad = run(tmp_path, "report", CRM_STATES_EMBEDDED_SERVER="postgres")
    assert bad.returncode == 2
    assert one_line(bad) == ("crm-states: CRM_STATES_EMBEDDED_SERVER='postgres': expected one of secantus, mongod, "
                             "mongod-rs")


def test_the_default_embedded_server_is_mongod(tmp_path: Path) -> None:
    done = run(tmp_path, "report", "--json")
    assert done.returncode == 0 and "in .crm-states/mongod was new" in done.stderr


@pytest.mark.parametrize("kind", ["secantus", "mongod"])
def test_a_data_directory_held_by_another_server_is_said_in_one_line(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "state" / kind / "data"
    with MongoServer(data, kind=kind) as holder:
        done = run(tmp_path, "report", "--data-dir", "state", "--embedded-server", kind)
        program = "secantusd-py" if kind == "secantus" else "mongod"
        assert done.returncode == 3
        assert one_line(done) == (f"crm-states: the database in state/{kind}/data is held by process "
                                  f"{holder.process.pid} ({program}, port {holder.port}): stop it or use another "
                                  "--data-dir")
        assert holder.process.poll() is None  # left alone


@pytest.mark.parametrize("kind", ["secantus", "mongod"])
def test_the_demo_and_its_database_outage_on_each_embedded_server(tmp_path: Path, kind: str) -> None:
    demo = run(tmp_path, "demo", "--profiles", "100", "--embedded-server", kind, timeout=300)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "signups met the database outage" in demo.stdout  # the failCommand fail point took effect
    report = run(tmp_path, "report", "--embedded-server", kind)
    assert report.returncode == 0 and report.stdout.strip() in demo.stdout
