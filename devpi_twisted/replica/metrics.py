"""
Replication figures for C{/+metrics} (a prometheus_client collector).
"""

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from devpi_twisted.replica.sync import STATE_CODES

STATES = ("initial", "following", "behind", "unreachable", "stopped")


class ReplicationCollector:
    """What a replica reports of its sync machine and its transfers."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        figures = self._replica.sync.describe()
        current = "unreachable" if figures["state"] == "probing" else figures["state"]
        state = GaugeMetricFamily("devpi_replica_state", "1 for the state the replica's sync machine is in",
                                  labels=["state"])
        for name in STATES:
            state.add_metric([name], 1 if name == current else 0)
        yield state
        if figures["lag-serials"] is not None:
            yield GaugeMetricFamily("devpi_replica_lag_serials", "Changes the primary has that this replica "
                                    "has not applied yet", value=figures["lag-serials"])
        if figures["lag-seconds"] is not None:
            yield GaugeMetricFamily("devpi_replica_lag_seconds", "Age of the oldest change not applied yet "
                                    "(0 when in sync)", value=figures["lag-seconds"])
        if figures["primary-serial"] is not None:
            yield GaugeMetricFamily("devpi_replica_primary_serial", "The primary's serial when it last answered",
                                    value=figures["primary-serial"])
        if figures["last-contact"] is not None:
            yield GaugeMetricFamily("devpi_replica_last_contact_timestamp_seconds",
                                    "When the primary last answered", value=figures["last-contact"])
        yield CounterMetricFamily("devpi_replica_changes_applied", "Changes applied from the primary",
                                  value=self._replica.applied)
        yield CounterMetricFamily("devpi_replica_files_fetched", "Files fetched from the primary and verified",
                                  value=self._replica.fetcher.fetched)


assert set(STATES) <= set(STATE_CODES)
