"""The server launcher (crm_states/testing/mongo.py) on the run's backend, with real processes: restart on
the same data, pause, fail points, the parent-death signal, a Ctrl-C on the parent's terminal, and a
data directory that another live server holds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pymongo import MongoClient, WriteConcern
from pymongo.errors import OperationFailure, PyMongoError

from crm_states.testing import processes
from crm_states.testing.mongo import DataDirectoryHeld, MongoServer, MongoServerError, find_mongod, last_error
from crm_states.testing.processes import alive, find_holder, sweep_temp_dirs

ROOT = Path(__file__).resolve().parents[1]


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid) or not processes.command_line(pid):
            return True
        time.sleep(0.05)
    return False


def journaled(client: MongoClient):  # type: ignore[no-untyped-def]
    return client.t.get_collection("docs", write_concern=WriteConcern(w=1, j=True))


def test_restart_keeps_port_and_journaled_data(mongo_server_factory, tmp_path: Path, backend: str) -> None:
    server = mongo_server_factory(tmp_path / "data")
    url = server.url
    client: MongoClient = MongoClient(url, serverSelectionTimeoutMS=20_000)
    journaled(client).insert_many([{"n": i} for i in range(100)])
    pid = server.process.pid
    server.restart()
    assert server.url == url and server.process.pid != pid and not alive(pid)
    assert client.t.docs.count_documents({}) == 100
    hello = client.admin.command("hello")
    if backend == "mongod-rs":  # restart waits until the single member is PRIMARY again
        assert hello["isWritablePrimary"] and hello["setName"] == "crm_states" and "replicaSet=crm_states" in url
    else:
        assert "setName" not in hello
    client.close()


def test_a_data_directory_reopened_on_another_port_keeps_its_data(tmp_path: Path, backend: str) -> None:
    """A new handle picks a new port; a replica set's stored config names the old one and is moved."""
    with MongoServer(tmp_path / "data", kind=backend) as first:
        journaled(MongoClient(first.url, serverSelectionTimeoutMS=20_000)).insert_one({"n": 1})
        old_port = first.port
    with MongoServer(tmp_path / "data", kind=backend) as second:
        assert second.port != old_port
        client: MongoClient = MongoClient(second.url, serverSelectionTimeoutMS=20_000)
        assert client.t.docs.count_documents({"n": 1}) == 1
        journaled(client).insert_one({"n": 2})  # writable: PRIMARY again for a replica set
        client.close()


def test_memory_storage_is_a_temporary_directory_kept_over_restart_and_removed_on_stop(mongo_server_factory) -> None:
    server = mongo_server_factory(":memory:")
    data = server.data_dir
    assert data.is_dir() and data.name == "data" and data.parent.name.startswith(f"crm-states-db-{os.getpid()}-")
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=20_000)
    journaled(client).insert_one({"kept": True})
    server.kill()
    server.start()
    assert client.t.docs.count_documents({"kept": True}) == 1
    client.close()
    server.stop()
    assert not data.parent.exists()


def test_pause_stalls_requests_until_resume(mongo_server_factory) -> None:
    server = mongo_server_factory()
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=20_000, socketTimeoutMS=500)
    client.admin.command("ping")
    server.pause()
    try:
        with pytest.raises(PyMongoError):
            client.admin.command("ping")
    finally:
        server.resume()
    assert client.admin.command("ping")["ok"] == 1
    client.close()


def test_fail_points_with_test_commands(mongo_server_factory) -> None:
    server = mongo_server_factory(test_commands=True)
    assert server.supports_fail_points
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=20_000, retryWrites=False)
    client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                          "data": {"failCommands": ["insert"], "errorCode": 2}})
    with pytest.raises(OperationFailure):
        client.t.docs.insert_one({"refused": True})
    client.t.docs.insert_one({"accepted": True})
    assert client.t.docs.count_documents({}) == 1
    client.close()


def test_without_test_commands_there_is_no_fail_point(mongo_server_factory) -> None:
    server = mongo_server_factory()
    assert not server.supports_fail_points
    client: MongoClient = MongoClient(server.url, serverSelectionTimeoutMS=20_000)
    with pytest.raises(OperationFailure):
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    client.close()


