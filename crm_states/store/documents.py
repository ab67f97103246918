"""The layout of the project's own collection and how its documents become values.

``crm_positions`` holds one document per (machine, profile): where the profile stands (the position a
compare-and-set moves), the fenced claim of a run at a write-ahead state, what the machine's finished runs
mean the profile document to hold (``data``, which ``heal`` writes back), and the whole history::

    {_id: "<machine>:<profile_id>", machine, profile_id, state, run_id, seq, at, detail, last_by,
     claim?: {by, owner, at, seconds}, data?: {fields, set_at, guard, crm_log}, history: [transition...]}

Position, claim, data and history change in ONE document update guarded by the old ``seq``, so they are
always consistent with each other and no roll-forward is needed for them. Sefaria's ``profiles`` documents
only ever receive the data fields (``sf_app_user_id``, ``CrmLog``, ``is_sustainer``): Sefaria replaces
those documents whole at any time, which can erase that data but never our state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..records import Claim, Position, ProfileData, Transition

POSITIONS = "crm_positions"
PROFILES = "profiles"
#: Fields of a position document without its history (what every read but ``history`` fetches).
POSITION_FIELDS = {"_id": 0, "profile_id": 1, "state": 1, "run_id": 1, "seq": 1, "at": 1, "detail": 1,
                   "data": 1, "claim": 1, "last_by": 1}


def position_key(machine: str, profile_id: int) -> str:
    return f"{machine}:{profile_id}"


def position_from_doc(doc: Mapping[str, Any] | None) -> Position:
    """A position document as a ``Position`` (the empty position when the profile never started)."""
    if not doc or not doc.get("state"):
        return Position()
    at = doc.get("at")
    return Position(state=doc["state"], run_id=doc.get("run_id"), seq=int(doc.get("seq", 0)),
                    detail=dict(doc.get("detail") or {}), at=_aware(at) if at is not None else None,
                    data=ProfileData.from_doc(doc.get("data")), claim=Claim.from_doc(doc.get("claim")),
                    last_by=str(doc.get("last_by") or ""))


def history_from_doc(doc: Mapping[str, Any] | None) -> list[Transition]:
    if not doc:
        return []
    return [Transition.from_doc(t, profile_id=doc["profile_id"], machine=doc["machine"])
            for t in doc.get("history") or ()]


def listing_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What ``profiles_in_state`` yields per profile: the stable read shape, whatever the layout."""
    return {"id": doc["profile_id"], "state": doc.get("state"), "at": _aware(doc["at"]) if doc.get("at") else None,
            "seq": doc.get("seq"), "run_id": doc.get("run_id"), "detail": dict(doc.get("detail") or {})}


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
