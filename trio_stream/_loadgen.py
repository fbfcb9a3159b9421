"""``trio-stream loadgen``: bursty producers and fast, slow and stalling consumers.

Run against any server URL, it proves (or disproves) the server's promises under load:

1. It publishes a start marker on each topic, and every consumer resumes right after it
   (``Last-Event-ID``), so each consumer is owed exactly the events published after the
   marker, however late it connects.
2. *N* producers publish in quiet/burst cycles (``POST /streams/{topic}`` batches, on a
   fixed schedule, honouring ``429`` + ``Retry-After``) for ``--duration`` seconds.
   Each event's data carries the run, producer, sequence number and send time.
3. *M* consumers (the project's own client: reconnects with ``Last-Event-ID``, the
   pause -> poll -> resume handover, acks) read it. A share of them are deliberately
   slow: they read at a low rate, stall for seconds now and then, or stop reading for
   good while holding their connection open. Some consumers of each kind use ack mode.
4. After the producers stop, consumers get up to ``--drain`` seconds to catch up.
   (SIGINT or SIGTERM stops the producers early; a second one cuts the drain short.)
5. ``/metrics`` is sampled all along (queue depth, saturation, retry signals, ...).

The report says, per consumer class, what was delivered, dropped (announced gaps),
still owed at the end, duplicated or reordered; latency percentiles from the publish
request to receipt (and to the acknowledgement); the server's counters over the run.
It is written as JSON (``--report-json``) and as PNG plots with an HTML page embedding
them (``--report-dir``; plots need matplotlib, the live display uses rich when present:
both are optional).

Exit status: 0 when every consumer that kept up (class ``fast``, with or without acks)
received every event exactly once and in each producer's order; 1 when one did not;
3 when the run could not start (server unreachable, start marker refused); 2 for bad
options.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import html
import importlib
import itertools
import json
import math
import secrets
import socket
import sys
from collections import deque
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from ._argtypes import integer, number, share
from ._client import (
    StreamReset,
    _default_factory,
    _HTTPConnection,
    _Lost,
    _Origin,
    _Response,
    _split_url,
    _target,
    open_event_stream,
)
from ._core._errors import TrioStreamError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ._client import EventStream
    from ._core._events import Event

__all__ = [
    "CONSUMER_KINDS",
    "CannotStartError",
    "LoadgenConfig",
    "add_parser",
    "main",
    "run_loadgen",
    "write_report",
]

ConsumerKind = Literal["fast", "slow-read", "slow-stall", "slow-stop"]
CONSUMER_KINDS: Final[tuple[ConsumerKind, ...]] = ("fast", "slow-read", "slow-stall", "slow-stop")
SLOW_MODES: Final = {"read": "slow-read", "stall": "slow-stall", "stop": "slow-stop"}

EXIT_OK: Final = 0
EXIT_LOST: Final = 1
EXIT_USAGE: Final = 2
EXIT_CANNOT_RUN: Final = 3

REPORT_VERSION: Final = 1
CONNECT_WAIT: Final = 5.0  # seconds consumers get to open their streams before publishing
SETTLE_TIMEOUT: Final = 3.0  # seconds the server gets to release the streams at the end
REQUEST_SILENCE: Final = 10.0  # seconds a publish or scrape may go without a byte
ACK_WATCH_INTERVAL: Final = 0.02  # resolution of the client-side ack latency
MAX_UNACKED_TRACKED: Final = 10_000
_SATURATION_WARNING: Final = 0.8
_QUANTILES: Final = (0.5, 0.9, 0.99, 0.999)
_MAX_BODY: Final = 16 * 1024 * 1024


class CannotStartError(TrioStreamError):
    """The load run could not start: no server at the URL, or it refused to publish."""


# -- configuration --------------------------------------------------------------------------


def _check_positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _check_non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be zero or positive, got {value!r}")


def _check_share(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within 0.0-1.0, got {value!r}")


def _check_count(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class LoadgenConfig:
    """One load run: the workload, its length and where the report goes.

    Attributes:
        url: The server's base URL (``http://host:port``).
        duration: Seconds the producers publish.
        drain: Seconds consumers get to catch up after the producers stop.
        topics: Topics used (``{topic_prefix}-{i}``); producers and consumers are
            spread over them round-robin.
        topic_prefix: Prefix of the topic names.
        producers: Producers (each publishes on its own schedule, in batches).
        quiet_rate: Events per second per producer in quiet spells.
        burst_rate: Events per second per producer in bursts.
        quiet_seconds: Length of each quiet spell.
        burst_seconds: Length of each burst.
        max_batch: Events per publish request at most.
        payload_bytes: Size of each event's data.
        consumers: Consumers in all.
        slow_share: Share of the consumers that are slow.
        slow_mode: ``read`` (read at *slow_rate*), ``stall`` (stop reading for
            *stall_seconds* every *stall_every* seconds), ``stop`` (stop reading for
            good after *stop_after* seconds, holding the connection) or ``mix``.
        slow_rate: Events per second a ``read`` slow consumer takes.
        stall_seconds: How long a ``stall`` consumer stops reading each time.
        stall_every: Seconds of reading between two stalls.
        stop_after: Seconds a ``stop`` consumer reads before it stops.
        slow_rcvbuf: Socket receive buffer of slow consumers, bytes (0: the system's).
        ack_share: Share of the consumers of each kind that use ack mode.
        ack_window: Their ack window.
        publish_token: Bearer token for publishing, if the server needs one.
        client_prefix: Prefix of the consumers' client ids.
        sample_interval: Seconds between two scrapes of ``/metrics``.
    """

    url: str
    duration: float = attrs.field(default=10.0, validator=_check_positive)
    drain: float = attrs.field(default=5.0, validator=_check_non_negative)
    topics: int = attrs.field(default=1, validator=_check_count)
    topic_prefix: str = "loadgen"
    producers: int = attrs.field(default=2, validator=_check_count)
    quiet_rate: float = attrs.field(default=10.0, validator=_check_non_negative)
    burst_rate: float = attrs.field(default=150.0, validator=_check_non_negative)
    quiet_seconds: float = attrs.field(default=2.0, validator=_check_non_negative)
    burst_seconds: float = attrs.field(default=0.5, validator=_check_non_negative)
    max_batch: int = attrs.field(default=100, validator=_check_count)
    payload_bytes: int = attrs.field(default=64, validator=_check_count)
    consumers: int = attrs.field(default=8, validator=_check_count)
    slow_share: float = attrs.field(default=0.5, validator=_check_share)
    slow_mode: str = attrs.field(
        default="mix", validator=attrs.validators.in_(("read", "stall", "stop", "mix"))
    )
    slow_rate: float = attrs.field(default=5.0, validator=_check_positive)
    stall_seconds: float = attrs.field(default=3.0, validator=_check_non_negative)
    stall_every: float = attrs.field(default=3.0, validator=_check_non_negative)
    stop_after: float = attrs.field(default=1.0, validator=_check_non_negative)
    slow_rcvbuf: int = attrs.field(default=8192, validator=_check_count)
    ack_share: float = attrs.field(default=0.25, validator=_check_share)
    ack_window: int = attrs.field(
        default=64, validator=[attrs.validators.ge(1), attrs.validators.le(10_000)]
    )
    publish_token: str | None = None
    client_prefix: str = "loadgen"
    sample_interval: float = attrs.field(default=0.5, validator=_check_positive)

    def __attrs_post_init__(self) -> None:
        _split_url(self.url)  # raises LocalProtocolError for a bad URL
        if self.topics < 1 or self.producers < 1:
            raise ValueError("topics and producers must be at least 1")
        if self.topics > self.producers:
            raise ValueError("every topic needs a producer: topics must not exceed producers")
        if self.quiet_seconds + self.burst_seconds <= 0:
            raise ValueError("quiet_seconds + burst_seconds must be positive")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")


def _consumer_plan(config: LoadgenConfig) -> list[tuple[ConsumerKind, bool]]:
    """``(kind, ack mode)`` of each consumer: the fast ones first, then the slow ones.

    Within each kind the last ``round(n * ack_share)`` consumers use ack mode.
    """
    slow = math.floor(config.consumers * config.slow_share + 0.5)
    kinds: list[ConsumerKind] = ["fast"] * (config.consumers - slow)
    cycle: list[ConsumerKind] = (
        ["slow-read", "slow-stall", "slow-stop"]
        if config.slow_mode == "mix"
        else [SLOW_MODES[config.slow_mode]]  # type: ignore[list-item]
    )
    kinds += [cycle[i % len(cycle)] for i in range(slow)]
    plan: list[tuple[ConsumerKind, bool]] = []
    for kind in CONSUMER_KINDS:
        members = [k for k in kinds if k == kind]
        acking = math.floor(len(members) * config.ack_share + 0.5)
        plan += [(kind, i >= len(members) - acking) for i in range(len(members))]
    return plan


def class_name(kind: str, ack: bool) -> str:
    """The report's name of a consumer class: the kind, ``+ack`` in ack mode."""
    return f"{kind}+ack" if ack else kind


# -- latency ---------------------------------------------------------------------------------


_LATENCY_FLOOR: Final = 1e-5
_LATENCY_RATIO: Final = 1.02
_LOG_RATIO: Final = math.log(_LATENCY_RATIO)


@attrs.define(eq=False)
class LatencyRecorder:
    """Latencies in logarithmic buckets 2 % wide: bounded memory, percentiles within 1 %.

    Attributes:
        count: Observations.
        total: Their sum, seconds.
        low: The smallest.
        high: The largest.
    """

    counts: dict[int, int] = attrs.field(factory=dict)
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = 0.0

    def record(self, seconds: float) -> None:
        """Record one latency (negative ones, from clock jitter, count as zero)."""
        seconds = max(0.0, seconds)
        index = (
            0 if seconds <= _LATENCY_FLOOR else int(math.log(seconds / _LATENCY_FLOOR) / _LOG_RATIO)
        )
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        self.low = min(self.low, seconds)
        self.high = max(self.high, seconds)

    def merge(self, other: LatencyRecorder) -> None:
        """Add *other*'s observations to these."""
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    @staticmethod
    def _value(index: int) -> float:
        # The bucket's geometric middle.
        return float(_LATENCY_FLOOR * _LATENCY_RATIO ** (index + 0.5))

    def quantile(self, q: float) -> float | None:
        """The *q*-quantile (0-1), ``None`` without observations."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(self.high, max(self.low, self._value(index)))
        return self.high

    def summary(self) -> dict[str, float | int | None]:
        """Count, mean, min, p50, p90, p99, p99.9 and max, in seconds."""
        out: dict[str, float | int | None] = {
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
            "min": self.low if self.count else None,
        }
        for q in _QUANTILES:
            out[_quantile_name(q)] = self.quantile(q)
        out["max"] = self.high if self.count else None
        return out

    def cdf(self) -> list[list[float]]:
        """``[latency, fraction at or below]`` points, one per non-empty bucket."""
        points, seen = [], 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            upper = min(self.high, _LATENCY_FLOOR * _LATENCY_RATIO ** (index + 1))
            points.append([upper, seen / self.count])
        return points


def _quantile_name(q: float) -> str:
    return "p" + f"{q * 100:g}".replace(".", "")


# -- state of the run ------------------------------------------------------------------------


@attrs.define(eq=False)
class _Producer:
    index: int
    topic: str
    phase: str = "starting"
    next_seq: int = 0
    """The sequence number the next accepted event gets."""
    published: int = 0
    batches: int = 0
    rejected: int = 0
    retry_after_s: float = 0.0
    errors: int = 0
    uncertain: list[range] = attrs.field(factory=list)
    """Sequence numbers of batches whose fate is unknown (the connection broke)."""
    finished: bool = False

    def certain(self, start: int, stop: int) -> int:
        """How many of the sequence numbers in ``[start, stop)`` were surely published."""
        n = max(0, stop - start)
        for span in self.uncertain:
            n -= max(0, min(stop, span.stop) - max(start, span.start))
        return n


@attrs.define(eq=False)
class _Consumer:
    index: int
    topic: str
    kind: ConsumerKind
    ack: bool
    client_id: str
    must_keep_up: bool
    next_seq: dict[int, int] = attrs.field(factory=dict)
    received: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicates: int = 0
    resets: int = 0
    foreign: int = 0
    stalls: int = 0
    stopped: bool = False
    max_pending: int = 0
    receipt: LatencyRecorder = attrs.field(factory=LatencyRecorder)
    to_ack: LatencyRecorder = attrs.field(factory=LatencyRecorder)
    unacked: deque[tuple[str, float]] = attrs.field(factory=deque)
    unacked_ids: set[str] = attrs.field(factory=set)
    last_acked: str | None = None
    digest: Any = attrs.field(factory=lambda: hashlib.blake2b(digest_size=16))
    stream: EventStream | None = None
    error: str | None = None
    reading: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    @property
    def name(self) -> str:
        return class_name(self.kind, self.ack)

    def on_event(self, event: Event, now: float, run_id: str, producers: list[_Producer]) -> None:
        """Check one event against what its producer published."""
        self.received += 1
        parts = event.data.split(" ", 4)
        if len(parts) < 4 or parts[0] != run_id:
            self.foreign += 1
            return
        try:
            producer, seq, sent_at = int(parts[1]), int(parts[2]), float(parts[3])
        except ValueError:
            self.foreign += 1
            return
        if not 0 <= producer < len(producers):
            self.foreign += 1
            return
        expected = self.next_seq.get(producer, 0)
        if seq < expected:
            self.duplicates += 1  # again, or out of the producer's order
            return
        if seq > expected:
            self.dropped += producers[producer].certain(expected, seq)
        self.next_seq[producer] = seq + 1
        self.delivered += 1
        self.receipt.record(now - sent_at)
        if event.id is not None:
            self.digest.update(event.id.encode() + b"\n")
            if self.ack and len(self.unacked) < MAX_UNACKED_TRACKED:
                self.unacked.append((event.id, sent_at))
                self.unacked_ids.add(event.id)

    def on_acked(self, acked_id: str, now: float) -> None:
        """The client's acker got *acked_id* (and all before it) accepted."""
        if acked_id not in self.unacked_ids:
            return
        while self.unacked:
            event_id, sent_at = self.unacked.popleft()
            self.unacked_ids.discard(event_id)
            self.to_ack.record(now - sent_at)
            if event_id == acked_id:
                break

    def owed(self, producers: Sequence[_Producer]) -> int:
        """Events published on this topic after the marker that this consumer lacks."""
        return sum(
            p.certain(self.next_seq.get(p.index, 0), p.next_seq)
            for p in producers
            if p.topic == self.topic
        )


# -- HTTP for publishing and scraping ---------------------------------------------------------


@attrs.define(eq=False)
class _HttpClient:
    """Short requests on a kept-alive connection, never retried behind the caller's back."""

    origin: _Origin
    headers: list[tuple[bytes, bytes]]
    _conn: _HTTPConnection | None = None

    async def request(self, method: bytes, target: bytes, body: bytes = b"") -> _Response:
        """Send one request; the connection is kept for the next when it can be.

        Raises:
            _Lost: The connection could not be made, broke, or went silent.
            RemoteProtocolError: The answer was malformed.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            with trio.move_on_after(REQUEST_SILENCE):
                try:
                    stream = await _default_factory(self.origin, None)
                except OSError as error:
                    raise _Lost(f"cannot connect: {error}") from error
                conn = _HTTPConnection(stream, REQUEST_SILENCE)
            if conn is None:
                raise _Lost("connecting took too long")
        headers = [*self.headers, (b"host", self.origin.host_header)]
        if body:
            headers.append((b"content-type", b"application/json"))
        try:
            response = await conn.request(method, target, headers, body)
            content = await conn.read_body(_MAX_BODY)
        except BaseException:
            await conn.aclose()
            raise
        if conn.reusable():
            conn.protocol.start_next_cycle()
            self._conn = conn
        else:
            await conn.aclose()
        return _Response(status=response.status_code, headers=list(response.headers), body=content)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


def _retry_after(response: _Response) -> float:
    for name, value in response.headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                break
    return 1.0


# -- metrics ----------------------------------------------------------------------------------

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by sample name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def _histogram(samples: Samples, name: str, **labels: str) -> dict[str, Any]:
    buckets = []
    for sample_labels, value in samples.get(name + "_bucket", []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            buckets.append([float(sample_labels["le"]), value])
    buckets.sort()
    return {
        "buckets": buckets,
        "count": _value(samples, name + "_count", **labels),
        "sum": _value(samples, name + "_sum", **labels),
    }


_HISTOGRAMS: Final = {
    "delivery_latency_write": ("trio_stream_delivery_latency_seconds", {"stage": "write"}),
    "delivery_latency_ack": ("trio_stream_delivery_latency_seconds", {"stage": "ack"}),
    "client_lag": ("trio_stream_client_lag", {}),
    "buffer_utilization": ("trio_stream_client_buffer_utilization", {}),
}
_COUNTERS: Final = {
    "published": "trio_stream_events_published_total",
    "sent": "trio_stream_events_sent_total",
    "dropped": "trio_stream_events_dropped_total",
    "write_stalls": "trio_stream_write_stalls_total",
    "publish_rejected": "trio_stream_publish_rejected_total",
}
RETRY_KINDS: Final = ("retry_field", "retry_after", "pause")
_SUMMED: Final = (
    "exact", "expected", "delivered", "dropped", "behind", "duplicates",
    "resets", "pauses", "polls", "reconnects", "acks",
)  # fmt: skip
_CLIENT_SIGNALS: Final = ("pauses", "polls", "reconnects", "resets")


def metrics_snapshot(samples: Samples, topics: Iterable[str]) -> dict[str, Any]:
    """The figures the report uses from one scrape of ``/metrics``."""
    topics = list(topics)
    snapshot: dict[str, Any] = {
        "connections": _value(samples, "trio_stream_connections"),
        **{key: _value(samples, name) for key, name in _COUNTERS.items()},
        "retry_signals": {
            kind: _value(samples, "trio_stream_retry_signals_total", kind=kind)
            for kind in RETRY_KINDS
        },
        "queue_depth": {t: _value(samples, "trio_stream_queue_depth", topic=t) for t in topics},
        "saturation": {t: _value(samples, "trio_stream_queue_saturation", topic=t) for t in topics},
    }
    for key, (name, labels) in _HISTOGRAMS.items():
        snapshot[key] = _histogram(samples, name, **labels)
    return snapshot


def _histogram_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    old = dict(before["buckets"])
    return {
        "buckets": [[le, n - old.get(le, 0.0)] for le, n in after["buckets"]],
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
    }


def histogram_quantile(histogram: dict[str, Any], q: float) -> float | None:
    """Estimate a quantile from cumulative buckets, as Prometheus' ``histogram_quantile``."""
    buckets = histogram["buckets"]
    if not buckets or not buckets[-1][1]:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            if cumulative == below:
                return float(le)
            return float(lower + (le - lower) * (rank - below) / (cumulative - below))
        lower, below = le, cumulative
    return lower


def _histogram_summary(histogram: dict[str, Any]) -> dict[str, Any]:
    count = histogram["count"]
    out: dict[str, Any] = {"count": count, "mean": histogram["sum"] / count if count else None}
    for q in _QUANTILES[:3]:
        out[_quantile_name(q)] = histogram_quantile(histogram, q)
    out["buckets"] = histogram["buckets"]
    return out


# -- the run ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Run:
    config: LoadgenConfig
    display: Callable[[_Run], Any] | None
    run_id: str = attrs.field(factory=lambda: secrets.token_hex(3))
    origin: _Origin = attrs.field(init=False)
    base_path: str = attrs.field(init=False)
    topics: list[str] = attrs.field(init=False)
    producers: list[_Producer] = attrs.field(init=False)
    consumers: list[_Consumer] = attrs.field(init=False)
    markers: dict[str, str] = attrs.field(factory=dict)
    t0: float = 0.0
    publish_end: float = 0.0
    drain_end: float = 0.0
    drain_started: float | None = None
    finished_at: float | None = None
    timeline: list[dict[str, Any]] = attrs.field(factory=list)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    last_scrape: dict[str, Any] | None = None
    scrape_errors: int = 0
    settled_in: float | None = None
    """Seconds the server took to release the streams after the consumers closed."""
    fatal: str | None = None
    interrupted: bool = False
    stop: trio.Event = attrs.field(factory=trio.Event)
    """Set to stop publishing early (a signal, a fatal publish error)."""
    abort: trio.Event = attrs.field(factory=trio.Event)
    """Set to stop draining too (a second signal, a fatal publish error)."""
    started: trio.Event = attrs.field(factory=trio.Event)
    """Set when publishing starts, and `t0` with it."""
    started_at: str = attrs.field(
        factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        self.origin, path, _ = _split_url(cfg.url)
        self.base_path = path.rstrip("/")
        self.topics = [f"{cfg.topic_prefix}-{i}" for i in range(cfg.topics)]
        self.producers = [
            _Producer(index=i, topic=self.topics[i % cfg.topics]) for i in range(cfg.producers)
        ]
        self.consumers = [
            _Consumer(
                index=i,
                topic=self.topics[i % cfg.topics],
                kind=kind,
                ack=ack,
                client_id=f"{cfg.client_prefix}-{self.run_id}-{i}",
                must_keep_up=kind == "fast",
            )
            for i, (kind, ack) in enumerate(_consumer_plan(cfg))
        ]

    # -- helpers ------------------------------------------------------------------------------

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"user-agent", b"trio-stream-loadgen")]
        if self.config.publish_token:
            headers.append((b"authorization", f"Bearer {self.config.publish_token}".encode()))
        return headers

    def _topic_target(self, topic: str) -> bytes:
        return _target(f"{self.base_path}/streams/{topic}", [])

    def elapsed(self) -> float:
        """Seconds since publishing started (negative before)."""
        return trio.current_time() - self.t0

    # -- start markers --------------------------------------------------------------------------

    async def publish_markers(self, http: _HttpClient) -> None:
        """Publish one start marker per topic; consumers resume right after it.

        Raises:
            CannotStartError: The server could not be reached or refused.
        """
        for topic in self.topics:
            body = json.dumps({"event": "loadgen-start", "data": self.run_id}).encode()
            for _ in range(20):
                try:
                    response = await http.request(b"POST", self._topic_target(topic), body)
                except (_Lost, TrioStreamError) as error:
                    raise CannotStartError(
                        f"cannot publish to {self.config.url}: {error}"
                    ) from None
                if response.status == 429:
                    await trio.sleep(min(5.0, _retry_after(response)))
                    continue
                if response.status != 202:
                    raise CannotStartError(
                        f"publishing to topic {topic!r} answered {response.status}: "
                        f"{response.body[:200].decode('utf-8', 'replace')}"
                    )
                self.markers[topic] = json.loads(response.body)["ids"][0]
                break
            else:
                raise CannotStartError(f"topic {topic!r} stayed full: cannot start")

    # -- producers ------------------------------------------------------------------------------

    async def produce(self, producer: _Producer) -> None:
        """Publish quiet spells and bursts on a fixed schedule until the end of publishing."""
        cfg = self.config
        http = _HttpClient(self.origin, self._headers())
        target = self._topic_target(producer.topic)
        phases = (
            ("quiet", cfg.quiet_rate, cfg.quiet_seconds),
            ("burst", cfg.burst_rate, cfg.burst_seconds),
        )
        try:
            cycle_start = self.t0
            while cycle_start < self.publish_end and not self.stop.is_set():
                phase_start = cycle_start
                for name, rate, seconds in phases:
                    phase_end = min(phase_start + seconds, self.publish_end)
                    producer.phase = name
                    total = math.ceil(seconds * rate - 1e-9) if rate > 0 else 0
                    sent = 0
                    while sent < total and not self.stop.is_set():
                        now = trio.current_time()
                        if now >= phase_end:
                            break
                        due = min(total, math.floor((now - phase_start) * rate) + 1)
                        if due > sent:
                            n = min(due - sent, cfg.max_batch)
                            if not await self._publish(http, target, producer, n, phase_end):
                                break
                            sent += n
                        if sent < total:
                            await trio.sleep_until(
                                min(phase_end, max(trio.current_time(), phase_start + sent / rate))
                            )
                    await trio.sleep_until(phase_end)
                    phase_start = phase_end
                cycle_start = phase_start
        finally:
            producer.phase = "done"
            producer.finished = True
            with trio.CancelScope(shield=True):
                await http.aclose()

    async def _publish(
        self, http: _HttpClient, target: bytes, producer: _Producer, n: int, give_up_at: float
    ) -> bool:
        """Publish *n* events, retrying after 429s until *give_up_at*; False to stop."""
        cfg = self.config
        while True:
            start = producer.next_seq
            sent_at = trio.current_time()
            items = []
            for seq in range(start, start + n):
                head = f"{self.run_id} {producer.index} {seq} {sent_at:.6f} "
                pad = "x" * max(0, cfg.payload_bytes - len(head))
                items.append({"data": head + pad})
            settled = False
            try:
                response = await http.request(b"POST", target, json.dumps(items).encode())
                settled = True
            except (_Lost, TrioStreamError):
                producer.errors += 1
                await trio.sleep(0.1)
                return True
            finally:
                if not settled:  # broken or cancelled: accepted or not, nobody knows
                    producer.uncertain.append(range(start, start + n))
                    producer.next_seq = start + n  # those numbers are never owed
            if response.status == 202:
                producer.next_seq = start + n
                producer.published += n
                producer.batches += 1
                return True
            if response.status == 429 or response.status >= 500:
                producer.rejected += response.status == 429
                producer.errors += response.status >= 500
                delay = _retry_after(response) if response.status == 429 else 0.5
                producer.retry_after_s += delay
                if trio.current_time() + delay >= give_up_at:
                    await trio.sleep_until(give_up_at)
                    return False
                await trio.sleep(delay)
                continue
            message = response.body[:200].decode("utf-8", "replace")
            self.fatal = f"publishing answered {response.status}: {message}"
            self.stop.set()
            self.abort.set()
            return False

    # -- consumers ------------------------------------------------------------------------------

    def _stream_factory(self, consumer: _Consumer) -> Any:
        rcvbuf = self.config.slow_rcvbuf
        if consumer.kind == "fast" or not rcvbuf or self.origin.scheme != "http":
            return None

        async def open_small_buffered(host: str, port: int) -> trio.abc.Stream:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                await sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)

        return open_small_buffered

    async def consume(self, consumer: _Consumer) -> None:
        """Read the consumer's topic its way until cancelled."""
        cfg = self.config
        url = f"{cfg.url.rstrip('/')}/streams/{consumer.topic}"
        producers = self.producers
        try:
            async with open_event_stream(
                url,
                client_id=consumer.client_id,
                last_event_id=self.markers[consumer.topic],
                ack=cfg.ack_window if consumer.ack else None,
                stream_factory=self._stream_factory(consumer),
                retry_jitter=0.1,
                max_retry_interval=5.0,
            ) as events:
                consumer.stream = events
                with consumer.reading:  # a "slow-stop" consumer's ends at its stop time
                    await self._read(consumer, events, producers)
                consumer.stopped = True
                await trio.sleep_forever()  # holding the connection, reading nothing
        except (TrioStreamError, trio.BrokenResourceError, OSError) as error:
            consumer.error = f"{type(error).__name__}: {error}"

    async def _read(
        self, consumer: _Consumer, events: EventStream, producers: list[_Producer]
    ) -> None:
        cfg = self.config
        next_read = trio.current_time()
        next_stall = math.inf
        async for item in events:
            now = trio.current_time()
            if isinstance(item, StreamReset):
                consumer.resets += 1
                continue
            consumer.on_event(item, now, self.run_id, producers)
            pending = events.statistics().pending
            consumer.max_pending = max(consumer.max_pending, pending)
            if consumer.kind == "slow-read":
                next_read = max(next_read + 1 / cfg.slow_rate, now - 1.0)
                await trio.sleep_until(next_read)
            elif consumer.kind == "slow-stall" and cfg.stall_seconds:
                if next_stall == math.inf and self.started.is_set():
                    next_stall = self.t0 + cfg.stall_every
                if now < next_stall:
                    continue
                consumer.stalls += 1
                await trio.sleep(cfg.stall_seconds)
                next_stall = trio.current_time() + cfg.stall_every

    async def watch_acks(self) -> None:
        """Turn the ack consumers' accepted acks into latencies, every few milliseconds."""
        acking = [c for c in self.consumers if c.ack]
        if not acking:
            return
        while True:
            await trio.sleep(ACK_WATCH_INTERVAL)
            now = trio.current_time()
            for consumer in acking:
                if consumer.stream is None:
                    continue
                acked = consumer.stream.statistics().last_acked_id
                if acked is not None and acked != consumer.last_acked:
                    consumer.last_acked = acked
                    consumer.on_acked(acked, now)

    def caught_up(self) -> bool:
        """Whether every consumer that is still reading has all it is owed."""
        if not all(p.finished for p in self.producers):
            return False
        return all(
            c.owed(self.producers) == 0
            for c in self.consumers
            if c.kind != "slow-stop" and c.error is None
        )

    # -- sampling -------------------------------------------------------------------------------

    async def scrape(self, http: _HttpClient) -> dict[str, Any] | None:
        """One scrape of ``/metrics`` as a snapshot; ``None`` (counted) when it fails."""
        target = _target(f"{self.base_path}/metrics", [])
        for _ in range(2):  # a GET may be retried on a fresh connection
            try:
                response = await http.request(b"GET", target)
            except (_Lost, TrioStreamError):
                continue
            if response.status == 200:
                try:
                    samples = parse_metrics(response.body.decode("utf-8", "replace"))
                except ValueError:
                    break
                return metrics_snapshot(samples, self.topics)
            break
        self.scrape_errors += 1
        return None

    def _client_point(self) -> dict[str, Any]:
        by_class: dict[str, int] = {}
        lag: dict[str, int] = {}
        for c in self.consumers:
            by_class[c.name] = by_class.get(c.name, 0) + c.delivered
            lag[c.name] = max(lag.get(c.name, 0), c.owed(self.producers))
        streams = [c.stream.statistics() for c in self.consumers if c.stream is not None]
        return {
            "t": round(self.elapsed(), 3),
            "published": sum(p.published for p in self.producers),
            "publish_429": sum(p.rejected for p in self.producers),
            "delivered": by_class,
            "lag": lag,
            "pauses": sum(s.pauses for s in streams),
            "reconnects": sum(max(0, s.connections - 1) for s in streams),
            "resets": sum(c.resets for c in self.consumers),
        }

    async def sample(self) -> None:
        """Scrape ``/metrics`` and record a timeline point every ``sample_interval``."""
        http = _HttpClient(self.origin, self._headers())
        try:
            while True:
                point = self._client_point()
                snapshot = await self.scrape(http)
                if snapshot is not None:
                    self.last_scrape = snapshot
                    point["server"] = {
                        k: snapshot[k]
                        for k in (
                            "connections",
                            "published",
                            "sent",
                            "dropped",
                            "write_stalls",
                            "publish_rejected",
                            "retry_signals",
                            "queue_depth",
                            "saturation",
                        )
                    }
                self.timeline.append(point)
                await trio.sleep(self.config.sample_interval)
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()

    async def refresh_display(self) -> None:
        """Redraw the live display twice a second."""
        assert self.display is not None
        while True:
            self.display(self)
            await trio.sleep(0.5)

    # -- the whole run --------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool) -> None:
        """Markers, consumers, producers, drain; the report's raw material is left in self."""
        cfg = self.config
        http = _HttpClient(self.origin, self._headers())
        try:
            await self.publish_markers(http)
            self.before = await self.scrape(http)
            async with trio.open_nursery() as outer:
                if handle_signals:
                    outer.start_soon(self._stop_on_signal)
                async with trio.open_nursery() as consumers:
                    self.t0 = trio.current_time() + CONNECT_WAIT  # until all are connected
                    for consumer in self.consumers:
                        consumers.start_soon(self.consume, consumer)
                    with trio.move_on_after(CONNECT_WAIT):
                        while not all(  # noqa: ASYNC110 - the client has no event for this
                            c.stream is not None and c.stream.statistics().connections
                            for c in self.consumers
                        ):
                            await trio.sleep(0.02)
                    self.t0 = trio.current_time()
                    self.publish_end = self.t0 + cfg.duration
                    self.started.set()
                    for consumer in self.consumers:
                        if consumer.kind == "slow-stop":
                            consumer.reading.deadline = self.t0 + cfg.stop_after
                    consumers.start_soon(self.watch_acks)
                    consumers.start_soon(self.sample)
                    if self.display is not None:
                        consumers.start_soon(self.refresh_display)
                    async with trio.open_nursery() as watch:
                        watch.start_soon(self._cancel_when_set, self.stop, watch.cancel_scope)
                        async with trio.open_nursery() as producers:
                            for producer in self.producers:
                                producers.start_soon(self.produce, producer)
                        watch.cancel_scope.cancel()
                    self.drain_started = trio.current_time()
                    self.drain_end = self.drain_started + cfg.drain
                    with trio.move_on_at(self.drain_end):
                        watch_abort = trio.CancelScope()
                        consumers.start_soon(self._cancel_when_set, self.abort, watch_abort)
                        with watch_abort:
                            while not self.caught_up():  # noqa: ASYNC110 - polls client state
                                await trio.sleep(0.05)
                    self.finished_at = trio.current_time()
                    self.timeline.append(self._client_point())
                    consumers.cancel_scope.cancel()
                outer.cancel_scope.cancel()
            # The streams are closed: give the server a moment to notice (it finds out
            # at its next read or write), then scrape the last time.
            closed_at = trio.current_time()
            baseline = self.before["connections"] if self.before else 0.0
            with trio.move_on_after(SETTLE_TIMEOUT):
                while True:
                    snapshot = await self.scrape(http)
                    if snapshot is not None:
                        self.after = snapshot
                    if snapshot is None or snapshot["connections"] <= baseline:
                        break
                    await trio.sleep(0.1)
            self.settled_in = trio.current_time() - closed_at
            if self.display is not None:
                self.display(self)
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()

    @staticmethod
    async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async def _stop_on_signal(self) -> None:
        """First SIGINT/SIGTERM: stop publishing, still drain; the second: stop draining."""
        import signal

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.stop.is_set():
                    self.abort.set()
                    return
                self.interrupted = True
                self.stop.set()

    # -- the report -----------------------------------------------------------------------------

    def _consumer_row(self, c: _Consumer) -> dict[str, Any]:
        stats = c.stream.statistics() if c.stream is not None else None
        owed = c.owed(self.producers)
        return {
            "index": c.index,
            "client_id": c.client_id,
            "topic": c.topic,
            "class": c.name,
            "must_keep_up": c.must_keep_up,
            "expected": sum(p.certain(0, p.next_seq) for p in self.producers if p.topic == c.topic),
            "delivered": c.delivered,
            "dropped": c.dropped,
            "behind": owed,
            "duplicates": c.duplicates,
            "resets": c.resets,
            "foreign": c.foreign,
            "pauses": stats.pauses if stats else 0,
            "polls": stats.polls if stats else 0,
            "reconnects": max(0, stats.connections - 1) if stats else 0,
            "client_duplicates": stats.duplicates if stats else 0,
            "acks": stats.acks if stats else 0,
            "stalls": c.stalls,
            "stopped": c.stopped,
            "max_pending": c.max_pending,
            "buffer_utilization_max": (
                min(1.0, c.max_pending / self.config.ack_window) if c.ack else None
            ),
            "exact": not (c.dropped or c.duplicates or owed or c.resets or c.error),
            "order_digest": c.digest.hexdigest(),
            "error": c.error,
        }

    def _verdict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        problems: list[str] = [self.fatal] if self.fatal else []
        warnings: list[str] = []
        digests: dict[str, set[str]] = {}
        for row in rows:
            if not row["must_keep_up"]:
                if row["error"]:
                    warnings.append(f"consumer {row['index']} ({row['class']}): {row['error']}")
                continue
            if row["exact"]:
                digests.setdefault(row["topic"], set()).add(row["order_digest"])
                continue
            if self.abort.is_set() and not (row["dropped"] or row["duplicates"] or row["resets"]):
                warnings.append(
                    f"consumer {row['index']} ({row['class']}) was {row['behind']} events "
                    "behind when the drain was cut short"
                )
                continue
            what = [
                f"{row[key]} {label}"
                for key, label in (
                    ("dropped", "lost in gaps"),
                    ("behind", "never received"),
                    ("duplicates", "duplicated or out of order"),
                    ("resets", "reset notices"),
                )
                if row[key]
            ]
            if row["error"]:
                what.append(f"failed: {row['error']}")
            problems.append(
                f"consumer {row['index']} ({row['class']}, {row['client_id']}): " + ", ".join(what)
            )
        for topic, seen in digests.items():
            if len(seen) > 1:
                problems.append(f"fast consumers of {topic!r} saw the events in different orders")
        if not self.abort.is_set() and any(row["must_keep_up"] and row["behind"] for row in rows):
            warnings.append(
                "a fast consumer was still behind at the end of the drain: is the publish "
                "rate above the server's per-client --rate (or --global-rate)?"
            )
        uncertain = sum(len(span) for p in self.producers for span in p.uncertain)
        if uncertain:
            warnings.append(
                f"{uncertain} events were in publish requests whose connection broke: "
                "not counted as owed"
            )
        foreign = sum(row["foreign"] for row in rows)
        if foreign:
            warnings.append(f"{foreign} events from someone else were seen on the topics")
        if self.scrape_errors:
            warnings.append(f"{self.scrape_errors} scrapes of /metrics failed")
        return {"ok": not problems, "problems": problems, "warnings": warnings}

    def report(self) -> dict[str, Any]:
        """The report as a JSON-able dict (see the module's docstring)."""
        producers = self.producers
        rows = [self._consumer_row(c) for c in self.consumers]
        classes: dict[str, dict[str, Any]] = {}
        receipt: dict[str, LatencyRecorder] = {}
        to_ack: dict[str, LatencyRecorder] = {}
        utilization: dict[str, float] = {}
        for c, row in zip(self.consumers, rows, strict=True):
            totals = classes.setdefault(
                c.name,
                {"consumers": 0, "must_keep_up": c.must_keep_up, **dict.fromkeys(_SUMMED, 0)},
            )
            totals["consumers"] += 1
            for key in _SUMMED:
                totals[key] += row[key]
            receipt.setdefault(c.name, LatencyRecorder()).merge(c.receipt)
            if c.ack:
                to_ack.setdefault(c.name, LatencyRecorder()).merge(c.to_ack)
                utilization[c.name] = max(
                    utilization.get(c.name, 0.0), row["buffer_utilization_max"]
                )
        published = sum(p.published for p in producers)
        publishing = max(1e-9, (self.drain_started or self.publish_end) - self.t0)
        server = self._server_report()
        return {
            "version": REPORT_VERSION,
            "run_id": self.run_id,
            "url": self.config.url,
            "started_at": self.started_at,
            "config": attrs.asdict(self.config),
            "interrupted": self.interrupted,
            "drain_aborted": self.abort.is_set(),
            "elapsed_s": {
                "publishing": round(publishing, 3),
                "drain": round((self.finished_at or 0) - (self.drain_started or 0), 3),
            },
            "verdict": self._verdict(rows),
            "producers": {
                "count": len(producers),
                "published": published,
                "markers": len(self.markers),
                "batches": sum(p.batches for p in producers),
                "rejected_429": sum(p.rejected for p in producers),
                "errors": sum(p.errors for p in producers),
                "uncertain": sum(len(span) for p in producers for span in p.uncertain),
                "rate_eps": round(published / publishing, 1),
                "per_topic": {
                    t: sum(p.published for p in producers if p.topic == t) for t in self.topics
                },
                "per_producer": [
                    {
                        "index": p.index,
                        "topic": p.topic,
                        "published": p.published,
                        "batches": p.batches,
                        "rejected_429": p.rejected,
                        "errors": p.errors,
                    }
                    for p in producers
                ],
            },
            "classes": classes,
            "consumers": rows,
            "latency_s": {
                "receipt": {name: r.summary() for name, r in sorted(receipt.items())},
                "ack": {name: r.summary() for name, r in sorted(to_ack.items())},
            },
            "latency_cdf": {
                "receipt": {name: r.cdf() for name, r in sorted(receipt.items())},
                "ack": {name: r.cdf() for name, r in sorted(to_ack.items())},
            },
            "retry_signals": {
                "server": server.get("retry_signals", {}),
                "client": {
                    "publish_429": sum(p.rejected for p in producers),
                    "publish_retry_after_s": round(sum(p.retry_after_s for p in producers), 3),
                    **{key: sum(r[key] for r in rows) for key in _CLIENT_SIGNALS},
                },
            },
            "buffer_utilization": {
                "server": server.get("buffer_utilization"),
                "client_max": utilization,
            },
            "server": server,
            "timeline": self.timeline,
        }

    def _server_report(self) -> dict[str, Any]:
        before, after = self.before, self.after or self.last_scrape
        if before is None or after is None:
            return {}
        delta = {key: after[key] - before[key] for key in _COUNTERS}
        signals = {k: after["retry_signals"][k] - before["retry_signals"][k] for k in RETRY_KINDS}
        hists = {key: _histogram_delta(before[key], after[key]) for key in _HISTOGRAMS}
        depth: dict[str, float] = dict.fromkeys(self.topics, 0.0)
        saturation: dict[str, float] = dict.fromkeys(self.topics, 0.0)
        for point in self.timeline:
            server = point.get("server")
            if server:
                for t in self.topics:
                    depth[t] = max(depth[t], server["queue_depth"].get(t, 0.0))
                    saturation[t] = max(saturation[t], server["saturation"].get(t, 0.0))
        return {
            "before": before,
            "after": after,
            "delta": delta,
            "retry_signals": signals,
            "connections_after": after["connections"],
            "connections_settled_s": None if self.settled_in is None else round(self.settled_in, 3),
            "max_queue_depth": depth,
            "max_saturation": saturation,
            "saturation_over_warning": any(s > _SATURATION_WARNING for s in saturation.values()),
            "delivery_latency_s": {
                "write": _histogram_summary(hists["delivery_latency_write"]),
                "ack": _histogram_summary(hists["delivery_latency_ack"]),
            },
            "client_lag": _histogram_summary(hists["client_lag"]),
            "buffer_utilization": _histogram_summary(hists["buffer_utilization"]),
        }


