"""Where the NationBuilder-profile validation may get its answer from besides asking the CRM now.

The validation machine's lookup (``RequestedContact``) asks its context for the App Users holding a batch of
NationBuilder ids. The context is normally the CRM (one packed REST lookup per batch). A
``RecordedLookup`` answers the same question from a record of the CRM taken earlier (a Bulk API query
job's results, the operators' export): the answers are ``Matches`` exactly as the CRM's, and each outcome's
detail also says what the answer was read from, so the history names the job or the file and its lines.
A ``RangeLookups`` asks the CRM once for a whole range that is driven in several smaller batches.
``LookupStrategy`` is the batch runner's choice among them, per run (``crm_states.runner``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .budget import BudgetedLookups
from .crm.base import requests_sent
from .crm.results import Matches

if TYPE_CHECKING:
    from .progress import RunnerReport
    from .protocols import States as CrmStates


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


class LookupStrategy:
    """Where a run's lookups are answered. This one asks the CRM for every range (one packed lookup of
    the range's NationBuilder ids: ``request_contact``); ``crm_states.snapshots.SnapshotLookups`` loads a
    snapshot first and answers from it. ``range_requests`` is what one range's lookup is expected to cost
    in API requests (0: ranges cost nothing, so ``--max-api-calls`` is not checked between them)."""

    name = "rest"
    range_requests = 1

    def __init__(self, app: CrmStates) -> None:
        self.app = app
        self.budget: BudgetedLookups | None = None

    def context(self) -> Any:
        """What the machine's lookup effect is given: the CRM, behind ``--max-api-calls`` when one is set."""
        return self.app.crm if self.budget is None else self.budget

    def limit(self, max_api_calls: int | None) -> None:
        """Hold every lookup to ``max_api_calls`` API requests in all (``BudgetedLookups``)."""
        self.budget = None if max_api_calls is None else BudgetedLookups(self.app.crm, max_api_calls,
                                                                          self.api_requests)

    def for_range(self, nationbuilder_ids: list[int], drives: int) -> Any:
        """What the ``drives`` batches of one range ask: the context, or when the range takes several
        batches and its lookups cost requests, one packed lookup of all the range's ids (``RangeLookups``)."""
        context = self.context()
        return RangeLookups(context, nationbuilder_ids) if drives > 1 and self.range_requests else context

    # ``runner`` is the ``crm_states.runner.ValidationRunner`` driving the run (not imported: it imports this).
    def prepare(self, runner: Any, report: RunnerReport) -> bool:
        """Work before the ranges; False stops the run (``report.stopped`` says why)."""
        return True

    def finish(self, runner: Any, report: RunnerReport) -> None:
        """Work after the ranges (the run may have stopped early)."""

    def api_requests(self) -> int:
        """The API requests the CRM client has sent so far, as the CRM counts them."""
        return requests_sent(self.app.crm)
