"""``--max-api-calls`` for batched CRM lookups: the CRM seen through a budget of API requests, shared by the
runner's threads (the validation's lookups by NationBuilder id, the reconciliation's by email)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .spec import Halt


class BudgetedLookups:
    """The CRM, with every batched lookup held to a budget of API requests: a lookup goes out only when the
    requests spent, plus what the lookups in flight were allowed, leave room for what one lookup has cost so
    far (one request, more where answers had further pages). Without room it waits for the lookups in flight
    (their requests then all counted), and halts its batch, whose profiles stay pending, when none is left."""

    def __init__(self, crm: Any, limit: int, spent: Callable[[], int]) -> None:
        self.crm = crm
        self.limit = limit
        self.spent = spent
        self._turn = threading.Condition()
        self._at_start = spent()
        self._reserved = 0
        self._done = 0

    def lookup_app_users_by_nationbuilder_ids(self, ids: Any) -> Any:
        return self._within_budget(self.crm.lookup_app_users_by_nationbuilder_ids, ids)

    def lookup_app_users_by_emails(self, emails: Any) -> Any:
        return self._within_budget(self.crm.lookup_app_users_by_emails, emails)

    def _within_budget(self, lookup: Callable[[Any], Any], keys: Any) -> Any:
        with self._turn:
            while True:
                spent = self.spent() - self._at_start
                cost = max(1, -(-spent // self._done) if self._done else 1)
                if spent + self._reserved + cost <= self.limit:
                    break
                if not self._reserved:
                    raise Halt(f"--max-api-calls {self.limit} reached")
                self._turn.wait()
            self._reserved += cost
        try:
            return lookup(keys)
        finally:
            with self._turn:
                self._reserved -= cost
                self._done += 1
                self._turn.notify_all()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.crm, name)
