"""Where the NationBuilder-profile validation may get its answer from besides asking the CRM now.

The validation machine's lookup (``RequestedContact``) asks its context for the App Users holding a batch of
NationBuilder ids. The context is normally the CRM (one packed REST lookup per batch). A
``RecordedLookup`` answers the same question from a record of the CRM taken earlier (a Bulk API query
job's results, the operators' export): the answers are ``Matches`` exactly as the CRM's, and each outcome's
detail also says what the answer was read from, so the history names the job or the file and its lines.
A ``RangeLookups`` asks the CRM once for a whole range that is driven in several smaller batches.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

from .crm.results import Matches


class RecordedLookup(abc.ABC):
    """Answers App User lookups by NationBuilder id from a recorded snapshot of the CRM."""

    #: Merged into the detail of every outcome this source decides (``{"bulk_job": ...}``, ``{"export_file": ...}``).
    source: Mapping[str, Any] = {}

    @abc.abstractmethod
    def recorded_app_users(self, ids: Sequence[int]) -> tuple[dict[int, Matches], dict[int, Mapping[str, Any]]]:
        """``({nationbuilder_id: Matches}, {nationbuilder_id: detail})`` for ``ids``: the matches found (ids
        without an App User are absent, as from the CRM) and, per id, what else its detail should name (the
        file lines it was read from). Raises when there is no answer (a failed job: ``CrmJobFailed``; a
        snapshot dropped meanwhile: ``Halt``)."""


class RangeLookups:
    """The CRM seen by the drives of one range: the range is driven in batches of ``--chunk-size`` (what one
    drive holds in memory), but its NationBuilder ids are asked in one packed lookup (what one API request
    carries), made when its first batch reaches ``RequestedContact``. Ids outside the range (a profile whose
    id changed meanwhile) are asked as they come; a failed range lookup is not cached, so each later batch
    asks for its own ids and gets its own answer. Used by the one thread that drives the range."""

    def __init__(self, crm: Any, ids: Sequence[int]) -> None:
        self.crm = crm
        self.ids = frozenset(ids)
        self._answers: dict[int, Matches] | None = None
        self._asked = False

    def lookup_app_users_by_nationbuilder_ids(self, ids: Sequence[int]) -> dict[int, Matches]:
        if not self._asked:
            self._asked = True  # asked once: a failure is the first batch's, the next ones ask for themselves
            self._answers = dict(self.crm.lookup_app_users_by_nationbuilder_ids(sorted(self.ids | set(ids))))
            return {key: self._answers[key] for key in ids if key in self._answers}
        if self._answers is None:
            return dict(self.crm.lookup_app_users_by_nationbuilder_ids(ids))
        outside = [key for key in ids if key not in self.ids]
        found = {key: self._answers[key] for key in ids if key in self._answers}
        return {**found, **self.crm.lookup_app_users_by_nationbuilder_ids(outside)} if outside else found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.crm, name)
