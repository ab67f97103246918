"""Who holds a lease or a claim, and whether that holder is provably gone.

A holder names its host, the host's boot id, its PID namespace, its PID and the process's start time.
A holder is *provably gone* only when all of host, boot and namespace are ours and no process with that
PID and start time runs: a PID reused by another process, a runner in another container (another PID
namespace), on another host, or before a reboot is never mistaken for alive or dead by PID alone. A
holder that is not provably gone is alive until its lease expires on the database's clock.
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import cache

import attrs

_SEPARATOR = "|"


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


@cache
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None when
    no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


@attrs.frozen
class Holder:
    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    started: str
    token: str

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), _boot_id(), _pid_namespace(), os.getpid(), _start_time(os.getpid()) or "",
                   uuid.uuid4().hex[:12])

    @property
    def key(self) -> str:
        return _SEPARATOR.join([self.host, self.boot_id, self.pid_namespace, str(self.pid), self.started, self.token])

    @classmethod
    def parse(cls, key: str) -> Holder | None:
        parts = key.split(_SEPARATOR)
        if len(parts) != 6 or not parts[3].isdigit():
            return None
        host, boot, namespace, pid, started, token = parts
        return cls(host, boot, namespace, int(pid), started, token)

    def provably_gone(self) -> bool:
        """True only when this holder ran on this very host, boot and PID namespace and is not running now."""
        if not self.boot_id or not self.pid_namespace:
            return False
        if (self.host, self.boot_id, self.pid_namespace) != (socket.gethostname(), _boot_id(), _pid_namespace()):
            return False
        return _start_time(self.pid) != self.started


def gone(key: str) -> bool:
    """Whether the holder ``key`` is provably gone (see ``Holder.provably_gone``); unknown keys are not."""
    holder = Holder.parse(key)
    return holder is not None and holder.provably_gone()
