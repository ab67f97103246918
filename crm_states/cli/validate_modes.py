"""``validate-nb``'s three ways to get answers (REST lookups per range, ``--snapshot``, ``--from-export``):
building the runner's lookup strategy before the database starts, and the lines that say what was spent."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from ..crm.export import ExportFormatError
from ..progress import RunnerReport
from .common import CliError, existing_file

#: The setting that names the org's App User key prefix (also read by the Salesforce client's schema).
KEY_PREFIX_SETTING = "SALESFORCE_APP_USER_KEY_PREFIX"


def lookup_for(args: argparse.Namespace, crm: Any) -> Callable[[Any], Any]:
    """``f(CrmStates) -> LookupStrategy | None`` for the mode the arguments ask for. The export file is
    opened and its header checked now, so a wrong file is refused before anything starts."""
    if args.from_export:
        from ..snapshots import ExportSource, SnapshotLookups

        path = existing_file(args.from_export)
        prefix = os.environ.get(KEY_PREFIX_SETTING, "").strip() or None
        if prefix is not None and not re.fullmatch(r"[A-Za-z0-9]{3}", prefix):
            raise CliError(f"{KEY_PREFIX_SETTING} must be three letters or digits")
        try:
            source = ExportSource(path, app_user_key_prefix=prefix)
        except ExportFormatError as exc:
            raise CliError(f"{exc}; nothing done") from None
        except UnicodeDecodeError:
            raise CliError(f"{path}: not UTF-8 text; nothing done") from None
        return lambda states: SnapshotLookups(states, source)
    if args.snapshot and not args.dry_run:
        from ..snapshots import BulkSource, SnapshotLookups

        return lambda states: SnapshotLookups(states, BulkSource(crm, page_records=args.page_records))
    return lambda states: None


def dry_run_line(report: RunnerReport, args: argparse.Namespace, range_size: int) -> str:
    """``range_size``: the run's ``RunnerConfig.range_size`` (profiles per lookup)."""
    head = f"{report.pending_at_start} profiles pending validation; a run would "
    if args.from_export:
        body = f"answer them from {args.from_export} with no API request"
    elif args.snapshot:
        body = ("read every App User with a NationBuilder id from one Bulk API query job (one request to start it, "
                "one per poll and one per result page; a job a killed run left is reused)")
    else:
        body = f"make about {-(-report.processed // range_size)} batched lookups"
    return head + body + " (dry run: nothing claimed, sent or written)"


def summary_lines(report: RunnerReport) -> list[str]:
    """The run's first line (what was validated, how fast, what it cost) and what the snapshot was."""
    head = (f"{report.processed} of {report.pending_at_start} pending profiles validated in {report.seconds:.1f}s "
            f"({report.rate:.0f}/s")
    snapshot = report.snapshot
    if snapshot is None:
        return [f"{head}, {report.api_requests} API requests, {report.lookups} batched lookups)"]
    if snapshot["source"] == "export":
        lines = [f"{head}, 0 API requests) from the export {snapshot.get('file') or '(not read)'}"]
        what = "lines"
    else:
        job = snapshot.get("job_id")
        lines = [f"{head}, {report.api_requests} API requests) from Bulk API query job "
                 f"{job or '(none started)'}{' (reused)' if snapshot.get('reused') else ''}"]
        what = "App Users"
    if "rows" in snapshot:
        pages = f"{snapshot['pages']} page{'' if snapshot['pages'] == 1 else 's'}"
        lines.append(f"  snapshot {snapshot['state']}: {snapshot['rows']} {what} read in {pages}, "
                     f"{snapshot['keyed']} with a NationBuilder id, {snapshot['refused']} refused")
    if snapshot.get("state") == "failed":
        lines.append(f"  the snapshot failed: {snapshot.get('error')}; its profiles were recorded as "
                     f"UnexpectedResponse (`crm-states resume --machine nb_profile_validation --state "
                     f"WroteUnexpectedResponse` asks Salesforce again)")
    if snapshot.get("nothing_pending"):
        lines.append("  another run validated every pending profile while this one waited for it: no job started")
    if snapshot.get("dropped"):
        lines.append("  no profile is pending any more: the snapshot collections were dropped")
    return lines
