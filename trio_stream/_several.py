"""Streams of several topics: one connection, one cursor over every topic's log.

A stream of topics ``a`` and ``b`` reads both logs and interleaves their events in the
order the hub accepted them (`Entry.order`). Its ids are composite cursors: a tag of
the topic set, then each topic's id, in the sorted order of the topics::

    <tag>~<id on a>~<id on b>

so one ``Last-Event-ID`` resumes every topic exactly. Rate limits, the ack window and
the stream count apply to the stream as a whole; its lag is the largest of its topics'.
The chain is the one of `Connection`; only the producer differs, and it frames each
event for the stream (its composite ``id:``, ``event: <topic>[/<name>]``) as it reads.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._connection import HEARTBEAT, Connection, _Item, hand_over
from ._core._errors import LocalProtocolError
from ._core._names import check_topic
from ._core._ring import Entry, Gap, Resume
from ._log import wait_any_after

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._connection import Sink
    from ._hub import _ClientTopic, _Topic
    from ._log import MemoryLog

__all__ = ["Cursor", "Delivery", "MultiConnection", "interleave", "tag_of", "topic_set"]

MAX_TOPICS_PER_STREAM: Final = 16
SEPARATOR: Final = "~"
TAG_DIGITS: Final = 8


def topic_set(topics: Iterable[str]) -> tuple[str, ...]:
    """The topics of a stream of several, checked and sorted.

    Raises:
        LocalProtocolError: None, more than 16, a repeated or an invalid topic.
    """
    names = list(topics)
    if not 1 <= len(names) <= MAX_TOPICS_PER_STREAM:
        raise LocalProtocolError(
            f"a stream takes 1 to {MAX_TOPICS_PER_STREAM} topics, got {len(names)}"
        )
    for name in names:
        check_topic(name)
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise LocalProtocolError(f"topics may not repeat: {', '.join(repeated)}")
    return tuple(sorted(names))


def tag_of(composite: str) -> str:
    """The tag of a composite id: what names its topic set.

    Raises:
        ValueError: *composite* does not have the shape of a composite id.
    """
    tag, sep, rest = composite.partition(SEPARATOR)
    if not sep or len(tag) != TAG_DIGITS or not rest:
        raise ValueError(f"malformed event id {composite[:64]!r}")
    return tag


@attrs.frozen
class Cursor:
    """Composite ids over a set of topics (see the module's docstring)."""

    topics: tuple[str, ...]
    tag: str = attrs.field(init=False)
    prefix: str = attrs.field(init=False)

    @tag.default
    def _tag(self) -> str:
        return f"{zlib.crc32(chr(10).join(self.topics).encode()):0{TAG_DIGITS}x}"

    @prefix.default
    def _prefix(self) -> str:
        return self.tag + SEPARATOR

    @property
    def key(self) -> str:
        """The topics joined by commas: what a client's pause is recorded under."""
        return ",".join(self.topics)

    def join(self, parts: Sequence[str]) -> str:
        """The composite id of each topic's id in *parts*."""
        return self.prefix + SEPARATOR.join(parts)

    def split(self, composite: str) -> list[str] | None:
        """Each topic's id in *composite*; ``None`` if it is not one of this topic set.

        Raises:
            ValueError: *composite* does not have the shape of a composite id.
        """
        tag = tag_of(composite)
        parts = composite[len(tag) + 1 :].split(SEPARATOR)
        if not all(parts):
            raise ValueError(f"malformed event id {composite[:64]!r}")
        if tag != self.tag or len(parts) != len(self.topics):
            return None
        return parts

    def resolve(self, logs: Sequence[MemoryLog], composite: str | None) -> list[Resume]:
        """Where a reader of *logs* resuming after *composite* starts, per topic.

        A composite that is malformed or of another topic set resumes each topic as an
        unknown id would (a ``reset`` per topic). Never raises.
        """
        if composite is None:
            return [log.resolve(None) for log in logs]
        try:
            parts = self.split(composite)
        except ValueError:
            parts = None
        resumes = []
        for index, log in enumerate(logs):
            resume = log.resolve("" if parts is None else parts[index])  # "": unknown
            if resume.gap is not None:
                gap = attrs.evolve(resume.gap, last_event_id=composite, topic=self.topics[index])
                resume = Resume(position=resume.position, gap=gap)
            resumes.append(resume)
        return resumes


class Delivery(Entry):
    """An event as a stream of several topics sends it: its composite id, its topic.

    Args:
        entry: The event in its topic's log.
        topic: Its topic.
        lane: The index of its topic in the stream's (sorted) topics.
        seq: Its position in the stream.
        id: Its composite id.
        wire: Its framing for the stream.
    """

    __slots__ = ("entry", "lane", "position", "topic")

    def __init__(
        self,
        entry: Entry,
        *,
        topic: str,
        lane: int,
        seq: int,
        id: str,
        wire: bytes,
    ) -> None:
        self.seq = seq
        self.id = id
        self.name = entry.name
        self.wire = wire
        self.published_at = entry.published_at
        self.order = entry.order
        self.trace_context = entry.trace_context
        self._data = None
        self._json = None
        self._tagged = None
        self.entry = entry
        """The event in its topic's log."""
        self.topic = topic
        self.position = entry.seq
        """Its position in its topic's log."""
        self.lane = lane

    @property
    def data(self) -> str:
        """The event's data (read from its topic's log entry)."""
        return self.entry.data

    @property
    def json(self) -> str:
        """The event as the WebSocket transport and the poll send it, with its topic.

        Its event and data are those of the entry's `Entry.json`, encoded once per entry.
        """
        return self.entry.json_as(self.id, self.topic)


def interleave(
    cursor: Cursor,
    logs: Sequence[MemoryLog],
    positions: list[int],
    parts: list[str],
    limit: int,
    seq: int,
) -> list[Delivery] | tuple[int, Gap]:
    """Up to *limit* events after *positions* on *logs*, in the order they were accepted.

    Moves *positions* and *parts* (each topic's id) past what it returns; numbers the
    deliveries from ``seq + 1``. When a topic's events expired under its position, it
    returns ``(index of the topic, the gap)`` instead, having moved past the gap.
    """
    merged: list[tuple[int, int, Entry]] = []
    cut = math.inf  # a topic that filled its read may hold earlier events beyond it
    for index, log in enumerate(logs):
        got = log.read_after(positions[index], limit)
        if isinstance(got, Gap):
            gap = attrs.evolve(got, last_event_id=cursor.join(parts), topic=cursor.topics[index])
            positions[index] = got.position
            parts[index] = log.cursor_id(got.position)
            return index, gap
        if got:
            if len(got) == limit:
                cut = min(cut, got[-1].order)
            merged += [(entry.order, index, entry) for entry in got]
    merged.sort(key=_first)
    deliveries: list[Delivery] = []
    topics = cursor.topics
    for order, index, entry in merged:
        if order > cut or len(deliveries) == limit:
            break
        positions[index] = entry.seq
        parts[index] = entry.id
        seq += 1
        composite = cursor.join(parts)
        deliveries.append(
            Delivery(
                entry,
                topic=topics[index],
                lane=index,
                seq=seq,
                id=composite,
                wire=b"id: " + composite.encode() + b"\n" + entry.tagged(topics[index]),
            )
        )
    return deliveries


def _first(item: tuple[int, int, Entry]) -> int:
    return item[0]


@attrs.define(eq=False)
class _Lane:
    """One topic of a stream of several: its log, the client's record, the position.

    Watches its topic's lag for the stream (a `LagWatcher`).
    """

    connection: MultiConnection
    topic: _Topic
    record: _ClientTopic
    position: int
    gap: Gap | None

    def lag_threshold(self) -> int:
        return self.position + self.connection.hub.config.lag_limit + 1

    def on_lag(self) -> None:
        self.connection.lagging = self.topic.name
        self.connection.on_lag()


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class MultiConnection(Connection):
    """One client's stream of several topics; made by `Hub.connect_many`.

    ``position`` counts the events this stream wrote (the ack window counts those);
    each topic's own position is in its lane.
    """

    cursor: Cursor = attrs.field(kw_only=True)
    lanes: list[_Lane] = attrs.field(factory=list, kw_only=True)
    lagging: str | None = attrs.field(default=None, kw_only=True)
    """The topic that made the stream pause."""
    _seq: int = attrs.field(default=0, init=False)
    """The position of the last event the producer framed."""
    _unacked: dict[str, int] = attrs.field(factory=dict, init=False)
    """In ack mode, the position of each event framed and not acknowledged yet, by id."""
    _unacked_order: deque[str] = attrs.field(factory=deque, init=False)

    def add_lanes(self, places: Iterable[tuple[_Topic, _ClientTopic, Resume]]) -> None:
        """Give the connection its topics (sorted as its cursor's), where each starts."""
        for topic, record, resume in places:
            lane = _Lane(self, topic, record, resume.position, resume.gap)
            self.lanes.append(lane)
            record.connections.add(self)

    @property
    def logs(self) -> list[MemoryLog]:
        """The topics' logs, in the cursor's order."""
        return [lane.topic.log for lane in self.lanes]

    @property
    def last_event_id(self) -> str | None:
        """The composite id of the last event written (or of where the stream started)."""
        return self.cursor.join([lane.topic.log.cursor_id(lane.position) for lane in self.lanes])

    @property
    def key(self) -> str:
        return self.cursor.key

    @property
    def lag(self) -> int:
        """The largest of its topics' lags."""
        return max(max(0, lane.topic.log.head - lane.position) for lane in self.lanes)

    def places(self) -> Iterable[tuple[_Topic, _ClientTopic]]:
        return [(lane.topic, lane.record) for lane in self.lanes]

    def _watch_lag(self) -> list[tuple[MemoryLog, object]]:
        watches = []
        for lane in self.lanes:
            watches.append((lane.topic.log, lane.topic.log.watch_lag(lane)))
            if lane.lag_threshold() <= lane.topic.log.head:
                lane.on_lag()
        return watches

    async def _send_pause(self, sink: Sink, after: str | None, retry_after: float) -> None:
        await sink.send_pause(after, retry_after, topic=self.lagging)

    async def _resolve_when_ready(self, last_event_id: str | None) -> None:
        for log in self.logs:
            await log.wait_ready()
        self.pending_resume = None
        logs = self.logs
        if last_event_id is None:
            resumes = [log.resolve_pending(None) for log in logs]
        else:
            resumes = self.cursor.resolve(logs, last_event_id)
        for lane, resume in zip(self.lanes, resumes, strict=True):
            lane.position, lane.gap = resume.position, resume.gap
            lane.record.sent = max(lane.record.sent, resume.position)
            lane.record.acked = max(lane.record.acked, resume.position)

    async def _produce(self, batches: trio.MemorySendChannel[_Item]) -> None:
        lanes, logs, limit = self.lanes, self.logs, self.hub.config.max_batch
        positions = [lane.position for lane in lanes]
        parts = [log.cursor_id(p) for log, p in zip(logs, positions, strict=True)]
        acking = self.window is not None
        try:
            with self._feeders[0]:
                async with batches:
                    for lane in lanes:
                        if lane.gap is not None:
                            self._lost(lane.gap)
                            await batches.send(lane.gap)
                    while True:
                        got = interleave(self.cursor, logs, positions, parts, limit, self._seq)
                        if isinstance(got, tuple):
                            self._lost(got[1])
                            await batches.send(got[1])
                        elif got:
                            self._seq = got[-1].seq
                            if acking:
                                for delivery in got:
                                    self._unacked[delivery.id] = delivery.seq
                                self._unacked_order.extend(d.id for d in got)
                            await hand_over(batches, list[Entry](got))
                            self._last_write = trio.current_time()  # on its way: not idle
                        elif self._heartbeat_due():
                            await hand_over(batches, HEARTBEAT)
                            self._last_write = trio.current_time()
                        else:
                            await wait_any_after(logs, positions)  # or the hub's beat
        finally:
            if self._idle.cancel_called:
                self.close()

    def _wrote(self, entries: list[Entry]) -> None:
        lanes = self.lanes
        for entry in entries:
            assert isinstance(entry, Delivery)
            lanes[entry.lane].position = entry.position
        for lane in lanes:
            if lane.position > lane.record.sent:
                lane.record.sent = lane.position
        self.position = entries[-1].seq

    def _skipped(self, gap: Gap) -> None:
        for lane in self.lanes:
            if lane.topic.name == gap.topic:
                lane.position = gap.position
                lane.record.sent = max(lane.record.sent, gap.position)

    def _trace(self, entries: list[Entry], now: float) -> None:
        tracing = self.hub.tracing
        assert tracing is not None
        for entry in entries:
            assert isinstance(entry, Delivery)
            tracing.delivered(entry.topic, self.client.id, [entry], "write", now)

    def on_ack(self, position: int) -> None:
        """An ack of one of its topics alone: it does not count for this stream."""

    def on_composite_ack(self, composite: str) -> None:
        """The client acknowledged every event of this stream up to *composite*."""
        window, unacked, order = self.window, self._unacked, self._unacked_order
        acked = unacked.get(composite)
        if window is None or acked is None:  # not one of ours, or acknowledged already
            return
        while order and unacked[order[0]] <= acked:
            del unacked[order.popleft()]
        window.on_ack(min(acked, window.sent))
        self.poke()
        self._progress(trio.current_time(), ack=True)
