"""Keeping a new user's app user id on their profile while Sefaria's registration is still saving it.

Sefaria's registration loads the new profile, saves it inside the signup's transaction, imports the
gravatar (a slow network call) and saves the same in-memory copy again: a copy loaded before the signup
wrote ``sf_app_user_id``, so that save writes ``None`` over it. The signup's position records the id
(``data``), so ``heal`` can always write it back; the aftercare does so for each new user a few times over
the next minutes (``DEFAULT_SCHEDULE`` seconds after the signup, ``CRM_STATES_AFTERCARE_SECONDS`` to
change it, ``off`` to stop it), one heal of that profile alone per check, from one daemon thread per
process. What a process exit cuts short, the periodic ``crm-states heal`` (or the Celery task
``crm_states.heal``) finishes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..logs import fields

log = logging.getLogger("crm_states.sefaria")

#: Seconds after a signup at which its profile is healed: past a slow gravatar import and the saves after it.
DEFAULT_SCHEDULE: tuple[float, ...] = (0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
SETTING = "CRM_STATES_AFTERCARE_SECONDS"


def schedule_from(settings: Mapping[str, Any]) -> tuple[float, ...]:
    """The schedule ``CRM_STATES_AFTERCARE_SECONDS`` names: comma-separated seconds, ``off`` for none,
    unset for ``DEFAULT_SCHEDULE``."""
    text = str(settings.get(SETTING) or "").strip()
    if not text:
        return DEFAULT_SCHEDULE
    if text.lower() in ("off", "none", "0"):
        return ()
    try:
        offsets = tuple(sorted(float(part) for part in text.split(",")))
    except ValueError:
        offsets = (-1.0,)
    if not offsets or any(not 0 <= o < 86_400 for o in offsets):
        raise ValueError(f"{SETTING} must be comma-separated seconds (or off), got {text[:60]!r}")
    return offsets


class Aftercare:
    """A heap of (when, app, profile id) checks and the one thread that runs them as they fall due; the
    checks due together are one heal per app."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any, int]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._running = 0

    def watch(self, app: Any, profile_id: int, schedule: Sequence[float]) -> None:
        """Heal ``profile_id`` at each offset of ``schedule`` (seconds from now)."""
        if not schedule:
            return
        now = time.monotonic()
        with self._cond:
            if self._pid != os.getpid():  # a forked child: the parent's thread and checks are not ours
                self._heap, self._thread, self._pid, self._running = [], None, os.getpid(), 0
            for offset in schedule:
                heapq.heappush(self._heap, (now + offset, next(self._order), app, profile_id))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="crm-states-aftercare", daemon=True)
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        """Checks not yet run (or running now)."""
        with self._cond:
            return len(self._heap) + self._running

    def wait_idle(self, timeout: float) -> bool:
        """Block until every check has run; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                due: dict[int, tuple[Any, set[int]]] = {}
                while self._heap and self._heap[0][0] <= time.monotonic():
                    _, _, app, pid = heapq.heappop(self._heap)
                    due.setdefault(id(app), (app, set()))[1].add(pid)
                self._running = len(due)
            try:
                for app, ids in due.values():
                    _heal(app, sorted(ids))
            finally:
                with self._cond:
                    self._running = 0
                    self._cond.notify_all()


def _heal(app: Any, ids: list[int]) -> None:
    try:
        report = app.heal(profile_ids=ids)
    except Exception as exc:  # the next check, or the periodic heal, tries again
        log.warning("aftercare of %d new profiles failed: %s", len(ids), type(exc).__name__,
                    extra=fields(kind="aftercare", outcome="interrupted", error_class=type(exc).__name__))
        return
    if report.healed_profiles:
        log.info("aftercare: wrote back the CRM data of %d new profiles that a later save had erased",
                 report.healed_profiles, extra=fields(kind="aftercare", outcome="healed"))


#: The process's aftercare.
AFTERCARE = Aftercare()
