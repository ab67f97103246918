"""What the batch jobs need of ``crm_states.api.CrmStates``, named here so that they do not import it (the
application layer builds on them, not the other way round)."""

from __future__ import annotations

from typing import Any, Protocol

from .engine import Engine
from .store import Store


class States(Protocol):
    """The machines over one database and one CRM: ``crm_states.api.CrmStates`` is one."""

    store: Store
    crm: Any

    def engine(self, name: str) -> Engine: ...
