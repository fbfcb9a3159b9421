"""Prometheus exposition of a hub's statistics, read at scrape time.

The hot paths only bump plain integers and `Histogram`s of the hub; this collector
turns them into metric families when ``/metrics`` is scraped, so no lock, label lookup
or metric object is touched per event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from ._core._stats import Histogram
    from ._hub import Hub

__all__ = ["CONTENT_TYPE", "HubCollector", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(
    family: HistogramMetricFamily, histogram: Histogram, labels: list[str] | None = None
) -> None:
    family.add_metric(labels or [], histogram.cumulative(), histogram.sum)


class HubCollector:
    """A prometheus-client collector for one hub (register it in a registry)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        """Yield every ``trio_stream_*`` family from the hub's current statistics."""
        hub = self.hub
        stats = hub.statistics()
        yield GaugeMetricFamily("trio_stream_connections", "Open streams.", stats.connections)
        yield CounterMetricFamily(
            "trio_stream_events_published", "Events accepted into topic logs.", stats.published
        )
        yield CounterMetricFamily(
            "trio_stream_events_sent", "Events written to clients.", stats.sent
        )
        yield CounterMetricFamily(
            "trio_stream_events_dropped",
            "Events a client never received (expired before delivery, reset gaps).",
            stats.dropped,
        )
        yield CounterMetricFamily(
            "trio_stream_write_stalls",
            "Socket writes that had to wait for the peer.",
            stats.write_stalls,
        )
        yield CounterMetricFamily(
            "trio_stream_publish_rejected",
            "Published events refused because a topic log was full.",
            stats.publish_rejected,
        )
        yield CounterMetricFamily(
            "trio_stream_publish_replayed",
            "Publishes answered with the ids of an earlier one (same Idempotency-Key).",
            stats.publish_replayed,
        )
        yield CounterMetricFamily(
            "trio_stream_backend_errors",
            "Operations on the backend (Redis) that failed.",
            hub.backend_errors,
        )
        signals = CounterMetricFamily(
            "trio_stream_retry_signals", "Retry signals sent to clients.", labels=["kind"]
        )
        for kind, count in sorted(stats.retry_signals.items()):
            signals.add_metric([kind], count)
        yield signals
        depth = GaugeMetricFamily(
            "trio_stream_queue_depth", "Events retained per topic log.", labels=["topic"]
        )
        saturation = GaugeMetricFamily(
            "trio_stream_queue_saturation",
            "Retained / capacity per topic log, 0-1 (warns above 0.8).",
            labels=["topic"],
        )
        for topic, log in sorted(hub.log_statistics().items()):
            depth.add_metric([topic], log.depth)
            saturation.add_metric([topic], log.saturation)
        yield depth
        yield saturation
        lag = HistogramMetricFamily(
            "trio_stream_client_lag", "Events a client is behind the head when an event is sent."
        )
        _histogram(lag, hub.client_lag)
        yield lag
        utilization = HistogramMetricFamily(
            "trio_stream_client_buffer_utilization", "buffer_utilization reported in acks."
        )
        _histogram(utilization, hub.buffer_utilization)
        yield utilization
        latency = HistogramMetricFamily(
            "trio_stream_delivery_latency_seconds",
            "Seconds from publication to the write (stage=write) and to the ack (stage=ack).",
            labels=["stage"],
        )
        _histogram(latency, hub.write_latency, ["write"])
        _histogram(latency, hub.ack_latency, ["ack"])
        yield latency


def exposition(hub: Hub) -> bytes:
    """The Prometheus text exposition (0.0.4) of *hub*'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return bytes(generate_latest(registry))
