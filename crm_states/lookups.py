"""Where the NationBuilder-profile validation may get its answer from besides asking the CRM now.

The validation machine's lookup (``RequestedContact``) asks its context for the App Users holding a batch of
NationBuilder ids. The context is normally the CRM (one packed REST lookup per batch). A
``RecordedLookup`` answers the same question from a record of the CRM taken earlier (a Bulk API query
job's results, the operators' export): the answers are ``Matches`` exactly as the CRM's, and each outcome's
detail also says what the answer was read from, so the history names the job or the file and its lines.
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
