"""``crm-states report --prometheus``: the report's figures in Prometheus' text exposition format, for
node-exporter's textfile collector (a cron job writes the file; the exporter serves it).

Built with ``prometheus_client`` (the ``crm_states[metrics]`` extra): its ``generate_latest`` writes the
format, label escaping included, so there is no writer of our own to keep right. Without the extra the
command says what to install.

Metrics (gauges, one sample per label set):

- ``crm_states_profiles{machine, state, kind}``: profiles now in each state of each machine (every
  diagram state, zeros included, and any state found only in the database);
- ``crm_states_oldest_profile_age_seconds{machine, state, kind}``: for each failure state (kind
  ``stopped`` or ``db failure``) holding profiles, how long the longest-waiting one has been there;
- ``crm_states_drift_profiles{machine}``: profiles whose data drifted, when ``crm-states heal`` measured it;
- ``crm_states_report_timestamp_seconds``: when the figures were read (to alert on a stale file).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from typing import Any

from .records import utcnow
from .report import FAILURE_KINDS, StateRow

INSTALL_HINT = 'the Prometheus output needs prometheus_client: pip install "crm_states[metrics]"'


class PrometheusMissing(RuntimeError):
    """``prometheus_client`` is not installed; the message says what to install."""


def check_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise PrometheusMissing(INSTALL_HINT) from exc


def exposition(data: Mapping[str, list[StateRow]], *, drift: Mapping[str, int] | None = None,
               now: dt.datetime | None = None) -> str:
    """The text exposition of ``data`` (``report.collect(db, machines)``) and of ``drift`` when known."""
    check_prometheus()
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(data, drift, now or utcnow()))
    return generate_latest(registry).decode("utf-8")


class _ReportCollector:
    """A one-shot collector over the report's rows (prometheus_client's custom-collector protocol)."""

    def __init__(self, data: Mapping[str, list[StateRow]], drift: Mapping[str, int] | None,
                 now: dt.datetime) -> None:
        self.data, self.drift, self.now = data, drift, _aware(now)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        profiles = GaugeMetricFamily("crm_states_profiles", "Profiles now in each state of each machine.",
                                     labels=["machine", "state", "kind"])
        age = GaugeMetricFamily("crm_states_oldest_profile_age_seconds",
                                "Seconds the longest-waiting profile has been in a failure state.",
                                labels=["machine", "state", "kind"])
        for machine, rows in self.data.items():
            for row in rows:
                profiles.add_metric([machine, row.state, row.kind], row.count)
                if row.kind in FAILURE_KINDS and row.count and isinstance(row.oldest, dt.datetime):
                    age.add_metric([machine, row.state, row.kind],
                                   max(0.0, (self.now - _aware(row.oldest)).total_seconds()))
        yield profiles
        yield age
        if self.drift is not None:
            drift = GaugeMetricFamily("crm_states_drift_profiles",
                                      "Profiles whose data drifted, as crm-states heal measured.", labels=["machine"])
            for machine, count in self.drift.items():
                drift.add_metric([machine], count)
            yield drift
        yield GaugeMetricFamily("crm_states_report_timestamp_seconds", "When these figures were read (Unix time).",
                                value=self.now.timestamp())


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)
