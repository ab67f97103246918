"""Server processes that die with their parent, and who holds a data directory.

A database server started for a test run or a CLI command must not outlive it: a SIGKILLed ``pytest``
or ``crm-states`` would otherwise leave a server running on its data directory, and the next start on
that directory fails. Each server is started with Linux's parent-death signal (``PR_SET_PDEATHSIG``:
SIGKILL when the starting thread ends) and in a session of its own (so a Ctrl-C on the terminal does
not stop the database in the middle of a write: the parent stops it in order).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import attrs

SERVER_FILE = "server.json"
MONGOD_LOCK = "mongod.lock"
TEMP_PREFIX = "crm-states-db-"
_PR_SET_PDEATHSIG = 1


class ParentDeathUnavailable(RuntimeError):
    """The parent-death signal cannot be set (not Linux, or not on the main thread)."""


def _prctl() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError) as exc:
        raise ParentDeathUnavailable(f"prctl is not available on this system: {exc}") from exc


def spawn(args: Sequence[str], log: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session, killed by SIGKILL when this thread ends.

    The signal is tied to the thread that forks, not to the process, so a server started from a
    thread that then ends would be killed with it: only the main thread may start servers (the
    fixtures and the CLI start them there). The child checks that its parent is still the one that
    forked it after setting the signal, which closes the race of a parent dying in between.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ParentDeathUnavailable("database servers are started from the main thread only: the parent-death "
                                     "signal fires when the starting thread ends")
    prctl = _prctl()  # looked up before the fork: the child only calls it
    parent = os.getpid()
    return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: _die_with(parent, prctl))


def _die_with(parent: int, prctl: ctypes._CFuncPtr) -> None:  # type: ignore[name-defined]
    """Set SIGKILL as this process's parent-death signal, then exit at once if ``parent`` is already gone
    (it died before the signal was set, and would never send it)."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def die_with_parent() -> None:
    """Have this process killed by SIGKILL when its parent ends (a pytest-xdist worker whose controller was
    killed), so the servers it started, which die with it, go too, instead of running on until its test ends."""
    _die_with(os.getppid(), _prctl())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Until every thread of ``pid`` is stopped (state T) or gone; False if that took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue
        if all(state in ("T", "t", "Z", "X") for state in states):
            return True
        time.sleep(0.001)
    return False


def command_line(pid: int) -> list[str]:
    """The process's arguments, or ``[]`` if it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@attrs.frozen
class Holder:
    """A live server process that has a data directory open."""

    pid: int
    program: str
    port: int | None

    def describe(self, path: Path | str) -> str:
        port = f", port {self.port}" if self.port else ""
        return f"the database in {path} is held by process {self.pid} ({self.program}{port})"


def write_server_file(data_dir: Path, pid: int, port: int, kind: str) -> None:
    """``server.json`` beside the data: which process serves it on which port (SecantusDB keeps no
    lock file that names its process; mongod's ``mongod.lock`` holds its pid but not its port)."""
    path = data_dir / SERVER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "port": port, "kind": kind}), encoding="utf-8")
    os.replace(tmp, path)


def remove_server_file(data_dir: Path) -> None:
    (data_dir / SERVER_FILE).unlink(missing_ok=True)


def find_holder(data_dir: Path) -> Holder | None:
    """The live process serving ``data_dir``, from ``server.json`` or ``mongod.lock``; a file left by a
    dead process (or by one whose pid was reused by another program) is ignored."""
    data_dir = data_dir.resolve()
    try:
        info = json.loads((data_dir / SERVER_FILE).read_text(encoding="utf-8"))
        pid, port = int(info["pid"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    else:
        holder = _holding(pid, data_dir, port)
        if holder:
            return holder
    try:
        pid = int((data_dir / MONGOD_LOCK).read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return None
    return _holding(pid, data_dir, None) if pid else None


def _holding(pid: int, data_dir: Path, port: int | None) -> Holder | None:
    if pid == os.getpid() or not alive(pid):
        return None
    args = command_line(pid)
    if str(data_dir) not in args:
        return None  # a reused pid: not a server on this directory
    program = next((Path(a).name for a in args if Path(a).name in ("mongod", "secantusd-py")), Path(args[0]).name)
    if port is None:
        port = _port_argument(args)
    return Holder(pid, program, port)


def _port_argument(args: list[str]) -> int | None:
    for flag, value in zip(args, args[1:]):
        if flag == "--port" and value.isdigit():
            return int(value)
    return None


def make_temp_dir() -> Path:
    """A temporary directory for one server (``:memory:``), named after this process so that one left
    by a SIGKILLed process can be recognised and removed by a later one."""
    sweep_temp_dirs()
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))


def sweep_temp_dirs() -> list[Path]:
    """Remove the temporary server directories of processes that no longer run."""
    removed = []
    pattern = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")
    root = Path(tempfile.gettempdir())
    for entry in root.glob(TEMP_PREFIX + "*"):
        match = pattern.match(entry.name)
        if not match or alive(int(match.group(1))) or not entry.is_dir():
            continue
        if find_holder(entry / "data") is None:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
