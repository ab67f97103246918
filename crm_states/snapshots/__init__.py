"""``validate-nb --snapshot`` and ``--from-export``: the validation answered from a snapshot of the CRM.

A snapshot is every App User that has a NationBuilder id, read once into a temporary collection of ours
(``crm_states.store.snapshots``) and joined with the pending profiles range by range by the batch runner
(``crm_states.runner``): from one Bulk API 2.0 query job (``BulkSource``: the job, its polls and its result
pages are the only API requests), or from the Salesforce report the operators export (``ExportSource``: no
API request at all). ``SnapshotLookups`` is the runner's lookup strategy that loads it and answers from it.
"""

from .bulk import BulkSource
from .export import ExportSource
from .strategy import SnapshotLookups, TableLookup

__all__ = ["SnapshotLookups", "TableLookup", "BulkSource", "ExportSource"]
