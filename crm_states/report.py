"""Reports over persisted states: how many profiles stand in each state of each machine."""

from __future__ import annotations

from typing import TextIO

from pymongo.database import Database

from .api import MACHINES
from .store import Store


def print_counts(db: Database, out: TextIO) -> None:
    """Per machine, every diagram state with its count; DB-failure and other terminal states marked."""
    store = Store(db)
    for name, spec in MACHINES.items():
        counts = store.count_by_state(name)
        total = sum(counts.values())
        print(f"{name} ({total} profiles)", file=out)
        for state in spec.diagram.states:
            mark = ("db failure" if state in spec.db_failure_states
                    else "final" if state in spec.diagram.finals
                    else "stopped" if state in spec.terminal else "")
            print(f"  {state:<30} {counts.get(state, 0):>8}  {mark}".rstrip(), file=out)
