"""The hub: topics and their logs, publishing, the client registry, the global bucket."""

from __future__ import annotations

import logging
import math
import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

import attrs
import trio

from ._core._errors import (
    ClientPausedError,
    LimitExceededError,
    LocalProtocolError,
    NotSentError,
    RateLimitedError,
    TopicLimitError,
    UnknownClientError,
)
from ._core._idempotency import Published, check_idempotency_key
from ._core._limits import Bucket, TokenBucket, _at_least_one, _non_negative, _positive
from ._core._names import check_client_id, check_event_name, check_topic
from ._core._ring import Entry, Gap, Resume
from ._core._stats import LAG_BUCKETS, LATENCY_BUCKETS, RATIO_BUCKETS, Histogram
from ._log import AlreadyPublished, BackendUnavailableError, LogStatistics, MemoryLog

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    from ._connection import Connection
    from ._core._events import Event
    from ._several import Cursor, MultiConnection
    from ._tracing import Tracing

__all__ = [
    "Backend",
    "ClientStatistics",
    "Hub",
    "HubConfig",
    "HubStatistics",
    "PollResult",
    "open_hub",
]

logger: Final = logging.getLogger("trio_stream")

SATURATION_WARNING: Final = 0.8
HOUSEKEEPING_INTERVAL: Final = 1.0
MAX_TOPICS_PER_CLIENT: Final = 64
MAX_TOPIC_SETS_PER_CLIENT: Final = 16


def _ack_window(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= 10_000:
        raise ValueError(f"{attribute.name} must be an integer from 1 to 10000, got {value!r}")


class Backend(Protocol):
    """Where topic logs live when not in this process's memory alone (e.g. Redis).

    A hub with a backend asks it for each topic's log; `Hub.run_housekeeping` runs it.
    """

    errors: int
    """Operations on the backend that failed (connection lost, timeouts, ...)."""

    def open_log(self, topic: str, config: HubConfig) -> MemoryLog:
        """A new log for *topic*, bounded as *config* says."""
        ...

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and keep the logs up to date until cancelled.

        Pause states shared by other processes are applied with `Hub.apply_pause`.
        """
        ...

    def share_pause(self, topic: str, client_id: str, after: str | None, *, paused: bool) -> None:
        """Tell the other processes that a client was paused on *topic* or caught up."""
        ...

    def problem(self) -> str | None:
        """What is wrong with the backend now (``None`` when it works)."""
        ...

    def bucket(self, key: str, rate: float, burst: int) -> Bucket:
        """The bucket named *key* (``"global"``, ``"client:<id>"``) all processes share."""
        ...

    def check_id(self, event_id: str) -> None:
        """Raise `ValueError` unless *event_id* has the shape of this backend's ids."""
        ...

    def share_client(self, client_id: str) -> None:
        """Tell the other processes that this one holds a stream of *client_id*."""
        ...

    async def forward_ack(
        self,
        topic: str,
        *,
        client_id: str,
        last_event_id: str,
        buffer_utilization: float | None = None,
    ) -> bool:
        """Hand an ack to the processes streaming to the client; ``False`` if none does.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """
        ...


@attrs.frozen(kw_only=True)
class HubConfig:
    """Every limit of a hub; the defaults are those of ``trio-stream serve``.

    Attributes:
        rate: Events per second delivered to one client (0: no limit).
        burst: Size of each client's bucket.
        global_rate: Events per second delivered by the whole hub (0: no limit).
        global_burst: Size of the global bucket (``None``: same as *burst*).
        window: Ack window for clients that ask for acks without a size.
        log_capacity: Events a topic's log retains.
        log_ttl: Seconds an event stays in a topic's log.
        log_max_bytes: Bytes of encoded events a topic's log retains.
        max_topics: Topics held at once.
        lag_limit: Events a client may fall behind its topic's head before it is paused.
        heartbeat_interval: Seconds of idleness after which a stream gets a heartbeat.
        retry_ms: The ``retry:`` value sent at the start of each stream.
        idle_timeout: Seconds a stream may go without progress before it is closed.
        max_streams_per_client: Concurrent streams one client id may hold.
        max_connections: Concurrent streams the hub accepts in all.
        max_clients: Client entries kept; idle ones are evicted first.
        client_ttl: Seconds an idle client's entry (bucket, acks, pause) is kept.
        max_batch: Events one write carries at most.
        poll_interval: Seconds a paused client is told to wait before polling.
        write_stall_threshold: A write that takes longer than this waited for the peer.
        on_saturation: Called with ``(topic, saturation)`` when a log passes 80 %.
        backend: Where topic logs live (``None``: in memory, this process only); see
            ``trio_stream.backends.redis.RedisBackend``.
        tracer: An OpenTelemetry ``Tracer``: spans per publish and per delivery (to the
            write and to the ack). ``None`` (the default) costs nothing.
    """

    rate: float = attrs.field(default=100.0, validator=_non_negative)
    burst: int = attrs.field(default=20, validator=_at_least_one)
    global_rate: float = attrs.field(default=0.0, validator=_non_negative)
    global_burst: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_at_least_one)
    )
    window: int = attrs.field(default=64, validator=_ack_window)
    log_capacity: int = attrs.field(default=10_000, validator=_at_least_one)
    log_ttl: float = attrs.field(default=30.0, validator=_positive)
    log_max_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_at_least_one)
    max_topics: int = attrs.field(default=10_000, validator=_at_least_one)
    lag_limit: int = attrs.field(default=1000, validator=_at_least_one)
    heartbeat_interval: float = attrs.field(default=15.0, validator=_positive)
    retry_ms: int = attrs.field(default=3000, validator=attrs.validators.ge(0))
    idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    max_streams_per_client: int = attrs.field(default=4, validator=_at_least_one)
    max_connections: int = attrs.field(default=10_000, validator=_at_least_one)
    max_clients: int = attrs.field(default=100_000, validator=_at_least_one)
    client_ttl: float = attrs.field(default=300.0, validator=_positive)
    max_batch: int = attrs.field(default=256, validator=_at_least_one)
    poll_interval: float = attrs.field(default=1.0, validator=_non_negative)
    write_stall_threshold: float = attrs.field(default=0.1, validator=_positive)
    on_saturation: Callable[[str, float], object] | None = None
    tracer: Any = None
    backend: Backend | None = None