PARENT = textwrap.dedent("""
    import faulthandler, os, signal, sys, time
    from pymongo import MongoClient
    from crm_states.testing.mongo import MongoServer
    faulthandler.dump_traceback_later(50)  # a hang shows where every thread was, before the test gives up
    # Ctrl-C handled as a program run from a terminal handles it: a suite started in the background (`cmd &`
    # from a script) runs with SIGINT ignored, which every child inherits, and this parent would sleep on
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = MongoServer(sys.argv[1], kind=sys.argv[2]).start()
    try:
        print(server.process.pid, server.port, flush=True)  # inside: the Ctrl-C may come right after it
        time.sleep(120)
    except KeyboardInterrupt:
        client = MongoClient(server.url, serverSelectionTimeoutMS=5000, socketTimeoutMS=20_000)
        client.t.docs.insert_one({"after": "ctrl-c"})   # the server outlived the terminal's Ctrl-C
        print("wrote after ctrl-c", flush=True)
        server.stop()
""")


def start_parent(data: Path, backend: str) -> tuple[subprocess.Popen[str], int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(data), backend], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    line = parent.stdout.readline()  # type: ignore[union-attr]
    assert line, parent.stderr.read()  # type: ignore[union-attr]
    server_pid, port = map(int, line.split())
    return parent, server_pid, port


def test_a_sigkilled_parent_takes_its_server_with_it(tmp_path: Path, backend: str) -> None:
    data = tmp_path / "data"
    parent, server_pid, port = start_parent(data, backend)
    assert alive(server_pid) and find_holder(data).pid == server_pid
    parent.kill()
    parent.wait(10)
    assert wait_gone(server_pid), f"server {server_pid} outlived its SIGKILLed parent"
    # What it left (server.json, mongod.lock) names a dead process: the directory opens again.
    assert (data / processes.SERVER_FILE).exists() and find_holder(data) is None
    with MongoServer(data, kind=backend) as again:
        assert MongoClient(again.url, serverSelectionTimeoutMS=20_000).admin.command("ping")["ok"] == 1


WORKER = textwrap.dedent("""
    import sys, time
    from crm_states.testing.mongo import MongoServer
    from crm_states.testing.processes import die_with_parent
    die_with_parent()  # what tests/conftest.py does in each pytest-xdist worker
    server = MongoServer(sys.argv[1], kind=sys.argv[2]).start()
    print(server.process.pid, flush=True)
    time.sleep(120)
""")
CONTROLLER = textwrap.dedent("""
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], stdout=subprocess.PIPE, text=True)
    print(worker.pid, worker.stdout.readline().strip(), flush=True)
    worker.wait()
""")


