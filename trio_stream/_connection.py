"""One stream: a nursery owning producer -> limiter -> writer, linked by zero-buffer channels.

```
log --read_after--> producer ==ch0==> limiter ==ch0==> writer --sink--> socket
                                        ^ client bucket, global bucket, ack credits
```

Each channel item is a batch: everything ready, up to ``max_batch`` events. A slow
socket stops the writer, which stops the limiter, which stops the producer: the log is
the only place events wait, and it is shared by every stream of the topic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Protocol

import attrs
import trio

from ._core._limits import CreditWindow
from ._core._ring import Entry, Gap

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._hub import Hub, _Client, _ClientTopic, _Topic
    from ._log import MemoryLog

__all__ = ["Connection", "ConnectionStatistics", "Sink"]


class _Heartbeat:
    """The item asking the writer for a heartbeat."""


HEARTBEAT = _Heartbeat()
_Item = list[Entry] | Gap | _Heartbeat


class Sink(Protocol):
    """Where a connection's writer puts things: the transport's framing and socket.

    Each method writes one whole unit (never half an event) and returns once written.
    """

    async def send_events(self, entries: Sequence[Entry]) -> None:
        """Write *entries* (one or more), in order, in as few writes as possible."""
        ...

    async def send_heartbeat(self) -> None:
        """Write a keep-alive that clients ignore."""
        ...

    async def send_reset(self, gap: Gap) -> None:
        """Announce that events after ``gap.last_event_id`` were lost."""
        ...

    async def send_pause(
        self, after: str | None, retry_after: float, *, topic: str | None = None
    ) -> None:
        """Tell the client to poll after *after*, in *retry_after* seconds; the stream ends.

        *topic* is the topic that lagged, on a stream of several topics.
        """
        ...


@attrs.frozen(kw_only=True)
class ConnectionStatistics:
    """A snapshot of one stream.

    Attributes:
        client_id: Its client.
        topic: Its topic (on a stream of several, their names joined by commas).
        last_event_id: The id of the last event written (or the id it started after).
        lag: Events between the last written and the topic's head.
        sent: Events written.
        dropped: Events it never got because they expired first.
        write_stalls: Writes that had to wait for the peer.
        tokens: Tokens in the client's bucket (``None`` without a rate limit).
        credits: Events it may still send before an ack (``None`` without acks).
        state: ``"open"``, or why it ended.
    """

    client_id: str
    topic: str
    last_event_id: str | None
    lag: int
    sent: int
    dropped: int
    write_stalls: int
    tokens: int | None
    credits: int | None
    state: str


async def hand_over(channel: trio.MemorySendChannel[_Item], item: _Item) -> None:
    """Send *item* on a zero-buffer channel, without a checkpoint when its receiver waits.

    The receiver runs next either way; skipping the sender's own checkpoint saves a
    scheduler pass per item (a tenth of the chain's cost in fan-out). The sender cannot
    starve others: its next hand-over finds the receiver busy and waits, and between
    items it waits for the log anyway.
    """
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await channel.send(item)


def _window(size: int | CreditWindow | None) -> CreditWindow | None:
    return CreditWindow(size) if isinstance(size, int) else size


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class Connection:
    """One client's stream of one topic; made by `Hub.connect`, run by `run`.

    Usable as a context manager that releases the stream's place in the hub's limits
    (`run` releases it too), so a stream that is never run leaks nothing.
    """

    hub: Hub
    client: _Client
    topic: _Topic
    record: _ClientTopic
    position: int
    """The log position of the last event written (or the one the stream started after)."""
    gap: Gap | None
    window: CreditWindow | None = attrs.field(converter=_window)
    pending_resume: tuple[str | None] | None = None
    """``(last_event_id,)`` while the log (a remote one, loading) could not resolve it yet."""
    state: Literal["new", "open", "paused", "idle", "closed"] = "new"
    sent: int = 0
    dropped: int = 0
    write_stalls: int = 0
    _acked: trio.Event = attrs.field(factory=trio.Event)
    _feeders: tuple[trio.CancelScope, trio.CancelScope] = attrs.field(
        factory=lambda: (trio.CancelScope(), trio.CancelScope())
    )
    _idle: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _owed_since: float = math.inf
    """Since when progress is owed (a write in progress, or acks): the idle clock."""
    _pausing: bool = False
    _last_write: float = 0.0
    """When the last write completed or was handed to the writer (for heartbeats)."""
    _writing: bool = False
    _write_started: float = 0.0
    _released: bool = False

    def __attrs_post_init__(self) -> None:
        if self.window is not None:
            self.window.sent = self.window.acked = self.position
        for _, record in self.places():  # (a stream of several adds its topics later)
            record.connections.add(self)

    @property
    def client_id(self) -> str:
        """The client's id (assigned by the hub when none was given)."""
        return self.client.id

    @property
    def log(self) -> MemoryLog:
        """The topic's log."""
        return self.topic.log

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event written, or the id the stream started after."""
        return self.log.id_of(self.position)

    @property
    def key(self) -> str:
        """What the client's pause is recorded under: the topic's name."""
        return self.topic.name

    @property
    def lag(self) -> int:
        """Events between the last one written and the head of the topic."""
        return max(0, self.log.head - self.position)

    def places(self) -> Iterable[tuple[_Topic, _ClientTopic]]:
        """The topics streamed, with the client's record of each."""
        return ((self.topic, self.record),)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the stream's place in the hub (idempotent); a running `run` ends."""
        if self.state in ("new", "open") and not self._pausing:
            self.state = "closed"
        self._stop_feeding()
        if self._writing:  # a write that may never complete (a peer that stopped reading)
            waited = trio.current_time() - self._write_started
            if waited >= self.hub.config.write_stall_threshold:
                self._writing = False  # counted now, not again if it completes later
                self.write_stalls += 1
                self.hub.note_stall(self, waited)
        self.hub.owing.discard(self)
        if not self._released:
            self._released = True
            self.hub._release(self)

    # -- the chain ---------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        """Stream the topic into *sink* until paused, idle too long, closed or cancelled.

        Ends normally after a pause (the sink got ``send_pause``) or when no progress
        was made for ``idle_timeout`` seconds: a write that could not complete, or, in
        ack mode, no ack while events are waiting for one.

        Cancellation: safe; the stream's tasks end and its place in the hub is released.
        Backpressure: the sink's slowness stops the whole chain; nothing queues here.
        """
        cfg = self.hub.config
        if self.state != "new":
            raise RuntimeError("a Connection runs once")
        self.state = "open"
        self._last_write = trio.current_time()  # the transport just wrote its preamble
        try:
            if self.pending_resume is not None:
                await self._resolve_when_ready(self.pending_resume[0])
            # Nothing is owed yet: waiting for events is not idleness (see `_progress`).
            with self._idle:
                watches = self._watch_lag()
                try:
                    async with trio.open_nursery() as nursery:
                        batches_in, batches_out = trio.open_memory_channel[_Item](0)
                        granted_in, granted_out = trio.open_memory_channel[_Item](0)
                        nursery.start_soon(self._produce, batches_in)
                        nursery.start_soon(self._limit, batches_out, granted_in)
                        # The writer is not in the feeders' scopes: stopping them lets it
                        # finish the write in progress, then it sees the end of its channel.
                        await self._write(granted_out, sink)
                finally:
                    for log, watch in watches:
                        log.unwatch_lag(watch)
                if self._pausing:
                    self.state = "paused"
                    after = self.last_event_id
                    # Paused since `on_lag`; the write in progress then may have gone out.
                    if self.key in self.client.paused:
                        self.client.paused[self.key] = after
                    await self._send_pause(sink, after, cfg.poll_interval)
            if self._idle.cancelled_caught:
                self.state = "idle"
        finally:
            self.close()

    def _watch_lag(self) -> list[tuple[MemoryLog, object]]:
        log = self.log
        watch = log.watch_lag(self)
        if self.lag_threshold() <= log.head:
            self.on_lag()
        return [(log, watch)]

    async def _send_pause(self, sink: Sink, after: str | None, retry_after: float) -> None:
        await sink.send_pause(after, retry_after)

    async def _resolve_when_ready(self, last_event_id: str | None) -> None:
        await self.log.wait_ready()
        self.pending_resume = None
        resume = self.log.resolve_pending(last_event_id)
        self.position, self.gap = resume.position, resume.gap
        record = self.record
        record.sent = max(record.sent, resume.position)
        record.acked = max(record.acked, resume.position)
        if self.window is not None:
            self.window.sent = self.window.acked = resume.position

    async def _produce(self, batches: trio.MemorySendChannel[_Item]) -> None:
        log, limit, cursor = self.log, self.hub.config.max_batch, self.position
        try:
            with self._feeders[0]:
                async with batches:
                    if self.gap is not None:
                        self._lost(self.gap)
                        await batches.send(self.gap)
                    while True:
                        got = log.read_after(cursor, limit)
                        if isinstance(got, Gap):
                            self._lost(got)
                            await hand_over(batches, got)
                            cursor = got.position
                        elif got:
                            await hand_over(batches, got)
                            cursor = got[-1].seq
                            self._last_write = trio.current_time()  # on its way: not idle
                        elif self._heartbeat_due():
                            await hand_over(batches, HEARTBEAT)
                            self._last_write = trio.current_time()
                        else:
                            await log.wait_after(cursor)  # woken by events or the hub's beat
        finally:
            # The writer may sit in a send the transport shields from cancellation
            # (hypercorn does): the idle timeout frees the stream's place at once anyway.
            # (After `on_lag` the place is free already: see there.)
            if self._idle.cancel_called:
                self.close()

    def _lost(self, gap: Gap) -> None:
        self.dropped += gap.lost
        self.hub.dropped += gap.lost

    async def _limit(
        self, batches: trio.MemoryReceiveChannel[_Item], granted: trio.MemorySendChannel[_Item]
    ) -> None:
        window = self.window
        async with batches, granted:  # closing `granted` ends the writer, after its write
            with self._feeders[1]:
                async for item in batches:
                    if isinstance(item, _Heartbeat):
                        await granted.send(item)
                        continue
                    if isinstance(item, Gap):
                        if window is not None and item.topic is None:
                            # A reset starts the window afresh (on its topic: not
                            # for a stream of several, whose other topics still count).
                            window.sent = window.acked = item.position
                        await granted.send(item)
                        continue
                    while item:
                        n = await self._grant(len(item))
                        if not n:  # a heartbeat is due while waiting for credits or tokens
                            await hand_over(granted, HEARTBEAT)
                            self._last_write = trio.current_time()
                            continue
                        part, item = (item, []) if n == len(item) else (item[:n], item[n:])
                        if window is not None:
                            window.on_sent(part[-1].seq)
                        await hand_over(granted, part)
                        del part  # hold no events while waiting: the log holds them

    async def _grant(self, want: int) -> int:
        """Wait until at least one event may go; returns how many (at most *want*).

        Returns 0 instead when a heartbeat falls due while waiting.
        """
        window = self.window
        if window is not None:
            if not window.credits:
                self.hub.awaiting_acks.add(self)
                try:
                    while not window.credits:
                        if self._heartbeat_due():
                            return 0
                        await self._acked.wait()  # woken by acks or the hub's beat
                finally:
                    self.hub.awaiting_acks.discard(self)
            want = min(want, window.credits)
        client, hub = self.client, self.hub
        bucket, overall = client.bucket, hub.global_bucket
        if bucket is None and overall is None:
            return want
        now = trio.current_time()
        if not client.lock.locked() and not (overall is not None and hub.global_lock.locked()):
            # The common case: tokens at hand and nobody queued; no checkpoint needed.
            n = want
            if bucket is not None:
                n = min(n, bucket.available(now))
            if overall is not None:
                n = min(n, overall.available(now))
            if n:
                if bucket is not None:
                    bucket.consume(now, n)
                if overall is not None:
                    overall.consume(now, n)
                return n
        async with client.lock:
            while True:
                now = trio.current_time()
                if bucket is not None and not bucket.available(now):
                    ready = bucket.ready_at(now)
                    if ready > self._heartbeat_at():
                        await trio.sleep_until(self._heartbeat_at())
                        return 0
                    # A bucket shared by processes (Redis) may still be empty then:
                    # its tokens came late, or another process took them. Look again.
                    await trio.sleep_until(ready)
                    continue
                if overall is None:
                    assert bucket is not None
                    n = min(want, bucket.available(now))
                    bucket.consume(now, n)
                    return n
                async with hub.global_lock:
                    while True:  # its deadline, then (shared by processes) look again
                        now = trio.current_time()
                        if overall.available(now):
                            break
                        await trio.sleep_until(overall.ready_at(now))
                    n = min(want, overall.available(now))
                    if bucket is not None:  # both at the same moment: neither goes over
                        n = min(n, bucket.available(now))
                    if n:
                        overall.consume(now, n)
                        if bucket is not None:
                            bucket.consume(now, n)
                        return n
                # The client's tokens lapsed while it waited for the global bucket.

    async def _write(self, granted: trio.MemoryReceiveChannel[_Item], sink: Sink) -> None:
        hub = self.hub
        stall = hub.config.write_stall_threshold
        latency, lag_histogram = hub.write_latency, hub.client_lag
        async with granted:
            while True:
                try:
                    item = await granted.receive()
                except trio.EndOfChannel:
                    return
                started = trio.current_time()
                if self._owed_since == math.inf:  # a write has idle_timeout to complete
                    self._owe(started)
                self._writing, self._write_started = True, started
                if isinstance(item, _Heartbeat):
                    await sink.send_heartbeat()
                elif isinstance(item, Gap):
                    await sink.send_reset(item)
                    self._skipped(item)
                else:
                    await sink.send_events(item)
                    self._wrote(item)
                    n = len(item)
                    self.sent += n
                    hub.sent += n
                    lag_histogram.observe(self.lag, n)
                counted = not self._writing  # close() counted it already
                self._writing = False
                now = trio.current_time()
                self._last_write = now
                if isinstance(item, list):
                    for entry in item:
                        latency.observe(now - entry.published_at)
                    if hub.tracing is not None:
                        self._trace(item, now)
                if now - started >= stall and not counted:
                    self.write_stalls += 1
                    hub.note_stall(self, now - started)
                self._progress(now)

    def _wrote(self, entries: list[Entry]) -> None:
        self._advance(entries[-1].seq)

    def _skipped(self, gap: Gap) -> None:
        self._advance(gap.position)

    def _trace(self, entries: list[Entry], now: float) -> None:
        assert self.hub.tracing is not None
        self.hub.tracing.delivered(self.topic.name, self.client.id, entries, "write", now)

    def _advance(self, position: int) -> None:
        self.position = position
        record = self.record
        if position > record.sent:
            record.sent = position

    def _progress(self, now: float, *, ack: bool = False) -> None:
        """Move the idle deadline: on an ack, or a write while no ack is awaited.

        The clock runs only while something is owed: a write in progress, or, in ack
        mode, an ack for events sent. A stream with nothing to send is not idle.
        """
        window = self.window
        if ack or window is None or not window.outstanding:
            owed = self._writing or (window is not None and bool(window.outstanding))
            self._owe(now if owed else math.inf)

    def _owe(self, since: float) -> None:
        """Run the idle clock from *since* (``inf``: stop it, nothing is owed).

        With the hub's clock running, the deadline is set only for what is still owed
        at its next tick (`Hub.beat`): most writes complete at once, and setting a
        cancel scope's deadline twice per write costs more than the rest of the write.
        The tick comes well within the idle timeout, so the deadline is still exact.
        """
        self._owed_since = since
        hub, idle = self.hub, self._idle
        if hub.ticking:
            if since == math.inf:
                hub.owing.discard(self)
            else:
                hub.owing.add(self)
            if idle.deadline != math.inf:  # armed already: move it
                idle.deadline = since + hub.config.idle_timeout
        else:
            idle.deadline = since + hub.config.idle_timeout

    def arm_idle_deadline(self) -> None:
        """Set the idle deadline of what is owed (the hub's clock calls this)."""
        if self._idle.deadline == math.inf:
            self._idle.deadline = self._owed_since + self.hub.config.idle_timeout

    # -- called by the hub -------------------------------------------------------------

    def on_ack(self, position: int) -> None:
        """The client acknowledged everything up to *position*."""
        window = self.window
        if window is not None:
            window.on_ack(min(position, window.sent))
            self.poke()
        self._progress(trio.current_time(), ack=True)

    def _heartbeat_at(self) -> float:
        return self._last_write + self.hub.config.heartbeat_interval

    def _heartbeat_due(self) -> bool:
        return trio.current_time() >= self._heartbeat_at()

    def poke(self) -> None:
        """Wake the stream if it waits for an ack (the hub's heartbeat clock)."""
        self._acked.set()
        self._acked = trio.Event()

    def lag_threshold(self) -> int:
        """The head position at which this stream is too far behind (`LagWatcher`)."""
        return self.position + self.hub.config.lag_limit + 1

    def on_lag(self) -> None:
        """The head passed the lag limit: end the chain and pause the client.

        The client is paused at once, even if a write that will never complete holds
        the stream: its next stream request is refused until it has polled.
        """
        if not self._pausing:
            self._pausing = True
            self.hub.pause(self, self.last_event_id)
        # The stream is over but for the write in progress and the pause message, which
        # a peer that stopped reading may never take: free its place now.
        self.close()

    def _stop_feeding(self) -> None:
        for scope in self._feeders:
            scope.cancel()

    def statistics(self) -> ConnectionStatistics:
        """A snapshot of the stream."""
        bucket, window = self.client.bucket, self.window
        return ConnectionStatistics(
            client_id=self.client.id,
            topic=self.key,
            last_event_id=self.last_event_id,
            lag=self.lag,
            sent=self.sent,
            dropped=self.dropped,
            write_stalls=self.write_stalls,
            tokens=None if bucket is None else bucket.available(trio.current_time()),
            credits=None if window is None else window.credits,
            state=self.state,
        )