@attrs.define(eq=False)
class _Topic:
    name: str
    log: MemoryLog
    streams: int = 0
    saturated: bool = False


@attrs.define(eq=False)
class _ClientTopic:
    """What one client was sent and acknowledged on one topic's log."""

    log: MemoryLog
    sent: int
    acked: int
    connections: set[Connection] = attrs.field(factory=set)


@attrs.define(eq=False)
class _Client:
    id: str
    bucket: Bucket | None
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    streams: int = 0
    paused: dict[str, str | None] = attrs.field(factory=dict)
    topics: dict[str, _ClientTopic] = attrs.field(factory=dict)
    cursors: dict[str, Cursor] = attrs.field(factory=dict)
    """The topic sets it streamed or polled together, by their ids' tag (for acks)."""
    last_seen: float = 0.0

    def remember(self, cursor: Cursor) -> None:
        cursors = self.cursors
        cursors.pop(cursor.tag, None)
        cursors[cursor.tag] = cursor  # the most recent last
        if len(cursors) > MAX_TOPIC_SETS_PER_CLIENT:
            del cursors[next(iter(cursors))]

    def record(self, topic: str, log: MemoryLog, position: int) -> _ClientTopic:
        record = self.topics.get(topic)
        if record is None or record.log is not log:
            if len(self.topics) >= MAX_TOPICS_PER_CLIENT:
                for name, old in list(self.topics.items()):
                    if not old.connections:
                        del self.topics[name]
                        break
            record = self.topics[topic] = _ClientTopic(log=log, sent=position, acked=position)
        return record


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """A snapshot of one client's entry: ``tokens`` is ``None`` without a rate limit."""

    client_id: str
    streams: int
    tokens: int | None
    paused_topics: tuple[str, ...]


@attrs.frozen(kw_only=True)
class HubStatistics:
    """Counters of a hub since it was made, and what it holds now."""

    topics: int
    clients: int
    connections: int
    published: int
    sent: int
    dropped: int
    write_stalls: int
    publish_rejected: int
    publish_replayed: int
    retry_signals: dict[str, int]
    global_tokens: int | None


@attrs.frozen(kw_only=True)
class PollResult:
    """What a poll returns (see the contract's ``/poll`` endpoint)."""

    events: list[Entry]
    last_event_id: str | None
    reset: bool
    resume_stream: bool