def test_a_sigkilled_test_controller_takes_its_workers_and_their_servers_with_it(tmp_path: Path,
                                                                                 backend: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    controller = subprocess.Popen([sys.executable, "-c", CONTROLLER, WORKER, str(tmp_path / "data"), backend],
                                  env=env, text=True, stdout=subprocess.PIPE, start_new_session=True)
    line = controller.stdout.readline()  # type: ignore[union-attr]
    worker_pid, server_pid = map(int, line.split())
    try:
        assert alive(worker_pid) and alive(server_pid)
        controller.kill()
        controller.wait(10)
        assert wait_gone(worker_pid), f"worker {worker_pid} outlived its SIGKILLed controller"
        assert wait_gone(server_pid), f"server {server_pid} outlived the worker that started it"
    finally:
        for pid in (worker_pid, server_pid):  # a failed run leaves nothing behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_on_the_parents_terminal_does_not_stop_the_server(tmp_path: Path, backend: str) -> None:
    parent, server_pid, port = start_parent(tmp_path / "data", backend)
    os.killpg(parent.pid, signal.SIGINT)  # what a Ctrl-C does: SIGINT to the terminal's foreground group
    try:
        out, err = parent.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        parent.kill()
        out, err = parent.communicate(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, signal.SIGKILL)
        pytest.fail(f"the parent did not end within 60 s of its Ctrl-C; it printed {out!r} and {err}")
    assert "wrote after ctrl-c" in out, err
    assert parent.returncode == 0 and wait_gone(server_pid)


def test_a_second_server_on_a_held_directory_names_the_holder(mongo_server_factory, tmp_path: Path,
                                                              backend: str) -> None:
    first = mongo_server_factory(tmp_path / "data")
    second = MongoServer(tmp_path / "data", kind=backend)
    with pytest.raises(DataDirectoryHeld) as caught:
        second.start()
    program = "secantusd-py" if backend == "secantus" else "mongod"
    assert str(caught.value) == (f"the database in {(tmp_path / 'data').resolve()} is held by process "
                                 f"{first.process.pid} ({program}, port {first.port}): stop it or use another "
                                 "data directory")
    assert second.process is None  # nothing was started
    # A holder that is not ours: a server started by another process (its server.json, or mongod.lock).
    first.stop()
    parent, server_pid, port = start_parent(tmp_path / "data", backend)
    try:
        with pytest.raises(DataDirectoryHeld, match=f"held by process {server_pid} \\({program}, port {port}\\)"):
            MongoServer(tmp_path / "data", kind=backend).start()
        if backend != "secantus":  # mongod's own lock file names it even without our server.json
            (tmp_path / "data" / processes.SERVER_FILE).unlink()
            with pytest.raises(DataDirectoryHeld, match=f"held by process {server_pid} \\(mongod, port {port}\\)"):
                MongoServer(tmp_path / "data", kind=backend).start()
    finally:
        parent.kill()
        parent.wait(10)
        wait_gone(server_pid)


def test_a_port_in_use_is_said_in_one_line(tmp_path: Path, backend: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MongoServer(tmp_path / "data", kind=backend, port=port, log_path=tmp_path / "server.log")
        with pytest.raises(MongoServerError, match=f"port {port} is already in use"):
            server.start()
    assert server.process is not None and server.process.poll() is not None


def test_a_missing_mongod_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRM_STATES_MONGOD", str(tmp_path / "no-mongod"))
    with pytest.raises(MongoServerError, match="CRM_STATES_MONGOD=.*no-mongod is not an executable file"):
        find_mongod()
    monkeypatch.delenv("CRM_STATES_MONGOD")
    assert Path(find_mongod()).name == "mongod"  # the dev extra's wheel


def test_a_server_that_fails_to_start_says_why(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "mongod"
    fake.write_text("#!/bin/sh\necho 'something broke: libfoo.so missing' >&2\nexit 7\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CRM_STATES_MONGOD", str(fake))
    with pytest.raises(MongoServerError, match=r"mongod exited with 7 while starting: something broke: libfoo.so "
                                               r"missing \(log: .*\)"):
        MongoServer(tmp_path / "data", kind="mongod", log_path=tmp_path / "m.log").start()


def test_last_error_reads_mongod_json_logs(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_text('{"t":1,"s":"I","msg":"ok"}\n{"t":2,"s":"E","msg":"Error setting up listener",'
                   '"attr":{"error":{"code":9001,"errmsg":"Address already in use"}}}\n{"t":3,"s":"I","msg":"bye"}\n')
    assert last_error(log).startswith("Error setting up listener: {'code': 9001, 'errmsg': 'Address already in use'")
    assert last_error(tmp_path / "absent.log") == ""


def test_temp_directories_of_dead_processes_are_swept(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    import tempfile

    left = Path(tempfile.gettempdir()) / f"{processes.TEMP_PREFIX}{dead}-left"
    (left / "data").mkdir(parents=True)
    mine = processes.make_temp_dir()
    try:
        assert left not in [mine] and not left.exists()
        assert mine.exists() and mine not in sweep_temp_dirs()
    finally:
        mine.rmdir()


def test_servers_start_from_the_main_thread_only(tmp_path: Path) -> None:
    import threading

    caught: list[BaseException] = []
    thread = threading.Thread(target=lambda: _start_catching(MongoServer(tmp_path / "d"), caught))
    thread.start()
    thread.join()
    assert [type(e).__name__ for e in caught] == ["ParentDeathUnavailable"] and "main thread" in str(caught[0])


def _start_catching(server: MongoServer, caught: list[BaseException]) -> None:
    try:
        server.start()
    except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
        caught.append(exc)
