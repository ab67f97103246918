"""All MongoDB persistence, in one place (see ``core`` for the commit protocol and ``documents`` for the
layout): positions, history and claims in the project's own ``crm_positions`` collection; machine data
written into Sefaria's ``profiles`` documents; applying journal entries; drift and heal."""

from .core import DUPLICATE_KEY, INDEX_BUILD_SECONDS, Store
from .documents import POSITIONS, PROFILES, position_key
from .errors import (
                     ConcurrentTransition,
                     InputChanged,
                     ProfileGone,
                     ProfileNotFound,
                     StoreError,
                     StoreUnavailable,
)
from .heal import HealReport, heal
from .journaled import chains
from .steps import Step

__all__ = ["Store", "Step", "StoreError", "StoreUnavailable", "ConcurrentTransition", "ProfileNotFound",
           "InputChanged", "ProfileGone", "HealReport", "heal", "chains", "position_key", "POSITIONS", "PROFILES",
           "DUPLICATE_KEY", "INDEX_BUILD_SECONDS"]