@attrs.define(eq=False)
class Hub:
    """Topics, publishing, clients and limits: the engine behind every transport.

    A hub is used from one Trio run. `open_hub` runs its housekeeping (expiry of idle
    topics and clients, saturation checks); a bare ``Hub`` works without it, minus those.
    """

    config: HubConfig = attrs.field(factory=HubConfig)
    _topics: dict[str, _Topic] = attrs.field(factory=dict, init=False)
    _clients: dict[str, _Client] = attrs.field(factory=dict, init=False)
    global_bucket: Bucket | None = attrs.field(init=False)
    global_lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock, init=False)
    connections: int = attrs.field(default=0, init=False)
    awaiting_acks: set[Connection] = attrs.field(factory=set, init=False)
    """Streams waiting for an ack (woken by `beat` to send heartbeats meanwhile)."""
    owing: set[Connection] = attrs.field(factory=set, init=False)
    """Streams that owe progress (a write, acks): `beat` arms their idle deadline."""
    ticking: bool = attrs.field(default=False, init=False)
    """Whether the hub's clock runs (`run_housekeeping`)."""
    published: int = attrs.field(default=0, init=False)
    sent: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    write_stalls: int = attrs.field(default=0, init=False)
    publish_rejected: int = attrs.field(default=0, init=False)
    publish_replayed: int = attrs.field(default=0, init=False)
    """Publishes answered with the ids of an earlier one (same idempotency key)."""
    retry_signals: dict[str, int] = attrs.field(
        factory=lambda: {"retry_field": 0, "retry_after": 0, "pause": 0}, init=False
    )
    client_lag: Histogram = attrs.field(factory=lambda: Histogram(LAG_BUCKETS), init=False)
    write_latency: Histogram = attrs.field(factory=lambda: Histogram(LATENCY_BUCKETS), init=False)
    ack_latency: Histogram = attrs.field(factory=lambda: Histogram(LATENCY_BUCKETS), init=False)
    buffer_utilization: Histogram = attrs.field(
        factory=lambda: Histogram(RATIO_BUCKETS), init=False
    )
    tracing: Tracing | None = attrs.field(init=False)
    _stall_log_at: float = attrs.field(default=-math.inf, init=False)
    _stalls_logged: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        self.tracing = None
        if cfg.tracer is not None:
            from ._tracing import Tracing  # needs opentelemetry-api: imported only if used

            self.tracing = Tracing(cfg.tracer)
        self.global_bucket = (
            self._bucket("global", cfg.global_rate, cfg.global_burst or cfg.burst)
            if cfg.global_rate
            else None
        )

    def _bucket(self, key: str, rate: float, burst: int) -> Bucket:
        """A bucket in this process, or, with a backend, one all processes share."""
        backend = self.config.backend
        return TokenBucket(rate, burst) if backend is None else backend.bucket(key, rate, burst)

    # -- topics and publishing ----------------------------------------------------------

    def log(self, topic: str) -> MemoryLog:
        """The log of *topic*, created if needed.

        Raises:
            LocalProtocolError: *topic* is not a valid topic name.
            TopicLimitError: Creating it would exceed ``max_topics``.
        """
        return self._topic(topic).log

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            check_topic(name)
            if len(self._topics) >= self.config.max_topics:
                self._forget_idle_topics()
                if len(self._topics) >= self.config.max_topics:
                    raise TopicLimitError("too many topics")
            cfg = self.config
            if cfg.backend is not None:
                log = cfg.backend.open_log(name, cfg)
            else:
                log = MemoryLog(
                    name, capacity=cfg.log_capacity, max_bytes=cfg.log_max_bytes, ttl=cfg.log_ttl
                )
            topic = self._topics[name] = _Topic(name, log)
        return topic

    def topics(self) -> list[str]:
        """The names of the topics held now."""
        return list(self._topics)

    def _forget_idle_topics(self) -> None:
        for name, topic in list(self._topics.items()):
            if not topic.streams:
                topic.log.expire()
                if not len(topic.log) and topic.log.ready:
                    del self._topics[name]
                    topic.log.close()

    def _accepted(self, topic: _Topic, entries: list[Entry]) -> Published:
        self.published += len(entries)
        if self.tracing is not None:
            self.tracing.published(topic.name, entries)
        self._check_saturation(topic)
        return Published([entry.id for entry in entries])

    def _replayed(self, ids: list[str]) -> Published:
        self.publish_replayed += 1
        return Published(ids, replayed=True)

    def publish_nowait(
        self, topic: str, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> Published:
        """Publish *events* to *topic* at once, all or none; returns their ids.

        Args:
            topic: The topic.
            events: The events (their ``id`` is ignored: the log gives each its id).
            idempotency_key: 1-128 visible ASCII characters naming this publish, so that
                retrying it is safe: the topic remembers the key with the events' ids
                for the log's TTL, and a publish with the same key and events meanwhile
                publishes nothing and returns those ids, with ``replayed`` set. (A batch
                of no events is not remembered.)

        Returns:
            The ids, a ``list[str]`` (`Published`) whose ``replayed`` says whether they
            are those of an earlier publish with *idempotency_key*.

        Raises:
            trio.WouldBlock: The topic's log is full of unexpired events (fail closed).
            IdempotencyKeyReusedError: *idempotency_key* was used on *topic* within the
                TTL for other events; nothing was published.
            LocalProtocolError: A bad topic, event name or key, or a batch too big to fit.
            TopicLimitError: The topic is new and the hub holds ``max_topics`` already.
        """
        events = _checked(events, idempotency_key)
        t = self._topic(topic)
        try:
            entries = t.log.append_nowait(events, idempotency_key=idempotency_key)
        except AlreadyPublished as earlier:
            return self._replayed(earlier.ids)
        except trio.WouldBlock:
            self.publish_rejected += len(events)
            raise
        return self._accepted(t, entries)

    async def submit(
        self, topic: str, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> Published:
        """Publish *events* to *topic* now, all or none, or refuse; returns their ids.

        `publish_nowait` for every backend: with a remote one (Redis) the log's
        capacity is checked and the events appended in one atomic step there, and so is
        *idempotency_key* (as for `publish_nowait`): of processes receiving the same
        retry, one publishes.

        Raises:
            trio.WouldBlock: The topic's log is full of unexpired events (fail closed).
            IdempotencyKeyReusedError: *idempotency_key* was used on *topic* within the
                TTL for other events; nothing was published.
            LocalProtocolError: A bad topic, event name or key, or a batch too big to fit.
            TopicLimitError: The topic is new and the hub holds ``max_topics`` already.
            BackendUnavailableError: The backend cannot be reached; nothing was published
                (unless ``maybe_published``: the answer was lost, the outcome is unknown;
                retried with the same *idempotency_key*, the events are published once).

        Cancellation: with a remote backend, a cancelled call may or may not have
        published the events.
        """
        if self.config.backend is None:
            return self.publish_nowait(topic, events, idempotency_key=idempotency_key)
        events = _checked(events, idempotency_key)
        t = self._topic(topic)
        if not t.log.remote:
            return self.publish_nowait(topic, events, idempotency_key=idempotency_key)
        tracing = self.tracing
        span, trace_context = (
            (None, None) if tracing is None else tracing.submitting(topic, len(events))
        )
        t.streams += 1  # keep the topic while we wait
        try:
            ids = await t.log.submit(
                events, idempotency_key=idempotency_key, trace_context=trace_context
            )
        except AlreadyPublished as earlier:
            if tracing is not None:
                tracing.answered(span, earlier.ids, replayed=True)
            return self._replayed(earlier.ids)
        except BaseException as error:
            if tracing is not None:
                tracing.answered(span, (), error=error)
            if isinstance(error, trio.WouldBlock):
                self.publish_rejected += len(events)
            raise
        finally:
            t.streams -= 1
        if tracing is not None:
            tracing.answered(span, ids)
        self.published += len(ids)
        self._check_saturation(t)
        return Published(ids)

    async def publish(
        self, topic: str, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> Published:
        """Publish *events* to *topic*, waiting while its log is full; returns their ids.

        *idempotency_key* as for `publish_nowait`; it is looked up again whenever the
        log has room, so of two publishes waiting with the same key, one publishes.

        Raises:
            IdempotencyKeyReusedError: *idempotency_key* was used on *topic* within the
                TTL for other events; nothing was published.
            LocalProtocolError: A bad topic, event name or key, or a batch too big to fit.
            TopicLimitError: The topic is new and the hub holds ``max_topics`` already.

        Cancellation: safe; if cancelled, nothing was published. (With a remote
        backend, a call cancelled while Redis runs the append may have published.)
        Backpressure: waits until the oldest events expire when the log is full; with
        a remote backend, also while it is unavailable. (Retrying after an answer lost
        in a timeout, it may then publish the events twice: at least once. With an
        *idempotency_key*, exactly once, if the retry comes within the log's TTL.)
        """
        events = _checked(events, idempotency_key)
        t = self._topic(topic)
        if t.log.remote:  # waits while full, and while the backend is unavailable
            while True:
                try:
                    return await self.submit(topic, events, idempotency_key=idempotency_key)
                except trio.WouldBlock:
                    await trio.sleep(max(0.01, t.log.retry_after()))
                except BackendUnavailableError as error:
                    await trio.sleep(error.retry_after)
        t.streams += 1  # keep the topic while we wait
        try:
            entries = await t.log.append(events, idempotency_key=idempotency_key)
        except AlreadyPublished as earlier:
            return self._replayed(earlier.ids)
        finally:
            t.streams -= 1
        return self._accepted(t, entries)

    def publish_retry_after(self, topic: str) -> float:
        """Seconds until *topic*'s log frees room."""
        t = self._topics.get(topic)
        return 0.0 if t is None else t.log.retry_after()

    def _check_saturation(self, topic: _Topic) -> None:
        log = topic.log
        saturation = log.saturation
        if saturation > SATURATION_WARNING and not topic.saturated:
            topic.saturated = True
            logger.warning("topic %r log is %.0f%% full", topic.name, saturation * 100)
            if self.config.on_saturation is not None:
                try:
                    self.config.on_saturation(topic.name, saturation)
                except Exception:
                    logger.exception("on_saturation callback failed")
        elif saturation <= SATURATION_WARNING:
            topic.saturated = False

    # -- clients ----------------------------------------------------------------------

    def _client(self, client_id: str | None) -> _Client:
        """The entry of *client_id* (made if new; a random id when ``None``), seen now.

        Entries are kept in the order they were last seen (`_seen`), so that the idle
        ones are found at the front, without looking at the others.
        """
        if client_id is None:
            client_id = secrets.token_urlsafe(12)
        client = self._clients.get(client_id)
        if client is None:
            check_client_id(client_id)
            if len(self._clients) >= self.config.max_clients:
                self._evict_one_client()
                if len(self._clients) >= self.config.max_clients:
                    raise LimitExceededError("too many clients", retry_after=self._retry_after())
            cfg = self.config
            bucket = self._bucket(f"client:{client_id}", cfg.rate, cfg.burst) if cfg.rate else None
            client = _Client(client_id, bucket, last_seen=trio.current_time())
            self._clients[client_id] = client
        else:
            self._seen(client)
        return client

    def _seen(self, client: _Client) -> None:
        """Note that *client* was seen now: its entry moves to the back."""
        client.last_seen = trio.current_time()
        clients = self._clients
        del clients[client.id]  # (registered: only clients without streams are evicted)
        clients[client.id] = client

    def _evict_one_client(self) -> None:
        """Forget the least recently seen client that has no stream open."""
        victim = next((c for c in self._clients.values() if not c.streams), None)
        if victim is not None:
            del self._clients[victim.id]

    def _evict_idle_clients(self) -> None:
        """Forget the clients not seen for ``client_ttl``, unless they stream (then they
        count as seen now). Looks at those and the first one seen since, no others."""
        cutoff = trio.current_time() - self.config.client_ttl
        stale = []
        for client in self._clients.values():
            if client.last_seen > cutoff:
                break
            stale.append(client)
        for client in stale:
            if client.streams:
                self._seen(client)
            else:
                del self._clients[client.id]

    def client_statistics(self, client_id: str) -> ClientStatistics:
        """A snapshot of a client's entry.

        Raises:
            UnknownClientError: No such client is known.
        """
        client = self._clients.get(client_id)
        if client is None:
            raise UnknownClientError(f"unknown client {client_id!r}")
        bucket = client.bucket
        return ClientStatistics(
            client_id=client.id,
            streams=client.streams,
            tokens=None if bucket is None else bucket.available(trio.current_time()),
            paused_topics=tuple(client.paused),
        )

    def _retry_after(self) -> float:
        return self.config.retry_ms / 1000

    def signal(self, kind: str) -> None:
        """Count a retry signal sent to a client (``retry_field``, ``retry_after``, ``pause``)."""
        self.retry_signals[kind] = self.retry_signals.get(kind, 0) + 1

    # -- streams ----------------------------------------------------------------------

    def connect(
        self,
        topic: str,
        *,
        client_id: str | None = None,
        last_event_id: str | None = None,
        ack: int | None = None,
    ) -> Connection:
        """Admit a stream of *topic* for a client; run it with `Connection.run`.

        Args:
            topic: The topic to stream.
            client_id: Who asks; ``None`` gives a random id (see ``Connection.client_id``).
            last_event_id: Resume after this id; ``None`` streams from now on.
            ack: The ack window (events sent beyond the last acknowledged one), or
                ``None`` for no acks.

        Raises:
            LocalProtocolError: A bad topic or client id.
            LimitExceededError: ``max_connections`` or ``max_streams_per_client`` reached.
            ClientPausedError: The client is paused on *topic* and must poll first.
            TopicLimitError: The topic is new and the hub holds ``max_topics`` already.
        """
        from ._connection import Connection

        check_topic(topic)
        client = self._admit(client_id, topic, ack)
        t = self._topic(topic)
        if t.log.ready:
            resume, pending = t.log.resolve(last_event_id), None
        else:  # a remote log still loading: `Connection.run` resolves once it is ready
            resume, pending = Resume(position=t.log.head), (last_event_id,)
        record = client.record(topic, t.log, resume.position)
        connection = Connection(
            hub=self,
            client=client,
            topic=t,
            record=record,
            position=resume.position,
            gap=resume.gap,
            window=ack,
            pending_resume=pending,
        )
        client.streams += 1
        t.streams += 1
        self.connections += 1
        self._share_client(client)
        return connection

    def _admit(self, client_id: str | None, key: str, ack: int | None) -> _Client:
        """The client asking for a stream, if the limits let it have one more.

        *key* is what its pause would be recorded under (the topic, or topics).
        """
        cfg = self.config
        if ack is not None:
            _ack_window(None, attrs.fields(HubConfig).window, ack)
        if self.connections >= cfg.max_connections:
            raise LimitExceededError("too many connections", retry_after=self._retry_after())
        client = self._client(client_id)
        if key in client.paused:
            raise ClientPausedError(
                topic=key,
                client_id=client.id,
                after=client.paused[key],
                retry_after=cfg.poll_interval,
            )
        if client.streams >= cfg.max_streams_per_client:
            raise LimitExceededError(
                f"client {client.id!r} holds {client.streams} streams already",
                retry_after=self._retry_after(),
            )
        return client

    def connect_many(
        self,
        topics: Iterable[str],
        *,
        client_id: str | None = None,
        last_event_id: str | None = None,
        ack: int | None = None,
    ) -> MultiConnection:
        """Admit a stream of several topics (1 to 16) for a client; see `connect`.

        Events of all the topics come interleaved in the order the hub accepted them,
        each with a composite id that resumes every topic (*last_event_id* takes one).
        Limits and the ack window apply to the stream as a whole; it pauses when it
        falls ``lag_limit`` events behind on any of its topics.

        Raises:
            LocalProtocolError: No topics, more than 16, a repeated or a bad topic, or
                a bad client id.
            LimitExceededError: ``max_connections`` or ``max_streams_per_client`` reached.
            ClientPausedError: The client is paused on this set of topics.
            TopicLimitError: A topic is new and the hub holds ``max_topics`` already.
        """
        from ._several import Cursor, MultiConnection, topic_set

        cursor = Cursor(topic_set(topics))
        client = self._admit(client_id, cursor.key, ack)
        client.remember(cursor)
        held = [self._topic(name) for name in cursor.topics]
        logs = [t.log for t in held]
        if all(log.ready for log in logs):
            resumes, pending = cursor.resolve(logs, last_event_id), None
        else:  # a remote log still loading: `run` resolves once they all are ready
            resumes, pending = [Resume(position=log.head) for log in logs], (last_event_id,)
        records = [
            client.record(t.name, t.log, resume.position)
            for t, resume in zip(held, resumes, strict=True)
        ]
        connection = MultiConnection(
            hub=self,
            client=client,
            topic=held[0],
            record=records[0],
            position=0,
            gap=None,
            window=ack,
            pending_resume=pending,
            cursor=cursor,
        )
        connection.add_lanes(zip(held, records, resumes, strict=True))
        client.streams += 1
        for t in held:
            t.streams += 1
        self.connections += 1
        self._share_client(client)
        return connection

    def _share_client(self, client: _Client) -> None:
        backend = self.config.backend
        if backend is not None:  # acks posted to other processes are forwarded here
            backend.share_client(client.id)

    def _release(self, connection: Connection) -> None:
        for topic, record in connection.places():
            record.connections.discard(connection)
            topic.streams -= 1
        connection.client.streams -= 1
        self._seen(connection.client)
        self.connections -= 1

    def pause(self, connection: Connection, after: str | None) -> None:
        """Mark *connection*'s client paused on its topic (or topics) until it has polled."""
        connection.client.paused[connection.key] = after
        self.signal("pause")
        if self.config.backend is not None:
            self.config.backend.share_pause(
                connection.key, connection.client.id, after, paused=True
            )

    def apply_pause(self, topic: str, client_id: str, after: str | None, *, paused: bool) -> None:
        """Pause (or unpause) a client on *topic* because another process did."""
        if paused:
            try:
                client = self._client(client_id)
            except (LimitExceededError, LocalProtocolError):
                return
            client.paused[topic] = after
        elif (known := self._clients.get(client_id)) is not None:
            known.paused.pop(topic, None)

    def note_stall(self, connection: Connection, seconds: float) -> None:
        """Count a write that waited for the peer; log now and then, not every time."""
        self.write_stalls += 1
        now = trio.current_time()
        if now - self._stall_log_at >= 10.0:
            logger.warning(
                "write stall: client %r on topic %r waited %.3f s (%d stalls since last report)",
                connection.client.id,
                connection.topic.name,
                seconds,
                self.write_stalls - self._stalls_logged,
            )
            self._stall_log_at, self._stalls_logged = now, self.write_stalls

    # -- acks and polls ---------------------------------------------------------------

    def ack(
        self,
        topic: str,
        *,
        client_id: str,
        last_event_id: str,
        buffer_utilization: float | None = None,
    ) -> None:
        """Acknowledge every event up to *last_event_id* for a client (cumulative).

        An id at or before the last acknowledged one changes nothing.

        Raises:
            LocalProtocolError: A bad topic or client id.
            ValueError: A malformed id, or *buffer_utilization* outside 0.0-1.0.
            UnknownClientError: No such client is known.
            NotSentError: The id was never sent to this client.
        """
        check_topic(topic)
        check_client_id(client_id)
        if buffer_utilization is not None and not 0.0 <= buffer_utilization <= 1.0:
            raise ValueError(f"buffer_utilization must be within 0.0-1.0: {buffer_utilization!r}")
        client = self._clients.get(client_id)
        t = self._topics.get(topic)
        record = client.topics.get(topic) if client is not None else None
        if t is not None:
            position = t.log.parse(last_event_id)
        else:  # malformed ids are a ValueError first
            if self.config.backend is not None:
                self.config.backend.check_id(last_event_id)
            else:
                MemoryLog(topic).parse(last_event_id)
            position = None
        if client is None:
            raise UnknownClientError(f"unknown client {client_id!r}")
        self._seen(client)
        if buffer_utilization is not None:
            self.buffer_utilization.observe(buffer_utilization)
        if t is None or record is None or record.log is not t.log or position is None:
            raise NotSentError(f"{last_event_id!r} was not sent to client {client_id!r}")
        if position > record.sent:
            raise NotSentError(f"{last_event_id!r} was not sent to client {client_id!r}")
        if self._acked(t, record, client_id, position):
            for connection in record.connections:
                connection.on_ack(position)

    def _acked(self, t: _Topic, record: _ClientTopic, client_id: str, position: int) -> bool:
        """Move *record*'s acknowledged position to *position*; whether it moved."""
        if position <= record.acked:
            return False
        previous, record.acked = record.acked, position
        now = trio.current_time()
        entry = t.log.entry(position)
        if entry is not None:
            self.ack_latency.observe(now - entry.published_at)
        if self.tracing is not None:
            acked = [t.log.entry(p) for p in range(previous + 1, position + 1)]
            self.tracing.delivered(t.name, client_id, [e for e in acked if e], "ack", now)
        return True

    def topics_of(self, client_id: str, last_event_id: str) -> tuple[str, ...]:
        """The topics of the stream *last_event_id* (composite) was sent on, if known."""
        from ._several import tag_of

        client = self._clients.get(client_id)
        try:
            cursor = None if client is None else client.cursors.get(tag_of(last_event_id))
        except ValueError:
            return ()
        return () if cursor is None else cursor.topics

    def ack_many(
        self, *, client_id: str, last_event_id: str, buffer_utilization: float | None = None
    ) -> None:
        """Acknowledge every event up to the composite *last_event_id* on a stream of
        several topics (see `connect_many`); cumulative, like `ack`.

        The id names its stream's topics to the client's entry, which knows the topic
        sets it streamed or polled.

        Raises:
            LocalProtocolError: A bad client id.
            ValueError: A malformed id, or *buffer_utilization* outside 0.0-1.0.
            UnknownClientError: No such client is known.
            NotSentError: The id was never sent to this client.
        """
        from ._several import MultiConnection, tag_of

        check_client_id(client_id)
        if buffer_utilization is not None and not 0.0 <= buffer_utilization <= 1.0:
            raise ValueError(f"buffer_utilization must be within 0.0-1.0: {buffer_utilization!r}")
        tag = tag_of(last_event_id)
        client = self._clients.get(client_id)
        if client is None:
            raise UnknownClientError(f"unknown client {client_id!r}")
        self._seen(client)
        if buffer_utilization is not None:
            self.buffer_utilization.observe(buffer_utilization)
        not_sent = NotSentError(f"{last_event_id[:300]!r} was not sent to client {client_id!r}")
        cursor = client.cursors.get(tag)
        parts = None if cursor is None else cursor.split(last_event_id)
        if cursor is None or parts is None:
            raise not_sent
        moves = []
        for name, part in zip(cursor.topics, parts, strict=True):
            t, record = self._topics.get(name), client.topics.get(name)
            if t is None or record is None or record.log is not t.log:
                raise not_sent
            position = t.log.parse(part)
            if position is None or position > record.sent:
                raise not_sent
            moves.append((t, record, position))
        for t, record, position in moves:
            self._acked(t, record, client_id, position)
        for connection in list(moves[0][1].connections):
            if isinstance(connection, MultiConnection) and connection.key == cursor.key:
                connection.on_composite_ack(last_event_id)

    def poll(
        self, topic: str, *, client_id: str | None, after: str | None, limit: int = 100
    ) -> PollResult:
        """Events after *after* for a client that polls, within its rate limit.

        Without *after*, polling starts at the oldest retained event. A client paused on
        *topic* is unpaused once the answer has ``resume_stream`` set: it is then at most
        half the lag limit behind.

        Raises:
            LocalProtocolError: A bad topic or client id.
            ValueError: *limit* is not positive.
            RateLimitedError: The client's (or the hub's) bucket is empty.
            TopicLimitError: The topic is new and the hub holds ``max_topics`` already.
        """
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit!r}")
        check_topic(topic)
        client = self._client(client_id)
        t = self._topic(topic)
        now = trio.current_time()
        allowed = self._poll_allowance(client, limit, now)
        log = t.log
        self._check_loaded(log)
        if after is None:
            log.expire()
            position, gap = log.first - 1, None
        else:
            resume = log.resolve(after)
            position, gap = resume.position, resume.gap
        if gap is not None:
            self.dropped += gap.lost
        events = log.read_after(position, allowed)
        assert not isinstance(events, Gap)  # resolve() just placed us within the log
        self._polled(client, events, now)
        if events:
            position = events[-1].seq
        record = client.record(topic, log, position)
        record.sent = record.acked = max(record.sent, position)
        resume_stream = log.head - position <= self.config.lag_limit // 2
        if resume_stream and topic in client.paused:
            del client.paused[topic]
            if self.config.backend is not None:
                self.config.backend.share_pause(topic, client.id, None, paused=False)
        return PollResult(
            events=events,
            last_event_id=events[-1].id if events else after,
            reset=gap is not None,
            resume_stream=resume_stream,
        )

    def poll_many(
        self,
        topics: Iterable[str],
        *,
        client_id: str | None,
        after: str | None,
        limit: int = 100,
    ) -> PollResult:
        """`poll` for a stream of several topics: *after* is a composite id.

        The events come interleaved as on the stream, each with its topic (they are
        ``Delivery`` entries) and a composite id. ``reset`` is set when any topic's
        events after *after* were no longer retained; ``resume_stream`` when the client
        is at most half the lag limit behind on every topic.

        Raises:
            LocalProtocolError: Bad topics or a bad client id.
            ValueError: *limit* is not positive.
            RateLimitedError: The client's (or the hub's) bucket is empty.
            TopicLimitError: A topic is new and the hub holds ``max_topics`` already.
        """
        from ._several import Cursor, interleave, topic_set

        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit!r}")
        cursor = Cursor(topic_set(topics))
        client = self._client(client_id)
        held = [self._topic(name) for name in cursor.topics]
        client.remember(cursor)
        now = trio.current_time()
        allowed = self._poll_allowance(client, limit, now)
        logs = [t.log for t in held]
        for log in logs:
            self._check_loaded(log)
        if after is None:
            for log in logs:
                log.expire()
            positions = [log.first - 1 for log in logs]
            reset = False
        else:
            resumes = cursor.resolve(logs, after)
            positions = [resume.position for resume in resumes]
            gaps = [resume.gap for resume in resumes if resume.gap is not None]
            self.dropped += sum(gap.lost for gap in gaps)
            reset = bool(gaps)
        parts = [log.cursor_id(p) for log, p in zip(logs, positions, strict=True)]
        events: list[Entry] = []
        while len(events) < allowed:
            got = interleave(cursor, logs, positions, parts, allowed - len(events), len(events))
            assert not isinstance(got, tuple)  # resolve() just placed us within each log
            if not got:
                break
            events += got
        self._polled(client, events, now)
        lag_limit = self.config.lag_limit
        for t, position in zip(held, positions, strict=True):
            record = client.record(t.name, t.log, position)
            record.sent = record.acked = max(record.sent, position)
        resume_stream = all(
            log.head - position <= lag_limit // 2
            for log, position in zip(logs, positions, strict=True)
        )
        if resume_stream and cursor.key in client.paused:
            del client.paused[cursor.key]
            if self.config.backend is not None:
                self.config.backend.share_pause(cursor.key, client.id, None, paused=False)
        return PollResult(
            events=events,
            last_event_id=events[-1].id if events else after,
            reset=reset,
            resume_stream=resume_stream,
        )

    def _poll_allowance(self, client: _Client, limit: int, now: float) -> int:
        """How many events a poll may return (at most *limit*), by the client's buckets.

        Raises:
            RateLimitedError: A bucket is empty.
        """
        allowed = limit
        for bucket in (client.bucket, self.global_bucket):
            if bucket is not None:
                allowed = min(allowed, bucket.available(now))
                if not allowed:  # the transport counts the signal it sends (429)
                    raise RateLimitedError(
                        "rate limit: poll later", retry_after=bucket.ready_at(now) - now
                    )
        return allowed

    def _check_loaded(self, log: MemoryLog) -> None:
        if not log.ready:
            raise LimitExceededError(
                f"topic {log.topic!r} is loading: poll again", retry_after=self._retry_after()
            )

    def _polled(self, client: _Client, events: list[Entry], now: float) -> None:
        """Take the tokens of the events a poll returns; count them as sent."""
        if not events:
            return
        for bucket in (client.bucket, self.global_bucket):
            if bucket is not None:
                bucket.consume(now, len(events))
        self.sent += len(events)
        for entry in events:
            self.write_latency.observe(now - entry.published_at)

    # -- housekeeping -----------------------------------------------------------------

    def housekeep(self) -> None:
        """Expire logs, re-check saturation, forget idle topics and idle clients."""
        for topic in self._topics.values():
            topic.log.expire()
            self._check_saturation(topic)
        self._forget_idle_topics()
        self._evict_idle_clients()

    async def run_housekeeping(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call `housekeep` once a second, forever; run the backend, if any, meanwhile."""
        backend = self.config.backend
        if backend is None:
            task_status.started()
            await self._tick()
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run, self)
            task_status.started()
            await self._tick()

    async def _tick(self) -> NoReturn:
        """Housekeeping once a second; the shared heartbeat clock more often.

        Streams keep no timer of their own for heartbeats (a timer per stream costs a
        cancel scope and a deadline per write): every ``heartbeat_interval / 4`` this
        wakes the streams that wait, and those idle for ``heartbeat_interval`` send one.
        It also arms the idle deadline of streams whose write (or ack) is overdue, at
        most a quarter of ``idle_timeout`` after it began: exact, and no deadline per write.
        """
        cfg = self.config
        tick = min(HOUSEKEEPING_INTERVAL, cfg.heartbeat_interval / 4, cfg.idle_timeout / 4)
        next_housekeeping = trio.current_time() + HOUSEKEEPING_INTERVAL
        self.ticking = True
        try:
            while True:
                await trio.sleep(tick)
                self.beat()
                if trio.current_time() >= next_housekeeping:
                    next_housekeeping += HOUSEKEEPING_INTERVAL
                    self.housekeep()
        finally:
            self.ticking = False
            for connection in list(self.owing):  # on their own again
                connection.arm_idle_deadline()
            self.owing.clear()

    def beat(self) -> None:
        """Wake every waiting stream so that idle ones send their heartbeat; arm the idle
        deadline of streams that owe progress since the last beat."""
        for topic in self._topics.values():
            topic.log.poke()
        for connection in list(self.awaiting_acks):
            connection.poke()
        for connection in self.owing:
            connection.arm_idle_deadline()

    def health(self) -> str | None:
        """What keeps the hub from working fully now (``None`` when all is well)."""
        backend = self.config.backend
        return None if backend is None else backend.problem()

    @property
    def backend_errors(self) -> int:
        """Operations on the backend that failed (0 without a backend)."""
        backend = self.config.backend
        return 0 if backend is None else backend.errors

    def statistics(self) -> HubStatistics:
        """A snapshot of the hub's counters."""
        bucket = self.global_bucket
        return HubStatistics(
            topics=len(self._topics),
            clients=len(self._clients),
            connections=self.connections,
            published=self.published,
            sent=self.sent,
            dropped=self.dropped,
            write_stalls=self.write_stalls,
            publish_rejected=self.publish_rejected,
            publish_replayed=self.publish_replayed,
            retry_signals=dict(self.retry_signals),
            global_tokens=None if bucket is None else bucket.available(trio.current_time()),
        )

    def log_statistics(self) -> dict[str, LogStatistics]:
        """Each topic's `LogStatistics`, by topic name."""
        return {name: topic.log.statistics() for name, topic in self._topics.items()}


def _checked(events: Iterable[Event], idempotency_key: str | None = None) -> list[Event]:
    events = list(events)
    for event in events:
        if event.event is not None:
            check_event_name(event.event)
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    return events


@asynccontextmanager
async def open_hub(config: HubConfig | None = None) -> AsyncIterator[Hub]:
    """A `Hub` whose housekeeping (`Hub.run_housekeeping`) runs while the block runs.

    Cancellation: leaving the block stops the housekeeping task.
    """
    hub = Hub(config or HubConfig())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_housekeeping)
        yield hub
        nursery.cancel_scope.cancel()