async def run_loadgen(
    config: LoadgenConfig,
    *,
    display: Callable[[Any], Any] | None = None,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Run one load test against ``config.url`` and return its report.

    Args:
        config: The workload.
        display: Called with the run's state twice a second (a live display).
        handle_signals: Stop publishing early on SIGINT/SIGTERM and still report
            (main thread only).

    Returns:
        The report (a JSON-able dict); ``report["verdict"]["ok"]`` says whether every
        consumer that kept up got every event exactly once.

    Raises:
        CannotStartError: The run could not start (no server, start marker refused).

    **Cancellation:** safe; every connection is closed.
    """
    run = _Run(config, display)
    await run.run(handle_signals=handle_signals)
    return run.report()


# -- live display ---------------------------------------------------------------------------


def _optional(name: str) -> Any | None:
    """The module *name*, or ``None`` when it is not installed (rich, matplotlib)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _rates(run: _Run) -> tuple[float, dict[str, float]]:
    """Published and delivered (by class) events per second over the last second or so."""
    points = run.timeline
    if len(points) < 2:
        return 0.0, {}
    now = run._client_point()
    back = next((p for p in reversed(points) if now["t"] - p["t"] >= 1.0), points[0])
    span = max(1e-9, now["t"] - back["t"])
    published = (now["published"] - back["published"]) / span
    delivered = {
        name: (n - back["delivered"].get(name, 0)) / span for name, n in now["delivered"].items()
    }
    return published, delivered


def _class_rows(run: _Run) -> list[list[str]]:
    rows = []
    delivered_rate = _rates(run)[1]
    names = sorted({c.name for c in run.consumers}, key=lambda n: (not n.startswith("fast"), n))
    for name in names:
        members = [c for c in run.consumers if c.name == name]
        streams = [c.stream.statistics() for c in members if c.stream is not None]
        rows.append(
            [
                name,
                str(len(members)),
                str(sum(c.delivered for c in members)),
                f"{delivered_rate.get(name, 0.0):.0f}",
                str(max(c.owed(run.producers) for c in members)),
                str(sum(s.pauses for s in streams)),
                str(sum(c.resets for c in members)),
                str(sum(max(0, s.connections - 1) for s in streams)),
                str(sum(c.dropped + c.duplicates for c in members)),
            ]
        )
    return rows


_COLUMNS: Final = ("class", "n", "recv", "recv/s", "lag", "pauses", "resets", "reconn", "lost+dup")


def _headline(run: _Run) -> str:
    published_rate, _ = _rates(run)
    phase = run.producers[0].phase if run.producers else "-"
    published = sum(p.published for p in run.producers)
    rejected = sum(p.rejected for p in run.producers)
    server, before = run.last_scrape or {}, run.before or {}
    depth = max(server.get("queue_depth", {}).values(), default=0)
    saturation = max(server.get("saturation", {}).values(), default=0.0)
    pauses = 0.0
    if server and before:
        pauses = server["retry_signals"]["pause"] - before["retry_signals"]["pause"]
    t = max(0.0, run.elapsed())
    stage = "draining" if run.drain_started is not None else phase
    return (
        f"t={t:.1f}s/{run.config.duration:g}s [{stage}] published {published} "
        f"({published_rate:.0f}/s, 429s {rejected}) | server: streams "
        f"{server.get('connections', 0):.0f}, queue {depth:.0f} ({saturation:.0%}), "
        f"pauses {pauses:.0f}"
    )


def plain_display(stream: Any = None) -> Callable[[_Run], None]:
    """A display that prints one line per second (when rich is not installed)."""
    last = [-math.inf]

    def show(run: _Run) -> None:
        now = trio.current_time()
        if now - last[0] < 1.0:
            return
        last[0] = now
        rows = _class_rows(run)
        parts = [f"{r[0]} {r[2]} lag {r[4]} p{r[5]}" for r in rows]
        print(_headline(run) + " | " + "; ".join(parts), file=stream or sys.stdout, flush=True)

    return show


def rich_display(
    rich_live: Any, rich_table: Any, console: Any
) -> tuple[Callable[[_Run], None], Any]:
    """A rich ``Live`` table, refreshed by the caller (no thread of its own)."""
    live = rich_live.Live(console=console, auto_refresh=False, transient=False)

    def show(run: _Run) -> None:
        table = rich_table.Table(title=_headline(run), title_justify="left")
        for column in _COLUMNS:
            if column == "class":
                table.add_column(column, no_wrap=True, min_width=13)
            else:
                table.add_column(column, justify="right", no_wrap=True)
        for row in _class_rows(run):
            table.add_row(*row)
        live.update(table, refresh=True)

    return show, live


# -- report files -----------------------------------------------------------------------------


def _fmt_seconds(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A plain-text summary of *report* for the terminal."""
    lines = []
    producers = report["producers"]
    verdict = report["verdict"]
    lines.append(
        f"loadgen {report['run_id']} against {report['url']}: published {producers['published']} "
        f"events in {report['elapsed_s']['publishing']:g} s ({producers['rate_eps']}/s), "
        f"{producers['rejected_429']} publishes answered 429"
    )
    header = (
        f"{'class':<16}{'n':>3}{'expected':>10}{'delivered':>10}{'dropped':>9}{'behind':>8}"
        f"{'dup':>5}{'resets':>7}{'pauses':>7}{'p50':>11}{'p99':>11}{'p99 ack':>11}"
    )
    lines.append(header)
    for name, c in report["classes"].items():
        latency = report["latency_s"]["receipt"].get(name, {})
        ack = report["latency_s"]["ack"].get(name, {})
        lines.append(
            f"{name:<16}{c['consumers']:>3}{c['expected']:>10}{c['delivered']:>10}"
            f"{c['dropped']:>9}{c['behind']:>8}{c['duplicates']:>5}{c['resets']:>7}"
            f"{c['pauses']:>7}{_fmt_seconds(latency.get('p50')):>11}"
            f"{_fmt_seconds(latency.get('p99')):>11}{_fmt_seconds(ack.get('p99')):>11}"
        )
    server = report["server"]
    if server:
        delta = server["delta"]
        signals = server["retry_signals"]
        lines.append(
            f"server: published {delta['published']:.0f}, sent {delta['sent']:.0f}, dropped "
            f"{delta['dropped']:.0f}, write stalls {delta['write_stalls']:.0f}, retry signals "
            + ", ".join(f"{k} {v:.0f}" for k, v in signals.items())
            + f"; max queue depth {max(server['max_queue_depth'].values(), default=0):.0f} "
            f"(saturation {max(server['max_saturation'].values(), default=0):.0%})"
        )
    for problem in verdict["problems"]:
        lines.append(f"PROBLEM: {problem}")
    for warning in verdict["warnings"]:
        lines.append(f"warning: {warning}")
    lines.append(
        "OK: every consumer that kept up got every event exactly once, in order"
        if verdict["ok"]
        else "FAILED"
    )
    return lines


def _burst_spans(report: dict[str, Any]) -> list[tuple[float, float]]:
    cfg = report["config"]
    cycle = cfg["quiet_seconds"] + cfg["burst_seconds"]
    end = report["elapsed_s"]["publishing"]
    spans, start = [], 0.0
    while start < end and cfg["burst_seconds"] > 0:
        spans.append((start + cfg["quiet_seconds"], min(end, start + cycle)))
        start += cycle
    return [s for s in spans if s[0] < s[1]]


def _shade_bursts(ax: Any, report: dict[str, Any]) -> None:
    for i, (a, b) in enumerate(_burst_spans(report)):
        ax.axvspan(a, b, color="orange", alpha=0.12, label="burst" if i == 0 else None)


def _series_rate(
    points: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for a, b in itertools.pairwise(points):
        dt = b["t"] - a["t"]
        if dt > 0:
            xs.append(b["t"])
            ys.append(max(0.0, (get(b) - get(a)) / dt))
    return xs, ys


def _delivered(point: dict[str, Any], *, name: str) -> float:
    return float(point["delivered"].get(name, 0))


def _plot_throughput(ax: Any, report: dict[str, Any]) -> None:
    points = [p for p in report["timeline"] if p["t"] >= 0]
    for name in report["classes"]:
        members = report["classes"][name]["consumers"]
        xs, ys = _series_rate(points, partial(_delivered, name=name))
        ax.plot(xs, [y / max(1, members) for y in ys], label=f"{name} (per consumer)")
    xs, ys = _series_rate(points, lambda p: p["published"])
    ax.plot(
        xs,
        ys,
        label="published (per topic)"
        if len(report["producers"]["per_topic"]) == 1
        else "published (all topics)",
        color="black",
        linewidth=2.5,
        linestyle="--",
        zorder=5,
    )
    _shade_bursts(ax, report)
    ax.set_title("Throughput")
    ax.set_xlabel("seconds")
    ax.set_ylabel("events / s")
    ax.legend(fontsize=7)


def _plot_queue(ax: Any, report: dict[str, Any]) -> None:
    points = [p for p in report["timeline"] if "server" in p and p["t"] >= 0]
    twin = ax.twinx()
    for topic in report["producers"]["per_topic"]:
        xs = [p["t"] for p in points]
        ax.plot(
            xs, [p["server"]["queue_depth"].get(topic, 0) for p in points], label=f"depth {topic}"
        )
        twin.plot(
            xs,
            [p["server"]["saturation"].get(topic, 0) for p in points],
            linestyle="--",
            label=f"saturation {topic}",
        )
    twin.axhline(_SATURATION_WARNING, color="red", linewidth=0.8, linestyle=":")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("saturation")
    _shade_bursts(ax, report)
    ax.set_title("Queue depth and saturation")
    ax.set_xlabel("seconds")
    ax.set_ylabel("events retained")
    ax.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")


def _plot_latency(ax: Any, report: dict[str, Any]) -> None:
    for stage, style in (("receipt", "-"), ("ack", "--")):
        for name, points in report["latency_cdf"][stage].items():
            if points:
                ax.step(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    where="post",
                    linestyle=style,
                    label=f"{name} ({'to ack' if stage == 'ack' else 'receipt'})",
                )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_title("Latency from publish request (CDF)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of events")
    ax.legend(fontsize=7)


def _plot_delivery(ax: Any, report: dict[str, Any]) -> None:
    names = list(report["classes"])
    bottoms = [0.0] * len(names)
    for key, color in (
        ("delivered", "tab:green"),
        ("dropped", "tab:red"),
        ("behind", "tab:orange"),
        ("duplicates", "tab:purple"),
    ):
        values = [
            report["classes"][n][key] / max(1, report["classes"][n]["consumers"]) for n in names
        ]
        ax.bar(names, values, bottom=bottoms, label=key, color=color)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_title("Delivery per consumer, by class")
    ax.set_ylabel("events")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.legend(fontsize=7)


def _plot_signals(ax: Any, report: dict[str, Any]) -> None:
    points = [p for p in report["timeline"] if "server" in p and p["t"] >= 0]
    if points:
        first = points[0]["server"]
        xs = [p["t"] for p in points]
        for kind in RETRY_KINDS:
            ax.plot(
                xs,
                [p["server"]["retry_signals"][kind] - first["retry_signals"][kind] for p in points],
                label=f"server {kind}",
            )
        ax.plot(
            xs,
            [p["server"]["write_stalls"] - first["write_stalls"] for p in points],
            label="server write stalls",
            linestyle=":",
        )
    client = [p for p in report["timeline"] if p["t"] >= 0]
    ax.plot(
        [p["t"] for p in client],
        [p["reconnects"] for p in client],
        label="client reconnects",
        linestyle="--",
    )
    _shade_bursts(ax, report)
    ax.set_title("Retry signals (cumulative)")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7)


def _plot_buffers(ax: Any, report: dict[str, Any]) -> None:
    server = report["buffer_utilization"]["server"] or {}
    buckets = server.get("buckets") or []
    labels, counts, below = [], [], 0.0
    for le, cumulative in buckets:
        if math.isinf(le):
            continue
        labels.append(f"≤{le:g}")
        counts.append(cumulative - below)
        below = cumulative
    if labels:
        ax.bar(labels, counts, color="tab:blue")
    ax.set_title(f"Client buffer utilization in acks (n={server.get('count', 0):.0f})")
    ax.set_xlabel("buffer_utilization")
    ax.set_ylabel("acks")
    ax.tick_params(axis="x", labelsize=7)


PANELS: Final[tuple[tuple[str, Callable[[Any, dict[str, Any]], None]], ...]] = (
    ("throughput", _plot_throughput),
    ("queue", _plot_queue),
    ("latency", _plot_latency),
    ("delivery", _plot_delivery),
    ("signals", _plot_signals),
    ("buffers", _plot_buffers),
)


def _plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """One PNG per panel and ``overview.png`` with all of them; none without matplotlib."""
    matplotlib = _optional("matplotlib")
    if matplotlib is None:
        return []
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    written = []
    for name, draw in PANELS:
        figure, ax = plt.subplots(figsize=(7, 4))
        draw(ax, report)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    figure, axes = plt.subplots(2, 3, figsize=(19, 9.5))
    for ax, (_, draw) in zip(axes.flat, PANELS, strict=True):
        draw(ax, report)
    verdict = "OK" if report["verdict"]["ok"] else "FAILED"
    figure.suptitle(
        f"trio-stream loadgen {report['run_id']}: {report['producers']['published']} events, "
        f"{len(report['consumers'])} consumers, {verdict}"
    )
    figure.tight_layout()
    path = directory / "overview.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.insert(0, path)
    return written


def _html_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(report: dict[str, Any], images: Sequence[Path]) -> str:
    verdict = report["verdict"]
    classes = report["classes"]
    latency = report["latency_s"]
    rows = []
    for name, c in classes.items():
        r, a = latency["receipt"].get(name, {}), latency["ack"].get(name, {})
        rows.append(
            [name, c["consumers"], c["expected"], c["delivered"], c["dropped"], c["behind"],
             c["duplicates"], c["resets"], c["pauses"], _fmt_seconds(r.get("p50")),
             _fmt_seconds(r.get("p99")), _fmt_seconds(r.get("p999")), _fmt_seconds(a.get("p99"))]
        )  # fmt: skip
    server = report["server"]
    server_rows: list[list[object]] = []
    if server:
        server_rows += [[k, f"{v:.0f}"] for k, v in server["delta"].items()]
        server_rows += [
            [f"retry_signals{{kind={k}}}", f"{v:.0f}"] for k, v in server["retry_signals"].items()
        ]
        for stage, s in server["delivery_latency_s"].items():
            server_rows.append([f"delivery latency p99 ({stage})", _fmt_seconds(s.get("p99"))])
        server_rows.append(
            ["max saturation", f"{max(server['max_saturation'].values(), default=0):.0%}"]
        )
    figures = (
        "".join(
            f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}'
            "</figcaption></figure>"
            for p in images
        )
        or "<p>No plots: install matplotlib to get them.</p>"
    )
    status = "OK" if verdict["ok"] else "FAILED"
    items = "".join(f"<li>{html.escape(p)}</li>" for p in verdict["problems"] + verdict["warnings"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>trio-stream loadgen {html.escape(report["run_id"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
.ok {{ color: #070; }} .failed {{ color: #b00; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>trio-stream loadgen <span class="{status.lower()}">{status}</span></h1>
<p>Run {html.escape(report["run_id"])} against {html.escape(report["url"])}, started
{html.escape(report["started_at"])}: {report["producers"]["published"]} events published in
{report["elapsed_s"]["publishing"]:g} s ({report["producers"]["rate_eps"]}/s) by
{report["producers"]["count"]} producers; {len(report["consumers"])} consumers.</p>
<ul>{items}</ul>
<h2>Consumers by class</h2>
{
        _html_table(
            [
                "class",
                "n",
                "expected",
                "delivered",
                "dropped",
                "behind",
                "dup",
                "resets",
                "pauses",
                "p50",
                "p99",
                "p99.9",
                "p99 to ack",
            ],
            rows,
        )
    }
<h2>Server (over the run, from /metrics)</h2>
{_html_table(["metric", "value"], server_rows)}
<h2>Plots</h2>
{figures}
</body></html>
"""


def write_report(
    report: dict[str, Any], *, json_path: Path | None = None, report_dir: Path | None = None
) -> list[Path]:
    """Write *report* as JSON and/or as PNG plots with an HTML page; the files written.

    Without matplotlib the HTML page has the tables but no plots.
    """
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        written.append(json_path)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        images = _plots(report, report_dir)
        page = report_dir / "index.html"
        page.write_text(_html(report, images))
        written += [*images, page]
    return written


# -- command line --------------------------------------------------------------------------


# (flag, type, default, help), in the order --help shows them.
OPTIONS: Final[Sequence[tuple[str, Callable[[str], Any], object, str]]] = (
    ("--duration", number(0, strict=True), 10.0, "seconds the producers publish"),
    ("--drain", number(0), 5.0, "seconds consumers get to catch up after the producers stop"),
    ("--topics", integer(1), 1, "topics to spread producers and consumers over (<= --producers)"),
    ("--topic-prefix", str, "loadgen", "topics are named PREFIX-0, PREFIX-1, ..."),
    ("--producers", integer(1), 2, "bursty producers (each POSTs batches on its own schedule)"),
    ("--quiet-rate", number(0), 10.0, "events/s per producer in quiet spells"),
    ("--burst-rate", number(0), 150.0, "events/s per producer in bursts"),
    ("--quiet-seconds", number(0), 2.0, "length of each quiet spell"),
    ("--burst-seconds", number(0), 0.5, "length of each burst"),
    ("--max-batch", integer(1), 100, "events per publish request at most"),
    ("--payload-bytes", integer(0), 64, "size of each event's data"),
    ("--consumers", integer(0), 8, "consumers in all"),
    ("--slow-share", share, 0.5, "share of the consumers that are deliberately slow (0-1)"),
    (
        "--slow-mode",
        str,
        "mix",
        "how slow consumers misbehave: 'read' (read at --slow-rate), 'stall' (stop reading "
        "for --stall-seconds every --stall-every s), 'stop' (stop reading for good after "
        "--stop-after s, keeping the connection open) or 'mix' (all three in turn)",
    ),
    ("--slow-rate", number(0, strict=True), 5.0, "events/s a 'read' slow consumer takes"),
    ("--stall-seconds", number(0), 3.0, "seconds a 'stall' consumer stops reading each time"),
    ("--stall-every", number(0), 3.0, "seconds a 'stall' consumer reads between two stalls"),
    ("--stop-after", number(0), 1.0, "seconds a 'stop' consumer reads before it stops"),
    (
        "--slow-rcvbuf",
        integer(0),
        8192,
        "socket receive buffer of slow consumers in bytes, so the server feels them "
        "sooner (0: the system's default)",
    ),
    ("--ack-share", share, 0.25, "share of the consumers of each kind in ack mode (0-1)"),
    ("--ack-window", integer(1), 64, "ack window of consumers in ack mode (1-10000)"),
    ("--publish-token", str, None, "bearer token for publishing (the server's --publish-token)"),
    ("--client-prefix", str, "loadgen", "consumers' client ids are PREFIX-RUN-INDEX"),
    ("--sample-interval", number(0, strict=True), 0.5, "seconds between scrapes of /metrics"),
    ("--report-json", Path, None, "write the report as JSON to this file"),
    (
        "--report-dir",
        Path,
        None,
        "write PNG plots (with matplotlib) and index.html embedding them to this directory",
    ),
)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``loadgen`` subcommand to *commands* (an ``add_subparsers()`` result)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "loadgen",
        help="load a running server with bursty producers and slow consumers; report",
        description=(
            "Load a running trio-stream server with bursty producers and fast, slow, "
            "stalling and stopping consumers (some in ack mode) for --duration seconds, "
            "then report delivery per consumer class, latency percentiles, queue depth "
            "and saturation, retry signals and buffer utilization. Exit status: 0 when "
            "every fast consumer got every event exactly once and in order, 1 when one "
            "did not, 3 when the run could not start, 2 for bad options. Ctrl-C stops "
            "publishing early (consumers still get --drain seconds to catch up); a second "
            "Ctrl-C cuts the drain short."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "url",
        nargs="?",
        default="http://127.0.0.1:8000",
        help="base URL of the server (its /streams/..., /metrics are used)",
    )
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no live display and no summary (the display is off anyway when stdout is "
        "not a terminal)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> LoadgenConfig:
    """The `LoadgenConfig` of parsed ``loadgen`` arguments.

    Raises:
        SystemExit: An option value is not acceptable.
    """
    names = [flag.lstrip("-").replace("-", "_") for flag, *_ in OPTIONS]
    values = {
        name: getattr(args, name) for name in names if name not in ("report_json", "report_dir")
    }
    if values["slow_mode"] not in ("read", "stall", "stop", "mix"):
        raise SystemExit(
            f"--slow-mode must be read, stall, stop or mix, got {values['slow_mode']!r}"
        )
    try:
        return LoadgenConfig(url=args.url, **values)
    except (TypeError, ValueError, TrioStreamError) as error:
        raise SystemExit(f"loadgen: {error}") from None


def main(args: argparse.Namespace) -> int:
    """``trio-stream loadgen``: run, display, report; the exit status."""
    config = config_from_args(args)
    show: Callable[[Any], Any] | None = None
    live: Any = None
    if not args.quiet and sys.stdout.isatty():
        rich_live, rich_table, rich_console = (
            _optional("rich.live"),
            _optional("rich.table"),
            _optional("rich.console"),
        )
        if rich_live is not None and rich_table is not None and rich_console is not None:
            show, live = rich_display(rich_live, rich_table, rich_console.Console())
        else:
            show = plain_display()

    async def run() -> dict[str, Any]:
        return await run_loadgen(config, display=show, handle_signals=True)

    try:
        if live is not None:
            with live:
                report = trio.run(run)
        else:
            report = trio.run(run)
    except CannotStartError as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    written = write_report(report, json_path=args.report_json, report_dir=args.report_dir)
    if not args.quiet:
        for line in summary_lines(report):
            print(line)
        for path in written:
            print(f"wrote {path}")
    sys.stdout.flush()
    return EXIT_OK if report["verdict"]["ok"] else EXIT_LOST
